"""Image-similarity measures of the cycle scores in numpy (the registration package never imports torch).

* ``normalise_intensity``: percentile scaling, so volumes of different gains compare.
* ``rmse`` and ``mutual_information`` (nats, joint histogram via ``np.bincount``).

Segmentation metrics (Dice, HD95, IoU, boundary F1) have one home, :mod:`monai_ssl.metrics`; ``report`` scores
its labels there in a child process.
"""

from __future__ import annotations

import numpy as np

__all__ = ["normalise_intensity", "rmse", "mutual_information"]


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
