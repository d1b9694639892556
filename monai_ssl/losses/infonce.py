"""Contrastive pretraining branch: global (image-level) and local (pixel-level) InfoNCE between two views.

View 1 is the batch the trainer already ran (its decoder features come with the step); view 2 is a random
flip/rot90 (:class:`~monai_ssl.data.views.FlipRotate`) plus intensity jitter of the same slices, run through the
same student. Both losses are MONAI's NT-Xent (:class:`monai.losses.ContrastiveLoss`, cosine similarity):

* global: the bottleneck, average-pooled and projected by a two-layer MLP; slice ``i`` of view 1 and of view 2
  are positives, every other slice of either view a negative;
* local: a decoder map at ``stride`` projected per pixel; view 2's map is mapped back by the exact inverse of
  the flip/rotation, so the same pixel position holds the same anatomy in both views; ``pixels`` random
  positions are drawn and each pixel's positive is itself in the other view, every other drawn pixel a negative.

As a warm-up, give it a :class:`~monai_ssl.losses.schedules.WarmupWeight`; the trainer skips it once its
weight is 0. As an extra term, give it a constant weight.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
from monai.losses import ContrastiveLoss

from monai_ssl.data.views import FlipRotate, strong_intensity
from monai_ssl.losses.contrastive import channels_at, select_scale
from monai_ssl.losses.schedules import WeightSchedule
from monai_ssl.losses.terms import LossTerm, StepContext, check_student
from monai_ssl.networks.projector import ContrastProjector

__all__ = ["InfoNCETerm"]


class InfoNCETerm(LossTerm):
    """``global_weight * NT-Xent(global) + local_weight * NT-Xent(local)`` for student ``student``.

    Args:
        name, weight: the term's name and weight or schedule.
        student: which student learns from this term (its channels size the projection heads when the term is
            bound; the second view runs through ``ctx.networks``).
        stride: the decoder map used for the local loss (its feature strides must include it); the input's
            spatial size must be a multiple of it so that flips and rotations map pixels onto pixels.
        pixels: positions drawn for the local loss per step (over the whole batch).
        temperature: NT-Xent temperature.
        strength: strength of the intensity jitter of view 2 (0: geometry only).
        seed: seed of the view and pixel draws.
    """

    needs_features = True

    def __init__(
        self,
        name: str = "infonce",
        weight: float | WeightSchedule = 0.1,
        student: int = 0,
        stride: int = 4,
        pixels: int = 256,
        temperature: float = 0.1,
        global_weight: float = 1.0,
        local_weight: float = 1.0,
        hidden: int = 256,
        out: int = 128,
        strength: float = 0.5,
        seed: int = 0,
    ):
        super().__init__(name, weight)
        self.student, self.stride, self.pixels = int(student), int(stride), int(pixels)
        self.global_weight, self.local_weight = float(global_weight), float(local_weight)
        self.hidden, self.out = int(hidden), int(out)
        self.global_head: nn.Module | None = None
        self.local_head: ContrastProjector | None = None
        self.loss = ContrastiveLoss(temperature=temperature)
        self.jitter = strong_intensity(strength, seed)
        self.generator = torch.Generator().manual_seed(seed)

    def bind(self, networks: Sequence[nn.Module]) -> None:
        check_student(self.name, networks, self.student)
        net = networks[self.student]
        bottleneck = int(net.feature_channels[0])
        hidden, out = self.hidden, self.out
        self.global_head = nn.Sequential(nn.Linear(bottleneck, hidden), nn.ReLU(), nn.Linear(hidden, out))
        self.local_head = ContrastProjector((channels_at(net, self.stride),), hidden=hidden, out=out)

    def _global(self, bottleneck: torch.Tensor) -> torch.Tensor:
        return self.global_head(bottleneck.flatten(2).mean(-1))

    def forward(self, ctx: StepContext) -> torch.Tensor:
        parts = [ctx.labeled["image"]] + ([ctx.unlabeled["image"]] if ctx.unlabeled is not None else [])
        x = torch.cat(parts)
        feats_1 = ctx.features_l[self.student]
        if ctx.unlabeled is not None:
            feats_1 = [torch.cat(pair) for pair in zip(feats_1, ctx.features_u[self.student], strict=True)]
        spatial = x.shape[2:]
        if any(s % self.stride for s in spatial):
            raise ValueError(f"loss term {self.name!r}: input size {list(spatial)} is not a multiple of {self.stride}")
        view = FlipRotate.for_batch(x, self.generator)
        _, feats_2 = ctx.networks[self.student].forward_features(view.apply(self.jitter(x)))
        loss = x.new_zeros(())
        if self.global_weight:
            loss = loss + self.global_weight * self.loss(self._global(feats_1[0]), self._global(feats_2[0]))
        if self.local_weight:
            z1 = self.local_head(select_scale(feats_1, spatial, self.stride), student=0)
            z2 = view.invert(self.local_head(select_scale(feats_2, spatial, self.stride), student=0))
            z1, z2 = (z.movedim(1, -1).reshape(-1, z.shape[1]) for z in (z1, z2))
            idx = torch.randperm(z1.shape[0], generator=self.generator)[: self.pixels].to(z1.device)
            loss = loss + self.local_weight * self.loss(z1[idx], z2[idx])
        return loss
