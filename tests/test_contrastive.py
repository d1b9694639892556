"""Contrastive loss terms (SCL + REPS, MCSC, MCSCv2) against numpy references on tiny tensors, and in the trainer."""

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.utils import set_determinism

from monai_ssl.losses.contrastive import (
    MCSCTerm,
    MCSCv2Term,
    SCLTerm,
    certain_pixels,
    hard_negative_mask,
    labels_at,
    probs_at,
    sample_per_class,
    select_scale,
    tile_blocks,
)
from monai_ssl.losses.reps import AffineCorrespondences, RegistrationPositives
from monai_ssl.losses.schedules import GaussianRampUp
from monai_ssl.losses.terms import StepContext, bind_terms

REPO = Path(__file__).resolve().parents[1]
TAU = 0.1


# ---- numpy references ----------------------------------------------------------------------------------------
def softmax(x, axis=1):
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def unit(x, axis=-1):
    return x / np.linalg.norm(x, axis=axis, keepdims=True)


def np_targets(gt, logits):
    """Cross-student labels, confidences and teacher probabilities at stride 1, per student: (S, B, ...)."""
    s, n_l = len(logits), gt.shape[0]
    labels, conf, probs = [], [], []
    for k in range(s):
        p = softmax(logits[(k + 1) % s])
        labels.append(np.concatenate([gt, p[n_l:].argmax(1)]))
        conf.append(np.concatenate([np.ones_like(p[:n_l, 0]), p[n_l:].max(1)]))
        probs.append(p)
    return np.stack(labels), np.stack(conf), np.stack(probs)


def np_pixels(z):
    """(S, B, D, H, W) -> (S*B*H*W, D) rows in (s, b, i, j) order."""
    return np.moveaxis(z, 2, -1).reshape(-1, z.shape[2])


def np_infonce_loss(z, y, anchor_ok, negatives_for, positive_for=None):
    """Class-mean of per-anchor -log(e^{a.p/t} / (e^{a.p/t} + sum_k e^{a.k/t})), looping over pixels."""
    per_class = []
    for c in sorted(set(y[anchor_ok].tolist())):
        members = np.nonzero(anchor_ok & (y == c))[0]
        proto = unit(z[members].mean(0))
        negs = negatives_for(c)
        if len(negs) == 0:
            continue
        losses = []
        for a in members:
            p = proto if positive_for is None else positive_for(a, proto)
            pos = np.exp(z[a] @ p / TAU)
            losses.append(-np.log(pos / (pos + np.exp(negs @ z[a] / TAU).sum())))
        per_class.append(np.mean(losses))
    return np.mean(per_class)


def np_balanced_supcon(z, y):
    """Mean over anchors of MCSC's class-balanced supervised contrastive loss within one group, by loops."""
    losses = []
    for i in range(len(y)):
        pos = [p for p in range(len(y)) if p != i and y[p] == y[i]]
        if not pos:
            continue
        denom = sum(np.exp(z[i] @ z[j] / TAU) / (np.sum(y == y[j]) - (y[j] == y[i])) for j in range(len(y)) if j != i)
        losses.append(-np.mean([z[i] @ z[p] / TAU - np.log(denom) for p in pos]))
    return np.mean(losses)


# ---- tiny contexts -------------------------------------------------------------------------------------------
def identity_projector(proj):
    """Make a ContrastProjector the identity (then normalisation) for non-negative inputs."""
    with torch.no_grad():
        for conv in [*proj.first, proj.shared]:
            conv.weight.copy_(torch.eye(conv.weight.shape[0])[:, :, None])
            conv.bias.zero_()
    return proj


def tiny_context(rng, n_l=1, n_u=1, size=(2, 3), d=4, k=3, gt=None, iteration=0, levels=None):
    """Two students with non-negative stride-1 features of width d (and any extra ``levels`` maps)."""
    b = n_l + n_u
    feats = [rng.uniform(0.1, 1.0, (b, d, *size)) for _ in range(2)]
    logits = [rng.normal(0, 2.0, (b, k, *size)) for _ in range(2)]
    logits[1][n_l:, :, 0, 0] = 0.0  # teacher of student 0: one uncertain pseudo-labelled pixel (top-1 = 1/3)
    if gt is None:
        gt = rng.integers(0, k, (n_l, *size))
    t = lambda a: torch.tensor(a, dtype=torch.float32)  # noqa: E731
    maps = [[t(f)] + [t(x) for x in (levels or [])] for f in feats]
    ctx = StepContext(
        iteration=iteration,
        max_iterations=100,
        labeled={"image": torch.zeros(n_l, 1, *size), "label": torch.tensor(gt)[:, None]},
        unlabeled={"image": torch.zeros(n_u, 1, *size)},
        logits_l=[t(x[:n_l]) for x in logits],
        logits_u=[t(x[n_l:]) for x in logits],
        features_l=[[m[:n_l] for m in ms] for ms in maps],
        features_u=[[m[n_l:] for m in ms] for ms in maps],
    )
    return ctx, np.stack(feats), gt, logits


# ---- helpers -------------------------------------------------------------------------------------------------
def test_scale_selection_label_sampling_and_probability_pooling():
    feats = [torch.zeros(1, 8, 2, 3), torch.zeros(1, 4, 4, 5), torch.zeros(1, 2, 7, 10)]
    assert select_scale(feats, (7, 10), 2) is feats[1] and select_scale(feats, (7, 10), 4) is feats[0]
    with pytest.raises(ValueError, match="stride 8"):
        select_scale(feats, (7, 10), 8)
    label = torch.arange(35).view(1, 1, 5, 7)
    # stride 2: feature pixel i's centre is input pixel 2i + 1, clamped to the last row/column
    assert labels_at(label, 2)[0].tolist() == [[8, 10, 12, 13], [22, 24, 26, 27], [29, 31, 33, 34]]
    probs = torch.arange(15.0).view(1, 1, 3, 5)
    # 2x2 footprints, partial at the far edges: the mean of the pixels that exist
    expected = [[(0 + 1 + 5 + 6) / 4, (2 + 3 + 7 + 8) / 4, (4 + 9) / 2], [(10 + 11) / 2, (12 + 13) / 2, 14]]
    assert probs_at(probs, 2)[0, 0].tolist() == expected


def test_class_balanced_sampling_limits_each_other_class():
    labels = torch.tensor([0] * 10 + [1] * 3 + [2] * 2 + [1])
    mask = torch.ones_like(labels, dtype=torch.bool)
    mask[-1] = False
    anchors, negatives = sample_per_class(labels, mask, num_anchors=3, num_negatives=4)
    # up to 3 anchors per class; each class offers 4 // (3 - 1) = 2 negatives, so background cannot dominate
    assert np.bincount(labels[anchors].numpy()).tolist() == [3, 3, 2]
    assert np.bincount(labels[negatives].numpy()).tolist() == [2, 2, 2]
    assert 15 not in anchors.tolist() + negatives.tolist()  # masked pixels never sampled
    assert len(set(anchors.tolist())) == len(anchors)  # without replacement


def test_tile_blocks_cover_every_pixel_once():
    x = torch.arange(35).view(1, 1, 5, 7)
    tiles = tile_blocks(x, [2, 3], pad_value=-1)
    assert tiles.shape == (1, 9, 1, 6)
    values = tiles.flatten()
    assert sorted(values[values >= 0].tolist()) == list(range(35))
    assert tiles[0, 2, 0].tolist() == [6, -1, -1, 13, -1, -1]  # the last, partial block of the first rows


# ---- SCL -----------------------------------------------------------------------------------------------------
def test_scl_matches_a_hand_computed_value():
    rng = np.random.default_rng(0)
    ctx, feats, gt, logits = tiny_context(rng, gt=np.array([[[0, 1, 2], [0, 0, 1]]]))
    term = SCLTerm(in_channels=(4, 4), stride=1, hidden=4, out=4)
    identity_projector(term.projector)
    loss = term(ctx)

    labels, conf, _ = np_targets(gt, logits)
    assert conf[0, 1, 0, 0] < 0.5  # the uncertain pseudo-labelled pixel is not an anchor
    z = np_pixels(unit(feats, axis=2)[:, :, :, :, :])
    y, ok = labels.reshape(-1), conf.reshape(-1) > 0.5
    expected = np_infonce_loss(z, y, ok, lambda c: z[ok & (y != c)])
    assert np.isclose(float(loss.detach()), expected, rtol=1e-5)
    assert isinstance(term.weight, GaussianRampUp) and term.last_stats["anchors"] == ok.sum()
    loss.backward()
    assert term.projector.shared.weight.grad.abs().sum() > 0
    # before unlabeled_start, pseudo-labelled pixels take no part (the rows of batch item 1 of each student)
    term.unlabeled_start = 1
    labelled_only = ok & (np.arange(len(y)) // 6 % 2 == 0)
    expected = np_infonce_loss(z, y, labelled_only, lambda c: z[labelled_only & (y != c)])
    assert np.isclose(float(term(ctx).detach()), expected, rtol=1e-5)


def test_scl_without_a_second_class_is_zero_but_differentiable():
    rng = np.random.default_rng(1)
    ctx, *_ = tiny_context(rng, n_u=0, gt=np.zeros((1, 2, 3), int))
    ctx.unlabeled = None
    term = SCLTerm(in_channels=(4, 4), stride=1, hidden=8, out=4)
    loss = term(ctx)
    assert float(loss.detach()) == 0.0 and loss.requires_grad


def test_scl_with_reps_uses_registered_positives_and_fills_the_bank():
    rng = np.random.default_rng(2)
    ctx, feats, gt, logits = tiny_context(rng, gt=np.array([[[0, 1, 2], [2, 0, 1]]]))
    p2w_lab = torch.eye(4, dtype=torch.float64)[None]  # world (i, j, 0)
    p2w_unl = p2w_lab.clone()
    p2w_unl[0, 2, 3] = 10.0  # the unlabelled slice sits 10 mm away from every stored slice
    ctx.labeled.update(case_id=["lab"], slice_index=torch.tensor([0]), pixel_to_world=p2w_lab)
    ctx.unlabeled.update(case_id=["unl"], slice_index=torch.tensor([3]), pixel_to_world=p2w_unl)
    corr = AffineCorrespondences(["lab", "unl", "other"], {("lab", "other"): np.eye(4), ("unl", "other"): np.eye(4)})
    reps = RegistrationPositives(corr, capacity=5, label_weight=0.3, registration_weight=0.7)
    stored = rng.uniform(0.1, 1.0, (1, 4, 2, 3))
    reps.update(torch.tensor(stored, dtype=torch.float32), p2w_lab, ["other"], [0], stride=1)
    term = SCLTerm(in_channels=(4, 4), stride=1, hidden=4, out=4, reps=reps)
    identity_projector(term.projector)
    loss = term(ctx)

    labels, conf, _ = np_targets(gt, logits)
    zs = unit(feats, axis=2)
    z = np_pixels(zs)
    y, ok = labels.reshape(-1), conf.reshape(-1) > 0.5
    b_of = np.tile(np.repeat([0, 1], 6), 2)  # (s, b, i, j) order: batch row of each pixel

    def positive(a, proto):
        if b_of[a] == 1:  # unlabelled slice: nothing stored near it
            return proto
        i, j = divmod(a % 6, 3)
        return unit(0.3 * proto + 0.7 * unit(stored[0, :, i, j]))

    expected = np_infonce_loss(z, y, ok, lambda c: z[ok & (y != c)], positive)
    assert np.isclose(float(loss.detach()), expected, rtol=1e-5)
    assert 0 < term.last_stats["reps_found"] < 1
    # the batch went into the bank: the normalised mean of both students' embeddings, per slice
    assert set(reps.bank.keys()) == {("other", 0), ("lab", 0), ("unl", 3)}
    bank_map, bank_m = reps.bank.get("unl", 3)
    assert np.allclose(bank_map.numpy(), unit(zs[:, 1].mean(0), axis=0), atol=1e-6)
    assert torch.equal(bank_m, p2w_unl[0])


def test_scl_with_reps_needs_slice_geometry():
    ctx, *_ = tiny_context(np.random.default_rng(8))
    reps = RegistrationPositives(AffineCorrespondences(["a"], {}), capacity=2)
    term = SCLTerm(in_channels=(4, 4), stride=1, hidden=8, out=4, reps=reps)
    with pytest.raises(ValueError, match="no 'pixel_to_world'"):
        term(ctx)


# ---- MCSC ----------------------------------------------------------------------------------------------------
def np_pool2(x):
    """Average 2x2 pooling of (..., 2, 4) -> (..., 1, 2)."""
    return x.reshape(*x.shape[:-2], 1, 2, 2, 2).mean(axis=(-3, -1))


def test_mcsc_matches_a_hand_computed_value_over_two_scales():
    rng = np.random.default_rng(3)
    coarse = [rng.uniform(0.1, 1.0, (2, 4, 1, 2)) for _ in range(2)]  # stride-2 maps of a 2x4 input
    ctx, feats, gt, logits = tiny_context(rng, size=(2, 4), gt=np.array([[[0, 1, 2, 1], [1, 1, 2, 0]]]))
    for k in range(2):
        ctx.features_l[k].append(torch.tensor(coarse[k][:1], dtype=torch.float32))
        ctx.features_u[k].append(torch.tensor(coarse[k][1:], dtype=torch.float32))
    term = MCSCTerm(in_channels=[(4, 4), (4, 4)], scales=[(1, 8), (2, 8)], shuffle_blocks=False, hidden=4, out=4)
    for proj in term.projector:
        identity_projector(proj)
    loss = term(ctx)

    labels, _, _ = np_targets(gt, logits)  # no confidence filter in MCSC
    fine = np_balanced_supcon(np_pixels(unit(feats, axis=2)), labels.reshape(-1))
    # stride 2: labels at the centre pixel (row 1, columns 1 and 3), pseudo-labels from pooled probabilities
    gt2 = gt[:, 1:2, 1::2]
    labels2 = np.stack(
        [np.concatenate([gt2, np_pool2(softmax(logits[1 - k]))[1:].argmax(1)]) for k in range(2)]
    ).reshape(-1)
    coarse_loss = np_balanced_supcon(np_pixels(unit(np.stack(coarse), axis=2)), labels2)
    assert np.isclose(float(loss.detach()), fine + coarse_loss, rtol=1e-5)
    assert term.weight(0, 100) == 0.001


def test_mcsc_covers_the_last_partial_block():
    rng = np.random.default_rng(4)
    gt = np.zeros((2, 5, 5), int)
    gt[:, 4, 4] = 1  # the only foreground: the bottom-right pixel, alone in the last (padded) 2x2 block
    ctx, feats, *_ = tiny_context(rng, n_l=2, n_u=0, size=(5, 5), gt=gt)
    term = MCSCTerm(in_channels=[(4, 4)], scales=[(1, 2)], shuffle_blocks=False, hidden=4, out=4)
    identity_projector(term.projector[0])
    loss = term(ctx)
    # every other block is background only and skipped; the last block holds 2 slices x 2 students
    z = unit(feats[:, :, :, 4, 4], axis=-1).reshape(-1, 4)
    assert float(loss.detach()) > 0
    assert np.isclose(float(loss.detach()), np_balanced_supcon(z, np.ones(4, int)), rtol=1e-5)
    # processing the 9 groups one at a time under checkpointing gives the same loss and gradients
    loss.backward()
    grad = term.projector[0].shared.weight.grad.clone()
    term.zero_grad()
    term.group_chunk = 1
    chunked = term(ctx)
    chunked.backward()
    assert torch.allclose(chunked, loss) and torch.allclose(term.projector[0].shared.weight.grad, grad)
    assert grad.abs().sum() > 0


def test_mcsc_block_shuffling_keeps_the_loss_of_a_single_slice():
    rng = np.random.default_rng(5)
    gt = rng.integers(0, 3, (1, 6, 6))
    ctx, *_ = tiny_context(rng, n_l=1, n_u=0, size=(6, 6), gt=gt)
    term = MCSCTerm(in_channels=[(4, 4)], scales=[(1, 3)], shuffle_blocks=False, hidden=8, out=4)
    plain = float(term(ctx).detach())
    term.shuffle_blocks = True
    torch.manual_seed(0)
    assert np.isclose(float(term(ctx).detach()), plain, rtol=1e-6)  # one slice: shuffling only renumbers the groups


# ---- MCSCv2 --------------------------------------------------------------------------------------------------
def test_certain_pixels_drop_exactly_the_most_uncertain_fraction():
    probs = torch.tensor(
        [[0.98, 0.01, 0.01], [0.6, 0.3, 0.1], [0.34, 0.33, 0.33], [0.55, 0.45, 0.0], [0.7, 0.15, 0.15]]
    ).t()[None, :, None, :]  # (1, 3, 1, 5); entropies, highest first: pixel 2, 1, 4, 3, 0
    assert certain_pixels(probs, 0.0, 0.5)[0, 0].tolist() == [True, True, False, True, True]
    assert certain_pixels(probs, 0.4, 0.5)[0, 0].tolist() == [True, False, False, True, True]  # drops 2 and 1
    assert certain_pixels(probs, 0.6, 0.5)[0, 0].tolist() == [True, False, False, True, False]  # and 4
    assert certain_pixels(probs, 0.0, 0.9)[0, 0].tolist() == [True, False, False, False, False]


def test_hard_negative_rank_rule():
    probs = torch.tensor([[0.5, 0.3, 0.2], [0.5, 0.3, 0.2], [0.1, 0.2, 0.7], [0.5, 0.3, 0.2]])
    labels = torch.tensor([0, 1, 2, -1])
    # row 1: GT class 1 although the teacher prefers 0; class 0 has rank 0, so it is no (r_l = 1) hard negative
    assert hard_negative_mask(probs, labels, 1, 2).tolist() == [
        [False, True, True],
        [False, False, True],
        [True, True, False],
        [False, False, False],
    ]
    assert hard_negative_mask(probs, labels, 1, 1).tolist() == [
        [False, True, False],
        [False, False, False],
        [False, True, False],
        [False, False, False],
    ]


def test_mcscv2_matches_a_hand_computed_value():
    rng = np.random.default_rng(6)
    ctx, feats, gt, logits = tiny_context(rng, gt=np.array([[[0, 1, 2], [2, 0, 1]]]))
    for x in logits:  # sharper teachers, so that some pseudo-labels pass the 0.9 threshold
        x *= 3.0
    ctx.logits_l = [torch.tensor(x[:1], dtype=torch.float32) for x in logits]
    ctx.logits_u = [torch.tensor(x[1:], dtype=torch.float32) for x in logits]
    term = MCSCv2Term(
        in_channels=(4, 4), stride=1, beta=0.25, rank_low=1, rank_high=1, push_fraction=1.0, hidden=4, out=4
    )
    identity_projector(term.projector)
    loss = term(ctx)

    labels, _, probs = np_targets(gt, logits)
    z = np_pixels(unit(feats, axis=2))
    y = labels.reshape(-1)
    anchor = np.ones_like(labels, bool)
    for k in range(2):
        p = probs[k, 1]  # the teacher's unlabelled map (K, 2, 3)
        entropy = -(p * np.log(p)).sum(0).reshape(-1)
        certain = p.max(0).reshape(-1) > 0.9
        certain[np.argsort(-entropy)[:1]] = False  # floor(0.25 * 6) = 1 most uncertain pixel dropped
        anchor[k, 1] = certain.reshape(2, 3)
    anchor = anchor.reshape(-1)
    assert 0 < anchor[12:18].sum() < 6 or 0 < anchor[18:].sum() < 6  # the filter did something
    p_flat = np.moveaxis(probs, 2, -1).reshape(-1, 3)
    second = np.argsort(-p_flat, axis=1, kind="stable")[:, 1]  # rank-1 class of every pixel
    banks = {c: z[(second == c) & (y != c)] for c in range(3)}
    expected = np_infonce_loss(z, y, anchor, lambda c: banks[c])
    assert np.isclose(float(loss.detach()), expected, rtol=1e-5)
    assert [term.banks.count(c) for c in range(3)] == [len(banks[c]) for c in range(3)]


def test_mcscv2_beta_schedule_and_bank_limits():
    term = MCSCv2Term(in_channels=(4, 4), stride=1, bank_size=4, push_fraction=0.5, hidden=8, out=4)
    assert [term.beta(i, 100) for i in (0, 50, 100)] == pytest.approx([0.2, 0.1, 0.0])
    rng = np.random.default_rng(7)
    for it in range(3):
        ctx, *_ = tiny_context(rng, iteration=it * 50, size=(3, 3))
        term(ctx)
        assert term.last_stats["beta"] == pytest.approx(0.2 - 0.1 * it)
        assert term.last_stats["pushed"] <= 2 * 3  # floor(0.5 * 4) per class and update
        assert all(term.banks.count(c) <= min(4, 2 * (it + 1)) for c in range(3))
    assert len(term.banks) == 12  # 3 classes, full


# ---- in the trainer ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_datalist(tmp_path_factory):
    sys.path.insert(0, str(REPO))
    from tests.test_trainer import tiny_dataset

    return tiny_dataset(tmp_path_factory.mktemp("contrast"))


@pytest.mark.parametrize("kind", ["scl_reps", "mcsc", "mcsc2"])
def test_contrastive_terms_train_in_the_semi_supervised_trainer(tiny_datalist, kind):
    from ignite.engine import Events

    from monai_ssl.data.pipeline import training_datasets
    from monai_ssl.data.slices import SemiSupervisedLoader
    from monai_ssl.engines.trainer import SemiSupervisedTrainer, loss_summary
    from monai_ssl.losses.terms import CrossPseudoTerm, SupervisedTerm
    from monai_ssl.networks.unet import FeatureUNet

    set_determinism(0)
    lab, unl = training_datasets(tiny_datalist, (16, 16), pixdim=(-1, -1, -1))
    loader = SemiSupervisedLoader(lab, unl, batch_size=4, labeled_ratio=0.5, seed=0)
    nets = [FeatureUNet(2, 1, 3, channels=(4, 8, 16), num_res_units=1) for _ in range(2)]
    if kind == "scl_reps":
        ids = ["lab", "u0", "u1"]  # same grid for all tiny volumes: identity correspondences
        corr = AffineCorrespondences(ids, {(a, b): np.eye(4) for a in ids for b in ids if a != b})
        term = SCLTerm(stride=2, reps=RegistrationPositives(corr, capacity=8), hidden=16, out=8)
    elif kind == "mcsc":
        term = MCSCTerm(scales=[(1, 8), (4, 4)], hidden=16, out=8, weight=0.1)
    else:
        term = MCSCv2Term(stride=2, bank_size=64, hidden=16, out=8, weight=0.1)
    assert term.projector is None  # built from the students' channels when bound
    bind_terms([term], nets)
    assert term.projector.first[0].in_channels == 8 if kind != "mcsc" else term.projector[1].first[0].in_channels == 16
    # one AdamW over students and projector, as student_optimizer(nets, extra_modules=[term.projector]) makes
    params = [p for m in (*nets, term.projector) for p in m.parameters()]
    optimizers = torch.optim.AdamW(params, lr=5e-3, weight_decay=5e-4)
    shared = term.projector.shared if kind != "mcsc" else term.projector[0].shared
    before = shared.weight.detach().clone()
    trainer = SemiSupervisedTrainer(
        "cpu", 3, loader, nets, optimizers, [SupervisedTerm(), CrossPseudoTerm(), term], epoch_length=1
    )
    log = []
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: log.append(loss_summary(e.state.output)))
    trainer.run()
    assert len(log) == 3
    assert all(np.isfinite(r[term.name]) and np.isfinite(r["loss"]) for r in log)
    assert log[1][term.name] > 0 and log[1][f"w_{term.name}"] == pytest.approx(float(term.weight(1, 3)))
    assert shared.weight.grad is not None and shared.weight.grad.abs().sum() > 0  # gradients reach the shared layer
    assert not torch.equal(shared.weight, before)  # and the projector is optimised
    if kind == "scl_reps":
        assert len(term.reps.bank) == 8  # 3 iterations x 4 slices, capacity 8
        # the third batch has slices at the positions of stored slices of other volumes (slices 1 and 5)
        assert term.last_stats["reps_found"] > 0
