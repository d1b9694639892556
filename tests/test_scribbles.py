"""Scribble supervision: the scribble generator, partial CE, batch mixing, class queues, the dual-decoder
network and a tiny PCLMix bundle run on scribbled data."""

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from monai_ssl.data.datalist import load_datalist
from monai_ssl.data.pipeline import training_datasets
from monai_ssl.data.scribbles import IGNORE_INDEX, scribble_datalist, scribble_volume
from monai_ssl.losses.memory import ClassFeatureQueues
from monai_ssl.losses.scribble import (
    DualConsistencyTerm,
    PartialCETerm,
    PixelContrastTerm,
    mix_batch,
    partial_cross_entropy,
)
from monai_ssl.losses.terms import StepContext, bind_terms
from monai_ssl.networks import build_network
from tests.test_trainer import tiny_dataset

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "bundles" / "cctr_brain_demo" / "configs"


def rings(shape=(48, 48, 3)) -> np.ndarray:
    """Disk = 1, ring = 2, a small square = 3 (on slice 0 only), background 0."""
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in shape[:2]], indexing="ij"), -1)
    r = np.linalg.norm(grid - 24, axis=-1)
    sl = np.where(r < 9, 1, np.where(r < 16, 2, 0)).astype(np.uint8)
    out = np.repeat(sl[..., None], shape[2], axis=2)
    out[2:6, 2:6, 0] = 3
    return out


def test_scribbles_lie_inside_their_class_cover_every_class_and_are_deterministic():
    label = rings()
    s = scribble_volume(label, seed=3)
    drawn = s != IGNORE_INDEX
    assert drawn.any() and (~drawn).any()
    assert np.array_equal(s[drawn], label[drawn])  # every stroke pixel lies inside its class
    assert set(np.unique(s[~drawn])) == {IGNORE_INDEX}
    for z in range(label.shape[2]):  # every class present in a slice gets a stroke there
        assert set(np.unique(s[..., z][drawn[..., z]])) == set(np.unique(label[..., z]))
    assert drawn.sum() < 0.25 * drawn.size  # scribbles, not dense labels
    assert np.array_equal(s, scribble_volume(label, seed=3))
    assert not np.array_equal(s, scribble_volume(label, seed=4))
    # strokes are broken: the background skeleton (a long ring) falls into several pieces
    from scipy import ndimage

    assert ndimage.label(s[..., 1] == 0, structure=np.ones((3, 3)))[1] > 1


def test_scribble_datalist_writes_nifti_and_pipeline_keeps_ignore(tmp_path):
    datalist = tiny_dataset(tmp_path / "data", n_unlabeled=1)
    out = scribble_datalist(datalist, tmp_path / "scrib", seed=0)
    dl = load_datalist(out)
    assert dl["ignore_index"] == IGNORE_INDEX
    from monai_ssl.data.validation import validate_datalist

    assert validate_datalist(out, progress=False) == []  # 255 allowed in the labelled cases only
    dense = load_datalist(datalist)
    assert dl["validation"][0]["label"] == dense["validation"][0]["label"]  # evaluation keeps dense labels
    src, scrib = nib.load(dense["labeled"][0]["label"]), nib.load(dl["labeled"][0]["label"])
    assert np.allclose(src.affine, scrib.affine)
    s, d = np.asarray(scrib.dataobj), np.asarray(src.dataobj)
    assert np.array_equal(s[s != IGNORE_INDEX], d[s != IGNORE_INDEX])
    from monai_ssl.data.__main__ import main

    assert main(["scribbles", "--datalist", str(datalist), "--out", str(tmp_path / "scrib2"), "--seed", "0"]) == 0
    again = load_datalist(tmp_path / "scrib2" / "datalist.json")
    assert np.array_equal(s, np.asarray(nib.load(again["labeled"][0]["label"]).dataobj))
    labeled, _ = training_datasets(out, (16, 16), pixdim=(-1, -1, -1))
    values = torch.unique(torch.cat([labeled[i]["label"].flatten() for i in range(len(labeled))]))
    assert IGNORE_INDEX in values.tolist() and set(values.tolist()) <= {0, 1, 2, IGNORE_INDEX}


def test_partial_cross_entropy_uses_scribbled_pixels_only():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 5, 5)
    target = torch.full((2, 1, 5, 5), IGNORE_INDEX)
    pixels = [(0, 1, 1, 0), (0, 2, 3, 2), (1, 4, 0, 1), (1, 0, 4, 2)]
    for b, i, j, c in pixels:
        target[b, 0, i, j] = c
    manual = np.mean([-F.log_softmax(logits[b, :, i, j], 0)[c].item() for b, i, j, c in pixels])
    assert partial_cross_entropy(logits, target) == pytest.approx(manual, rel=1e-5)
    changed = logits.clone()
    changed[target.expand_as(logits) == IGNORE_INDEX] = 100.0  # whatever is at unlabelled pixels
    assert partial_cross_entropy(changed, target) == pytest.approx(manual, rel=1e-5)
    assert float(partial_cross_entropy(logits, torch.full_like(target, IGNORE_INDEX))) == 0.0
    ctx = StepContext(0, 1, {"label": target}, None, [logits], [])
    assert float(PartialCETerm()(ctx)) == pytest.approx(manual, rel=1e-5)


def test_mix_keeps_image_and_label_aligned():
    g = torch.Generator().manual_seed(0)
    image = torch.rand(6, 1, 12, 10, generator=g)
    label = (image * 4).floor().long()  # label == f(image) pixelwise
    mixed = mix_batch(image, label, generator=g)
    assert torch.equal(mixed.label, (mixed.image * 4).floor().long())
    assert not torch.equal(mixed.perm, torch.arange(6)) and 0 < float(mixed.mask.mean()) < 1
    i = 0
    inside = mixed.mask[i, 0] > 0
    assert torch.equal(mixed.image[i, 0][inside], image[mixed.perm[i], 0][inside])
    assert torch.equal(mixed.image[i, 0][~inside], image[i, 0][~inside])


def test_class_queue_capacity_and_fifo_order():
    q = ClassFeatureQueues(num_classes=2, capacity=4, max_push_fraction=1.0)
    q.push(1, torch.arange(3.0)[:, None])
    q.push(1, torch.arange(3.0, 6.0)[:, None])
    assert q.count(1) == 4 and q.count(0) == 0
    assert q.features(1)[:, 0].tolist() == [2.0, 3.0, 4.0, 5.0]  # oldest first, the two oldest evicted


def test_dual_decoder_forward_is_main_decoder_only():
    torch.manual_seed(0)
    net = build_network("dual_decoder_unet", 2, 1, 3, channels=[4, 8, 16], num_res_units=1).eval()
    x = torch.randn(2, 1, 18, 20)
    main, aux, features = net.forward_both(x)
    assert main.shape == aux.shape == (2, 3, 18, 20)
    assert torch.allclose(net(x), main) and not torch.allclose(main, aux)
    assert [f.shape[1] for f in features] == list(net.feature_channels)
    assert [f.shape[2] for f in features] == [-(-18 // s) for s in net.feature_strides]
    assert net.forward_features(x)[0].shape == main.shape and net.aux_logits is None
    net.train()
    net.forward_features(x)
    assert net.aux_logits.shape == (2, 3, 18, 20)


def test_pclmix_terms_on_a_step_context():
    torch.manual_seed(0)
    net = build_network("dual_decoder_unet", 2, 1, 3, channels=[4, 8, 16], num_res_units=1).train()
    x = torch.randn(4, 1, 16, 16)
    label = torch.full((4, 1, 16, 16), IGNORE_INDEX)
    label[:, 0, 2:4, 2:12], label[:, 0, 8, 3:13], label[:, 0, 12:14, 5] = 0, 1, 2
    logits, features = net.forward_features(x)
    ctx = StepContext(0, 10, {"image": x, "label": label}, None, [logits], [], [features], None, [net])
    con = DualConsistencyTerm()
    ctr = PixelContrastTerm(stride=4, queue_size=64, num_anchors=8, num_negatives=8)
    bind_terms([ctr], [net])
    losses = [PartialCETerm()(ctx), con(ctx), ctr(ctx)]
    assert all(torch.isfinite(v) and v.requires_grad for v in losses)
    assert ctr.queues is not None and len(ctr.queues) > 0  # scribbled pixels filled the queues
    sum(losses).backward()
    assert net.aux_head.conv.weight.grad is not None


def test_pclmix_bundle_trains_two_iterations_on_scribbles(tmp_path):
    from monai.bundle import run

    from tests.test_bundle import TINY

    datalist = scribble_datalist(tiny_dataset(tmp_path / "data", n_unlabeled=1), tmp_path / "scrib", seed=0)
    out = tmp_path / "runs"
    run("training", config_file=[str(CONFIGS / "train.json"), str(CONFIGS / "methods" / "pclmix.json")],
        datalist=str(datalist), output_root=str(out), max_iterations=2, val_interval=2, **TINY)  # fmt: skip
    ckpt = torch.load(out / "pclmix" / "models" / "checkpoint_iteration=2.pt", map_location="cpu", weights_only=False)
    assert any("aux_decoder" in k for k in ckpt["model"])
    assert any("projector" in k for k in ckpt["loss_terms"])
    assert json.loads((CONFIGS / "methods" / "pce.json").read_text())["student_0#name"] == "dual_decoder_unet"
    # evaluation runs the main decoder on the dense validation labels
    run("evaluating", config_file=[str(CONFIGS / n) for n in ("train.json", "evaluate.json", "methods/pclmix.json")],
        datalist=str(datalist), output_root=str(out), eval_groups=["validation"], **TINY)  # fmt: skip
    import pandas as pd

    per_case = pd.read_csv(out / "pclmix" / "eval" / "metrics_per_case.csv")
    assert per_case["case_id"].unique().tolist() == ["val"]


@pytest.mark.parametrize("method", ["pclmix", "pce"])
def test_scribble_methods_pass_the_bundle_property_checks(tmp_path, method):
    from monai.bundle import ConfigWorkflow

    from tests.test_bundle import TINY

    datalist = scribble_datalist(tiny_dataset(tmp_path / "data", n_unlabeled=1), tmp_path / "scrib", seed=0)
    overrides = dict(TINY, datalist=str(datalist), output_root=str(tmp_path / "runs"))
    infer = {"input_dir": str(datalist), "input_groups": ["validation"]}
    for workflow_type, name in (("train", "train.json"), ("infer", "inference.json")):
        wf = ConfigWorkflow(
            config_file=[str(CONFIGS / name), str(CONFIGS / "methods" / f"{method}.json")],
            meta_file=str(CONFIGS / "metadata.json"),
            logging_file=str(CONFIGS / "logging.conf"),
            workflow_type=workflow_type,
            **(dict(overrides, **infer) if workflow_type == "infer" else overrides),
        )
        wf.initialize()
        assert wf.check_properties() == [], (workflow_type, method)
