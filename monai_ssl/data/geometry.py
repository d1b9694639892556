"""The slice axis, one rule for the whole project (torch-free, so ``registration/`` uses it too).

A volume is cut into 2D slices along its **low-resolution axis**: the axis whose spacing is at least
:data:`ANISOTROPY_RATIO` times the finest one (nnU-Net's rule for anisotropic data; the largest spacing, the last
axis on ties). A volume without such an axis (near-isotropic) is cut axially, along the axis that reorientation
to RAS turns into S. The 2D pipeline reorients to RAS and slices along its last axis, so it needs the
low-resolution axis to be S-I; a thick sagittal or coronal stack is refused by :func:`check_slice_axis` rather
than resampled across its thick axis.
"""

from __future__ import annotations

from collections.abc import Sequence

import nibabel as nib
import numpy as np

__all__ = ["ANISOTROPY_RATIO", "voxel_spacing", "low_resolution_axis", "axial_axis", "slice_axis", "check_slice_axis"]

#: an axis this many times coarser than the finest is the low-resolution (slice) axis (nnU-Net's threshold)
ANISOTROPY_RATIO = 3.0
_PLANES = {0: ("left-right", "sagittal"), 1: ("back-front", "coronal"), 2: ("down-up", "axial")}


def voxel_spacing(affine: np.ndarray) -> np.ndarray:
    """Spacing (mm) of each stored array axis of a voxel-to-world affine."""
    return np.linalg.norm(np.asarray(affine, dtype=float)[:3, :3], axis=0)


def low_resolution_axis(spacing: Sequence[float]) -> int | None:
    """The array axis at least :data:`ANISOTROPY_RATIO` times coarser than the finest (last on ties), or None."""
    sp = np.asarray(spacing, dtype=float)
    if sp.max() < ANISOTROPY_RATIO * sp.min():
        return None
    return int(len(sp) - 1 - np.argmax(sp[::-1]))


def axial_axis(affine: np.ndarray) -> int:
    """The stored array axis that reorientation to RAS turns into S (the pipeline's last axis)."""
    axes = nib.orientations.io_orientation(np.asarray(affine, dtype=float))[:, 0]
    return int(np.flatnonzero(axes == 2)[0]) if (axes == 2).any() else 2


def slice_axis(affine: np.ndarray) -> int:
    """The stored array axis that 2D slices are cut along: the low-resolution axis, else the axial one."""
    low = low_resolution_axis(voxel_spacing(affine))
    return axial_axis(affine) if low is None else low


def check_slice_axis(affine: np.ndarray, name: str) -> list[str]:
    """Problems when the low-resolution axis is not S-I (a thick sagittal or coronal stack): slicing axially
    would cut across it."""
    low = low_resolution_axis(voxel_spacing(affine))
    if low is None or low == axial_axis(affine):
        return []
    world = int(nib.orientations.io_orientation(np.asarray(affine, dtype=float))[low, 0])
    direction, plane = _PLANES[world]
    spacing = voxel_spacing(affine)
    return [
        f"{name}: its low-resolution axis (array axis {low}, {spacing[low]:.3g} mm, finest {spacing.min():.3g} mm) "
        f"runs {direction}: a {plane} stack. The 2D pipeline cuts axial slices and would resample across the thick "
        "axis; reslice the volume to axial slices, or train 3D patches (--spatial_dims 3)"
    ]
