"""Synthetic label noise for measuring noise-robust training (issue #8): noisy copies of labelled volumes.

:func:`noisy_label` perturbs one label map, deterministically for ``(seed, case_id)``:

1. **Per-class erosion / dilation.** Every foreground class, in a random order, is eroded (probability
   ``erode_prob``), dilated (``dilate_prob``) or kept, by a random radius ``1..max_radius`` voxels (scipy
   ``binary_erosion`` / ``binary_dilation`` with an in-plane cross, so thick slices are not bled through).
   Each class is changed relative to the *clean* map: dilated voxels take the class, eroded voxels take the
   nearest other clean class (``distance_transform_edt``).
2. **Boundary jitter.** Each voxel on a boundary of the result (a 4-neighbour in-plane has another label)
   takes, with probability ``jitter_prob``, the label of a random in-plane neighbour (offsets in ``{-1, 0, 1}``).
3. **Classes kept.** A class present in the clean map but gone from the noisy one gets its clean voxels back.

Every changed voxel therefore lies within ``max_radius + 1`` in-plane voxels of a clean boundary. The slice axis
is the project's one rule (:func:`monai_ssl.data.geometry.slice_axis`: the low-resolution axis, else axial).
:func:`write_noisy_datalist` writes noisy copies of a datalist's *labelled* cases (validation and test keep their
clean labels, so test Dice is measured against clean labels) and a datalist pointing at them.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from scipy import ndimage

from monai_ssl.data.datalist import case_seed, load_datalist, write_datalist
from monai_ssl.data.geometry import slice_axis
from monai_ssl.data.validation import volume_array
from monai_ssl.fileio import save_nifti

__all__ = ["noisy_label", "boundary_mask", "write_noisy_datalist", "NOISE_DEFAULTS"]

#: default noise parameters (also recorded in the noisy datalist)
NOISE_DEFAULTS: dict[str, float] = {"erode_prob": 0.35, "dilate_prob": 0.35, "max_radius": 2, "jitter_prob": 0.3}


def _in_plane_structure(slice_axis: int, ndim: int = 3) -> np.ndarray:
    """A 3D cross of the 4 in-plane neighbours (connectivity 1), flat along ``slice_axis``."""
    structure = ndimage.generate_binary_structure(ndim, 1)
    index = [slice(None)] * ndim
    for end in (0, 2):
        index[slice_axis] = end
        structure[tuple(index)] = False
    return structure


def boundary_mask(label: np.ndarray, slice_axis: int = -1) -> np.ndarray:
    """Voxels with an in-plane 4-neighbour of another label (edges of the array excluded)."""
    axis = slice_axis % label.ndim
    out = np.zeros(label.shape, dtype=bool)
    for a in range(label.ndim):
        if a == axis:
            continue
        differ = np.diff(label, axis=a) != 0
        lo = [slice(None)] * label.ndim
        hi = [slice(None)] * label.ndim
        lo[a], hi[a] = slice(0, -1), slice(1, None)
        out[tuple(lo)] |= differ
        out[tuple(hi)] |= differ
    return out


def _nearest_other(label: np.ndarray, cls: int, sampling: tuple[float, ...]) -> np.ndarray:
    """For every voxel, the label of the nearest voxel of another class than ``cls`` (in-plane distances)."""
    _, index = ndimage.distance_transform_edt(label == cls, sampling=sampling, return_indices=True)
    return label[tuple(index)]


def noisy_label(
    label: np.ndarray,
    seed: int = 0,
    case_id: str = "",
    slice_axis: int = -1,
    erode_prob: float = NOISE_DEFAULTS["erode_prob"],
    dilate_prob: float = NOISE_DEFAULTS["dilate_prob"],
    max_radius: int = int(NOISE_DEFAULTS["max_radius"]),
    jitter_prob: float = NOISE_DEFAULTS["jitter_prob"],
) -> np.ndarray:
    """A noisy copy of a 3D integer label map, deterministic for ``(seed, case_id)`` (module docstring)."""
    if label.ndim != 3:
        raise ValueError(f"noisy_label expects a 3D label map, got shape {label.shape}")
    if erode_prob < 0 or dilate_prob < 0 or erode_prob + dilate_prob > 1 or not 0 <= jitter_prob <= 1:
        raise ValueError(
            f"noisy_label: bad probabilities erode={erode_prob}, dilate={dilate_prob}, jitter={jitter_prob}"
        )
    if max_radius < 1:
        raise ValueError(f"noisy_label: max_radius must be >= 1, got {max_radius}")
    rng = np.random.default_rng(case_seed(seed, case_id))
    axis = slice_axis % 3
    structure = _in_plane_structure(axis)
    sampling = tuple(1e6 if a == axis else 1.0 for a in range(3))  # nearest class searched within the slice
    clean = np.asarray(label)
    out = clean.copy()
    classes = [int(c) for c in np.unique(clean) if c != 0]
    for cls in rng.permutation(classes) if classes else []:
        op, radius = rng.random(), int(rng.integers(1, max_radius + 1))
        mask = clean == cls
        if op < erode_prob:
            eroded = ndimage.binary_erosion(mask, structure, iterations=radius, border_value=1)
            removed = mask & ~eroded
            out[removed] = _nearest_other(clean, int(cls), sampling)[removed]
        elif op < erode_prob + dilate_prob:
            out[ndimage.binary_dilation(mask, structure, iterations=radius) & ~mask] = cls
    if jitter_prob > 0:
        edge = boundary_mask(out, axis) & (rng.random(out.shape) < jitter_prob)
        where = np.nonzero(edge)
        shifted = []
        for a, idx in enumerate(where):
            step = np.zeros(len(idx), dtype=np.int64) if a == axis else rng.integers(-1, 2, len(idx))
            shifted.append(np.clip(idx + step, 0, out.shape[a] - 1))
        out[where] = out[tuple(shifted)]
    for cls in classes:
        if not (out == cls).any():
            out[clean == cls] = cls
    return out.astype(clean.dtype, copy=False)


def write_noisy_datalist(
    datalist: str | os.PathLike | Mapping[str, Any],
    out_dir: str | os.PathLike,
    seed: int = 0,
    **noise: Any,
) -> Path:
    """Write noisy labels of every labelled case to ``out_dir/labels/<case_id>_noisy_s<seed>.nii.gz`` and
    ``out_dir/datalist.json`` (images and the other groups unchanged); return the datalist's path.

    Each label keeps its file's affine and header; the noise parameters (:data:`NOISE_DEFAULTS` updated with
    ``noise``) and the seed are recorded under ``label_noise`` in the datalist. Files are written atomically.
    """
    dl = dict(datalist) if isinstance(datalist, Mapping) else load_datalist(datalist)
    params = {**NOISE_DEFAULTS, **noise}
    out_dir = Path(out_dir)
    labeled = []
    for case in dl.get("labeled", []):
        img = nib.load(case["label"])
        data = volume_array(img)
        noisy = noisy_label(data, seed, case["case_id"], slice_axis(img.affine), **params)
        path = out_dir / "labels" / f"{case['case_id']}_noisy_s{seed}.nii.gz"
        save_nifti(noisy, path, like=img)
        labeled.append(dict(case, label=str(path.resolve())))
    out = {k: v for k, v in dl.items() if k != "datalist_path"}
    out["labeled"] = labeled
    out["name"] = f"{dl.get('name', 'dataset')}_noisy_s{seed}"
    out["label_noise"] = {"seed": int(seed), **params}
    return write_datalist(out, out_dir / "datalist.json")
