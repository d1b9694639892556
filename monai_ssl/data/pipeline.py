"""Datasets for training and evaluation, assembled from a datalist (the entry points bundles call).

``training_datasets`` gives the labelled and unlabelled sample datasets: 2D (2.5D) augmented slices for
``spatial_dims=2``, random 3D patches for ``spatial_dims=3``. Unlabelled cases never carry their ``label``;
they carry ``reg_label`` (the registered label) when registered labels are given.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from monai.data import Dataset
from monai.transforms import Compose, RandFlipd, RandSpatialCropd, SpatialPadd

from monai_ssl.data.datalist import group_cases, load_datalist, num_classes
from monai_ssl.data.slices import SliceDataset, VolumeDataset
from monai_ssl.data.transforms import IMAGE_KEY, PixelToWorldd, slice_augmentations, volume_transforms
from monai_ssl.data.validation import LABEL_KEYS, InputError

__all__ = [
    "training_datasets",
    "evaluation_dataset",
    "attach_registered_labels",
    "patch_augmentations",
    "registered_labels",
]


def _datalist(datalist: str | os.PathLike | Mapping[str, Any]) -> Mapping[str, Any]:
    return datalist if isinstance(datalist, Mapping) else load_datalist(datalist)


def attach_registered_labels(
    cases: Sequence[dict[str, Any]], registered_labels: Mapping[str, str] | None
) -> list[dict[str, Any]]:
    """Add ``reg_label`` paths (case_id -> NIfTI on that case's grid) to unlabelled cases.

    Every case must have one when a mapping is given, so a stale or partial registration output fails here,
    naming the missing cases, rather than silently training without registration supervision.
    """
    if registered_labels is None:
        return list(cases)
    missing = [c["case_id"] for c in cases if c["case_id"] not in registered_labels]
    if missing:
        raise InputError(f"no registered label for unlabelled case(s) {', '.join(missing)}")
    return [dict(c, reg_label=str(registered_labels[c["case_id"]])) for c in cases]


def registered_labels(registration_dir: str | os.PathLike, kind: str = "affine") -> dict[str, str]:
    """case_id -> registered label path, read from the registration job's ``<dir>/<kind>/brs.json``.

    Read as plain JSON (no ITK import): it is what ``python -m registration select`` wrote.
    """
    root = Path(registration_dir) / kind
    path = root / "brs.json"
    if not path.exists():
        raise InputError(
            f"{path}: no best-registration selection; run `python -m registration precompute` and "
            "`python -m registration select` first"
        )
    cases = json.loads(path.read_text()).get("cases", {})
    out = {cid: str(root / c["registered_label"]) for cid, c in cases.items() if c.get("registered_label")}
    missing = [str(p) for p in out.values() if not Path(p).exists()]
    if missing:
        raise InputError([f"{p}: registered label listed in {path} is missing" for p in missing])
    return out


def patch_augmentations(patch_size: Sequence[int], label_keys: Sequence[str] = LABEL_KEYS, flip_prob: float = 0.5):
    """Random 3D patches with in-plane flips; the patch's MetaTensor affine becomes ``pixel_to_world``."""
    keys = (IMAGE_KEY, *label_keys)
    return [
        SpatialPadd(keys, spatial_size=patch_size, allow_missing_keys=True),
        RandSpatialCropd(keys, roi_size=patch_size, random_size=False, allow_missing_keys=True),
        *[RandFlipd(keys, prob=flip_prob, spatial_axis=a, allow_missing_keys=True) for a in (0, 1)],
        PixelToWorldd(label_keys),
    ]


def training_datasets(
    datalist: str | os.PathLike | Mapping[str, Any],
    patch_size: Sequence[int],
    spatial_dims: int = 2,
    pixdim: Sequence[float] = (1.75, 1.75, -1.0),
    context: int = 1,
    registered_labels: Mapping[str, str] | None = None,
    augment: Mapping[str, Any] | None = None,
    cache_num_workers: int = 0,
    ignore_index: int | None = None,
) -> tuple[Dataset, Dataset]:
    """Labelled and unlabelled training samples of a datalist.

    Args:
        datalist: datalist path or loaded dict.
        patch_size: 2D slice patch ``(H, W)`` or 3D patch ``(H, W, D)``.
        spatial_dims: 2 for (2.5D) slices, 3 for 3D patches.
        pixdim: target spacing; non-positive entries keep the original (default: keep the slice spacing).
        context: neighbouring slices stacked as channels (2D only, odd).
        registered_labels: case_id -> registered label path for the unlabelled cases (CCT-R's RSL).
        augment: keyword arguments of :func:`~monai_ssl.data.transforms.slice_augmentations` (2D).
        cache_num_workers: threads used to fill the volume cache.
        ignore_index: label value of unannotated pixels that labelled cases may carry (scribbles); default the
            datalist's ``"ignore_index"`` (set by :func:`monai_ssl.data.scribbles.scribble_datalist`), else none.
    """
    dl = _datalist(datalist)
    if ignore_index is None:
        ignore_index = dl.get("ignore_index")
    if len(patch_size) != spatial_dims:
        raise ValueError(f"patch_size {tuple(patch_size)} does not have spatial_dims={spatial_dims} entries")
    modality, n_classes = dl.get("modality", "MR"), num_classes(dl)
    vol_tf = volume_transforms(modality=modality, pixdim=pixdim, num_classes=n_classes)
    lab_tf = (
        vol_tf if ignore_index is None else volume_transforms(modality, pixdim, n_classes, ignore_index=ignore_index)
    )
    labeled_cases = group_cases(dl, "labeled")
    unlabeled_cases = attach_registered_labels(group_cases(dl, "unlabeled"), registered_labels)
    if not labeled_cases:
        raise InputError(f"{dl.get('datalist_path', 'datalist')}: no labelled case to train on")
    out = []
    for cases, preprocess in ((labeled_cases, lab_tf), (unlabeled_cases, vol_tf)):
        volumes = VolumeDataset(cases, preprocess, num_workers=cache_num_workers, progress=False) if cases else []
        if spatial_dims == 2:
            tf = slice_augmentations(patch_size, **dict(augment or {})) + [PixelToWorldd()]
            out.append(SliceDataset(volumes, tf, context=context))
        elif spatial_dims == 3:
            if context != 1:
                raise ValueError("context slices are a 2D option; use context=1 with spatial_dims=3")
            out.append(Dataset(volumes, Compose(patch_augmentations(patch_size))))
        else:
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
    return out[0], out[1]


def evaluation_dataset(
    datalist: str | os.PathLike | Mapping[str, Any],
    group: str = "validation",
    pixdim: Sequence[float] = (1.75, 1.75, -1.0),
    cache_num_workers: int = 0,
) -> VolumeDataset:
    """Preprocessed whole volumes (image and label) of an evaluation group, for validation during training."""
    dl = _datalist(datalist)
    vol_tf = volume_transforms(modality=dl.get("modality", "MR"), pixdim=pixdim, num_classes=num_classes(dl))
    return VolumeDataset(group_cases(dl, group), vol_tf, num_workers=cache_num_workers, progress=False)
