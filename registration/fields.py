"""Low-resolution displacement fields for fast, vectorised point mapping at training time.

File ``OUT/<kind>/fields/<src>__<dst>.nii.gz`` (written by ``precompute --fields``) holds the pair
(fixed=src, moving=dst), i.e. it maps points of ``src`` to ``dst``:

* a float32 NIfTI of shape ``(X, Y, Z, 3)`` on a coarse version of src's grid: the two finest axes are
  ``factor`` times coarser (default 4), the slice (coarsest) axis is kept; voxel 0 sits on src's voxel 0 and
  the grid covers all of src;
* its affine is the usual voxel -> RAS matrix of that coarse grid;
* the value at voxel ``v`` is ``T(p) - p`` in RAS mm, where ``p = affine @ [v, 1]`` and ``T`` the pair's
  transform. Components are RAS (x, y, z), not ITK's LPS.

``DisplacementField.map_points`` interpolates it trilinearly, which is exact for affine transforms.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import SimpleITK as sitk
from scipy.ndimage import map_coordinates

from monai_ssl.data.geometry import slice_axis
from monai_ssl.fileio import save_nifti
from registration.geometry import array_xyz, flip_xy, grid_affine_ras, image_affine_ras

__all__ = ["coarse_grid", "write_field", "load_field", "DisplacementField"]


def coarse_grid(reference: sitk.Image, factor: int = 4) -> tuple[list[int], tuple, list[float], tuple]:
    """(size, origin, spacing, direction) of ``reference``'s grid with the two in-plane axes ``factor`` x coarser
    (the slice axis, :func:`monai_ssl.data.geometry.slice_axis`, is kept)."""
    spacing = np.array(reference.GetSpacing(), float)
    axis = slice_axis(image_affine_ras(reference))  # the project's one rule (monai_ssl.data.geometry)
    size, new_spacing = [], []
    for d, n in enumerate(reference.GetSize()):
        f = 1 if d == axis else int(factor)
        size.append(int(np.ceil((n - 1) / f)) + 1)
        new_spacing.append(float(spacing[d] * f))
    return size, reference.GetOrigin(), new_spacing, reference.GetDirection()


def write_field(transform: sitk.Transform, reference: sitk.Image, path: str | os.PathLike, factor: int = 4) -> Path:
    """Sample ``transform`` (src LPS -> dst LPS) on the coarse src grid and write the RAS displacement field."""
    size, origin, spacing, direction = coarse_grid(reference, factor)
    disp = sitk.TransformToDisplacementField(transform, sitk.sitkVectorFloat64, size, origin, spacing, direction)
    data = flip_xy(array_xyz(disp)).astype(np.float32)  # displacement vectors LPS -> RAS
    affine = grid_affine_ras(origin, spacing, direction)
    return save_nifti(data, path, affine=affine, descrip="RAS displacement mm: T(p)-p, registration")


@dataclass
class DisplacementField:
    """A loaded field: ``data`` (X, Y, Z, 3) RAS displacements in mm on the grid of ``affine`` (voxel -> RAS)."""

    data: np.ndarray
    affine: np.ndarray

    def map_points(self, points_ras: np.ndarray) -> np.ndarray:
        """Map (N, 3) RAS points by trilinear interpolation of the field (nearest edge value outside it)."""
        pts = np.asarray(points_ras, np.float64).reshape(-1, 3)
        vox = (np.linalg.inv(self.affine) @ np.c_[pts, np.ones(len(pts))].T)[:3]
        disp = np.stack([map_coordinates(self.data[..., c], vox, order=1, mode="nearest") for c in range(3)], -1)
        return pts + disp


def load_field(path: str | os.PathLike) -> DisplacementField:
    """Read a field written by :func:`write_field`."""
    img = nib.load(os.fspath(path))
    data = np.asarray(img.dataobj, dtype=np.float32)
    if data.ndim != 4 or data.shape[-1] != 3:
        raise ValueError(f"{path}: expected a (X, Y, Z, 3) displacement field, got shape {data.shape}")
    return DisplacementField(data, img.affine)
