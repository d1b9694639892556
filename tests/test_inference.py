"""Volume inference writes label maps on the input's own grid; evaluation reads the original labels."""

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch
from monai.data import DataLoader, Dataset
from monai.engines import SupervisedEvaluator
from monai.inferers import SliceInferer
from scipy import ndimage

from monai_ssl.data.validation import InputError
from monai_ssl.inference.volume import inference_cases, inference_postprocessing, inference_preprocessing
from monai_ssl.metrics.handlers import SegmentationReportHandler
from monai_ssl.metrics.report import SegmentationReport
from monai_ssl.networks.ensemble import StudentEnsemble
from tests.conftest import write_nifti


class Threshold(torch.nn.Module):
    """A fixed 'network': class 1 where the normalised intensity exceeds 0.5 (logits +-(x - 0.5))."""

    def forward(self, x):
        return torch.cat([0.5 - x[:, :1], x[:, :1] - 0.5], 1) * 20


def oblique_lps_affine():
    c, s = np.cos(0.25), np.sin(0.25)
    aff = np.eye(4)
    aff[:3, :3] = np.array([[-c, s, 0], [-s, -c, 0], [0, 0, 1]]) @ np.diag([1.1, 0.8, 3.5])
    aff[:3, 3] = [30.0, 20.0, -10.0]
    return aff


def blob_case(tmp_path, name="case_a", shape=(26, 30, 7)):
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1)
    label = (np.linalg.norm((grid - [9, 17, 3]) * [1.1, 0.8, 3.5], axis=-1) < 7).astype(np.uint8)
    image = label * 900.0 + 50.0  # CT-like values; window (0, 1000) maps the blob to 0.95, background to 0.05
    aff = oblique_lps_affine()
    img = write_nifti(tmp_path / "in" / f"{name}.nii.gz", image, aff, np.float32)
    lab = write_nifti(tmp_path / "labels" / f"{name}_gt.nii.gz", label, aff, np.uint8)
    return img, lab, label


def run(cases, out_dir, uncertainty=False, handlers=None, network=None, variance=False, prior_weight=0.0):
    pre = inference_preprocessing(modality="CT", pixdim=(1.0, 1.0, -1.0), ct_window=(0.0, 1000.0))
    evaluator = SupervisedEvaluator(
        device="cpu",
        val_data_loader=DataLoader(Dataset(cases, pre), batch_size=1),
        network=StudentEnsemble([Threshold(), Threshold()]) if network is None else network,
        inferer=SliceInferer(roi_size=(16, 16), spatial_dim=2, sw_batch_size=4),
        postprocessing=inference_postprocessing(
            pre, out_dir, uncertainty=uncertainty, variance=variance, prior_weight=prior_weight
        ),
        val_handlers=handlers,
    )
    evaluator.run()
    return evaluator


def test_prediction_lands_on_input_grid_with_same_geometry(tmp_path):
    img_path, _, label = blob_case(tmp_path)
    run(inference_cases(tmp_path / "in"), tmp_path / "out", uncertainty=True)
    seg = nib.load(tmp_path / "out" / "case_a_seg.nii.gz")
    src = nib.load(img_path)
    assert seg.shape == src.shape
    assert np.allclose(seg.affine, src.affine)
    assert seg.get_data_dtype() == np.uint8
    pred = np.asarray(seg.dataobj)
    # the threshold "network" reproduces the blob: preprocessing (reorient, resample) was inverted correctly
    dice = 2 * (pred * label).sum() / (pred.sum() + label.sum())
    assert dice > 0.95, dice
    ent = nib.load(tmp_path / "out" / "case_a_entropy.nii.gz")
    e = np.asarray(ent.dataobj)
    assert ent.shape == src.shape and e.min() >= 0 and e.max() <= np.log(2) + 1e-6
    inner = ndimage.binary_erosion(label, structure=np.ones((3, 3, 1)), iterations=2)
    assert inner.sum() > 20 and e[inner].max() < 0.01  # confident inside the blob, uncertain only at its edge
    assert e[label == 1].max() > 0.3
    assert not list((tmp_path / "out").glob(".tmp-*"))


def _dice(a, b):
    return 2 * (a & b).sum() / (a.sum() + b.sum())


def test_registration_prior_is_mixed_on_the_preprocessed_grid_and_lands_on_the_input_grid(tmp_path):
    """A confident network (the blob) and a one-hot prior of another shape (a box), on an oblique LPS grid."""
    img_path, _, label = blob_case(tmp_path)
    box = np.zeros(label.shape, bool)
    box[12:22, 4:14, 1:6] = True
    prior_path = write_nifti(
        tmp_path / "priors" / "case_a.nii.gz", np.stack([~box, box], -1), nib.load(img_path).affine, np.float32
    )
    cases = [dict(c, reg_prob=prior_path) for c in inference_cases(tmp_path / "in")]
    network = StudentEnsemble([Threshold()])
    results = {}
    for name, weight in (("registration alone", 1.0), ("confident network wins", 0.3), ("from the model", network)):
        if name == "from the model":
            network.set_prior_weight(0.9)  # read when called, as after loading a checkpoint
        run(cases, tmp_path / name, network=network, prior_weight=weight)
        results[name] = np.asarray(nib.load(tmp_path / name / "case_a_seg.nii.gz").dataobj).astype(bool)
    assert _dice(box, label.astype(bool)) < 0.5  # the two answers differ
    assert _dice(results["registration alone"], box) > 0.95  # the prior went through reorient/resample and back
    assert _dice(results["from the model"], box) > 0.95
    # softmax 1 - 2e-4 on the blob: (1 - w) * p beats w * 1 for w = 0.3, so the network's labels stay
    assert _dice(results["confident network wins"], label.astype(bool)) > 0.95


def test_prior_mix_by_hand_and_its_errors():
    from monai.data import MetaTensor

    from monai_ssl.inference.volume import MixPriord

    probs = torch.tensor([0.9, 0.1]).view(2, 1, 1, 1).repeat(1, 2, 2, 1)
    prior = torch.tensor([0.0, 1.0]).view(2, 1, 1, 1).repeat(1, 2, 2, 1)
    image = MetaTensor(torch.zeros(1, 2, 2, 1), meta={"filename_or_obj": "/data/x.nii.gz"})
    out = MixPriord("pred", 0.25)({"pred": probs, "reg_prob": prior, "image": image})["pred"]
    torch.testing.assert_close(out[:, 0, 0, 0], torch.tensor([0.675, 0.325]))  # 0.75 * (0.9, 0.1) + 0.25 * (0, 1)
    assert MixPriord("pred", 0.0)({"pred": probs, "image": image})["pred"] is probs  # no prior needed at weight 0
    with pytest.raises(InputError, match=r"/data/x.nii.gz: the model mixes in 0.25 of the registration prior"):
        MixPriord("pred", 0.25)({"pred": probs, "image": image})
    with pytest.raises(InputError, match="another label set"):
        MixPriord("pred", 0.25)({"pred": probs, "reg_prob": prior[:1], "image": image})


def test_evaluation_report_on_original_labels(tmp_path):
    _, lab_path, _ = blob_case(tmp_path)
    cases = inference_cases(tmp_path / "in")
    cases[0]["label_path"] = lab_path
    report = SegmentationReport(tmp_path / "eval", num_classes=2, class_names=["background", "blob"])
    run(cases, tmp_path / "out", handlers=[SegmentationReportHandler(report)])
    per_case = pd.read_csv(tmp_path / "eval" / "metrics_per_case.csv")
    assert per_case["case_id"].tolist() == ["case_a"] and per_case["dice"].iloc[0] > 0.95
    # HD95 in mm of the original grid: a few voxels of boundary error at most
    assert per_case["hd95_mm"].iloc[0] < 3.5 * 1.5
    assert (tmp_path / "eval" / "metrics_summary.csv").exists()
    assert (tmp_path / "eval" / "overlays" / "case_a.png").exists()


def test_inference_inputs_are_checked_up_front(tmp_path):
    blob_case(tmp_path)
    write_nifti(tmp_path / "in" / "flat.nii.gz", np.zeros((8, 8)), np.eye(4), np.float32)
    (tmp_path / "in" / "broken.nii.gz").write_bytes(b"not an image")
    with pytest.raises(InputError) as e:
        inference_cases(tmp_path / "in")
    msg = str(e.value)
    assert "flat.nii.gz" in msg and "3D volume" in msg and "broken.nii.gz" in msg and "corrupt" in msg
    with pytest.raises(InputError, match="not found"):
        inference_cases(tmp_path / "missing_dir")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no image files"):
        inference_cases(tmp_path / "empty")


def test_attach_priors_names_the_cases_without_one():
    from monai_ssl.data.pipeline import attach_priors

    cases = [{"case_id": "a", "image": "a.nii.gz"}, {"case_id": "b", "image": "b.nii.gz"}]
    assert attach_priors(cases, None) == cases
    assert attach_priors(cases[:1], {"a": "/p/a.nii.gz"}) == [dict(cases[0], reg_prob="/p/a.nii.gz")]
    with pytest.raises(InputError, match=r"case\(s\) b: no registration prior \(register them"):
        attach_priors(cases, {"a": "/p/a.nii.gz"})
