"""Volume inference: list and check inputs, preprocess, predict, invert back onto the input's own grid, save.

The preprocessing is :func:`monai_ssl.data.transforms.volume_transforms` without labels (reorient to RAS,
resample in-plane, normalise); MONAI's ``Invertd`` undoes it on the softmax probabilities, so label maps
and the optional entropy (and refinement variance) maps are written on the input's own voxel grid, with its
affine and header.
"""

from __future__ import annotations

import os
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from monai.transforms import Activationsd, AsDiscreted, Compose, Invertd, MapTransform

from monai_ssl.data.datalist import GROUPS, load_datalist
from monai_ssl.data.transforms import DEFAULT_PIXDIM, IMAGE_KEY, volume_transforms
from monai_ssl.data.validation import PROBABILITY_KEYS, InputError, check_case
from monai_ssl.fileio import save_nifti
from monai_ssl.metrics.uncertainty import entropy

__all__ = [
    "IMAGE_SUFFIXES",
    "case_id_of",
    "inference_cases",
    "inference_preprocessing",
    "inference_postprocessing",
    "EntropyMapd",
    "MixPriord",
    "SplitLastChanneld",
    "SaveVolumed",
]

IMAGE_SUFFIXES = (".nii.gz", ".nii", ".mha", ".mhd", ".nrrd")
PRED_KEY = "pred"
ENTROPY_KEY = "entropy"
VARIANCE_KEY = "variance"


def case_id_of(path: str | os.PathLike) -> str:
    """File name without its image suffix (``a/b/case_07.nii.gz`` -> ``case_07``)."""
    name = Path(path).name
    for suffix in IMAGE_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return Path(name).stem


def inference_cases(
    source: str | os.PathLike, groups: Sequence[str] = ("test",), with_labels: bool = False
) -> list[dict[str, Any]]:
    """Cases to predict from a folder of volumes, a single volume or a datalist JSON (its ``groups``).

    Every file is checked up front (exists, readable, 3D, label on the image grid) and all problems are raised
    together as :class:`InputError`. ``with_labels`` keeps each case's label path as ``label_path`` (read only by
    the evaluation report, never by the network pipeline).
    """
    source = Path(source)
    if not source.exists():
        raise InputError(f"{source}: input not found")
    if source.is_dir():
        files = sorted(p for p in source.iterdir() if p.name.endswith(IMAGE_SUFFIXES))
        if not files:
            raise InputError(f"{source}: no image files ({', '.join(IMAGE_SUFFIXES)}) in this folder")
        cases = [{"case_id": case_id_of(p), "image": str(p)} for p in files]
    elif source.suffix == ".json":
        dl = load_datalist(source)
        unknown = [g for g in groups if g not in GROUPS]
        if unknown:
            raise InputError(f"{source}: unknown group(s) {unknown}")
        cases = [dict(c) for g in groups for c in dl.get(g, [])]
        if not cases:
            raise InputError(f"{source}: no cases in group(s) {list(groups)}")
    else:
        cases = [{"case_id": case_id_of(source), "image": str(source)}]
    ids = [c["case_id"] for c in cases]
    if len(set(ids)) != len(ids):
        raise InputError(f"{source}: duplicate case ids {sorted({i for i in ids if ids.count(i) > 1})}")
    problems = []
    for case in cases:
        if with_labels and not case.get("label"):
            problems.append(f"{case['image']}: no label to evaluate against")
        checked = {k: case[k] for k in ("image", "label") if (k == "image" or with_labels) and case.get(k)}
        problems += check_case(checked)  # data read in full: a truncated or NaN volume fails here, by name
    if problems:
        raise InputError(problems)
    out = []
    for case in cases:
        item = {"case_id": case["case_id"], IMAGE_KEY: case["image"]}
        if with_labels:
            item["label_path"] = case["label"]
        out.append(item)
    return out


def inference_preprocessing(modality: str = "MR", pixdim: Sequence[float] = DEFAULT_PIXDIM, **kwargs: Any) -> Compose:
    """The training volume pipeline for images only (invertible by ``Invertd``); ``kwargs`` go to
    :func:`~monai_ssl.data.transforms.volume_transforms` (``ct_window``, ``mr_percentiles``, ``reader``)."""
    return volume_transforms(modality=modality, pixdim=pixdim, label_keys=(), **kwargs)


class EntropyMapd(MapTransform):
    """Per-voxel entropy (nats) of class probabilities ``(C, ...)``, stored under ``output_key`` as ``(1, ...)``.

    Applied to the softmax of the averaged students' logits, it is the uncertainty map of the ensemble;
    its maximum is ``log(C)``.
    """

    def __init__(self, keys: str = PRED_KEY, output_key: str = ENTROPY_KEY, eps: float = 1e-8):
        super().__init__(keys)
        self.output_key, self.eps = output_key, eps

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[self.output_key] = entropy(d[key], dim=0, eps=self.eps)
        return d


class MixPriord(MapTransform):
    """``(1 - w) * probabilities + w * prior``: the model's class probabilities mixed with the registration prior
    of the same case (its atlases' fused labels, preprocessed onto the same grid), before the argmax.

    ``weight`` is a number, or a module with a ``prior_weight`` buffer (a
    :class:`~monai_ssl.networks.ensemble.StudentEnsemble`), read at every call, so the value validation chose
    and the checkpoint loaded is the one used. With weight 0 nothing is read and no prior is needed.
    """

    def __init__(self, keys: str = PRED_KEY, weight: float | Any = 0.0, prior_key: str = PROBABILITY_KEYS[0]):
        super().__init__(keys)
        self.weight, self.prior_key = weight, prior_key

    def current_weight(self) -> float:
        return float(getattr(self.weight, "prior_weight", self.weight))

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        w = self.current_weight()
        if w == 0.0:
            return d
        where = str(d[IMAGE_KEY].meta.get("filename_or_obj", "")) if IMAGE_KEY in d else str(d.get("case_id", ""))
        if self.prior_key not in d:
            raise InputError(
                f"{where}: the model mixes in {w:g} of the registration prior and this case has none: register it "
                "(`python -m registration precompute` and `select`, with the case in the datalist's test group) and "
                "pass --registration_dir, or set --prior_weight 0 to use the network alone"
            )
        prior = d[self.prior_key]
        for key in self.key_iterator(d):
            if tuple(prior.shape) != tuple(d[key].shape):
                raise InputError(
                    f"{where}: registration prior has shape {tuple(prior.shape)}, the prediction "
                    f"{tuple(d[key].shape)} (classes first): a prior of another label set or grid"
                )
            d[key] = d[key] * (1.0 - w) + prior.to(d[key].device, d[key].dtype) * w
        return d


class SplitLastChanneld(MapTransform):
    """Move the last channel of ``keys`` to ``output_key`` (e.g. the refinement variance a
    :class:`~monai_ssl.networks.ensemble.StudentEnsemble` with ``refine_variance`` appends to its logits)."""

    def __init__(self, keys: str = PRED_KEY, output_key: str = VARIANCE_KEY):
        super().__init__(keys)
        self.output_key = output_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[self.output_key], d[key] = d[key][-1:], d[key][:-1]
        return d


class SaveVolumed(MapTransform):
    """Write channel-first volumes as NIfTI on the input's grid, atomically, as ``<case_id><suffix>``.

    For a NIfTI input the input's own header is reused (affine, qform/sform codes, units); the volume's affine
    after ``Invertd`` must agree with it, otherwise the write is refused rather than misplaced.
    """

    def __init__(
        self,
        keys: Sequence[str],
        output_dir: str | os.PathLike,
        suffixes: Mapping[str, str] | None = None,
        dtypes: Mapping[str, Any] | None = None,
        image_key: str = IMAGE_KEY,
    ):
        super().__init__(keys, allow_missing_keys=True)
        self.output_dir = Path(output_dir)
        self.suffixes = {PRED_KEY: "_seg.nii.gz", ENTROPY_KEY: "_entropy.nii.gz", **(suffixes or {})}
        self.dtypes = {PRED_KEY: np.uint8, ENTROPY_KEY: np.float32, **(dtypes or {})}
        self.image_key = image_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        source = str(d[self.image_key].meta.get("filename_or_obj", ""))
        case_id = d.get("case_id") or case_id_of(source)
        for key in self.key_iterator(d):
            vol = d[key]
            array = np.asarray(vol.detach().cpu())[0].astype(self.dtypes.get(key, np.float32))
            affine = np.asarray(vol.affine, dtype=np.float64)
            like = None
            if source.endswith((".nii", ".nii.gz")):
                ref = nib.load(source)
                if ref.shape[:3] != array.shape or not np.allclose(ref.affine, affine, atol=1e-3):
                    raise RuntimeError(
                        f"{source}: inverted {key} has shape {array.shape} and affine\n{affine}\n"
                        f"but the input has {ref.shape} and\n{ref.affine}; not writing a misplaced volume"
                    )
                like = ref  # the input's own header: its grid, exactly
            out = self.output_dir / f"{case_id}{self.suffixes.get(key, f'_{key}.nii.gz')}"
            save_nifti(array, out, affine=affine, like=like)
            d[f"{key}_path"] = str(out)
        return d


def inference_postprocessing(
    preprocessing: Compose,
    output_dir: str | os.PathLike | None = None,
    uncertainty: bool = False,
    variance: bool = False,
    prior_weight: float | Any = 0.0,
) -> Compose:
    """Softmax -> (registration prior, :class:`MixPriord`) -> invert the preprocessing on the probabilities ->
    (entropy) -> argmax -> (save).

    Probabilities are resampled back (bilinear), then the argmax taken on the input's grid, which is more
    accurate than resampling a label map. ``variance``: the network's last channel is the diffusion refinement's
    per-pixel variance (``StudentEnsemble(refine_variance=True)``); it is split off before the softmax, inverted
    the same way and saved as ``<case>_variance.nii.gz``.
    """
    inverted = [PRED_KEY, VARIANCE_KEY] if variance else [PRED_KEY]
    steps: list = [SplitLastChanneld(PRED_KEY, VARIANCE_KEY)] if variance else []
    steps += [
        Activationsd(PRED_KEY, softmax=True),
        MixPriord(PRED_KEY, prior_weight),
        Invertd(inverted, transform=preprocessing, orig_keys=IMAGE_KEY, nearest_interp=False, to_tensor=True),
    ]
    if uncertainty:
        steps.append(EntropyMapd(PRED_KEY, ENTROPY_KEY))
    steps.append(AsDiscreted(PRED_KEY, argmax=True))
    if output_dir is not None:
        saved = [PRED_KEY] + ([ENTROPY_KEY] if uncertainty else []) + ([VARIANCE_KEY] if variance else [])
        steps.append(SaveVolumed(saved, output_dir))
    return Compose(steps)
