"""Registration supervision: registered labels reach unlabelled slices through the same augmentation."""

import json

import numpy as np
import pytest
import torch

from monai_ssl.data.datalist import write_datalist
from monai_ssl.data.pipeline import registered_labels, training_datasets
from monai_ssl.data.validation import InputError
from monai_ssl.losses.terms import RegistrationSupervisionTerm, StepContext, SupervisedTerm
from tests.conftest import write_nifti

AFF = np.diag([1.2, 1.2, 4.0, 1.0])


def dataset_with_registered_label(tmp_path):
    rng = np.random.default_rng(0)
    shape = (20, 24, 5)
    lab = rng.integers(0, 3, shape).astype(np.uint8)
    # blocky registered label (4x4-pixel patches), so rotated slices keep large uniform regions
    reg = rng.integers(0, 3, (5, 6, 5)).repeat(4, axis=0).repeat(4, axis=1).astype(np.uint8)
    img_l = write_nifti(tmp_path / "l.nii.gz", lab.astype(np.float32), AFF)
    # the unlabelled image's intensities equal its registered label, so the two can be compared after augmentation
    img_u = write_nifti(tmp_path / "u.nii.gz", reg.astype(np.float32) * 100, AFF)
    write_nifti(tmp_path / "reg" / "affine" / "registered_labels" / "u.nii.gz", reg, AFF, np.uint8)
    dl = {
        "modality": "CT",
        "labels": {"0": "bg", "1": "a", "2": "b"},
        "labeled": [{"case_id": "l", "image": img_l, "label": write_nifti(tmp_path / "l_gt.nii.gz", lab, AFF)}],
        "unlabeled": [{"case_id": "u", "image": img_u, "label": str(tmp_path / "never_read.nii.gz")}],
    }
    brs = {"cases": {"u": {"choice": "l", "registered_label": "registered_labels/u.nii.gz"}}}
    (tmp_path / "reg" / "affine" / "brs.json").write_text(json.dumps(brs))
    return write_datalist(dl, tmp_path / "dl.json"), reg


@pytest.mark.parametrize("affine_prob", [0.0, 1.0])
def test_rsl_target_is_the_registered_label_slice_after_augmentation(tmp_path, affine_prob):
    dl, reg = dataset_with_registered_label(tmp_path)
    mapping = registered_labels(tmp_path / "reg", "affine")
    assert mapping == {"u": str(tmp_path / "reg" / "affine" / "registered_labels" / "u.nii.gz")}
    aug = {"affine_prob": affine_prob, "rotate_deg": 20, "scale": 0.1}
    _, unl = training_datasets(dl, (16, 16), pixdim=(-1, -1, -1), registered_labels=mapping, augment=aug)
    window = 400.0  # the default CT window (-125, 275) maps 0/100/200 to (125, 225, 325)/400, clipped at 1
    for seed in range(4):
        unl.set_random_state(seed)
        for z in range(reg.shape[2]):
            s = unl[z]
            assert "label" not in s and s["reg_label"].shape == (1, 16, 16)
            assert s["reg_label"].dtype == torch.long
            hu = s["image"][0].numpy() * window - 125.0
            decoded = np.clip(np.round(hu / 100), 0, 2)
            same = decoded == s["reg_label"][0].numpy()
            if affine_prob == 0:  # crops and flips only: pixel-exact
                assert same.all()
            else:  # bilinear image vs nearest label differ only along label edges
                assert same.mean() > 0.85
            if affine_prob == 0:
                # and it is the right slice: the augmented label is a crop/flip of reg[..., z]
                src = reg[..., s["slice_index"]]
                found = any(
                    (np.flip(src, axes) if axes else src)[i : i + 16, j : j + 16].tolist() == s["reg_label"][0].tolist()
                    for axes in ((), (0,), (1,), (0, 1))
                    for i in range(src.shape[0] - 15)
                    for j in range(src.shape[1] - 15)
                )
                assert found


def test_registered_labels_errors(tmp_path):
    with pytest.raises(InputError, match="registration select"):
        registered_labels(tmp_path, "affine")
    (tmp_path / "affine").mkdir()
    (tmp_path / "affine" / "brs.json").write_text(json.dumps({"cases": {"u": {"registered_label": "gone.nii.gz"}}}))
    with pytest.raises(InputError, match="gone.nii.gz"):
        registered_labels(tmp_path, "affine")


def test_rsl_term_value_equals_supervised_loss_on_registered_labels():
    rng = np.random.default_rng(2)
    logits = [torch.tensor(rng.normal(size=(2, 3, 4, 4)), dtype=torch.float32) for _ in range(2)]
    reg = torch.tensor(rng.integers(0, 3, (2, 1, 4, 4)))
    ctx = StepContext(0, 10, {"label": None}, {"reg_label": reg}, [], logits)
    ref = StepContext(0, 10, {"label": reg}, None, logits, [])
    assert RegistrationSupervisionTerm()(ctx).item() == pytest.approx(SupervisedTerm()(ref).item())
    assert RegistrationSupervisionTerm().weight(0, 10) == 0.5
    with pytest.raises(KeyError, match="registered_labels"):
        RegistrationSupervisionTerm()(StepContext(0, 10, {}, {"image": None}, [], logits))
