"""RAS (nibabel/MONAI) <-> LPS (ITK) conversions, transform matrices and displacement fields of registration/."""

import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from registration.fields import coarse_grid, load_field, write_field
from registration.geometry import (
    LPS_RAS,
    array_xyz,
    flip_xy,
    image_affine_ras,
    linear_transform_ras,
    matrix_offset_ras,
)

ROOT = Path(__file__).resolve().parents[1]


def _oblique_affine() -> np.ndarray:
    """A RAS voxel->world affine with rotation about two axes, anisotropic spacing and an offset."""
    a, b = 0.4, -0.25
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    aff = np.eye(4)
    aff[:3, :3] = rz @ rx @ np.diag([1.5, 2.0, 4.0])
    aff[:3, 3] = [-30.0, 12.5, 7.0]
    return aff


def _ras(tr: sitk.Transform, pts_ras: np.ndarray) -> np.ndarray:
    """Reference mapping: RAS -> LPS, ITK TransformPoint one by one, LPS -> RAS."""
    return np.array([[-q[0], -q[1], q[2]] for q in (tr.TransformPoint((-p[0], -p[1], p[2])) for p in pts_ras)])


def test_flip_xy_negates_x_and_y_and_is_its_own_inverse():
    pts = np.array([[1.0, -2.0, 3.0], [0.5, 4.0, -6.0]])
    np.testing.assert_array_equal(flip_xy(pts), [[-1.0, 2.0, 3.0], [-0.5, -4.0, -6.0]])
    np.testing.assert_array_equal(flip_xy(flip_xy(pts)), pts)
    np.testing.assert_array_equal(LPS_RAS @ LPS_RAS, np.eye(4))
    with pytest.raises(ValueError):
        flip_xy(np.zeros((2, 2)))


def test_nibabel_and_simpleitk_agree_on_world_coordinates(tmp_path):
    aff = _oblique_affine()
    data = np.random.default_rng(0).random((5, 6, 7)).astype(np.float32)
    nib.save(nib.Nifti1Image(data, aff), tmp_path / "a.nii.gz")
    img = sitk.ReadImage(str(tmp_path / "a.nii.gz"))
    np.testing.assert_allclose(image_affine_ras(img), aff, atol=1e-5)
    np.testing.assert_array_equal(array_xyz(img), data)  # same voxel (i, j, k) in both libraries
    idx = (4, 1, 3)
    lps = np.array(img.TransformIndexToPhysicalPoint(idx))
    np.testing.assert_allclose(flip_xy(lps), (aff @ [*idx, 1])[:3], atol=1e-4)
    # and the other way: a file written by SimpleITK reads back in nibabel with the same RAS affine
    sitk.WriteImage(img, str(tmp_path / "b.nii.gz"))
    np.testing.assert_allclose(nib.load(tmp_path / "b.nii.gz").affine, aff, atol=1e-4)


def test_matrix_offset_ras_matches_itk_point_mapping():
    rng = np.random.default_rng(1)
    tr = sitk.AffineTransform(3)
    tr.SetMatrix((rng.normal(size=9) * 0.1 + np.eye(3).ravel()).tolist())
    tr.SetTranslation((3.0, -2.0, 5.0))
    tr.SetCenter((10.0, 20.0, -5.0))
    m = matrix_offset_ras(tr.GetMatrix(), tr.GetTranslation(), tr.GetCenter())
    pts = rng.uniform(-50, 50, (20, 3))
    np.testing.assert_allclose(pts @ m[:3, :3].T + m[:3, 3], _ras(tr, pts), atol=1e-9)
    # hand check of the conjugation: a pure LPS translation (+3, -2, +5) is a RAS translation (-3, +2, +5)
    t = sitk.TranslationTransform(3, (3.0, -2.0, 5.0))
    np.testing.assert_allclose(linear_transform_ras(t), _translation([-3.0, 2.0, 5.0]))


def _translation(v) -> np.ndarray:
    out = np.eye(4)
    out[:3, 3] = v
    return out


def test_composite_order_last_added_first():
    shift = sitk.TranslationTransform(3, (10.0, 0.0, 0.0))
    scale = sitk.AffineTransform(3)
    scale.SetMatrix((2.0, 0, 0, 0, 1, 0, 0, 0, 1))
    comp = sitk.CompositeTransform([scale, shift])  # applies shift first, then scale
    np.testing.assert_allclose(comp.TransformPoint((1.0, 0.0, 0.0)), (22.0, 0.0, 0.0))
    m = linear_transform_ras(comp)
    pts = np.random.default_rng(2).uniform(-20, 20, (10, 3))
    np.testing.assert_allclose(pts @ m[:3, :3].T + m[:3, 3], _ras(comp, pts), atol=1e-9)


def test_linear_transform_ras_rejects_deformable():
    ref = sitk.Image([8, 8, 8], sitk.sitkFloat32)
    with pytest.raises(ValueError, match="not a linear"):
        linear_transform_ras(sitk.BSplineTransformInitializer(ref, [2, 2, 2]))


def test_displacement_field_is_exact_for_an_affine(tmp_path):
    ref = sitk.Image([33, 29, 6], sitk.sitkFloat32)
    ref.SetSpacing((1.5, 1.5, 5.0))
    ref.SetOrigin((-20.0, 10.0, 3.0))
    c, s = np.cos(0.3), np.sin(0.3)
    ref.SetDirection((c, -s, 0, s, c, 0, 0, 0, 1))
    tr = sitk.AffineTransform(3)
    tr.SetMatrix((1.05, 0.04, 0.0, -0.03, 0.97, 0.02, 0.0, 0.01, 1.0))
    tr.SetTranslation((2.0, -3.0, 1.0))
    tr.SetCenter(ref.TransformContinuousIndexToPhysicalPoint((16, 14, 2.5)))
    size, _, spacing, _ = coarse_grid(ref, 4)
    assert size == [9, 8, 6] and spacing == [6.0, 6.0, 5.0]  # in-plane 4x coarser, slices kept
    write_field(tr, ref, tmp_path / "f.nii.gz", factor=4)
    field = load_field(tmp_path / "f.nii.gz")
    assert field.data.shape == (9, 8, 6, 3) and field.data.dtype == np.float32
    # points anywhere inside src's grid, in RAS
    vox = np.random.default_rng(3).uniform([0, 0, 0], [32, 28, 5], (50, 3))
    pts = (image_affine_ras(ref) @ np.c_[vox, np.ones(50)].T)[:3].T
    np.testing.assert_allclose(field.map_points(pts), _ras(tr, pts), atol=2e-4)


def test_import_registration_does_not_import_torch():
    code = (
        "import sys, registration, registration.cli, registration.jobs, registration.pool, registration.store, "
        "registration.select, registration.report, registration.distributed, registration.layout, registration.fusion; "
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'monai')); "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
