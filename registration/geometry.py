"""The one place where RAS (NIfTI, nibabel, MONAI) meets LPS (ITK, SimpleITK, elastix).

World points in ``monai_ssl`` are RAS millimetres; ITK physical points are LPS millimetres. The two differ by
``diag(-1, -1, 1)``: x and y change sign, z does not. The conversion is its own inverse. Voxel indices are the
same in both worlds: ``(i, j, k)`` of a nibabel array is ``(i, j, k)`` of an ITK index, while
``SimpleITK.GetArrayFromImage`` returns the array as ``[k, j, i]``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import SimpleITK as sitk

__all__ = [
    "LPS_RAS",
    "flip_xy",
    "grid_affine_ras",
    "image_affine_ras",
    "matrix_offset_ras",
    "linear_transform_ras",
    "array_xyz",
]

# diag(-1, -1, 1, 1): maps LPS homogeneous points to RAS and back (it is its own inverse)
LPS_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def flip_xy(points: np.ndarray) -> np.ndarray:
    """Convert ``(..., 3)`` world points RAS <-> LPS (negate x and y); returns a new float64 array."""
    out = np.array(points, dtype=np.float64, copy=True)
    if out.shape[-1] != 3:
        raise ValueError(f"points must have shape (..., 3), got {out.shape}")
    out[..., :2] *= -1.0
    return out


def grid_affine_ras(origin: Sequence[float], spacing: Sequence[float], direction: Sequence[float]) -> np.ndarray:
    """4x4 voxel-index -> RAS matrix of an ITK grid given in LPS (origin, spacing, row-major 3x3 direction)."""
    lps = np.eye(4)
    lps[:3, :3] = np.asarray(direction, dtype=np.float64).reshape(3, 3) @ np.diag(np.asarray(spacing, float))
    lps[:3, 3] = np.asarray(origin, dtype=np.float64)
    return LPS_RAS @ lps


def image_affine_ras(image: sitk.Image) -> np.ndarray:
    """4x4 voxel-index -> RAS matrix of a SimpleITK image; equals nibabel's ``img.affine`` for the same file."""
    return grid_affine_ras(image.GetOrigin(), image.GetSpacing(), image.GetDirection())


def matrix_offset_ras(matrix: Sequence[float], translation: Sequence[float], center: Sequence[float]) -> np.ndarray:
    """RAS->RAS 4x4 of an ITK matrix-offset transform ``p -> A (p - c) + c + t`` given in LPS.

    The LPS matrix is ``[[A, t + c - A c], [0, 1]]``; conjugating it by the LPS flip gives the RAS matrix.
    """
    a = np.asarray(matrix, dtype=np.float64).reshape(3, 3)
    c = np.asarray(center, dtype=np.float64)
    lps = np.eye(4)
    lps[:3, :3] = a
    lps[:3, 3] = np.asarray(translation, dtype=np.float64) + c - a @ c
    return LPS_RAS @ lps @ LPS_RAS


def linear_transform_ras(transform: sitk.Transform) -> np.ndarray:
    """Exact RAS->RAS 4x4 of a SimpleITK transform made only of linear parts (affine, Euler, composites of them).

    Raises ``ValueError`` for transforms with a deformable part (B-spline, displacement field).
    """
    transform = transform.Downcast()
    if isinstance(transform, sitk.CompositeTransform):
        total = np.eye(4)
        # ITK applies the last-added transform first: T(x) = T_0(T_1(...T_{n-1}(x)))
        for i in range(transform.GetNumberOfTransforms()):
            total = total @ linear_transform_ras(transform.GetNthTransform(i))
        return total
    if transform.GetName() == "IdentityTransform":
        return np.eye(4)
    if transform.GetName() == "TranslationTransform":
        return matrix_offset_ras(np.eye(3).ravel(), transform.GetOffset(), (0.0, 0.0, 0.0))
    if not hasattr(transform, "GetMatrix") or not hasattr(transform, "GetCenter"):
        raise ValueError(f"{transform.GetName()} is not a linear transform; it has no exact 4x4 matrix")
    return matrix_offset_ras(transform.GetMatrix(), transform.GetTranslation(), transform.GetCenter())


def array_xyz(image: sitk.Image) -> np.ndarray:
    """Voxel array of a SimpleITK image indexed ``[i, j, k]`` (plus a trailing component axis for vector
    images), like nibabel's ``get_fdata()``."""
    arr = sitk.GetArrayFromImage(image)
    return np.ascontiguousarray(arr.transpose(2, 1, 0, *range(3, arr.ndim)))
