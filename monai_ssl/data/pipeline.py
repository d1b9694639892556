"""Datasets for training and evaluation, assembled from a datalist (the entry points bundles call).

``training_datasets`` gives the labelled and unlabelled sample datasets: 2D (2.5D) augmented slices for
``spatial_dims=2``, random 3D patches for ``spatial_dims=3``. Unlabelled cases never carry their ``label``;
they carry ``reg_label`` (the registered label) when registered labels are given, and ``reg_prob`` (the fused
class probabilities, soft RSL targets) when registered probabilities are given. With ``transductive_priors`` the
validation and test images join the unlabelled cases, their registration priors standing in for registered labels.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

from monai.transforms import Compose

from monai_ssl.data.datalist import group_cases, load_datalist, num_classes
from monai_ssl.data.slices import ForegroundSampler, PatchDataset, SliceDataset, VolumeDataset
from monai_ssl.data.transforms import (
    DEFAULT_FLIP_AXES,
    DEFAULT_PIXDIM,
    IMAGE_KEY,
    LabelFromProbabilitiesd,
    PixelToWorldd,
    intensity_augmentations,
    slice_augmentations,
    spatial_crop_and_flips,
    volume_transforms,
)
from monai_ssl.data.validation import LABEL_KEYS, PROBABILITY_KEYS, InputError
from registration.layout import Layout

__all__ = [
    "training_datasets",
    "transductive_cases",
    "evaluation_dataset",
    "attach_registered_labels",
    "attach_priors",
    "registration_priors",
    "patch_augmentations",
    "registered_labels",
    "registered_probabilities",
]


def _datalist(datalist: str | os.PathLike | Mapping[str, Any]) -> Mapping[str, Any]:
    return datalist if isinstance(datalist, Mapping) else load_datalist(datalist)


def attach_registered_labels(
    cases: Sequence[dict[str, Any]],
    registered_labels: Mapping[str, str] | None,
    key: str = "reg_label",
    what: str | None = None,
) -> list[dict[str, Any]]:
    """Add ``key`` paths (case_id -> NIfTI on that case's grid: registered labels, or with ``key="reg_prob"``
    their class probabilities, or the registration priors of evaluation cases) to ``cases``.

    Every case must have one when a mapping is given, so a stale or partial registration output fails here,
    naming the missing cases, rather than silently training without registration supervision.
    """
    if registered_labels is None:
        return list(cases)
    missing = [c["case_id"] for c in cases if c["case_id"] not in registered_labels]
    if missing:
        what = what or ("registered label" if key == "reg_label" else "registered class probabilities")
        raise InputError(f"case(s) {', '.join(missing)}: no {what}")
    return [dict(c, **{key: str(registered_labels[c["case_id"]])}) for c in cases]


def registered_labels(
    registration_dir: str | os.PathLike, kind: str = "affine", what: str = "registered_label"
) -> dict[str, str]:
    """case_id -> registered label path (``what="registered_probabilities"``: fused class probabilities), read
    from the registration job's selection ``<dir>/<kind>/brs.json`` by :class:`registration.layout.Layout`."""
    layout = Layout(registration_dir, kind)
    out = {cid: str(p) for cid, p in layout.selected(what).items()}
    if what == "registered_probabilities":
        cases = layout.read_selection().get("cases", {})
        brs = sorted(cid for cid, c in cases.items() if c.get("choice") and cid not in out)
        if brs:
            raise InputError(
                f"{layout.selection_path}: no class probabilities for {', '.join(brs)}: their labels come from one "
                "atlas (brs); soft RSL targets need label fusion, i.e. two or more labelled cases and "
                "`select --strategy auto|fusion`"
            )
    return out


def registration_priors(registration_dir: str | os.PathLike, kind: str = "affine") -> dict[str, str]:
    """case_id -> registration prior (4D class probabilities) of every validation and test case ``select`` wrote."""
    return {cid: str(p) for cid, p in Layout(registration_dir, kind).selected("prior").items()}


def attach_priors(cases: Sequence[dict[str, Any]], priors: Mapping[str, str] | None) -> list[dict[str, Any]]:
    """Add each case's registration prior (``reg_prob``, :class:`~monai_ssl.inference.volume.MixPriord`); every
    case must have one when ``priors`` is given (None: no prior, the cases unchanged)."""
    hint = (
        "registration prior (register them: `python -m registration precompute` without --no-eval, then `select`;"
        " or go without it: --registration_prior false in training and evaluation, no --registration_dir in inference)"
    )
    return attach_registered_labels(cases, priors, PROBABILITY_KEYS[0], hint)


def transductive_cases(
    datalist: str | os.PathLike | Mapping[str, Any],
    priors: Mapping[str, str] | None,
    groups: Sequence[str] = ("validation", "test"),
) -> list[dict[str, Any]]:
    """The images of the evaluation ``groups`` as unlabelled training cases: their labels dropped, their
    registration priors attached (``reg_prob``; None: images only, for methods without registered labels).

    Transductive training: the user's case of labelling one volume of a folder and segmenting the rest, where the
    network sees the contrast of the very volumes it must segment. No evaluation label is read.
    """
    dl = _datalist(datalist)
    cases = [{k: v for k, v in c.items() if k != "label"} for g in groups for c in group_cases(dl, g)]
    return attach_priors(cases, priors)


def registered_probabilities(registration_dir: str | os.PathLike, kind: str = "affine") -> dict[str, str]:
    """case_id -> fused class-probability map (4D NIfTI) of every unlabelled case, for soft RSL targets."""
    return registered_labels(registration_dir, kind, "registered_probabilities")


def patch_augmentations(
    patch_size: Sequence[int],
    label_keys: Sequence[str] = LABEL_KEYS,
    flip_prob: float = 0.5,
    flip_axes: Sequence[int] = DEFAULT_FLIP_AXES,
    intensity_prob: float = 0.0,
):
    """3D patches (random or class-centred) with flips of ``flip_axes`` and, with ``intensity_prob``, random
    contrast (:func:`~monai_ssl.data.transforms.intensity_augmentations`); the patch's MetaTensor affine becomes
    ``pixel_to_world``."""
    keys = (IMAGE_KEY, *label_keys, *PROBABILITY_KEYS)
    spatial = spatial_crop_and_flips(patch_size, keys, flip_axes, flip_prob)
    return [*spatial, *intensity_augmentations(intensity_prob), PixelToWorldd(label_keys)]


def training_datasets(
    datalist: str | os.PathLike | Mapping[str, Any],
    patch_size: Sequence[int],
    spatial_dims: int = 2,
    pixdim: Sequence[float] = DEFAULT_PIXDIM,
    context: int = 1,
    registered_labels: Mapping[str, str] | None = None,
    registered_probabilities: Mapping[str, str] | None = None,
    augment: Mapping[str, Any] | None = None,
    cache_num_workers: int = 0,
    ignore_index: int | None = None,
    foreground_fraction: float = 0.33,
    unlabeled_foreground_fraction: float = 0.0,
    flip_axes: Sequence[int] = DEFAULT_FLIP_AXES,
    intensity_prob: float = 0.0,
    seed: int = 0,
    transductive_priors: Mapping[str, str] | None = None,
) -> tuple[SliceDataset | PatchDataset, SliceDataset | PatchDataset]:
    """Labelled and unlabelled training samples of a datalist.

    Args:
        datalist: datalist path or loaded dict.
        patch_size: 2D slice patch ``(H, W)`` or 3D patch ``(H, W, D)``.
        spatial_dims: 2 for (2.5D) slices, 3 for 3D patches.
        pixdim: target spacing; non-positive entries keep the original (default: keep the slice spacing).
        context: neighbouring slices stacked as channels (2D only, odd).
        registered_labels: case_id -> registered label path for the unlabelled cases (CCT-R's RSL).
        registered_probabilities: case_id -> fused class probabilities (``reg_prob``, soft RSL targets).
        augment: further keyword arguments of :func:`~monai_ssl.data.transforms.slice_augmentations` (2D).
        cache_num_workers: threads used to fill the volume cache.
        ignore_index: label value of unannotated pixels that labelled cases may carry (scribbles); default the
            datalist's ``"ignore_index"`` (set by :func:`monai_ssl.data.scribbles.scribble_datalist`), else none.
        foreground_fraction: share of labelled draws centred on a voxel of a foreground class chosen uniformly
            among the classes present (:class:`~monai_ssl.data.slices.ForegroundSampler`; nnU-Net's 0.33).
        unlabeled_foreground_fraction: the same for unlabelled cases, on their registered labels (0: off).
        flip_axes: the axes flipped at random (after RAS reorientation: 0 left-right, 1 back-front, 2 down-up);
            only axes across which the anatomy is mirror-symmetric, so none by default.
        intensity_prob: probability of each random-contrast transform on every sample, labelled and unlabelled
            (:func:`~monai_ssl.data.transforms.intensity_augmentations`; 0: off).
        seed: seed of the class-balanced voxel lists.
        transductive_priors: case_id -> registration prior of every validation and test case: their images join
            the unlabelled cases (:func:`transductive_cases`), the prior's argmax as registered label (its
            probabilities kept as ``reg_prob`` when ``registered_probabilities`` is given). None: inductive.
    """
    dl = _datalist(datalist)
    if ignore_index is None:
        ignore_index = dl.get("ignore_index")
    if len(patch_size) != spatial_dims:
        raise ValueError(f"patch_size {tuple(patch_size)} does not have spatial_dims={spatial_dims} entries")
    modality, n_classes = dl.get("modality", "MR"), num_classes(dl)
    slices = spatial_dims == 2  # 2D students: the low-resolution axis must be S-I (monai_ssl.data.geometry)
    vol_tf = volume_transforms(modality=modality, pixdim=pixdim, num_classes=n_classes, slices=slices)
    lab_tf = (
        vol_tf
        if ignore_index is None
        else volume_transforms(modality, pixdim, n_classes, ignore_index=ignore_index, slices=slices)
    )
    labeled_cases = group_cases(dl, "labeled")
    unlabeled_cases = attach_registered_labels(group_cases(dl, "unlabeled"), registered_labels)
    unlabeled_cases = attach_registered_labels(unlabeled_cases, registered_probabilities, PROBABILITY_KEYS[0])
    if transductive_priors is not None:
        unlabeled_cases += transductive_cases(dl, transductive_priors if registered_labels is not None else None)
    unl_tf = Compose([vol_tf, LabelFromProbabilitiesd(keep=registered_probabilities is not None)])
    if not labeled_cases:
        raise InputError(f"{dl.get('datalist_path', 'datalist')}: no labelled case to train on")
    if spatial_dims not in (2, 3):
        raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
    if spatial_dims == 3 and context != 1:
        raise ValueError("context slices are a 2D option; use context=1 with spatial_dims=3")
    out = []
    groups = ((labeled_cases, lab_tf, foreground_fraction, "label"),
              (unlabeled_cases, unl_tf, unlabeled_foreground_fraction, "reg_label"))  # fmt: skip
    for cases, preprocess, fraction, key in groups:
        volumes = VolumeDataset(cases, preprocess, num_workers=cache_num_workers, progress=False) if cases else []
        sampler = ForegroundSampler(volumes, fraction, key, n_classes, seed=seed) if fraction > 0 else None
        if spatial_dims == 2:
            aug = dict(augment or {})
            aug.setdefault("flip_axes", flip_axes)
            aug.setdefault("intensity_prob", intensity_prob)
            tf = slice_augmentations(patch_size, **aug) + [PixelToWorldd()]
            out.append(SliceDataset(volumes, tf, context=context, foreground=sampler))
        else:
            out.append(
                PatchDataset(
                    volumes,
                    patch_augmentations(patch_size, flip_axes=flip_axes, intensity_prob=intensity_prob),
                    sampler,
                )
            )
    return out[0], out[1]


def evaluation_dataset(
    datalist: str | os.PathLike | Mapping[str, Any],
    group: str = "validation",
    pixdim: Sequence[float] = DEFAULT_PIXDIM,
    cache_num_workers: int = 0,
    spatial_dims: int = 2,
    priors: Mapping[str, str] | None = None,
) -> VolumeDataset:
    """Preprocessed whole volumes (image and label, and with ``priors`` the registration prior) of an evaluation
    group, for validation during training."""
    dl = _datalist(datalist)
    modality, n_classes = dl.get("modality", "MR"), num_classes(dl)
    vol_tf = volume_transforms(modality=modality, pixdim=pixdim, num_classes=n_classes, slices=spatial_dims == 2)
    cases = attach_priors(group_cases(dl, group), priors)
    return VolumeDataset(cases, vol_tf, num_workers=cache_num_workers, progress=False)
