"""Teacher-student terms: EMA arithmetic, MT/UAMT values, FixMatch view alignment, cross-scale consistency."""

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from ignite.engine import Events

from monai_ssl.losses.teacher import (
    CrossScaleTerm,
    EMATeacher,
    FixMatchTerm,
    MeanTeacherTerm,
    entropy,
    predict_at_scales,
    scale_consistency,
)
from monai_ssl.losses.terms import LossTerm, StepContext, bind_terms


def bound(term: LossTerm, students) -> LossTerm:
    """``term`` bound to ``students`` (teacher copied from its student), as the trainer's config does."""
    return bind_terms([term], students)[0]


def ctx_u(image, logits_u, iteration=0, max_iterations=10, networks=()):
    return StepContext(
        iteration=iteration,
        max_iterations=max_iterations,
        labeled={},
        unlabeled={"image": image},
        logits_l=[logits[:0] for logits in logits_u],
        logits_u=logits_u,
        networks=networks,
    )


class Scalar(nn.Module):
    """One weight, one buffer: EMA arithmetic by hand."""

    def __init__(self, w):
        super().__init__()
        self.w = nn.Parameter(torch.tensor(float(w)))
        self.register_buffer("stat", torch.tensor(0.0))

    def forward(self, x):
        return x * self.w


class Pointwise(nn.Module):
    """Per-pixel logits ``(x, -x)``: equivariant to every flip and rotation."""

    def forward(self, x):
        return torch.cat([3 * x, -3 * x], dim=1)


def test_ema_update_arithmetic():
    student = Scalar(1.0)
    teacher = EMATeacher(student, decay=0.9)
    assert not any(p.requires_grad for p in teacher.parameters())
    student.w.data.fill_(3.0)
    student.stat.fill_(7.0)
    # update 1 with warm-up: a = min(1 - 1/2, 0.9) = 0.5 -> 0.5 * 1 + 0.5 * 3 = 2
    teacher.update(0)
    assert teacher.model.w.item() == pytest.approx(2.0) and teacher.model.stat.item() == 7.0
    teacher.update(0)  # same iteration (a shared teacher): no second update
    assert teacher.model.w.item() == pytest.approx(2.0) and int(teacher.updates) == 1
    # update 2: a = min(1 - 1/3, 0.9) = 2/3 -> 2/3 * 2 + 1/3 * 3 = 7/3
    teacher.update(1)
    assert teacher.model.w.item() == pytest.approx(7 / 3)
    # far along, a = decay: 0.9 * t + 0.1 * s
    teacher.updates.fill_(100)
    before = teacher.model.w.item()
    teacher.update(2)
    assert teacher.model.w.item() == pytest.approx(0.9 * before + 0.1 * 3.0)
    # without warm-up the decay applies from the start
    fixed = EMATeacher(Scalar(1.0), decay=0.99, warmup=False)
    fixed.student.w.data.fill_(2.0)
    fixed.update()
    assert fixed.model.w.item() == pytest.approx(0.99 + 0.02)


def test_ema_teacher_state_is_checkpointed_and_not_optimised():
    student = Scalar(1.0)
    term = bound(MeanTeacherTerm(decay=0.5), [student])
    keys = set(nn.ModuleList([term]).state_dict())
    assert {"0.teacher.model.w", "0.teacher.updates"} <= keys
    assert not any(k.startswith("0._students") for k in keys)
    assert [p for p in term.parameters() if p.requires_grad] == []


def test_mean_teacher_loss_is_mse_to_the_teacher():
    torch.manual_seed(0)
    student = Pointwise()
    term = bound(MeanTeacherTerm(noise_std=0.0), [student])
    x = torch.randn(2, 1, 4, 4)
    logits = torch.randn(2, 2, 4, 4)
    expected = ((torch.softmax(logits, 1) - torch.softmax(Pointwise()(x), 1)) ** 2).mean()
    assert term(ctx_u(x, [logits])).item() == pytest.approx(expected.item(), rel=1e-6)


def test_uamt_masks_uncertain_pixels():
    # teacher logits: confident pixel (6, -6) and a perfectly uncertain one (0, 0) whose entropy is ln 2
    x = torch.tensor([[[[2.0, 0.0]]]])
    student_logits = torch.tensor([[[[0.0, 0.0]], [[0.0, 0.0]]]])  # softmax 0.5 everywhere
    term = bound(MeanTeacherTerm(noise_std=0.0, uncertainty=True, mc_samples=2), [Pointwise()])
    # threshold at iteration 0 of 10: (0.75 + 0.25 exp(-5)) ln 2 < ln 2, so only pixel 0 counts
    assert term.threshold(0, 10, 2) == pytest.approx((0.75 + 0.25 * math.exp(-5)) * math.log(2))
    ctx = ctx_u(x, [student_logits])
    p = torch.sigmoid(torch.tensor(12.0)).item()  # teacher probability of class 0 at pixel 0
    expected = ((0.5 - p) ** 2 + (0.5 - (1 - p)) ** 2) / 2  # mean over the 2 classes of the one kept pixel
    assert term(ctx).item() == pytest.approx(expected, rel=1e-5)
    assert ctx.scalars["mt/certain_fraction"] == pytest.approx(0.5)
    assert entropy(torch.tensor([[[0.5]], [[0.5]]])[None]).item() == pytest.approx(math.log(2), rel=1e-6)


def test_fixmatch_pseudo_labels_align_with_the_strong_view():
    # with an equivariant student and no photometric change, the strong view's logits mapped back equal the weak
    # view's: the loss is CE of the logits against their own argmax, masked by confidence. A wrong inverse on
    # this asymmetric image would compare different pixels and change the value.
    torch.manual_seed(0)
    x = torch.randn(4, 1, 6, 6)
    student = Pointwise()
    term = bound(FixMatchTerm(threshold=0.9, strength=0.0, use_teacher=False), [student])
    logits = student(x)
    ctx = ctx_u(x, [logits], networks=[student])
    conf, y = torch.softmax(logits, 1).max(1)
    mask = (conf >= 0.9).float()
    expected = (F.cross_entropy(logits, y, reduction="none") * mask).sum() / mask.numel()
    assert term(ctx).item() == pytest.approx(expected.item(), rel=1e-6)
    assert 0 < ctx.scalars["fixmatch/confident_fraction"] < 1


def test_fixmatch_is_zero_below_no_confident_pixel_and_uses_the_teacher():
    x = torch.full((2, 1, 4, 4), 0.01)  # probabilities near 0.5: nothing is confident
    student = Pointwise()
    term = bound(FixMatchTerm(threshold=0.95), [student])
    assert term(ctx_u(x, [student(x)], networks=[student])).item() == 0.0
    assert isinstance(term.teacher, EMATeacher)


class WidthLogits(nn.Module):
    """Logits ``(W / 10, 0)`` at every pixel: the prediction depends on the input's scale."""

    def forward(self, x):
        b, _, h, w = x.shape
        return torch.stack([torch.full((b, h, w), w / 10.0), torch.zeros(b, h, w)], dim=1)


def test_cross_scale_resampling_and_consistency_by_hand():
    x = torch.zeros(1, 1, 8, 8)
    logits = predict_at_scales(WidthLogits(), x, (1.0, 0.5))
    assert [tuple(p.shape) for p in logits] == [(1, 2, 8, 8)] * 2
    assert torch.allclose(logits[0][:, 0], torch.tensor(0.8)) and torch.allclose(logits[1][:, 0], torch.tensor(0.4))
    p1, p2 = torch.sigmoid(torch.tensor(0.8)), torch.sigmoid(torch.tensor(0.4))
    # two scales: each deviates from the mean by |p1 - p2| / 2 in both classes
    expected = ((p1 - p2) / 2) ** 2
    probs = [torch.softmax(v, 1) for v in logits]
    assert scale_consistency(probs).item() == pytest.approx(expected.item(), rel=1e-5)
    assert scale_consistency([probs[0], probs[0]]).item() == 0.0


def test_cross_scale_keeps_only_stable_pixels():
    class Teacher(nn.Module):
        """Class 1 on the left half at full scale; at half scale everything is class 0."""

        def forward(self, x):
            w = x.shape[-1]
            out = torch.zeros(x.shape[0], 2, *x.shape[2:])
            out[:, 0] = 1.0
            if w == 8:
                out[:, 1, :, :4] = 3.0
            return out

    term = bound(CrossScaleTerm(scales=(1.0, 0.5), snapshot_interval=1), [Teacher()])
    term.teacher.model = Teacher()
    term.snapshot = Teacher()
    labels, stable = term.refined_labels(torch.zeros(1, 1, 8, 8))
    # left half: class 1 at scale 1 but class 0 at scale 0.5 -> unstable; right half: class 0 everywhere
    assert stable[..., 4:].all() and not stable[..., :4].any()
    assert (labels[..., 4:] == 0).all()


def test_cross_scale_snapshot_follows_the_teacher_at_its_interval():
    student = Scalar(1.0)
    term = bound(CrossScaleTerm(scales=(1.0, 0.5), snapshot_interval=2, decay=0.0, weight=1.0), [student])
    student.w.data.fill_(5.0)
    term.step_completed(0)  # teacher -> 5 (decay 0 copies), snapshot not yet refreshed (iteration 1 of 2)
    assert term.teacher.model.w.item() == 5.0 and term.snapshot.w.item() == 1.0
    term.step_completed(1)
    assert term.snapshot.w.item() == 5.0


def _batches(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        image = torch.rand(4, 1, 16, 16, generator=g)
        label = (image > 0.5).long()
        out.append({"labeled": {"image": image[:2], "label": label[:2]}, "unlabeled": {"image": image[2:]}})
    return out


def test_teacher_terms_train_in_the_trainer_and_skip_zero_weights():
    from monai_ssl.engines.trainer import SemiSupervisedTrainer
    from monai_ssl.losses.infonce import InfoNCETerm
    from monai_ssl.losses.schedules import WarmupWeight
    from monai_ssl.losses.terms import SupervisedTerm
    from monai_ssl.networks import FeatureUNet

    torch.manual_seed(0)
    nets = [FeatureUNet(2, 1, 2, channels=(4, 8, 16), num_res_units=1) for _ in range(2)]
    teacher = EMATeacher(nets[0], decay=0.9)
    terms = [
        SupervisedTerm(),
        MeanTeacherTerm(teacher=teacher, uncertainty=True, mc_samples=2),
        FixMatchTerm(teacher=teacher, threshold=0.0),
        CrossScaleTerm(scales=(1.0, 0.5), snapshot_interval=2),
        InfoNCETerm(weight=WarmupWeight(0.1, warmup_iterations=2), stride=4, pixels=32, hidden=8, out=4),
    ]
    bind_terms(terms, nets)  # before the optimiser: InfoNCE's heads are created here
    initial = [p.clone() for p in teacher.model.parameters()]
    opts = [torch.optim.AdamW(n.parameters(), lr=1e-3) for n in nets]
    head = torch.optim.AdamW([p for t in terms for p in t.parameters() if p.requires_grad], lr=1e-3)
    trainer = SemiSupervisedTrainer("cpu", 1, _batches(4), nets, opts + [head], terms, epoch_length=4)
    seen = []
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: seen.append(set(e.state.output["terms"])))
    trainer.run()
    assert int(teacher.updates) == 4  # shared by two terms, updated once per iteration
    assert any(not torch.equal(a, b) for a, b in zip(initial, teacher.model.parameters(), strict=True))
    assert int(terms[3].teacher.updates) == 4
    assert "infonce" in seen[0] and "infonce" in seen[1]
    assert "infonce" not in seen[2] and "infonce" not in seen[3]  # weight 0 after the warm-up: not evaluated
    assert all({"sup", "mt", "fixmatch", "xscale"} <= s for s in seen)


def test_cross_scale_term_runs_on_3d_students():
    # HSTF with 3D students (e.g. MONAI's 3D U-Net): trilinear resampling back to the patch grid
    from monai_ssl.networks import FeatureUNet

    torch.manual_seed(0)
    nets = [FeatureUNet(3, 1, 2, channels=(4, 8), num_res_units=1) for _ in range(2)]
    x = torch.rand(2, 1, 8, 8, 4)
    logits = predict_at_scales(nets[0], x, (1.0, 0.5))
    assert [tuple(v.shape) for v in logits] == [(2, 2, 8, 8, 4)] * 2
    term = bound(CrossScaleTerm(scales=(1.0, 0.5)), nets)
    loss = term(ctx_u(x, [n(x) for n in nets], networks=nets))
    loss.backward()
    assert torch.isfinite(loss) and all(p.grad is not None for p in nets[1].parameters())
