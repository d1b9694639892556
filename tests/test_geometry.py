"""The one slice-axis rule (monai_ssl.data.geometry), on axial, permuted and sagittal stacks."""

import numpy as np
import pytest

from monai_ssl.data.geometry import check_slice_axis, low_resolution_axis, slice_axis
from monai_ssl.data.pipeline import training_datasets
from monai_ssl.data.validation import InputError
from tests.test_trainer import tiny_dataset


def test_low_resolution_axis_follows_nnunets_ratio():
    assert low_resolution_axis((1.0, 1.0, 3.0)) == 2
    assert low_resolution_axis((1.0, 1.0, 2.9)) is None  # near-isotropic: no low-resolution axis
    assert low_resolution_axis((5.0, 1.0, 5.0)) == 2  # ties: the last
    assert low_resolution_axis((5.0, 0.8, 0.8)) == 0


def test_slice_axis_of_axial_permuted_and_sagittal_stacks():
    axial = np.diag([0.8, 0.8, 5.0, 1.0])
    assert slice_axis(axial) == 2 and check_slice_axis(axial, "a") == []
    permuted = np.zeros((4, 4))  # stored as (S, A, R): array axis 0 is the 5 mm S axis
    permuted[2, 0], permuted[1, 1], permuted[0, 2], permuted[3, 3] = 5.0, 0.8, 0.8, 1.0
    assert slice_axis(permuted) == 0 and check_slice_axis(permuted, "p") == []
    isotropic = permuted.copy()
    isotropic[2, 0] = 1.0
    assert slice_axis(isotropic) == 0  # no thick axis: the one that becomes S (axial)
    sagittal = np.diag([5.0, 0.8, 0.8, 1.0])
    assert slice_axis(sagittal) == 0
    (problem,) = check_slice_axis(sagittal, "sag.nii.gz")
    assert problem.startswith("sag.nii.gz: its low-resolution axis (array axis 0, 5 mm") and "sagittal stack" in problem


def test_the_2d_pipeline_refuses_a_sagittal_stack_and_3d_accepts_it(tmp_path):
    import nibabel as nib

    from monai_ssl.data.datalist import load_datalist

    datalist = tiny_dataset(tmp_path / "data")
    dl = load_datalist(datalist)  # absolute paths
    for case in [c for g in ("labeled", "unlabeled", "validation") for c in dl[g]]:
        for key in ("image", "label"):
            img = nib.load(case[key])
            nib.save(nib.Nifti1Image(np.asarray(img.dataobj), np.diag([6.0, 1.5, 1.5, 1.0])), case[key])
    with pytest.raises(InputError, match=r"lab\.nii\.gz: its low-resolution axis .* sagittal stack"):
        lab, _ = training_datasets(datalist, (16, 16), pixdim=(-1, -1, -1))
        lab[0]
    lab, _ = training_datasets(datalist, (8, 8, 4), spatial_dims=3, pixdim=(-1, -1, -1))
    assert lab[0]["image"].shape[1:] == (8, 8, 4)
