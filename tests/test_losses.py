"""Loss terms and weight schedules against values worked out by hand / with numpy."""

import math

import numpy as np
import pytest
import torch

from monai_ssl.losses.schedules import ConstantWeight, GaussianRampUp, LinearSchedule, as_schedule
from monai_ssl.losses.terms import CrossPseudoTerm, StepContext, SupervisedTerm

SMOOTH = 1e-5  # MONAI DiceLoss default smooth_nr = smooth_dr


def np_softmax(x):
    e = np.exp(x - x.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def np_batch_dice_loss(logits, target, n_classes):
    """1 - mean over classes of (2 sum(p t) + s) / (sum p + sum t + s), sums over batch and pixels."""
    p = np_softmax(logits)
    t = np.eye(n_classes)[target[:, 0]].transpose(0, 3, 1, 2)
    inter = (p * t).sum(axis=(0, 2, 3))
    denom = p.sum(axis=(0, 2, 3)) + t.sum(axis=(0, 2, 3))
    return float(np.mean(1 - (2 * inter + SMOOTH) / (denom + SMOOTH)))


def np_ce(logits, target):
    p = np_softmax(logits)
    picked = np.take_along_axis(p, target, axis=1)
    return float(-np.log(picked).mean())


def ctx_for(logits_l, logits_u, label=None):
    return StepContext(
        iteration=0,
        max_iterations=10,
        labeled={"label": label},
        unlabeled={"image": None},
        logits_l=logits_l,
        logits_u=logits_u,
    )


def test_gaussian_rampup_values():
    w = GaussianRampUp(0.1, ramp_iterations=100)
    assert math.isclose(w(0, 1000), 0.1 * math.exp(-5))
    assert math.isclose(w(50, 1000), 0.1 * math.exp(-5 * 0.25))
    assert math.isclose(w(100, 1000), 0.1) and math.isclose(w(500, 1000), 0.1)
    # default ramp length: the whole run
    assert math.isclose(GaussianRampUp(0.1)(25, 100), 0.1 * math.exp(-5 * 0.75**2))
    assert LinearSchedule(0.2, 0.0)(25, 100) == pytest.approx(0.15)
    assert as_schedule(0.3)(7, 9) == 0.3 and isinstance(as_schedule(0.3), ConstantWeight)


def test_supervised_term_matches_hand_computation():
    # one 2x2 slice, two classes; by hand: softmax of (2, 0) is (0.8808, 0.1192)
    logits = torch.tensor([[[[2.0, 0.0], [0.0, 1.0]], [[0.0, 0.0], [1.0, 1.0]]]])
    label = torch.tensor([[[[0, 0], [1, 1]]]])
    p0 = 1 / (1 + math.exp(-2))  # pixel (0,0): class 0 prob
    p_tl, p_tr, p_bl, p_br = p0, 0.5, 1 / (1 + math.exp(-1)), 0.5  # prob of the true class per pixel
    ce = -(math.log(p_tl) + math.log(p_tr) + math.log(p_bl) + math.log(p_br)) / 4
    # class 0: probs (p0, .5, 1-p_bl, .5) vs target (1, 1, 0, 0); class 1: complements
    q0 = [p0, 0.5, 1 - p_bl, 0.5]
    d0 = 1 - (2 * (q0[0] + q0[1]) + SMOOTH) / (sum(q0) + 2 + SMOOTH)
    q1 = [1 - q for q in q0]
    d1 = 1 - (2 * (q1[2] + q1[3]) + SMOOTH) / (sum(q1) + 2 + SMOOTH)
    expected = 0.5 * ce + 0.5 * (d0 + d1) / 2
    term = SupervisedTerm()
    assert term(ctx_for([logits], [], label)).item() == pytest.approx(expected, rel=1e-5)
    # summed over students
    assert term(ctx_for([logits, logits], [], label)).item() == pytest.approx(2 * expected, rel=1e-5)
    assert expected == pytest.approx(
        0.5 * np_ce(logits.numpy(), label.numpy()) + 0.5 * np_batch_dice_loss(logits.numpy(), label.numpy(), 2),
        rel=1e-5,
    )


@pytest.mark.parametrize("criterion", ["dice", "ce"])
def test_cross_pseudo_term_value_and_no_gradient_through_target(criterion):
    rng = np.random.default_rng(0)
    a_np, b_np = rng.normal(size=(2, 3, 4, 4)), rng.normal(size=(2, 3, 4, 4))
    a = torch.tensor(a_np, dtype=torch.float32, requires_grad=True)
    b = torch.tensor(b_np, dtype=torch.float32, requires_grad=True)
    term = CrossPseudoTerm(criterion=criterion)
    value = term(ctx_for([], [a, b]))
    pa, pb = a_np.argmax(1)[:, None], b_np.argmax(1)[:, None]
    if criterion == "dice":
        expected = np_batch_dice_loss(a_np, pb, 3) + np_batch_dice_loss(b_np, pa, 3)
    else:
        expected = np_ce(a_np, pb) + np_ce(b_np, pa)
    assert value.item() == pytest.approx(expected, rel=1e-4)
    # only one direction: the target student gets no gradient
    one_way = CrossPseudoTerm(criterion=criterion)._one(a, ctx_for([], [a, b]).pseudo_labels(1))
    one_way.backward()
    assert b.grad is None and a.grad is not None and a.grad.abs().sum() > 0
    assert math.isclose(CrossPseudoTerm().weight(0, 100), 0.1 * math.exp(-5))


def test_cross_pseudo_term_is_zero_when_students_agree_confidently():
    big = torch.zeros(1, 2, 3, 3)
    big[:, 0] = 30.0
    assert CrossPseudoTerm(criterion="ce")(ctx_for([], [big, big.clone()])).item() < 1e-6
