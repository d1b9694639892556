"""Atomic writes and the one NIfTI writer (monai_ssl.fileio)."""

import json

import nibabel as nib
import numpy as np
import pytest

from monai_ssl.fileio import atomic_path, atomic_write_json, save_nifti


def _oblique_affine():
    c, s = np.cos(0.3), np.sin(0.3)
    return np.array([[1.2 * c, -0.8 * s, 0, 10.0], [1.2 * s, 0.8 * c, 0, -4.0], [0, 0, 5.0, 2.5], [0, 0, 0, 1]])


def test_save_nifti_like_a_reference_keeps_its_grid_and_the_dtype(tmp_path):
    aff = _oblique_affine()
    nib.save(nib.Nifti1Image(np.zeros((5, 6, 7), np.float32), aff), tmp_path / "ref.nii.gz")
    lab = np.zeros((5, 6, 7), np.uint8)
    lab[1:3, 2:5, 3] = 7
    save_nifti(lab, tmp_path / "lab.nii.gz", like=tmp_path / "ref.nii.gz")
    out = nib.load(tmp_path / "lab.nii.gz")
    np.testing.assert_allclose(out.affine, aff, atol=1e-6)
    assert out.get_data_dtype() == np.uint8
    np.testing.assert_array_equal(np.asarray(out.dataobj), lab)
    assert not list(tmp_path.glob(".tmp-*"))
    with pytest.raises(ValueError, match="does not match"):
        save_nifti(lab[:4], tmp_path / "bad.nii.gz", like=tmp_path / "ref.nii.gz")
    assert not (tmp_path / "bad.nii.gz").exists()


def test_save_nifti_with_an_affine_and_a_scale(tmp_path):
    aff = _oblique_affine()
    probs = np.array([0, 51, 255], np.uint8).reshape(3, 1, 1)
    save_nifti(probs, tmp_path / "p.nii.gz", affine=aff, scale=1 / 255, descrip="probabilities")
    out = nib.load(tmp_path / "p.nii.gz")
    np.testing.assert_allclose(out.affine, aff, atol=1e-6)
    assert int(out.header["qform_code"]) == 1 and int(out.header["sform_code"]) == 1
    np.testing.assert_allclose(out.get_fdata()[:, 0, 0], [0.0, 0.2, 1.0], atol=1e-6)
    assert out.header["descrip"].tobytes().startswith(b"probabilities")


def test_atomic_path_leaves_nothing_when_the_block_fails(tmp_path):
    target = tmp_path / "out.json"
    atomic_write_json(target, {"a": 1})
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("partial")
        raise RuntimeError("killed")
    assert json.loads(target.read_text()) == {"a": 1}  # the earlier whole file, untouched
    assert not list(tmp_path.glob(".tmp-*"))
