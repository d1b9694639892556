"""Registration supervision: registered labels reach unlabelled slices through the same augmentation."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from monai_ssl.data.datalist import write_datalist
from monai_ssl.data.pipeline import (
    registered_labels,
    registered_probabilities,
    registration_priors,
    training_datasets,
    transductive_cases,
)
from monai_ssl.data.transforms import LabelFromProbabilitiesd
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


def test_soft_targets_are_the_fused_probabilities_through_the_same_augmentation(tmp_path):
    """A 4D probability map (one channel per class) reaches the unlabelled slices resampled with the image: where
    the registered label is confident its argmax equals the registered label, and it sums to 1 inside the crop."""
    dl, reg = dataset_with_registered_label(tmp_path)
    probs = np.stack([(reg == c) * 0.7 + 0.1 for c in range(3)], axis=-1).astype(np.float32)  # 0.8 + 0.1 + 0.1
    write_nifti(tmp_path / "reg" / "affine" / "registered_probabilities" / "u.nii.gz", probs, AFF)
    brs = json.loads((tmp_path / "reg" / "affine" / "brs.json").read_text())
    brs["cases"]["u"]["registered_probabilities"] = "registered_probabilities/u.nii.gz"
    (tmp_path / "reg" / "affine" / "brs.json").write_text(json.dumps(brs))
    labels, soft = registered_labels(tmp_path / "reg"), registered_probabilities(tmp_path / "reg")
    for affine_prob in (0.0, 1.0):
        aug = {"affine_prob": affine_prob, "rotate_deg": 20, "scale": 0.1}
        _, unl = training_datasets(
            dl, (16, 16), pixdim=(-1, -1, -1), registered_labels=labels, registered_probabilities=soft, augment=aug
        )
        for seed in range(3):
            unl.set_random_state(seed)
            s = unl[2]
            p, hard = s["reg_prob"], s["reg_label"][0]
            assert p.shape == (3, 16, 16) and p.dtype == torch.float32
            if affine_prob == 0:  # crops and flips only: the stored values, pixel for pixel
                np.testing.assert_allclose(p.sum(0).numpy(), 1.0, atol=1e-5)
                assert (p.argmax(0) == hard).all() and torch.allclose(p.max(0).values, torch.tensor(0.8))
            else:  # rotated and scaled: bilinear probabilities vs nearest labels agree where the label is sure
                sure = p.max(0).values > 0.75
                assert sure.sum() > 50 and (p.argmax(0)[sure] == hard[sure]).all()


def test_soft_rsl_with_one_hot_targets_equals_hard_rsl_and_needs_fusion(tmp_path):
    rng = np.random.default_rng(3)
    logits = [torch.tensor(rng.normal(size=(2, 3, 4, 4)), dtype=torch.float32) for _ in range(2)]
    reg = torch.tensor(rng.integers(0, 3, (2, 1, 4, 4)))
    one_hot = torch.nn.functional.one_hot(reg[:, 0], 3).permute(0, 3, 1, 2).float()
    hard = RegistrationSupervisionTerm()(StepContext(0, 10, {}, {"reg_label": reg}, [], logits))
    soft_term = RegistrationSupervisionTerm(soft=True)
    soft = soft_term(StepContext(0, 10, {}, {"reg_prob": one_hot}, [], logits))
    assert soft.item() == pytest.approx(hard.item(), rel=1e-5)
    # a softer target moves the loss: it is read, not ignored
    blurred = 0.5 * one_hot + 0.5 / 3
    assert soft_term(StepContext(0, 10, {}, {"reg_prob": blurred}, [], logits)).item() != pytest.approx(soft.item())
    with pytest.raises(KeyError, match="registered probabilities"):
        soft_term(StepContext(0, 10, {}, {"reg_label": reg}, [], logits))
    (tmp_path / "affine").mkdir()
    brs = {"cases": {"u": {"choice": "l", "strategy": "brs", "registered_label": "registered_labels/u.nii.gz"}}}
    (tmp_path / "affine" / "brs.json").write_text(json.dumps(brs))
    with pytest.raises(InputError, match="soft RSL targets need label fusion"):
        registered_probabilities(tmp_path, "affine")


def test_transductive_cases_train_on_evaluation_images_with_their_priors_argmax(tmp_path):
    """With ``transductive_priors`` the validation and test images join the unlabelled volumes: no evaluation
    label is loaded (each label file holds a class the prior never has), the registered label is the prior's
    argmax on the same grid, and every volume carries the same keys, so batches of mixed cases collate."""
    dl_path, reg = dataset_with_registered_label(tmp_path)
    dl = json.loads(Path(dl_path).read_text())
    rng = np.random.default_rng(4)
    priors = {}
    for cid, group in (("v", "validation"), ("t", "test")):
        probs = rng.dirichlet(np.ones(3), reg.shape).astype(np.float32)  # [i, j, k, c]
        path = write_nifti(tmp_path / "reg" / "affine" / "priors" / f"{cid}.nii.gz", probs, AFF)
        priors[cid] = (path, probs.argmax(-1))
        image = write_nifti(tmp_path / f"{cid}.nii.gz", rng.normal(size=reg.shape).astype(np.float32), AFF)
        truth = write_nifti(tmp_path / f"{cid}_gt.nii.gz", np.full(reg.shape, 2, np.uint8), AFF, np.uint8)
        dl[group] = [{"case_id": cid, "image": image, "label": truth}]
    brs = json.loads((tmp_path / "reg" / "affine" / "brs.json").read_text())
    brs["priors"] = {cid: {"prior": f"priors/{cid}.nii.gz"} for cid in priors}
    (tmp_path / "reg" / "affine" / "brs.json").write_text(json.dumps(brs))
    dl = write_datalist(dl, tmp_path / "dl_td.json")
    labels, prior_paths = registered_labels(tmp_path / "reg"), registration_priors(tmp_path / "reg")
    assert [c["case_id"] for c in transductive_cases(dl, prior_paths)] == ["v", "t"]

    _, unl = training_datasets(
        dl, (16, 16), pixdim=(-1, -1, -1), registered_labels=labels, transductive_priors=prior_paths
    )
    volumes = {unl.volumes[i]["case_id"]: unl.volumes[i] for i in range(len(unl.volumes))}
    assert sorted(volumes) == ["t", "u", "v"]
    assert {frozenset(k for k in v if not k.endswith("_dict")) for v in volumes.values()} == {
        frozenset({"case_id", "group", "image", "patient_id", "reg_label"})
    }
    for cid, (_, argmax) in priors.items():
        got = volumes[cid]["reg_label"]
        assert got.dtype == torch.uint8 and (got[0].numpy() == argmax).all()
        np.testing.assert_allclose(got.affine, volumes[cid]["image"].affine)
    # methods without registered labels get the images alone
    _, images_only = training_datasets(dl, (16, 16), pixdim=(-1, -1, -1), transductive_priors=prior_paths)
    image_keys = [set(images_only.volumes[i]) for i in range(len(images_only.volumes))]
    assert len(image_keys) == 3 and all("image" in k and not k & {"label", "reg_label", "reg_prob"} for k in image_keys)
    # a stale registration without a test prior fails naming the case, rather than training without it
    with pytest.raises(InputError, match="case.s. t: no registration prior"):
        training_datasets(
            dl, (16, 16), pixdim=(-1, -1, -1), registered_labels=labels, transductive_priors={"v": priors["v"][0]}
        )


def test_label_from_probabilities_fills_only_missing_labels():
    probs = MetaTensor(
        torch.tensor([[[0.2, 0.7]], [[0.8, 0.3]]]), affine=torch.diag(torch.tensor([2.0, 3.0, 4.0, 1.0]))
    )
    kept = LabelFromProbabilitiesd(keep=True)({"reg_prob": probs})
    assert kept["reg_label"].tolist() == [[[1, 0]]] and kept["reg_prob"] is probs
    assert torch.equal(kept["reg_label"].affine, probs.affine)
    assert "reg_prob" not in LabelFromProbabilitiesd()({"reg_prob": probs})
    own = torch.zeros(1, 1, 2, dtype=torch.uint8)
    assert LabelFromProbabilitiesd()({"reg_prob": probs, "reg_label": own})["reg_label"] is own
