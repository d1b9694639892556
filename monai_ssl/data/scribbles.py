"""Scribble annotations synthesised from dense labels, for scribble-supervised training (PCLMix, partial CE).

Per 2D slice (along the volume's slice axis) and per class present in it, background included:

1. the class mask is eroded (``erosion`` pixels, a 3x3 cross per step), so strokes keep off class borders as a
   human annotator's would; a class that erodes away falls back to its uneroded mask;
2. the eroded mask is skeletonised (``skimage.morphology.skeletonize``): one-pixel-thin centre lines;
3. the skeleton is broken into strokes: about one break every ``stroke_length`` skeleton pixels, each cutting a
   ``(2 * gap + 1)`` square out of the line at a random skeleton pixel; if the breaks would erase the class
   entirely, the unbroken skeleton is kept, so **every class present in a slice gets at least one stroke**.

Strokes are subsets of their class mask by construction. Every other pixel carries :data:`IGNORE_INDEX` (255:
above any class index, and it survives the pipeline's ``uint8`` label storage and nearest-neighbour resampling).
A scribbled datalist records it as ``"ignore_index": 255``; :func:`monai_ssl.data.pipeline.training_datasets`
reads that key and then accepts the value in the labelled cases' labels (validation and test keep dense labels).

Output is deterministic: one ``numpy`` generator per case, seeded by ``(seed, crc32(case_id))``, so a case's
scribbles do not depend on which other cases are in the datalist. Files are NIfTI on the label's own grid,
written atomically (temporary file, then rename).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from scipy import ndimage
from skimage.morphology import skeletonize

from monai_ssl.data.datalist import GROUPS, case_seed, load_datalist, write_datalist
from monai_ssl.data.geometry import slice_axis
from monai_ssl.data.validation import volume_array
from monai_ssl.fileio import save_nifti

__all__ = [
    "IGNORE_INDEX",
    "scribble_slice",
    "scribble_volume",
    "write_scribbles",
    "scribble_datalist",
]

#: label value of unannotated pixels in scribble maps
IGNORE_INDEX = 255


def _strokes(mask: np.ndarray, erosion: int, stroke_length: int, gap: int, rng: np.random.Generator) -> np.ndarray:
    """Broken skeleton of the eroded ``mask`` (2D bool); never empty for a non-empty mask."""
    eroded = ndimage.binary_erosion(mask, iterations=erosion) if erosion > 0 else mask
    if not eroded.any():
        eroded = mask
    skeleton = skeletonize(eroded)
    if not skeleton.any():  # skeletonize keeps isolated pixels, but be safe
        skeleton = eroded
    n = int(skeleton.sum())
    breaks = n // max(1, stroke_length)
    if breaks == 0:
        return skeleton
    coords = np.argwhere(skeleton)
    centres = np.zeros_like(skeleton)
    chosen = coords[rng.choice(n, size=breaks, replace=False)]
    centres[tuple(chosen.T)] = True
    cut = ndimage.binary_dilation(centres, structure=np.ones((3, 3), bool), iterations=gap) if gap > 0 else centres
    broken = skeleton & ~cut
    return broken if broken.any() else skeleton


def scribble_slice(
    label: np.ndarray,
    rng: np.random.Generator,
    erosion: int = 2,
    stroke_length: int = 24,
    gap: int = 2,
    ignore_index: int = IGNORE_INDEX,
) -> np.ndarray:
    """Scribbles ``(H, W)`` of one 2D label slice: class strokes where drawn, ``ignore_index`` elsewhere."""
    label = np.asarray(label)
    out = np.full(label.shape, ignore_index, dtype=np.uint8 if ignore_index < 256 else np.int32)
    for c in np.unique(label):
        if int(c) == ignore_index:
            continue
        out[_strokes(label == c, erosion, stroke_length, gap, rng)] = c
    return out


def scribble_volume(
    label: np.ndarray, seed: int | list[int] | np.random.Generator = 0, slice_axis: int = -1, **kwargs: Any
) -> np.ndarray:
    """Scribbles of a 3D label map, slice by slice along ``slice_axis`` (see the module docstring); ``kwargs``
    (``erosion``, ``stroke_length``, ``gap``, ``ignore_index``) go to :func:`scribble_slice`."""
    label = np.asarray(label)
    if label.ndim != 3:
        raise ValueError(f"scribble_volume expects a 3D label map, got shape {label.shape}")
    if np.issubdtype(label.dtype, np.floating):
        label = np.rint(label).astype(np.int64)
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    moved = np.moveaxis(label, slice_axis, 0)
    out = np.stack([scribble_slice(s, rng, **kwargs) for s in moved])
    return np.moveaxis(out, 0, slice_axis)


def write_scribbles(
    label_path: str | os.PathLike, out_path: str | os.PathLike, seed: int | list[int] = 0, **kwargs: Any
) -> Path:
    """Scribbles of one label NIfTI, written atomically to ``out_path`` on the same grid (``kwargs``: see
    :func:`scribble_volume`)."""
    img = nib.load(os.fspath(label_path))
    data = volume_array(img)
    scribbles = scribble_volume(data, np.random.default_rng(seed), slice_axis=slice_axis(img.affine), **kwargs)
    return save_nifti(scribbles, out_path, like=img)


def scribble_datalist(
    datalist: str | os.PathLike | Mapping[str, Any],
    out_dir: str | os.PathLike,
    seed: int = 0,
    ignore_index: int = IGNORE_INDEX,
    **kwargs: Any,
) -> Path:
    """Scribble every labelled case of ``datalist``; write ``<out_dir>/datalist.json`` pointing at them.

    Scribbles go to ``<out_dir>/scribbles/<case_id>.nii.gz``. The new datalist is the input with the labelled
    cases' ``label`` replaced, ``"ignore_index"`` set and a ``"scribbles"`` record (source datalist, seed,
    parameters); unlabelled, validation and test cases are unchanged (their dense labels stay for evaluation).
    Returns the new datalist's path.
    """
    dl = dict(datalist) if isinstance(datalist, Mapping) else load_datalist(datalist)
    out_dir = Path(out_dir).resolve()
    new = {k: v for k, v in dl.items() if k not in GROUPS}
    for group in GROUPS:
        if group not in dl:
            continue
        new[group] = [dict(c) for c in dl[group]]
        if group != "labeled":
            continue
        for case in new[group]:
            target = out_dir / "scribbles" / f"{case['case_id']}.nii.gz"
            write_scribbles(
                case["label"], target, case_seed(seed, case["case_id"]), ignore_index=ignore_index, **kwargs
            )
            case["label"] = str(target)
    new["ignore_index"] = int(ignore_index)
    new["scribbles"] = {"source": str(dl.get("datalist_path", "")), "seed": int(seed), **kwargs}
    return write_datalist(new, out_dir / "datalist.json")
