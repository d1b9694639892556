"""Scribble-supervised loss terms (PCLMix-style) for one dual-decoder student.

The labelled slices carry scribbles (:mod:`monai_ssl.data.scribbles`): class indices on stroke pixels and
``ignore_index`` (255) elsewhere. Unlabelled slices, when the method uses them, count as slices without any
scribble. A method is ``l_sup + lambda_con * l_con + lambda_ctr * l_ctr``, three terms whose weights are the
lambdas:

* :class:`PartialCETerm` (``l_sup``): cross-entropy over scribbled pixels only, of the main decoder and, when the
  student is a :class:`~monai_ssl.networks.dual_decoder.DualDecoderUNet` whose auxiliary decoder ran this
  iteration, also of that decoder (the mean of the two).
* :class:`DualConsistencyTerm` (``l_con``): the dynamic pseudo-label (below) supervises both decoders on the
  batch (decoder-decoder consistency), and both decoders again on a **mixed** batch: images and pseudo-labels of
  the batch and of a shuffled copy of it are combined with random boxes (:func:`mix_batch`) and the mixed
  images are fed back through the network (mixed-vs-unmixed consistency). Both parts are Dice losses.
* :class:`PixelContrastTerm` (``l_ctr``): uncertainty-guided pixel contrast with a memory queue per class.

**Pseudo-labels** (:func:`dual_decoder_targets`, computed once per iteration and shared): with a fresh
``alpha ~ U(0, 1)`` per iteration, ``argmax(alpha * p_main + (1 - alpha) * p_aux)`` of the detached softmaxes
(PCLMix's dynamic mixing of the two decoders), replaced by the scribble on scribbled pixels. A pixel is
**confirmed** when it is scribbled, or when both decoders' argmaxes agree and the normalised entropy of their
mean probabilities is below ``uncertainty_threshold``. Confirmed pixels fill the contrast queues and are the
anchors; the consistency terms use every pixel's pseudo-label.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.losses import DiceLoss

from monai_ssl.data.scribbles import IGNORE_INDEX
from monai_ssl.losses.contrastive import (
    channels_at,
    embed_students,
    info_nce,
    mean_over_classes,
    probs_at,
    sample_per_class,
    zero_loss,
)
from monai_ssl.losses.memory import ClassFeatureQueues
from monai_ssl.losses.schedules import WeightSchedule
from monai_ssl.losses.terms import LossTerm, StepContext, check_student
from monai_ssl.metrics.uncertainty import entropy
from monai_ssl.networks.dual_decoder import auxiliary_logits
from monai_ssl.networks.projector import ContrastProjector

__all__ = [
    "partial_cross_entropy",
    "box_masks",
    "MixedBatch",
    "mix_batch",
    "DualDecoderTargets",
    "dual_decoder_targets",
    "PartialCETerm",
    "DualConsistencyTerm",
    "PixelContrastTerm",
]


def partial_cross_entropy(logits: torch.Tensor, target: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Mean cross-entropy over the pixels of ``target`` ``(B, 1, ...)`` or ``(B, ...)`` not equal to
    ``ignore_index``; a zero attached to the graph when there are none."""
    t = (target[:, 0] if target.dim() == logits.dim() else target).long().to(logits.device)
    if not bool((t != ignore_index).any()):
        return logits.sum() * 0.0
    return F.cross_entropy(logits.float(), t, ignore_index=ignore_index)


def box_masks(
    shape: Sequence[int], area: tuple[float, float] = (0.25, 0.5), generator: torch.Generator | None = None
) -> torch.Tensor:
    """``(B, 1, *spatial)`` float masks, 1 inside one random axis-aligned box per sample covering a fraction of
    the image drawn uniformly from ``area`` (each side scaled by ``fraction ** (1 / dims)``)."""
    b, *spatial = [int(s) for s in shape]
    masks = torch.zeros(b, 1, *spatial)
    for i in range(b):
        fraction = area[0] + (area[1] - area[0]) * float(torch.rand((), generator=generator))
        box = []
        for n in spatial:
            side = max(1, min(n, round(n * fraction ** (1 / len(spatial)))))
            start = int(torch.randint(0, n - side + 1, (), generator=generator))
            box.append(slice(start, start + side))
        masks[(i, 0, *box)] = 1.0
    return masks


@dataclass
class MixedBatch:
    """A mixed batch: ``image`` and ``label`` are the originals outside ``mask`` (1) and sample ``perm[i]`` of the
    batch inside it."""

    image: torch.Tensor
    label: torch.Tensor
    mask: torch.Tensor
    perm: torch.Tensor


def mix_batch(
    image: torch.Tensor,
    label: torch.Tensor,
    mask: torch.Tensor | None = None,
    perm: torch.Tensor | None = None,
    area: tuple[float, float] = (0.25, 0.5),
    generator: torch.Generator | None = None,
) -> MixedBatch:
    """Shuffle the batch and paste a random box of each sample's partner into it, in the image and the label alike.

    ``image`` ``(B, C, *sp)``; ``label`` ``(B, L, *sp)`` (hard labels or per-class maps). ``perm`` (default a random
    permutation) picks each sample's partner and ``mask`` (default :func:`box_masks`) where the partner shows.
    Every output pixel of image and label comes from the same input pixel, so they stay aligned.
    """
    b = image.shape[0]
    if perm is None:
        perm = torch.randperm(b, generator=generator)
    if mask is None:
        mask = box_masks((b, *image.shape[2:]), area, generator)
    perm, inside = perm.to(image.device), mask.to(image.device) > 0.5
    mixed_image = torch.where(inside, image[perm], image)
    mixed_label = torch.where(inside, label[perm], label)
    return MixedBatch(mixed_image, mixed_label, inside.to(image.dtype), perm)


@dataclass
class DualDecoderTargets:
    """One iteration's pseudo-labels of a dual-decoder student over the whole batch (labelled then unlabelled).

    ``main``/``aux``: the two decoders' logits (with gradient); ``pseudo`` ``(N, 1, ...)``: dynamic pseudo-labels
    with scribbles on top; ``confirmed`` ``(N, 1, ...)``: scribbled or certain pixels; ``alpha``: the mixing weight.
    """

    main: torch.Tensor
    aux: torch.Tensor
    pseudo: torch.Tensor
    confirmed: torch.Tensor
    alpha: float


def _batch_logits(ctx: StepContext, student: int) -> torch.Tensor:
    """Student ``student``'s main logits on the labelled then the unlabelled slices."""
    parts = [ctx.logits_l[student]]
    if ctx.logits_u and ctx.logits_u[student].shape[0] > 0:
        parts.append(ctx.logits_u[student])
    return torch.cat(parts) if len(parts) > 1 else parts[0]


def _scribbles(ctx: StepContext, n: int, label_key: str, ignore_index: int) -> torch.Tensor:
    """Scribbles of the batch ``(n, 1, ...)``: the labelled slices' labels, ``ignore_index`` on unlabelled ones."""
    lab = ctx.labeled[label_key]
    lab = (lab if lab.dim() == ctx.logits_l[0].dim() else lab[:, None]).long()
    if lab.shape[0] == n:
        return lab
    return torch.cat([lab, lab.new_full((n - lab.shape[0], *lab.shape[1:]), ignore_index)])


def dual_decoder_targets(
    ctx: StepContext,
    network: nn.Module,
    student: int = 0,
    label_key: str = "label",
    ignore_index: int = IGNORE_INDEX,
    uncertainty_threshold: float = 0.5,
) -> DualDecoderTargets:
    """Pseudo-labels and confirmed pixels as in the module docstring (cached in ``ctx.cache`` per iteration)."""
    key = ("dual_decoder_targets", student, label_key, ignore_index, float(uncertainty_threshold))
    if key in ctx.cache:
        return ctx.cache[key]
    main = _batch_logits(ctx, student)
    aux = auxiliary_logits(network, main.shape[0])
    if aux is None:
        raise ValueError(
            "scribble terms need a dual-decoder student (build_network('dual_decoder_unet', ...)) whose training "
            "forward_features ran this iteration: the method needs a term with needs_features"
        )
    p_main, p_aux = torch.softmax(main.detach().float(), 1), torch.softmax(aux.detach().float(), 1)
    alpha = float(torch.rand(()))
    pseudo = (alpha * p_main + (1 - alpha) * p_aux).argmax(1, keepdim=True)
    scribble = _scribbles(ctx, main.shape[0], label_key, ignore_index).to(pseudo.device)
    scribbled = scribble != ignore_index
    pseudo = torch.where(scribbled, scribble, pseudo)
    uncertainty = entropy(0.5 * (p_main + p_aux)) / math.log(main.shape[1])
    agree = p_main.argmax(1, keepdim=True) == p_aux.argmax(1, keepdim=True)
    confirmed = scribbled | (agree & (uncertainty < uncertainty_threshold))
    out = DualDecoderTargets(main, aux, pseudo, confirmed, alpha)
    ctx.cache[key] = out
    return out


class _DualDecoderTerm(LossTerm):
    """A term over student ``student`` (a dual-decoder network, ``ctx.networks[student]``) and the shared targets.

    ``student``, ``label_key``, ``ignore_index`` and ``uncertainty_threshold`` (keyword arguments of every
    subclass) select the network and define the targets of :func:`dual_decoder_targets`.
    """

    needs_features = True  # the trainer's forward_features is what runs the auxiliary decoder

    def __init__(
        self,
        name: str,
        weight: float | WeightSchedule,
        student: int = 0,
        label_key: str = "label",
        ignore_index: int = IGNORE_INDEX,
        uncertainty_threshold: float = 0.5,
    ):
        super().__init__(name, weight)
        self.student, self.label_key, self.ignore_index = int(student), label_key, int(ignore_index)
        self.uncertainty_threshold = float(uncertainty_threshold)

    def bind(self, networks: Sequence[nn.Module]) -> None:
        check_student(self.name, networks, self.student)

    def network(self, ctx: StepContext) -> nn.Module:
        return ctx.networks[self.student]

    def targets(self, ctx: StepContext) -> DualDecoderTargets:
        return dual_decoder_targets(
            ctx, self.network(ctx), self.student, self.label_key, self.ignore_index, self.uncertainty_threshold
        )


class PartialCETerm(LossTerm):
    """Partial cross-entropy: every student's CE over the scribbled pixels of the labelled slices, summed.

    A dual-decoder student's loss is the mean of its main and auxiliary decoders' when its training
    ``forward_features`` ran this iteration (a method with a feature term, e.g. PCLMix); otherwise (e.g. PCE
    alone), and for other networks, the main decoder's alone.
    """

    def __init__(
        self,
        name: str = "sup",
        weight: float | WeightSchedule = 1.0,
        label_key: str = "label",
        ignore_index: int = IGNORE_INDEX,
    ):
        super().__init__(name, weight)
        self.label_key, self.ignore_index = label_key, int(ignore_index)

    def forward(self, ctx: StepContext) -> torch.Tensor:
        target = ctx.labeled[self.label_key]
        n_l = ctx.logits_l[0].shape[0]
        total = ctx.logits_l[0].new_zeros(())
        for k, logits in enumerate(ctx.logits_l):
            loss = partial_cross_entropy(logits, target, self.ignore_index)
            aux = auxiliary_logits(ctx.networks[k], _batch_logits(ctx, k).shape[0]) if k < len(ctx.networks) else None
            if aux is not None:
                loss = 0.5 * (loss + partial_cross_entropy(aux[:n_l], target, self.ignore_index))
            total = total + loss
        return total


class DualConsistencyTerm(_DualDecoderTerm):
    """``l_con``: both decoders against the dynamic pseudo-label, on the batch and on a mixed batch (module doc).

    ``0.5 * (Dice(main, y) + Dice(aux, y)) + 0.5 * (Dice(main(x_mix), y_mix) + Dice(aux(x_mix), y_mix))``, with
    ``(x_mix, y_mix) = mix_batch(x, y)``: boxes of ``area`` (fraction of the slice) pasted from a shuffled batch.
    The mixed forward runs the network a second time (both decoders). Weight: ``lambda_con``.
    """

    def __init__(
        self,
        name: str = "con",
        weight: float | WeightSchedule = 0.5,
        area: tuple[float, float] = (0.25, 0.5),
        seed: int = 0,
        **kwargs: Any,
    ):
        super().__init__(name, weight, **kwargs)
        self.area = (float(area[0]), float(area[1]))
        self.dice = DiceLoss(to_onehot_y=True, softmax=True, batch=True)
        self.generator = torch.Generator().manual_seed(seed)

    def pair(self, main: torch.Tensor, aux: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return 0.5 * (self.dice(main, target) + self.dice(aux, target))

    def forward(self, ctx: StepContext) -> torch.Tensor:
        tg = self.targets(ctx)
        x = self.batch_images(ctx)
        mixed = mix_batch(x, tg.pseudo, area=self.area, generator=self.generator)
        mix_main, mix_aux, _ = self.network(ctx).forward_both(mixed.image)
        return self.pair(tg.main, tg.aux, tg.pseudo) + self.pair(mix_main, mix_aux, mixed.label)

    @staticmethod
    def batch_images(ctx: StepContext) -> torch.Tensor:
        return ctx.batch_values("image")


class PixelContrastTerm(_DualDecoderTerm):
    """``l_ctr``: uncertainty-guided pixel contrast against one FIFO memory queue per class.

    At the main decoder's map of ``stride``, a feature pixel is confirmed as class ``c`` when its footprint holds
    confirmed pixels (:func:`dual_decoder_targets`) of class ``c`` only (scribbles are thin: a footprint rarely
    holds many). Each iteration the confirmed pixels' detached projections are pushed to their class queues
    (:class:`~monai_ssl.losses.memory.ClassFeatureQueues`, ``queue_size`` each, at most ``push_fraction`` of it per
    update), then up to ``num_anchors`` confirmed pixels per class are anchors; an anchor of class ``c`` has the
    normalised mean of queue ``c`` as positive and up to ``num_negatives`` pixels drawn from the other queues as
    negatives; the loss is InfoNCE at ``temperature``, averaged per class then over classes. Weight:
    ``lambda_ctr``. The projector (``projector``) is the term's own parameters.
    """

    def __init__(
        self,
        name: str = "ctr",
        weight: float | WeightSchedule = 0.1,
        stride: int = 4,
        queue_size: int = 2000,
        push_fraction: float = 0.25,
        num_anchors: int = 256,
        num_negatives: int = 512,
        temperature: float = 0.1,
        hidden: int = 64,
        out: int = 32,
        **kwargs: Any,
    ):
        super().__init__(name, weight, **kwargs)
        self.stride, self.temperature = int(stride), float(temperature)
        self.num_anchors, self.num_negatives = int(num_anchors), int(num_negatives)
        self.queue_size, self.push_fraction = int(queue_size), float(push_fraction)
        self.hidden, self.out = int(hidden), int(out)
        self.projector: ContrastProjector | None = None
        self.queues: ClassFeatureQueues | None = None

    def bind(self, networks: Sequence[nn.Module]) -> None:
        super().bind(networks)
        channels = channels_at(networks[self.student], self.stride)
        self.projector = ContrastProjector([channels], hidden=self.hidden, out=self.out)

    def confirmed_at_scale(self, tg: DualDecoderTargets) -> torch.Tensor:
        """``(N, *sp)`` class of every feature pixel whose footprint's confirmed pixels share one class, else -1."""
        k = tg.main.shape[1]
        onehot = F.one_hot(tg.pseudo[:, 0], k).movedim(-1, 1).float() * tg.confirmed.float()
        fractions = probs_at(onehot, self.stride)
        top, label = fractions.max(dim=1)
        single = (top > 0) & (fractions.sum(dim=1) - top <= 1e-6)
        return torch.where(single, label, torch.full_like(label, -1))

    def forward(self, ctx: StepContext) -> torch.Tensor:
        student_ctx = ctx if ctx.num_students == 1 else self._one_student(ctx)
        z = embed_students(student_ctx, self.projector, self.stride)[0]  # (N, D, *sp)
        tg = self.targets(ctx)
        k, d = tg.main.shape[1], z.shape[1]
        if self.queues is None:
            self.queues = ClassFeatureQueues(k, self.queue_size, self.push_fraction)
        labels = self.confirmed_at_scale(tg).reshape(-1)
        flat = z.movedim(1, -1).reshape(-1, d)
        valid = labels >= 0
        pushed = [self.queues.push(c, flat.detach()[valid & (labels == c)]) for c in range(k)]
        anchor_idx, _ = sample_per_class(labels, valid, self.num_anchors, 0)
        anchor_cls = labels[anchor_idx]
        positives = flat.new_zeros(k, d)
        negs, tags = [], []
        quota = max(1, self.num_negatives // max(1, k - 1))
        for c in range(k):
            if self.queues.count(c) == 0:
                continue
            positives[c] = F.normalize(self.queues.features(c).float().mean(0), dim=0).to(flat)
            sample = self.queues.sample(c, quota)
            negs.append(sample.to(flat))
            tags.append(torch.full((sample.shape[0],), c, dtype=torch.long, device=flat.device))
        negatives = torch.cat(negs) if negs else flat.new_zeros(0, d)
        tag = torch.cat(tags) if tags else labels.new_zeros(0)
        losses, has_negative = info_nce(
            flat[anchor_idx], positives[anchor_cls], negatives, tag[None, :] != anchor_cls[:, None], self.temperature
        )
        loss = mean_over_classes(losses, anchor_cls, has_negative)
        self.report(ctx, anchors=anchor_idx.numel(), pushed=sum(pushed), alpha=tg.alpha)
        return zero_loss(z) if loss is None else loss

    def _one_student(self, ctx: StepContext) -> StepContext:
        """A view of ``ctx`` holding only this term's student (the projector has one input)."""
        s = self.student
        return StepContext(
            ctx.iteration, ctx.max_iterations, ctx.labeled, ctx.unlabeled, [ctx.logits_l[s]],
            [ctx.logits_u[s]] if ctx.logits_u else [], [ctx.features_l[s]],
            None if ctx.features_u is None else [ctx.features_u[s]], [ctx.networks[s]] if ctx.networks else (),
        )  # fmt: skip
