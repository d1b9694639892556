"""Score label-map files against reference label files: the metric implementation for label maps on disk.

The registration job (which never imports torch) writes its propagated labels and a table of
(prediction, reference) paths; ``python -m monai_ssl.metrics score`` scores them here with the same
:func:`~monai_ssl.metrics.segmentation.case_metrics` (Dice, HD95 mm, IoU, boundary F1) as every evaluation.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from monai_ssl.data.validation import InputError, check_geometry, volume_array, volume_shape
from monai_ssl.fileio import atomic_path
from monai_ssl.metrics.segmentation import case_metrics

__all__ = ["PATH_COLUMNS", "score_files", "score_table"]

#: columns of a predictions table holding file paths; every other column is copied onto the metric rows
PATH_COLUMNS = ("prediction", "reference")


def _read_label(path: str) -> nib.Nifti1Image:
    try:
        img = nib.load(path)
        img.get_fdata(dtype=np.float32)  # read in full: a truncated file fails here, naming itself
    except FileNotFoundError as e:
        raise InputError(f"{path}: label file not found") from e
    except Exception as e:  # nibabel raises several types for broken files
        raise InputError(f"{path}: cannot read label ({type(e).__name__}: {e})") from e
    return img


def score_files(
    prediction: str, reference: str, num_classes: int, class_names: Mapping[Any, str] | None = None
) -> list[dict[str, Any]]:
    """Per-class metric rows of one predicted label file against its reference (same grid, spacing from it)."""
    pred, ref = _read_label(prediction), _read_label(reference)
    problems = check_geometry(
        reference, volume_shape(ref.shape), ref.affine, prediction, volume_shape(pred.shape), pred.affine
    )
    if problems:
        raise InputError(problems)
    spacing = nib.affines.voxel_sizes(ref.affine)
    return case_metrics(
        volume_array(pred),
        volume_array(ref),
        num_classes,
        spacing,
        class_names,
    )


def score_table(
    predictions: pd.DataFrame,
    num_classes: int,
    class_names: Mapping[Any, str] | None = None,
    out: str | os.PathLike | None = None,
    progress: bool = True,
) -> pd.DataFrame:
    """Score every row of ``predictions`` (columns ``prediction``, ``reference`` and any others, copied onto the
    per-class rows); write the result atomically to ``out`` (CSV) when given."""
    missing = [c for c in PATH_COLUMNS if c not in predictions]
    if missing:
        raise InputError(f"predictions table lacks the column(s) {missing}")
    rows = []
    keep = [c for c in predictions.columns if c not in PATH_COLUMNS]
    for rec in tqdm(predictions.to_dict("records"), desc="scoring", unit="label", disable=not progress):
        extra = {k: rec[k] for k in keep}
        for row in score_files(str(rec["prediction"]), str(rec["reference"]), num_classes, class_names):
            rows.append({**extra, **{k: v for k, v in row.items() if k not in extra}})
    frame = pd.DataFrame(rows)
    if out is not None:
        with atomic_path(Path(out)) as tmp:
            frame.to_csv(tmp, index=False)
    return frame
