"""Input checks that name the file and the problem: missing or corrupt files, wrong dimensionality,
non-finite intensities, labels outside the declared classes, and image/label geometry mismatches.

The array-level checks are shared by :class:`monai_ssl.data.transforms.CheckVolumed` (at load time, inside
the MONAI pipeline) and by :func:`validate_datalist` (the up-front ``validate-datalist`` command), which
reports every problem of a datalist instead of stopping at the first.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from monai_ssl.data.datalist import GROUPS, DatalistError, load_datalist, num_classes

__all__ = [
    "InputError",
    "install_error_hook",
    "check_image_array",
    "check_label_array",
    "check_geometry",
    "check_probability_array",
    "check_case",
    "validate_datalist",
    "volume_shape",
    "volume_array",
    "LABEL_KEYS",
    "PROBABILITY_KEYS",
]

#: keys holding label maps; ``reg_label`` is the registered label of an unlabelled case
LABEL_KEYS = ("label", "reg_label")
#: keys holding per-class probability maps ``(C, *spatial)`` on the image grid: fused registered labels
PROBABILITY_KEYS = ("reg_prob",)
#: world-coordinate tolerance (mm) for two grids to count as the same
GEOMETRY_ATOL_MM = 1e-3


class InputError(ValueError):
    """Bad input data. The message names every offending file and its problem."""

    def __init__(self, problems: str | Sequence[str]):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("\n".join(self.problems))


def install_error_hook() -> None:
    """Make an :class:`InputError` anywhere in an uncaught exception's chain end the output: the full traceback
    first (for the log), then one ``error: <file>: <problem>`` line per problem, so the last line a bundle user
    sees names the file and the problem instead of MONAI's ``Failed to evaluate ConfigExpression``."""
    import sys
    import traceback

    previous = sys.excepthook

    def hook(kind, value, tb):
        err = value
        while err is not None and not isinstance(err, InputError):
            err = err.__cause__ or err.__context__
        if err is None:
            return previous(kind, value, tb)
        traceback.print_exception(kind, value, tb, file=sys.stderr)
        print("", file=sys.stderr)
        for problem in err.problems:
            print(f"error: {problem}", file=sys.stderr)

    sys.excepthook = hook


def check_image_array(array: Any, name: str, spatial_dims: int = 3) -> list[str]:
    """Problems of a channel-first image array ``(C, *spatial)``: dimensionality and non-finite values."""
    problems = []
    arr = np.asarray(array)
    if arr.ndim - 1 != spatial_dims:
        problems.append(
            f"{name}: expected a {spatial_dims}D volume, got {arr.ndim - 1} spatial dimensions "
            f"(shape {tuple(arr.shape[1:])})"
        )
    if np.issubdtype(arr.dtype, np.floating):
        bad = ~np.isfinite(arr)
        if bad.any():
            n_nan, n_inf = int(np.isnan(arr).sum()), int(np.isinf(arr).sum())
            problems.append(f"{name}: {n_nan} NaN and {n_inf} infinite intensities")
    return problems


def check_label_array(array: Any, name: str, n_classes: int | None, ignore_index: int | None = None) -> list[str]:
    """Problems of a label map: non-integer or non-finite values, and values outside ``[0, n_classes)``.

    ``ignore_index`` (scribble labels: unannotated pixels) is accepted as well when given.
    """
    arr = np.asarray(array)
    if np.issubdtype(arr.dtype, np.floating):
        if not np.isfinite(arr).all():
            return [f"{name}: label map has NaN or infinite values"]
        if not np.array_equal(arr, np.round(arr)):
            return [f"{name}: label map has non-integer values (was it resampled with linear interpolation?)"]
    if n_classes is None:
        return []
    values = np.unique(arr)
    bad = (values < 0) | (values >= n_classes)
    if ignore_index is not None:
        bad &= values != ignore_index
    outside = values[bad]
    if outside.size:
        shown = ", ".join(str(int(v)) for v in outside[:10])
        return [f"{name}: label values {shown} outside the declared classes 0..{n_classes - 1}"]
    return []


def check_probability_array(array: Any, name: str, n_classes: int | None) -> list[str]:
    """Problems of a channel-first class-probability map ``(C, *spatial)``: channel count, values in [0, 1]."""
    arr = np.asarray(array)
    if n_classes is not None and arr.shape[0] != n_classes:
        return [f"{name}: {arr.shape[0]} probability channels, expected one per class ({n_classes})"]
    if not np.isfinite(arr).all():
        return [f"{name}: probability map has NaN or infinite values"]
    if arr.min() < 0 or arr.max() > 1 + 1e-3:
        return [f"{name}: probabilities outside [0, 1] (min {arr.min():.4g}, max {arr.max():.4g})"]
    return []


def check_geometry(
    ref_name: str, ref_shape: Sequence[int], ref_affine: Any, name: str, shape: Sequence[int], affine: Any
) -> list[str]:
    """Problems when a label does not share its image's voxel grid (shape, spacing, orientation, origin)."""
    if tuple(ref_shape) != tuple(shape):
        return [f"{name}: shape {tuple(shape)} differs from image {ref_name} shape {tuple(ref_shape)}"]
    diff = np.abs(np.asarray(ref_affine, dtype=float) - np.asarray(affine, dtype=float)).max()
    if diff > GEOMETRY_ATOL_MM:
        return [
            f"{name}: voxel-to-world affine differs from image {ref_name} by up to {diff:.4g} mm "
            "(different spacing, orientation or origin)"
        ]
    return []


def _read(path: str, key: str, load_data: bool) -> tuple[Any, list[str]]:
    """Open one NIfTI/ITK file; return (nibabel-like image or None, problems)."""
    import nibabel as nib

    if not os.path.exists(path):
        return None, [f"{path}: {key} file not found"]
    try:
        img = nib.load(path)
        if load_data:
            img.get_fdata(dtype=np.float32)
        return img, []
    except Exception as e:  # nibabel raises many types for truncated / non-image files
        return None, [f"{path}: cannot read {key} ({type(e).__name__}: {e}); the file may be corrupt"]


def check_case(
    case: Mapping[str, Any], n_classes: int | None = None, load_data: bool = True, ignore_index: int | None = None
) -> list[str]:
    """Every problem of one case's files. ``load_data=False`` checks headers only (fast); ``ignore_index`` is
    accepted in its labels (scribbles)."""
    problems: list[str] = []
    arrays: dict[str, Any] = {}
    for key in ("image", *LABEL_KEYS):
        if not case.get(key):
            continue
        img, errs = _read(str(case[key]), key, load_data)
        problems += errs
        if img is not None:
            arrays[key] = img
    if "image" not in arrays:
        return problems
    image = arrays["image"]
    shape = volume_shape(image.shape)
    if len(shape) != 3 or min(shape) < 2:
        if len(shape) == 3:
            hint = " (fewer than 2 voxels along an axis)"
        else:
            hint = " (a 2D image?)" if len(shape) < 3 else " (a 4D series? give one 3D volume per case)"
        problems.append(f"{case['image']}: expected a 3D volume, got shape {tuple(image.shape)}{hint}")
        return problems
    if load_data:
        problems += check_image_array(np.asarray(image.dataobj).reshape(shape)[None], str(case["image"]))
    for key in LABEL_KEYS:
        if key not in arrays:
            continue
        lab = arrays[key]
        lshape = volume_shape(lab.shape)
        problems += check_geometry(str(case["image"]), shape, image.affine, str(case[key]), lshape, lab.affine)
        if load_data and lshape == shape:
            problems += check_label_array(np.asarray(lab.dataobj), str(case[key]), n_classes, ignore_index)
    return problems


def volume_shape(shape: Sequence[int]) -> tuple[int, ...]:
    """Drop trailing singleton dimensions beyond the third (NIfTI stores some volumes as X*Y*Z*1)."""
    shape = tuple(shape)
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    return shape


def volume_array(img: Any) -> np.ndarray:
    """The data of a nibabel image as stored, trailing singleton dimensions beyond the third dropped."""
    return np.asarray(img.dataobj).reshape(volume_shape(img.shape))


def validate_datalist(
    datalist: str | os.PathLike | Mapping[str, Any],
    groups: Iterable[str] = GROUPS,
    load_data: bool = True,
    progress: bool = True,
) -> list[str]:
    """Check a whole datalist up front and return every problem found (an empty list means valid).

    Unlike training code, this also opens the label files that unlabelled cases name, because a broken file
    in the dataset is worth reporting even if training would never read it.
    """
    try:
        dl = datalist if isinstance(datalist, Mapping) else load_datalist(datalist)
    except DatalistError as e:
        return [str(e)]
    try:
        n_classes = num_classes(dl)
    except DatalistError as e:
        n_classes = None
        problems = [str(e)]
    else:
        problems = []
    cases = [c for g in groups for c in dl.get(g, [])]
    if not cases:
        problems.append(f"{dl.get('datalist_path', 'datalist')}: no cases in group(s) {', '.join(groups)}")
    ignore_index = dl.get("ignore_index")  # a scribbled datalist: only its labelled cases may use it
    for case in tqdm(cases, desc="validating", unit="case", disable=not progress):
        ignore = ignore_index if case.get("group") == "labeled" else None
        problems += check_case(case, n_classes, load_data=load_data, ignore_index=ignore)
    return problems


def main_validate(datalist: str | Path, header_only: bool = False) -> int:
    """``validate-datalist`` entry point: print every problem, return a process exit code."""
    problems = validate_datalist(datalist, load_data=not header_only)
    if problems:
        print(f"{datalist}: {len(problems)} problem(s):")
        for p in problems:
            print(f"  - {p}")
        return 1
    print(f"{datalist}: OK")
    return 0
