"""Image-similarity and segmentation metrics in numpy/scipy (the registration package never imports torch).

* ``mutual_information``: histogram mutual information in nats (joint histogram via ``np.bincount``).
* ``dice`` / ``hd95``: per-class overlap and 95th-percentile Hausdorff distance in mm, with the definition of
  MONAI's ``HausdorffDistanceMetric(percentile=95)``: surface voxels are ``mask XOR binary_erosion(mask)``,
  the directed distances from each surface to the other are taken both ways, the 95th percentile of each
  direction is computed, and the larger one is reported.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from scipy.ndimage import binary_erosion
from scipy.spatial import cKDTree

__all__ = ["normalise_intensity", "rmse", "mutual_information", "dice", "hd95", "segmentation_scores"]


def normalise_intensity(image: np.ndarray, reference: np.ndarray | None = None) -> np.ndarray:
    """Map intensities linearly so that the 1st/99th percentiles of ``reference`` (default: image) go to 0/1."""
    ref = image if reference is None else reference
    lo, hi = np.percentile(ref, [1.0, 99.0])
    scale = hi - lo if hi > lo else 1.0
    return ((np.asarray(image, np.float64) - lo) / scale).astype(np.float32)


def rmse(a: np.ndarray, b: np.ndarray, mask: np.ndarray | None = None) -> float:
    """Root mean squared difference of two arrays (over ``mask`` when given)."""
    d = np.asarray(a, np.float64) - np.asarray(b, np.float64)
    if mask is not None:
        d = d[mask]
    return float(np.sqrt(np.mean(d * d))) if d.size else float("nan")


def mutual_information(a: np.ndarray, b: np.ndarray, bins: int = 32, mask: np.ndarray | None = None) -> float:
    """Mutual information (nats) of two intensity arrays from a ``bins`` x ``bins`` joint histogram.

    Both arrays are binned over the range of ``a`` (values of ``b`` outside it are clipped), so that the score
    of different round trips of one volume ``a`` is measured on the same bins.
    """
    a = np.asarray(a, np.float64).ravel()
    b = np.asarray(b, np.float64).ravel()
    if mask is not None:
        m = np.asarray(mask, bool).ravel()
        a, b = a[m], b[m]
    if a.size == 0:
        return float("nan")
    lo, hi = float(a.min()), float(a.max())
    scale = bins / (hi - lo) if hi > lo else 0.0
    ia = np.clip(((a - lo) * scale).astype(np.int64), 0, bins - 1)
    ib = np.clip(((b - lo) * scale).astype(np.int64), 0, bins - 1)
    joint = np.bincount(ia * bins + ib, minlength=bins * bins).reshape(bins, bins) / a.size
    pa, pb = joint.sum(1), joint.sum(0)
    nz = joint > 0
    return float(np.sum(joint[nz] * np.log(joint[nz] / np.outer(pa, pb)[nz])))


def dice(pred: np.ndarray, gt: np.ndarray) -> float:
    """Dice of two binary masks; NaN when both are empty."""
    pred, gt = np.asarray(pred, bool), np.asarray(gt, bool)
    total = pred.sum() + gt.sum()
    return float(2.0 * np.logical_and(pred, gt).sum() / total) if total else float("nan")


def _surface(mask: np.ndarray) -> np.ndarray:
    return mask ^ binary_erosion(mask)


def hd95(pred: np.ndarray, gt: np.ndarray, spacing: Sequence[float]) -> float:
    """Symmetric 95th-percentile Hausdorff distance (mm) between two non-empty binary masks."""
    pred, gt = np.asarray(pred, bool), np.asarray(gt, bool)
    if not pred.any() or not gt.any():
        raise ValueError("hd95 needs two non-empty masks; handle empty masks before calling it")
    sp = np.asarray(spacing, np.float64)
    ep = np.argwhere(_surface(pred)) * sp
    eg = np.argwhere(_surface(gt)) * sp
    d_pg = cKDTree(eg).query(ep)[0]
    d_gp = cKDTree(ep).query(eg)[0]
    return float(max(np.percentile(d_pg, 95), np.percentile(d_gp, 95)))


def segmentation_scores(
    pred: np.ndarray, gt: np.ndarray, spacing: Sequence[float], classes: Mapping[int, str] | Sequence[int]
) -> list[dict]:
    """Per-class Dice and HD95 (mm) of two label maps, one dict per foreground class.

    Status per class: ``ok``; ``both_empty`` (Dice and HD95 NaN, to be excluded from means); ``pred_empty`` or
    ``gt_empty`` (Dice 0 and HD95 = the volume diagonal in mm, the worst possible distance).
    """
    if pred.shape != gt.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from ground truth shape {gt.shape}")
    names = dict(classes) if isinstance(classes, Mapping) else {int(c): str(c) for c in classes}
    diagonal = float(np.linalg.norm((np.asarray(gt.shape) - 1) * np.asarray(spacing, np.float64)))
    rows = []
    for c in sorted(int(k) for k in names):
        if c == 0:
            continue
        p, g = pred == c, gt == c
        if not p.any() and not g.any():
            row = {"dice": float("nan"), "hd95_mm": float("nan"), "status": "both_empty"}
        elif not p.any() or not g.any():
            row = {"dice": 0.0, "hd95_mm": diagonal, "status": "pred_empty" if not p.any() else "gt_empty"}
        else:
            row = {"dice": dice(p, g), "hd95_mm": hd95(p, g, spacing), "status": "ok"}
        rows.append({"class": c, "class_name": names[c], **row})
    return rows
