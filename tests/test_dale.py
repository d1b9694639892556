"""DALE-style fuzzy-region learning: partition, Gaussian W2, label confidence, the term, label noise, bundle run."""

import math

import numpy as np
import pytest
import torch

from monai_ssl.data.label_noise import write_noisy_datalist
from monai_ssl.losses.dale import DALETerm, LabelConfidence, class_moments, fuzzy_partition, gaussian_w2
from monai_ssl.losses.terms import StepContext, bind_terms
from monai_ssl.networks import FeatureUNet
from tests.test_bundle import CONFIGS, TINY
from tests.test_trainer import tiny_dataset


def probs_of(rows):
    """``(1, C, 1, N)`` probabilities from a list of per-pixel class distributions."""
    return torch.tensor(rows, dtype=torch.float).T[None, :, None, :]


def test_partition_of_a_constructed_batch():
    # 12 confident and correct pixels, one confident but wrong (noisy label?), one uniform (boundary?)
    rows = [[0.98, 0.01, 0.01]] * 12 + [[0.98, 0.01, 0.01], [1 / 3, 1 / 3, 1 / 3]]
    target = torch.tensor([0] * 12 + [2, 0]).view(1, 1, 1, -1)
    fuzzy, error, ent = fuzzy_partition(probs_of(rows), target, k=1.0, temperature=0.25, per_class=False)
    f = fuzzy.flatten()
    assert (f[:12] < 0.05).all() and f[12] > 0.95 and f[13] > 0.95
    assert error.flatten()[12].item() == pytest.approx(0.99) and ent.flatten()[13].item() == pytest.approx(1.0)
    # the threshold adapts: with half of the batch wrong, mean + std of the error sits at the wrong pixels
    half = [[0.98, 0.01, 0.01]] * 14
    mixed = fuzzy_partition(probs_of(half), torch.tensor([0] * 7 + [2] * 7).view(1, 1, 1, -1), per_class=False)[0]
    assert 0.4 < mixed.max() < 0.6
    # identical pixels: no spread, nothing is fuzzy; ignored pixels are never fuzzy
    same = fuzzy_partition(probs_of(half), torch.zeros(1, 1, 1, 14, dtype=torch.long), per_class=False)[0]
    assert same.max() < 0.05
    valid = torch.ones(1, 1, 1, 14, dtype=torch.bool)
    valid[..., 12] = False
    assert fuzzy_partition(probs_of(rows), target, valid, per_class=False)[0].flatten()[12] == 0


def test_per_class_thresholds_keep_an_unlearned_small_class_stable():
    # class 0: 12 confident correct pixels and one confident wrong one; class 1: 4 pixels not learned yet
    # (uniform prediction). One threshold over the batch makes all of class 1 fuzzy (error 2/3 and entropy 1 sit
    # far above the batch's mean + std), so the stable phase would never learn it; per class, its pixels are
    # alike and none is fuzzy, while the wrong pixel of class 0 stays fuzzy.
    rows = [[0.98, 0.01, 0.01]] * 12 + [[0.01, 0.01, 0.98]] + [[1 / 3, 1 / 3, 1 / 3]] * 4
    target = torch.tensor([0] * 13 + [1] * 4).view(1, 1, 1, -1)
    batch = fuzzy_partition(probs_of(rows), target, per_class=False)[0].flatten()
    per_class = fuzzy_partition(probs_of(rows), target)[0].flatten()
    assert (batch[13:] > 0.95).all() and batch[12] > 0.95
    assert (per_class[13:] < 0.05).all() and per_class[12] > 0.95 and (per_class[:12] < 0.05).all()
    # the hand value of the wrong pixel's error score: class 0 errors are 0.02 x 12 and 0.99
    e = torch.tensor([0.02] * 12 + [0.99])
    mean, d = e.mean(), e.std(unbiased=False)
    assert per_class[12].item() >= torch.sigmoid((0.99 - mean - d) / (0.25 * d)).item() - 1e-6


def test_gaussian_w2_against_a_hand_computed_value():
    m1, v1 = torch.tensor([0.0, 1.0]), torch.tensor([1.0, 4.0])
    m2, v2 = torch.tensor([3.0, 1.0]), torch.tensor([4.0, 9.0])
    # ||m1 - m2||^2 = 9; ||sqrt(v1) - sqrt(v2)||^2 = (1 - 2)^2 + (2 - 3)^2 = 2
    assert gaussian_w2(m1, v1, m2, v2).item() == pytest.approx(11.0)
    assert gaussian_w2(m1, v1, m1, v1).item() == pytest.approx(0.0, abs=1e-10)
    # weighted class moments: class 0 from two unit-weight points, class 1 from one
    x = torch.tensor([[1.0, 0.0], [3.0, 2.0], [5.0, 5.0]])
    mean, var, mass = class_moments(x, torch.tensor([0, 0, 1]), torch.ones(3), 2)
    assert torch.allclose(mean, torch.tensor([[2.0, 1.0], [5.0, 5.0]]))
    assert torch.allclose(var, torch.tensor([[1.0, 1.0], [0.0, 0.0]])) and mass.tolist() == [2.0, 1.0]


def grid_memory(shape=(4, 5, 3)):
    """A memory over one case with a non-trivial voxel->world affine."""
    affine = np.array([[0.0, -2.0, 0.0, 10.0], [1.5, 0.0, 0.0, -3.0], [0.0, 0.0, 5.0, 7.0], [0, 0, 0, 1]])
    return LabelConfidence({"c": (affine, shape)}, momentum=0.5, temperature=0.5), affine


def test_memory_keys_follow_pixels_through_augmentation():
    mem, affine = grid_memory()
    z = 1
    base = affine @ np.array([[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, z], [0, 0, 0, 1]], dtype=float)
    flip = np.array([[-1, 0, 0, 3], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]], dtype=float)  # i -> 3 - i
    p2w = torch.tensor(np.stack([base, base @ flip]))
    keys = mem.keys(p2w, ["c", "c"], (4, 5))
    expected = torch.tensor([[(i * 5 + j) * 3 + z for j in range(5)] for i in range(4)])
    assert torch.equal(keys[0], expected) and torch.equal(keys[1], expected.flip(0))
    # another case, or pixels beyond the volume, have no voxel
    assert (mem.keys(p2w[:1], ["other"], (4, 5)) == -1).all()
    assert (mem.keys(p2w[:1], ["c"], (6, 5))[0, 4:] == -1).all()


def test_label_confidence_drops_for_flipping_labels():
    mem, _ = grid_memory()
    keys = torch.tensor([[0, 1, 2, -1]])
    for step in range(6):
        flip = step % 2
        # pixel 0: stable label, steady loss; pixel 1: label flips and the loss jumps; pixel 2: unseen after step 0
        labels = torch.tensor([[1, flip, 1, 0]])
        loss = torch.tensor([[0.1, 2.3 if flip else 0.1, 0.5, 9.0]])
        mem.observe(
            keys if step == 0 else keys[:, :2], loss if step == 0 else loss[:, :2], labels[:, : 4 if step == 0 else 2]
        )
        w = mem.weights(keys)
        if step == 0:
            assert torch.allclose(w, torch.ones_like(w))
    assert w[0, 0].item() == pytest.approx(1.0) and w[0, 3].item() == 1.0 and w[0, 2].item() == pytest.approx(1.0)
    assert w[0, 1].item() < 0.2
    assert set(mem.state_dict()) == {"loss_mean", "loss_var", "flip_rate", "last_label"}


def tiny_net(seed=0):
    torch.manual_seed(seed)
    return FeatureUNet(2, 1, 3, channels=(4, 8), num_res_units=1)


def labelled_ctx(nets, image, label, iteration=0, extra=None):
    outs = [n.forward_features(image) for n in nets]
    return StepContext(
        iteration=iteration,
        max_iterations=10,
        labeled={"image": image, "label": label, **(extra or {})},
        unlabeled=None,
        logits_l=[o[0] for o in outs],
        logits_u=[o[0][:0] for o in outs],
        features_l=[o[1] for o in outs],
    )


def test_ignored_pixels_give_no_gradient_and_phases_alternate():
    nets = [tiny_net(0), tiny_net(1)]
    term = DALETerm(3, ignore_index=255, warmup_iterations=2, stable_iterations=1, fuzzy_iterations=2, min_pixels=1.0)
    bind_terms([term], nets)
    assert [term.phase(i) for i in range(7)] == ["warmup"] * 2 + ["stable"] + ["fuzzy"] * 2 + ["stable", "fuzzy"]
    image = torch.rand(2, 1, 8, 8)
    label = torch.randint(0, 3, (2, 1, 8, 8))
    label[:, :, :, :3] = 255
    for iteration in (0, 3):  # a stable and a fuzzy iteration (with the W2 alignment)
        ctx = labelled_ctx(nets, image, label, iteration)
        logits = [lg.detach().requires_grad_() for lg in ctx.logits_l]
        ctx.logits_l = logits
        feats = [[f.detach().requires_grad_() for f in fs] for fs in ctx.features_l]
        ctx.features_l = feats
        loss = term(ctx)
        loss.backward()
        assert torch.isfinite(loss) and ctx.scalars["dale/fuzzy_phase"] == (term.phase(iteration) == "fuzzy")
        for lg in logits:
            assert lg.grad[..., :3].abs().max() == 0 and lg.grad[..., 3:].abs().max() > 0
        finest = feats[0][-1]  # stride 1: ignored columns give no feature gradient either
        if iteration == 3:
            assert finest.grad[..., :3].abs().max() == 0 and finest.grad[..., 3:].abs().max() > 0
    assert bool(term.stable_seen_0.any()) and bool(term.stable_seen_1.any())
    # buffers are checkpointed; the students are not part of the term
    keys = set(term.state_dict())
    assert {"stable_mean_0", "stable_var_1"} <= keys and not any("conv" in k or "model" in k for k in keys)
    assert [p for p in term.parameters() if p.requires_grad] == []


def test_term_keys_the_memory_with_pixel_to_world():
    net = tiny_net()
    affine = np.diag([1.5, 1.5, 3.0, 1.0])
    term = DALETerm(3, grids={"lab": (affine, (8, 8, 2))}, align_weight=0.0)
    bind_terms([term], [net])
    base = torch.tensor(affine @ np.array([[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 1], [0, 0, 0, 1.0]]))
    extra = {"pixel_to_world": base[None], "case_id": ["lab"]}
    ctx = labelled_ctx([net], torch.rand(1, 1, 8, 8), torch.randint(0, 3, (1, 1, 8, 8)), extra=extra)
    term(ctx)
    seen = term.confidence.last_label.view(8, 8, 2)
    assert (seen[..., 1] >= 0).all() and (seen[..., 0] == -1).all()


# ---- bundle ----------------------------------------------------------------------------------------------------
def test_dale_bundle_trains_two_iterations(tmp_path):
    from monai.bundle import run

    noisy = write_noisy_datalist(tiny_dataset(tmp_path / "data", n_unlabeled=1), tmp_path / "noisy", seed=0)
    out = tmp_path / "runs"
    run("training", config_file=[str(CONFIGS / "train.json"), str(CONFIGS / "methods" / "dale.json")],
        max_iterations=2, val_interval=2, output_root=str(out), datalist=str(noisy), **TINY)  # fmt: skip
    ckpt = torch.load(out / "dale" / "models" / "checkpoint_iteration=2.pt", map_location="cpu", weights_only=False)
    terms = ckpt["loss_terms"]
    assert "0.stable_mean_0" in terms and "0.confidence.loss_var" in terms
    assert int((terms["0.confidence.last_label"] >= 0).sum()) > 0  # the memory saw labelled voxels
    assert len(ckpt["optimizer"]["param_groups"]) == 1  # the single student; the term has no parameters
    assert math.isfinite(float(terms["0.confidence.loss_mean"].max()))


def test_dale_bundle_properties(tmp_path):
    from monai.bundle import ConfigWorkflow

    data = tiny_dataset(tmp_path / "data", n_unlabeled=1)
    for workflow_type, first in (("train", "train.json"), ("infer", "inference.json")):
        extra = {"input_dir": str(data), "input_groups": ["validation"]} if workflow_type == "infer" else {}
        wf = ConfigWorkflow(
            config_file=[str(CONFIGS / first), str(CONFIGS / "methods" / "dale.json")],
            meta_file=str(CONFIGS / "metadata.json"),
            logging_file=str(CONFIGS / "logging.conf"),
            workflow_type=workflow_type,
            dataset_dir=str(data.parent),
            output_root=str(tmp_path / "runs"),
            **TINY,
            **extra,
        )
        wf.initialize()
        assert wf.check_properties() == [], workflow_type


def test_term_wraps_any_per_pixel_loss():
    from monai.losses import FocalLoss

    net = tiny_net()
    image, label = torch.rand(2, 1, 8, 8), torch.randint(0, 3, (2, 1, 8, 8))
    focal = DALETerm(3, lambda_dice=0.0, pixel_loss=FocalLoss(reduction="none", to_onehot_y=True, use_softmax=True))
    ce = DALETerm(3, lambda_dice=0.0)
    bind_terms([focal, ce], [net])
    a, b = focal(labelled_ctx([net], image, label)), ce(labelled_ctx([net], image, label))
    assert torch.isfinite(a) and 0 < a.item() < b.item()  # focal down-weights every pixel's CE


def test_warmup_learns_every_pixel_like_the_plain_supervised_loss():
    # during warm-up the partition is not used: the loss is MONAI's batch DiceCE (0.5 / 0.5) on every pixel,
    # computed independently here; after it, the stable phase drops the fuzzy pixels and the value changes
    from monai.losses import DiceCELoss

    net = tiny_net()
    image, label = torch.rand(2, 1, 8, 8), torch.randint(0, 3, (2, 1, 8, 8))
    term = DALETerm(3, warmup_iterations=2, align_weight=0.0)
    bind_terms([term], [net])
    ctx = labelled_ctx([net], image, label, iteration=1)
    plain = DiceCELoss(to_onehot_y=True, softmax=True, batch=True, lambda_dice=0.5, lambda_ce=0.5)
    expected = plain(ctx.logits_l[0], label).item()
    assert term(ctx).item() == pytest.approx(expected, rel=1e-5)
    assert term(labelled_ctx([net], image, label, iteration=2)).item() != pytest.approx(expected, rel=1e-3)
