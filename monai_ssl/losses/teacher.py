"""Teacher-student loss terms: mean teacher (MT), uncertainty-aware MT (UAMT), FixMatch-style confidence
pseudo-labels and HSTF-style cross-scale consistency with refined pseudo-labels.

The teacher is an :class:`EMATeacher`: a frozen copy of one student whose weights follow the student's by an
exponential moving average after every optimiser step (the trainer calls ``LossTerm.step_completed``). It is a
submodule of the term that uses it, so the bundles' resumable checkpoint (``loss_terms``) saves and restores it;
its parameters do not require gradients, so no optimiser steps them. The teacher is copied from its student when
the term is bound (:meth:`LossTerm.bind`); terms run the students only through the step context.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from monai_ssl.data.views import FlipRotate, strong_intensity
from monai_ssl.losses.schedules import GaussianRampUp, WeightSchedule
from monai_ssl.losses.terms import LossTerm, StepContext, check_student
from monai_ssl.metrics.uncertainty import entropy

__all__ = [
    "EMATeacher",
    "MeanTeacherTerm",
    "FixMatchTerm",
    "CrossScaleTerm",
    "entropy",
    "predict_at_scales",
    "scale_consistency",
]


class EMATeacher(nn.Module):
    """Exponential-moving-average copy of a student (Tarvainen & Valpola's mean teacher).

    After update ``n`` (counting from 1) the teacher is ``a * teacher + (1 - a) * student`` with
    ``a = min(1 - 1 / (n + 1), decay)`` when ``warmup`` (early teachers follow the student closely), else
    ``a = decay``. Buffers (batch-norm statistics) are copied from the student. ``forward`` runs without
    gradient, in the student's current train/eval mode (noise and dropout active while training, as in MT).
    A teacher shared by several terms is updated once per iteration. Ours, not torch's ``AveragedModel`` or ignite's
    ``EMAHandler``: those have a constant (or linearly warmed) momentum, not MT's ``1 - 1/(n+1)``, and the teacher
    must be a submodule of the term so that the term's checkpoint carries it.
    """

    def __init__(self, student: nn.Module, decay: float = 0.99, warmup: bool = True):
        super().__init__()
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMATeacher: decay must be in [0, 1], got {decay}")
        self.model = copy.deepcopy(student)
        for p in self.model.parameters():
            p.requires_grad_(False)
        self._student = (student,)  # a tuple: not registered, never checkpointed or optimised twice
        self.decay, self.warmup = float(decay), bool(warmup)
        self.register_buffer("updates", torch.zeros((), dtype=torch.long))
        self._last_iteration: int | None = None

    @property
    def student(self) -> nn.Module:
        return self._student[0]

    def current_decay(self) -> float:
        """The EMA factor the next update will use."""
        n = int(self.updates) + 1
        return min(1.0 - 1.0 / (n + 1), self.decay) if self.warmup else self.decay

    @torch.no_grad()
    def update(self, iteration: int | None = None) -> None:
        """Move the teacher towards the student; a second call for the same ``iteration`` does nothing."""
        if iteration is not None and iteration == self._last_iteration:
            return
        a = self.current_decay()
        for t, s in zip(self.model.parameters(), self.student.parameters(), strict=True):
            t.mul_(a).add_(s.detach(), alpha=1.0 - a)
        for t, s in zip(self.model.buffers(), self.student.buffers(), strict=True):
            t.copy_(s)
        self.updates += 1
        self._last_iteration = iteration

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Teacher logits, without gradient; the teacher's mode follows the student's."""
        self.model.train(self.student.training)
        with torch.no_grad():
            return self.model(x)


class _TeacherTerm(LossTerm):
    """A term with an EMA teacher of student ``student``, copied from it when bound, or a shared ``teacher``."""

    needs_unlabeled = True

    def __init__(
        self, name: str, weight: float | WeightSchedule, teacher: EMATeacher | None, student: int, decay: float
    ):
        super().__init__(name, weight)
        self.student, self.decay = int(student), float(decay)
        self.teacher = teacher

    def bind(self, networks: Sequence[nn.Module]) -> None:
        check_student(self.name, networks, self.student)
        if self.teacher is None:
            self.teacher = EMATeacher(networks[self.student], self.decay)

    def step_completed(self, iteration: int) -> None:
        self.teacher.update(iteration)


class MeanTeacherTerm(_TeacherTerm):
    """Mean teacher consistency on unlabelled slices: ``MSE(softmax(student), softmax(teacher(x + noise)))``.

    The teacher sees the slices with clipped Gaussian noise (``noise_std``, clipped to ``+-noise_clip``).
    With ``uncertainty=True`` this is UAMT: the teacher target is the mean of ``mc_samples`` noisy passes (with
    dropout, if the network has any), its entropy ``u`` is the uncertainty, and the loss is averaged only over
    pixels with ``u < (0.75 + 0.25 * r(i)) * ln(C)``, where ``r`` is the Gaussian ramp-up from 0 to 1 over the
    run (Yu et al., 2019). Default weight: Gaussian ramp-up to 0.1.
    """

    def __init__(
        self,
        name: str = "mt",
        weight: float | WeightSchedule | None = None,
        teacher: EMATeacher | None = None,
        student: int = 0,
        decay: float = 0.99,
        noise_std: float = 0.1,
        noise_clip: float = 0.2,
        uncertainty: bool = False,
        mc_samples: int = 8,
    ):
        super().__init__(name, GaussianRampUp(0.1) if weight is None else weight, teacher, student, decay)
        if uncertainty and mc_samples < 2:
            raise ValueError(f"UAMT needs mc_samples >= 2, got {mc_samples}")
        self.noise_std, self.noise_clip = float(noise_std), float(noise_clip)
        self.uncertainty, self.mc_samples = bool(uncertainty), int(mc_samples)
        self.ramp = GaussianRampUp(1.0)

    def _noisy(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.clamp(torch.randn_like(x) * self.noise_std, -self.noise_clip, self.noise_clip)

    def threshold(self, iteration: int, max_iterations: int, num_classes: int) -> float:
        """UAMT's uncertainty threshold at ``iteration``: from ``0.75 ln C`` up to ``ln C``."""
        return (0.75 + 0.25 * self.ramp(iteration, max_iterations)) * math.log(num_classes)

    def forward(self, ctx: StepContext) -> torch.Tensor:
        x = ctx.unlabeled["image"]
        prob = torch.softmax(ctx.logits_u[self.student], dim=1)
        if not self.uncertainty:
            target = torch.softmax(self.teacher(self._noisy(x)), dim=1)
            return F.mse_loss(prob, target)
        passes = self.teacher(self._noisy(x.repeat(self.mc_samples, *([1] * (x.dim() - 1)))))
        target = torch.softmax(passes, dim=1).view(self.mc_samples, *prob.shape).mean(0)
        mask = (entropy(target) < self.threshold(ctx.iteration, ctx.max_iterations, prob.shape[1])).to(prob)
        self.report(ctx, certain_fraction=mask.mean())
        return (mask * (prob - target) ** 2).sum() / (prob.shape[1] * mask.sum() + 1e-8)


class FixMatchTerm(_TeacherTerm):
    """Confidence pseudo-labels (FixMatch-style) on unlabelled slices.

    The weak view is the slice as the sampler augmented it; the teacher's prediction on it gives a hard
    pseudo-label and a confidence. The strong view is a random flip/rot90 (:class:`FlipRotate`) of the weak
    view plus intensity and contrast jitter, noise and cut-out. The student's logits on the strong view are
    mapped back by the exact inverse of the flip/rotation, and cross-entropy against the pseudo-label is summed
    over pixels whose confidence is at least ``threshold`` and divided by all pixels (FixMatch's normalisation:
    the term fades when few pixels are confident). ``teacher=None`` builds an EMA teacher; pass
    ``use_teacher=False`` to use the student's own detached prediction instead, as in the original FixMatch.
    """

    def __init__(
        self,
        name: str = "fixmatch",
        weight: float | WeightSchedule = 1.0,
        teacher: EMATeacher | None = None,
        student: int = 0,
        decay: float = 0.99,
        threshold: float = 0.95,
        strength: float = 1.0,
        use_teacher: bool = True,
        seed: int = 0,
    ):
        super().__init__(name, weight, teacher, student, decay)
        self.threshold, self.use_teacher = float(threshold), bool(use_teacher)
        self.strong = strong_intensity(strength, seed)
        self.generator = torch.Generator().manual_seed(seed)

    def forward(self, ctx: StepContext) -> torch.Tensor:
        x = ctx.unlabeled["image"]
        logits = self.teacher(x) if self.use_teacher else ctx.logits_u[self.student].detach()
        confidence, pseudo = torch.softmax(logits.float(), dim=1).max(dim=1)
        view = FlipRotate.for_batch(x, self.generator)
        strong_logits = view.invert(ctx.networks[self.student](self.strong(view.apply(x))))
        mask = (confidence >= self.threshold).to(strong_logits.dtype)
        self.report(ctx, confident_fraction=mask.mean())
        ce = F.cross_entropy(strong_logits, pseudo, reduction="none")
        return (ce * mask).sum() / mask.numel()


def predict_at_scales(network: nn.Module, x: torch.Tensor, scales: Sequence[float]) -> list[torch.Tensor]:
    """Logits of ``network`` on ``x`` resized by each scale, resampled back to ``x``'s grid.

    Inputs are resized (bi/trilinear, antialiased when shrinking in 2D) to ``round(size * scale)``; logits
    are resized back with the same interpolation, so every prediction lies on the input's pixels.
    """
    size = list(x.shape[2:])
    mode = "bilinear" if len(size) == 2 else "trilinear"
    out = []
    for scale in scales:
        if scale == 1.0:
            out.append(network(x))
            continue
        small = [max(1, round(s * scale)) for s in size]
        xs = F.interpolate(x, size=small, mode=mode, align_corners=False, antialias=mode == "bilinear")
        out.append(F.interpolate(network(xs), size=size, mode=mode, align_corners=False))
    return out


def scale_consistency(probs: Sequence[torch.Tensor]) -> torch.Tensor:
    """Disagreement of predictions at several scales: mean squared deviation from their mean."""
    stacked = torch.stack(list(probs))
    return ((stacked - stacked.mean(0, keepdim=True)) ** 2).mean()


class CrossScaleTerm(_TeacherTerm):
    """HSTF-style cross-scale consistency with stability-refined teacher pseudo-labels.

    For every student, the unlabelled slices are also predicted at the other ``scales`` (e.g. 0.75 and 0.5);
    the predictions, resampled to the input grid, are pulled together by :func:`scale_consistency`. The
    teacher (EMA of student ``student``) predicts at every scale too. A pixel keeps the teacher's label (the
    argmax of its mean over scales) only when it is stable across scales (the same argmax at every scale) and
    across iterations (the same argmax as a snapshot of the teacher taken every ``snapshot_interval``
    iterations); the other pixels are ignored. Every student gets cross-entropy against the kept labels,
    averaged over kept pixels, weighted by ``pseudo_weight``. The students may be any mix of CNNs and
    transformers, 2D or 3D.
    """

    def __init__(
        self,
        name: str = "xscale",
        weight: float | WeightSchedule | None = None,
        teacher: EMATeacher | None = None,
        student: int = 0,
        decay: float = 0.99,
        scales: Sequence[float] = (1.0, 0.75, 0.5),
        snapshot_interval: int = 50,
        pseudo_weight: float = 1.0,
    ):
        super().__init__(name, GaussianRampUp(0.1) if weight is None else weight, teacher, student, decay)
        self.scales = tuple(float(s) for s in scales)
        if 1.0 not in self.scales or len(self.scales) < 2 or any(s <= 0 for s in self.scales):
            raise ValueError(f"CrossScaleTerm: scales must include 1.0 and another positive scale, got {scales}")
        if snapshot_interval < 1:
            raise ValueError(f"CrossScaleTerm: snapshot_interval must be positive, got {snapshot_interval}")
        self.snapshot_interval, self.pseudo_weight = int(snapshot_interval), float(pseudo_weight)
        self.snapshot: nn.Module | None = None

    def bind(self, networks: Sequence[nn.Module]) -> None:
        super().bind(networks)
        self.snapshot = copy.deepcopy(self.teacher.model).requires_grad_(False)

    def step_completed(self, iteration: int) -> None:
        super().step_completed(iteration)
        if (iteration + 1) % self.snapshot_interval == 0:
            self.snapshot.load_state_dict(self.teacher.model.state_dict())

    @torch.no_grad()
    def refined_labels(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Teacher labels ``(B, ...)`` and the mask of pixels stable across scales and iterations."""
        self.snapshot.train(self.teacher.student.training)
        probs = [torch.softmax(p.float(), dim=1) for p in predict_at_scales(self.teacher, x, self.scales)]
        per_scale = torch.stack([p.argmax(1) for p in probs])
        labels = torch.stack(probs).mean(0).argmax(1)
        stable = (per_scale == labels).all(0) & (self.snapshot(x).argmax(1) == labels)
        return labels, stable

    def forward(self, ctx: StepContext) -> torch.Tensor:
        x = ctx.unlabeled["image"]
        others = [s for s in self.scales if s != 1.0]
        labels, stable = self.refined_labels(x)
        self.report(ctx, stable_fraction=stable.float().mean())
        loss = x.new_zeros(())
        for k, net in enumerate(ctx.networks):
            logits = ctx.logits_u[k]
            probs = [torch.softmax(p, dim=1) for p in [logits, *predict_at_scales(net, x, others)]]
            loss = loss + scale_consistency(probs)
            if stable.any():
                ce = F.cross_entropy(logits, labels, reduction="none")
                loss = loss + self.pseudo_weight * ce[stable].mean()
        return loss
