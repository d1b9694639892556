"""Test fixtures (not installed): synthetic volumes and known transforms for the registration tests and the
registration accuracy benchmark.

A "known pair" is built by resampling a moving volume through a known transform ``G``: the fixed volume is
``F(x) = M(G(x))``, so a correct registration (fixed=F, moving=M) returns ``T ~= G`` (fixed points -> moving
points), and the target registration error is ``|T(x) - G(x)|`` over the fixed volume's foreground.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy.ndimage import gaussian_filter

from monai_ssl.data.datalist import GROUPS, write_datalist
from monai_ssl.demo.synthesis import random_smooth_deformation

__all__ = ["phantom", "random_affine", "random_deformation", "known_pair", "resample_to_grid", "write_dataset"]


def _oblique_direction(angle: float) -> tuple[float, ...]:
    c, s = np.cos(angle), np.sin(angle)
    return (c, -s, 0.0, s, c, 0.0, 0.0, 0.0, 1.0)


def phantom(
    size: Sequence[int] = (24, 24, 12),
    spacing: Sequence[float] = (2.0, 2.0, 4.0),
    origin: Sequence[float] = (10.0, -5.0, 3.0),
    angle: float = 0.3,
    classes: int = 4,
    seed: int = 0,
) -> tuple[sitk.Image, sitk.Image]:
    """A smooth textured ellipsoid "body" with ``classes - 2`` inner blobs; returns (image, label) in LPS.

    ``size`` is (x, y, z) in voxels; the direction matrix is a rotation by ``angle`` about z, so the grid is
    oblique (a non-identity direction exercises ITK's direction handling).
    """
    rng = np.random.default_rng(seed)
    shape = tuple(int(s) for s in size[::-1])  # numpy order z, y, x
    zz, yy, xx = np.meshgrid(*[(np.arange(n) + 0.5) / n for n in shape], indexing="ij")
    label = np.zeros(shape, np.uint8)
    body = ((zz - 0.5) / 0.4) ** 2 + ((yy - 0.5) / 0.4) ** 2 + ((xx - 0.5) / 0.36) ** 2 < 1
    label[body] = 1
    for k in range(2, classes):
        c = rng.uniform(0.35, 0.65, 3)
        r = rng.uniform(0.1, 0.17, 3) * np.array([1.6, 1.0, 1.0])
        label[(((zz - c[0]) / r[0]) ** 2 + ((yy - c[1]) / r[1]) ** 2 + ((xx - c[2]) / r[2]) ** 2 < 1) & body] = k
    means = np.concatenate([[0.0], rng.permutation(np.linspace(60.0, 200.0, classes - 1))])
    texture = gaussian_filter(rng.normal(0.0, 1.0, shape), 2.0)
    image = means[label] + 25.0 * texture / (texture.std() + 1e-6) * (label > 0)
    image = gaussian_filter(image, 0.6).astype(np.float32)
    out = []
    for arr in (image, label):
        img = sitk.GetImageFromArray(arr)
        img.SetSpacing([float(s) for s in spacing])
        img.SetOrigin([float(o) for o in origin])
        img.SetDirection(_oblique_direction(angle))
        out.append(img)
    return out[0], out[1]


def _center(image: sitk.Image) -> tuple[float, ...]:
    return image.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2 for n in image.GetSize()])


def random_affine(
    reference: sitk.Image,
    rng: np.random.Generator,
    max_rotation_deg: float = 8.0,
    max_scale: float = 0.06,
    max_shift_mm: float = 6.0,
    in_plane_only: bool = False,
) -> sitk.AffineTransform:
    """A random affine about the centre of ``reference``: rotation, anisotropic scale and translation."""
    angles = np.deg2rad(rng.uniform(-max_rotation_deg, max_rotation_deg, 3))
    if in_plane_only:
        angles[:2] = 0.0
    euler = sitk.Euler3DTransform()
    euler.SetRotation(*angles.tolist())
    matrix = np.array(euler.GetMatrix()).reshape(3, 3) @ np.diag(1.0 + rng.uniform(-max_scale, max_scale, 3))
    out = sitk.AffineTransform(3)
    out.SetMatrix(matrix.ravel().tolist())
    out.SetCenter(_center(reference))
    out.SetTranslation(rng.uniform(-max_shift_mm, max_shift_mm, 3).tolist())
    return out


def random_deformation(
    reference: sitk.Image, rng: np.random.Generator, smoothing_mm: float = 12.0, max_displacement_mm: float = 3.0
) -> sitk.DisplacementFieldTransform:
    """A smooth random deformation over ``reference``'s extent, as an ITK displacement field (physical mm).

    The field is the demo's generator (:func:`monai_ssl.demo.random_smooth_deformation`, its affine part off) on an
    isotropic grid of ``reference``'s finest spacing, aligned with ``reference``: Gaussian smoothing of
    ``smoothing_mm``, at most ``max_displacement_mm`` long, locally invertible.
    """
    step = float(min(reference.GetSpacing()))
    extent = [(n - 1) * s for n, s in zip(reference.GetSize(), reference.GetSpacing(), strict=True)]
    shape = [int(np.ceil(e / step - 1e-6)) + 1 for e in extent]  # ITK axis order (x, y, z)
    coords, _ = random_smooth_deformation(
        shape,
        rng,
        max_rotation_deg=0.0,
        max_scale=0.0,
        max_translation=0.0,
        max_displacement=max_displacement_mm / step,
        smoothing=smoothing_mm / step,
    )
    index_shift = coords - np.indices(shape, dtype=np.float32)  # (3, x, y, z), in grid voxels
    direction = np.array(reference.GetDirection()).reshape(3, 3)
    shift_mm = np.einsum("ij,jxyz->zyxi", direction * step, index_shift.astype(np.float64))
    field = sitk.GetImageFromArray(shift_mm, isVector=True)
    field.SetOrigin(reference.GetOrigin())
    field.SetSpacing([step] * 3)
    field.SetDirection(reference.GetDirection())
    return sitk.DisplacementFieldTransform(field)


def known_pair(
    moving: sitk.Image, transform: sitk.Transform, moving_label: sitk.Image | None = None
) -> tuple[sitk.Image, sitk.Image | None]:
    """The fixed volume ``F(x) = M(G(x))`` on the moving grid (linear; labels nearest-neighbour)."""
    fixed = sitk.Resample(moving, moving, transform, sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    label = None
    if moving_label is not None:
        label = sitk.Resample(moving_label, moving_label, transform, sitk.sitkNearestNeighbor, 0)
    return fixed, label


def resample_to_grid(
    image: sitk.Image, size: Sequence[int], spacing: Sequence[float], interpolator=sitk.sitkLinear
) -> sitk.Image:
    """Resample ``image`` onto a grid of ``size`` x ``spacing`` with the same direction and centre."""
    center = np.array(_center(image))
    direction = np.array(image.GetDirection()).reshape(3, 3)
    half = direction @ ((np.array(size, float) - 1) / 2 * np.array(spacing, float))
    origin = (center - half).tolist()
    return sitk.Resample(
        image,
        [int(s) for s in size],
        sitk.Transform(),
        interpolator,
        origin,
        [float(s) for s in spacing],
        image.GetDirection(),
        0.0,
        image.GetPixelID(),
    )


def write_dataset(
    root: str | os.PathLike,
    cases: dict[str, tuple[str, sitk.Image, sitk.Image | None]],
    labels: dict[str, str] | None = None,
) -> Path:
    """Write ``{case_id: (group, image, label or None)}`` as NIfTI files plus ``datalist.json``; return its path."""
    root = Path(root)
    datalist: dict = {"name": "synthetic", "labels": labels or {}, **{g: [] for g in GROUPS}}
    for cid, (group, image, label) in cases.items():
        entry = {"case_id": cid, "image": str(root / "images" / f"{cid}.nii.gz"), "group": group}
        (root / "images").mkdir(parents=True, exist_ok=True)
        sitk.WriteImage(image, entry["image"])
        if label is not None:
            entry["label"] = str(root / "labels" / f"{cid}.nii.gz")
            (root / "labels").mkdir(parents=True, exist_ok=True)
            sitk.WriteImage(label, entry["label"])
        datalist[group].append(entry)
    return write_datalist(datalist, root / "datalist.json")
