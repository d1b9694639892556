"""Supervised contrastive loss terms over projected decoder features: SCL (+REPS), MCSC and MCSCv2.

All three are :class:`~monai_ssl.losses.terms.LossTerm` s that own a
:class:`~monai_ssl.networks.projector.ContrastProjector` (attribute ``projector``; give it to
``student_optimizer(extra_modules=[term.projector])``) and share one convention for targets:

* **Scale.** A term reads the decoder map of a given stride (``ceil(size / stride)`` pixels per axis) of every
  student, concatenating labelled and unlabelled slices. Labels are brought to that scale by nearest sampling at
  the feature pixel's centre (input pixel ``i*s + s//2``), probabilities by average pooling over the pixel's
  ``s x s`` footprint.
* **Cross-student targets.** Student ``k``'s *teacher* is student ``(k+1) % S`` (itself with one student). The
  teacher's detached softmax, pooled to the scale, gives the pixel's probabilities. Labels are the ground truth on
  labelled slices and the teacher's argmax (of the pooled probabilities) on unlabelled ones; the confidence of a
  pixel is 1 on labelled slices (ground truth) and the teacher's pooled top-1 probability on unlabelled ones.
  Certainty filters therefore only ever remove pseudo-labelled pixels.
* **Embeddings** are L2-normalised projections; both students' pixels enter one pool (the projector's last
  layer is shared), so an anchor of student A meets positives and negatives of student B.
* ``unlabeled_start``: pseudo-labelled pixels join after this many iterations (MCSC's public code waits 3000).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from monai_ssl.losses.memory import ClassFeatureQueues
from monai_ssl.losses.reps import RegistrationPositives, feature_pixel_to_world, pixel_world
from monai_ssl.losses.schedules import GaussianRampUp, LinearSchedule, WeightSchedule, as_schedule
from monai_ssl.losses.terms import LossTerm, StepContext
from monai_ssl.metrics.uncertainty import entropy
from monai_ssl.networks.projector import ContrastProjector

__all__ = [
    "ContrastiveTerm",
    "AnchorTerm",
    "embed_students",
    "zero_loss",
    "SCLTerm",
    "MCSCTerm",
    "MCSCv2Term",
    "ContrastTargets",
    "contrast_targets",
    "select_scale",
    "labels_at",
    "probs_at",
    "channels_at",
    "class_prototypes",
    "sample_per_class",
    "info_nce",
    "mean_over_classes",
    "tile_blocks",
    "balanced_supcon",
    "certain_pixels",
    "hard_negative_mask",
]

_MASKED = -1e9  # finite "minus infinity" for masked logits: exp() is 0 and gradients stay finite


# ---- scales and targets ------------------------------------------------------------------------------------
def select_scale(features: Sequence[torch.Tensor], spatial: Sequence[int], stride: int) -> torch.Tensor:
    """The feature map whose spatial size is ``ceil(size / stride)`` on every axis of an input of size ``spatial``."""
    want = [-(-int(s) // int(stride)) for s in spatial]
    for f in features:
        if list(f.shape[2:]) == want:
            return f
    raise ValueError(
        f"no decoder feature map at stride {stride} for input size {list(spatial)} (expected {want}, got "
        f"{[list(f.shape[2:]) for f in features]})"
    )


def channels_at(network: nn.Module, stride: int) -> int:
    """Channels of ``network``'s decoder map at ``stride`` (from its ``feature_strides`` / ``feature_channels``)."""
    strides = list(getattr(network, "feature_strides", ()))
    if stride not in strides:
        raise ValueError(f"{type(network).__name__} has no feature map at stride {stride} (strides {strides})")
    return int(network.feature_channels[strides.index(stride)])


def labels_at(label: torch.Tensor, stride: int) -> torch.Tensor:
    """``(B, 1, *spatial)`` or ``(B, *spatial)`` labels sampled at the centres of stride-``stride`` pixels."""
    x = label[:, 0] if label.dim() >= 3 and label.shape[1] == 1 else label
    s = int(stride)
    for axis in range(1, x.dim()):
        n = x.shape[axis]
        idx = (torch.arange(-(-n // s), device=x.device) * s + s // 2).clamp(max=n - 1)
        x = x.index_select(axis, idx)
    return x.long()


def probs_at(probs: torch.Tensor, stride: int) -> torch.Tensor:
    """``(B, K, *spatial)`` probabilities averaged over each stride-``stride`` pixel's footprint (partial at edges)."""
    if stride == 1:
        return probs
    pool = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}[probs.dim() - 2]
    return pool(probs, kernel_size=stride, stride=stride, ceil_mode=True)


@dataclass
class ContrastTargets:
    """Per-student targets at one scale: ``labels`` ``(S, B, *sp)``, teacher ``probs`` ``(S, B, K, *sp)``
    (detached) and which slices are ``labeled`` ``(B,)``."""

    labels: torch.Tensor
    probs: torch.Tensor
    labeled: torch.Tensor

    @property
    def confidence(self) -> torch.Tensor:
        """1 on labelled slices, the teacher's top-1 probability on unlabelled ones, ``(S, B, *sp)``."""
        top1 = self.probs.max(dim=2).values
        lab = self.labeled.view(1, -1, *([1] * (top1.dim() - 2)))
        return torch.where(lab, torch.ones_like(top1), top1)

    def slice_mask(self, use_unlabeled: bool) -> torch.Tensor:
        """``(S, B, *sp)`` True on the slices a term may use (labelled, plus unlabelled when allowed)."""
        keep = self.labeled | use_unlabeled
        return keep.view(1, -1, *([1] * (self.labels.dim() - 2))).expand_as(self.labels)


def contrast_targets(ctx: StepContext, stride: int, label_key: str = "label") -> ContrastTargets:
    """Cross-student labels and teacher probabilities at ``stride`` (cached in ``ctx.cache`` per iteration)."""
    key = ("contrast_targets", int(stride), label_key)
    if key in ctx.cache:
        return ctx.cache[key]
    s = ctx.num_students
    n_l = ctx.logits_l[0].shape[0]
    teacher = []
    for t in range(s):
        logits = ctx.logits_l[t] if not ctx.logits_u else torch.cat([ctx.logits_l[t], ctx.logits_u[t]])
        teacher.append(probs_at(torch.softmax(logits.detach().float(), dim=1), stride))
    gt = labels_at(ctx.labeled[label_key], stride).to(teacher[0].device)
    labels, probs = [], []
    for k in range(s):
        p = teacher[(k + 1) % s]
        labels.append(torch.cat([gt, p[n_l:].argmax(dim=1)]))
        probs.append(p)
    b = probs[0].shape[0]
    out = ContrastTargets(torch.stack(labels), torch.stack(probs), torch.arange(b, device=gt.device) < n_l)
    ctx.cache[key] = out
    return out


# ---- sampling and losses -----------------------------------------------------------------------------------
def class_prototypes(
    z: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor, num_classes: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """L2-normalised mean embedding of each class over the masked pixels ``(K, D)``, and which classes occur."""
    y = labels[mask]
    sums = z.new_zeros(num_classes, z.shape[1]).index_add(0, y, z[mask])
    counts = torch.bincount(y, minlength=num_classes)
    return F.normalize(sums, dim=1), counts > 0


def sample_per_class(
    labels: torch.Tensor, mask: torch.Tensor, num_anchors: int, num_negatives: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices of anchors and of the class-balanced negative pool among the masked pixels.

    Each class present gets up to ``num_anchors`` anchors (uniformly, without replacement) and contributes up to
    ``quota = max(1, num_negatives // (C - 1))`` pixels to the negative pool (``C`` classes present): an anchor of
    class ``c`` then meets at most ``num_negatives`` negatives, an equal share from each other class, so the
    background cannot dominate. Quotas a small class cannot fill are not handed to others.
    """
    classes = torch.unique(labels[mask])
    quota = max(1, num_negatives // (len(classes) - 1)) if len(classes) > 1 else 0
    anchors, negatives = [], []
    for c in classes:
        cand = torch.nonzero(mask & (labels == c)).squeeze(1)
        perm = cand[torch.randperm(cand.numel(), device=cand.device)]
        anchors.append(perm[:num_anchors])
        negatives.append(perm[:quota])
    empty = labels.new_zeros(0)
    return (torch.cat(anchors) if anchors else empty), (torch.cat(negatives) if negatives else empty)


def info_nce(
    anchors: torch.Tensor, positives: torch.Tensor, negatives: torch.Tensor, allowed: torch.Tensor, temperature: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-anchor ``-log(e^{a.p/t} / (e^{a.p/t} + sum_k e^{a.k/t}))`` over the ``allowed`` ``(A, M)`` negatives.

    Returns the losses ``(A,)`` and whether each anchor had at least one negative.
    """
    pos = (anchors * positives).sum(dim=1) / temperature
    neg = (anchors @ negatives.t() / temperature).masked_fill(~allowed, _MASKED)
    lse = torch.logsumexp(torch.cat([pos[:, None], neg], dim=1), dim=1)
    return lse - pos, allowed.any(dim=1)


def mean_over_classes(values: torch.Tensor, classes: torch.Tensor, keep: torch.Tensor) -> torch.Tensor | None:
    """Mean of ``values`` per class, then over classes, over the ``keep`` entries (None when there are none)."""
    v, c = values[keep], classes[keep]
    if v.numel() == 0:
        return None
    uniq, inv = torch.unique(c, return_inverse=True)
    sums = v.new_zeros(len(uniq)).index_add(0, inv, v)
    return (sums / torch.bincount(inv, minlength=len(uniq)).to(v)).mean()


def tile_blocks(x: torch.Tensor, block: Sequence[int], pad_value: float = 0.0) -> torch.Tensor:
    """Cut ``(N, C, *spatial)`` into blocks covering every pixel: ``(N, n_blocks, C, prod(block))``.

    Each axis is padded with ``pad_value`` at its far end to a multiple of its block size, so the last,
    partial, block of each axis is kept (MCSC's public code drops it and more: it tiles only
    ``(size // block - 1)`` blocks per axis). Blocks are numbered in C order over the block grid.
    """
    spatial = x.shape[2:]
    pads: list[int] = []
    for n, b in zip(reversed(spatial), reversed(block), strict=True):
        pads += [0, (-n) % b]
    if any(pads):
        x = F.pad(x, pads, value=pad_value)
    nd = len(spatial)
    grid = [x.shape[2 + d] // block[d] for d in range(nd)]
    shape = [x.shape[0], x.shape[1]] + [v for d in range(nd) for v in (grid[d], block[d])]
    x = x.reshape(shape)
    order = [0] + [2 + 2 * d for d in range(nd)] + [1] + [3 + 2 * d for d in range(nd)]
    return x.permute(order).reshape(x.shape[0], math.prod(grid), x.shape[1], math.prod(block))


def balanced_supcon(
    z: torch.Tensor, labels: torch.Tensor, temperature: float, num_classes: int, skip_background: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Class-balanced supervised contrastive loss within groups of pixels (MCSC's block loss).

    ``z`` ``(G, P, D)`` unit embeddings, ``labels`` ``(G, P)`` (-1: not a pixel). Within a group, every pixel
    ``i`` with at least one other pixel of its class is an anchor; its positives ``P(i)`` are the other pixels of
    its class and

        ``loss_i = -1/|P(i)| sum_{p in P(i)} [ l_ip - log sum_{j != i} e^{l_ij} / n'_j ]``,  ``l_ij = z_i.z_j / t``

    where ``n'_j`` is the number of pixels of ``j``'s class in the group other than ``i``: every class
    contributes the *mean* of its terms to the denominator (class balance). A group's loss is the mean over its
    anchors; groups without anchors, or (``skip_background``) without any foreground pixel, are not ``used``.
    Returns ``(per_group (G,), used (G,))``.
    """
    z = z.float()
    valid = labels >= 0
    y = labels.clamp(min=0)
    logits = torch.bmm(z, z.transpose(1, 2)) / temperature
    counts = (F.one_hot(y, num_classes) * valid[..., None]).sum(dim=1)  # (G, K)
    n_j = counts.gather(1, y)  # (G, P): size of j's class in the group
    p = labels.shape[1]
    not_self = ~torch.eye(p, dtype=torch.bool, device=z.device)
    pair = valid[:, :, None] & valid[:, None, :] & not_self
    same = pair & (labels[:, :, None] == labels[:, None, :])
    log_w = -torch.log((n_j[:, None, :] - same.to(n_j.dtype)).clamp(min=1).float())
    log_denominator = torch.logsumexp((logits + log_w).masked_fill(~pair, _MASKED), dim=2)
    n_pos = same.sum(dim=2)
    mean_pos = (logits * same).sum(dim=2) / n_pos.clamp(min=1)
    anchor = n_pos > 0
    per_anchor = torch.where(anchor, log_denominator - mean_pos, torch.zeros_like(mean_pos))
    per_group = per_anchor.sum(dim=1) / anchor.sum(dim=1).clamp(min=1)
    used = anchor.any(dim=1)
    if skip_background:
        used &= ((labels > 0) & valid).any(dim=1)
    return per_group, used


def certain_pixels(probs: torch.Tensor, beta: float, threshold: float) -> torch.Tensor:
    """Certainty mask ``(N, *sp)`` of teacher probabilities ``(N, K, *sp)`` (MCSCv2 anchors).

    A pixel is certain when its top-1 probability exceeds ``threshold`` and it is not among the
    ``floor(beta * n)`` pixels of highest entropy ``-sum_k p_k log p_k`` of all ``n`` pixels given.
    """
    top1 = probs.max(dim=1).values
    keep = top1 > threshold
    drop = math.floor(beta * top1.numel())
    if drop > 0:
        worst = torch.topk(entropy(probs, eps=1e-12).flatten(), drop).indices
        keep = keep.flatten().index_fill(0, worst, False).view_as(keep)
    return keep


def hard_negative_mask(probs: torch.Tensor, labels: torch.Tensor, rank_low: int, rank_high: int) -> torch.Tensor:
    """``(P, K)``: pixel ``j`` is a hard negative for class ``c`` (goes to ``c``'s bank).

    True when ``labels[j] != c`` and ``c``'s rank in ``j``'s teacher probabilities ``probs`` ``(P, K)`` lies in
    ``[rank_low, rank_high]`` (0 = the most probable class; ties by class index). Pixels labelled -1 never are.
    """
    order = probs.argsort(dim=1, descending=True, stable=True)
    rank = order.argsort(dim=1)
    k = probs.shape[1]
    other = labels[:, None] != torch.arange(k, device=labels.device)[None, :]
    return (rank >= rank_low) & (rank <= rank_high) & other & (labels >= 0)[:, None]


# ---- terms -------------------------------------------------------------------------------------------------
def embed_students(ctx: StepContext, projector: ContrastProjector, stride: int) -> torch.Tensor:
    """Projected, normalised embeddings of every student at ``stride``: ``(S, B, D, *sp)``, labelled slices first."""
    if ctx.features_l is None:
        raise ValueError("contrastive terms need decoder features: the trainer did not provide any")
    spatial = ctx.labeled["image"].shape[2:]
    out = []
    for k in range(ctx.num_students):
        parts = [select_scale(ctx.features_l[k], spatial, stride)]
        if ctx.features_u is not None and ctx.features_u[k] and ctx.features_u[k][0].shape[0] > 0:
            parts.append(select_scale(ctx.features_u[k], spatial, stride))
        out.append(projector(torch.cat(parts), student=k))
    return torch.stack(out)


def zero_loss(z: torch.Tensor) -> torch.Tensor:
    """A zero loss attached to the graph (backward through a term that found nothing to contrast)."""
    return z.sum() * 0.0


class ContrastiveTerm(LossTerm):
    """Base of the contrastive terms: decoder features requested, the default ramp-up, the unlabelled start."""

    needs_features = True

    def __init__(
        self, name: str, weight: float | WeightSchedule | None, label_key: str = "label", unlabeled_start: int = 0
    ):
        super().__init__(name, GaussianRampUp(0.1) if weight is None else weight)
        self.label_key = label_key
        self.unlabeled_start = int(unlabeled_start)

    def use_unlabeled(self, ctx: StepContext) -> bool:
        return ctx.iteration >= self.unlabeled_start


class AnchorTerm(ContrastiveTerm):
    """Single-scale terms with anchors, class positives and InfoNCE (SCL, MCSCv2): projector and sampling sizes."""

    def __init__(
        self,
        in_channels: Sequence[int] | None,
        *,
        stride: int,
        num_anchors: int,
        num_negatives: int,
        threshold: float,
        temperature: float,
        hidden: int,
        out: int,
        name: str,
        weight: float | WeightSchedule | None,
        label_key: str,
        unlabeled_start: int,
    ):
        super().__init__(name, weight, label_key, unlabeled_start)
        self.stride, self.threshold, self.temperature = int(stride), float(threshold), float(temperature)
        self.num_anchors, self.num_negatives = int(num_anchors), int(num_negatives)
        self.hidden, self.out = int(hidden), int(out)
        self.projector = None if in_channels is None else ContrastProjector(in_channels, hidden=hidden, out=out)

    def bind(self, networks: Sequence[nn.Module]) -> None:
        """Build the projector from the students' channels at ``stride``, unless ``in_channels`` were given."""
        if self.projector is None:
            channels = [channels_at(n, self.stride) for n in networks]
            self.projector = ContrastProjector(channels, hidden=self.hidden, out=self.out)


class SCLTerm(AnchorTerm):
    """Supervised contrastive loss with class-balanced sampling and, optionally, REPS positives.

    At the decoder map of ``stride`` (default 4) of both students (see the module docstring for targets):

    * valid pixels have confidence > ``threshold`` (h = 0.5); per class, up to ``num_anchors`` (N = 1000) valid
      pixels are anchors; the negatives of class ``c`` are up to ``num_negatives`` (O = 500) valid pixels of the
      other classes, an equal share per other class (:func:`sample_per_class`);
    * the label positive of class ``c`` is the normalised mean embedding of all its valid pixels (with gradient);
      with ``reps``, an anchor whose world point maps onto a stored slice of another volume uses
      ``normalize(w_l * label_pos + w_r * registered_pos)`` instead (:class:`RegistrationPositives`);
    * ``loss = mean_c mean_{a in c} -log(e^{a.p/t} / (e^{a.p/t} + sum_k e^{a.k/t}))`` with t = 0.1, over classes
      that have negatives; 0 when fewer than two classes are valid.

    After the loss, with ``reps``, the batch's detached embeddings (the normalised mean over students) are stored
    in the bank with their feature-resolution ``pixel_to_world``. REPS needs 2D slices. The weight defaults to
    ``GaussianRampUp(0.1)``, like cross teaching.

    Args:
        in_channels: each student's channels at ``stride``; None (the bundles): read from the students when the
            term is bound (:meth:`LossTerm.bind`).
        stride, num_anchors, num_negatives, threshold, temperature: as above.
        reps: registration positives (None: label positives only).
        hidden, out: projector widths (thesis: 256 -> 128).
        name, weight, label_key, unlabeled_start: see :class:`LossTerm` and the module docstring.
    """

    def __init__(
        self,
        in_channels: Sequence[int] | None = None,
        stride: int = 4,
        num_anchors: int = 1000,
        num_negatives: int = 500,
        threshold: float = 0.5,
        temperature: float = 0.1,
        reps: RegistrationPositives | None = None,
        hidden: int = 256,
        out: int = 128,
        name: str = "scl",
        weight: float | WeightSchedule | None = None,
        label_key: str = "label",
        unlabeled_start: int = 0,
    ):
        super().__init__(
            in_channels, stride=stride, num_anchors=num_anchors, num_negatives=num_negatives, threshold=threshold,
            temperature=temperature, hidden=hidden, out=out, name=name, weight=weight, label_key=label_key,
            unlabeled_start=unlabeled_start,
        )  # fmt: skip
        self.reps = reps

    def forward(self, ctx: StepContext) -> torch.Tensor:
        z = embed_students(ctx, self.projector, self.stride)
        tg = contrast_targets(ctx, self.stride, self.label_key)
        d = z.shape[2]
        flat = z.movedim(2, -1).reshape(-1, d)
        labels = tg.labels.reshape(-1)
        valid = ((tg.confidence > self.threshold) & tg.slice_mask(self.use_unlabeled(ctx))).reshape(-1)
        prototypes, _ = class_prototypes(flat, labels, valid, tg.probs.shape[2])
        anchor_idx, negative_idx = sample_per_class(labels, valid, self.num_anchors, self.num_negatives)
        anchor_cls = labels[anchor_idx]
        positives = prototypes[anchor_cls]
        found = torch.zeros_like(anchor_cls, dtype=torch.bool)
        if self.reps is not None:
            positives, found = self._registration_positives(ctx, z, anchor_idx, positives)
        losses, has_negative = info_nce(
            flat[anchor_idx], positives, flat[negative_idx], labels[negative_idx][None, :] != anchor_cls[:, None],
            self.temperature,
        )  # fmt: skip
        loss = mean_over_classes(losses, anchor_cls, has_negative)
        self.report(
            ctx,
            anchors=anchor_idx.numel(),
            classes=torch.unique(anchor_cls).numel(),
            reps_found=found.float().mean() if found.numel() else 0.0,
        )
        if self.reps is not None:
            self.reps.update(
                F.normalize(z.detach().mean(dim=0), dim=1),
                ctx.batch_values("pixel_to_world"),
                ctx.batch_values("case_id"),
                ctx.batch_values("slice_index"),
                self.stride,
            )
        return zero_loss(z) if loss is None else loss

    def _registration_positives(
        self, ctx: StepContext, z: torch.Tensor, anchor_idx: torch.Tensor, label_positives: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if z.dim() != 5:
            raise ValueError(f"REPS works on 2D slices; got {z.dim() - 3}D feature maps")
        b, h, w = z.shape[1], z.shape[3], z.shape[4]
        rem = anchor_idx % (b * h * w)
        row, i, j = rem // (h * w), (rem // w) % h, rem % w
        p2w = feature_pixel_to_world(ctx.batch_values("pixel_to_world").to(z.device), self.stride)
        world = pixel_world(p2w[row], i, j)
        src = self.reps.case_index(ctx.batch_values("case_id")).to(z.device)[row]
        return self.reps.positives(label_positives, src, world)


class MCSCTerm(ContrastiveTerm):
    """MCSC: multi-scale, class-balanced supervised contrast of pixels within blocks, with cross-student labels.

    For each ``(stride, block)`` of ``scales`` (published: the stride-1 map in 19 x 19 blocks and the stride-8 map
    in 14 x 14 blocks), with its own projector:

    1. both students' embeddings and labels (module docstring: GT / teacher argmax of the pooled probabilities,
       no confidence filter) are cut into ``block``-sized blocks covering the *whole* map
       (:func:`tile_blocks`; the far edge is padded and padding is ignored; a block larger than the map shrinks to
       it);
    2. with ``shuffle_blocks`` (published), each slice's blocks are randomly permuted, and group ``g`` gathers
       block ``perm_b[g]`` of every slice ``b`` of both students, so pixels meet pixels of other slices and of
       the other student at unrelated positions;
    3. each group gets the class-balanced pixel-level supervised contrastive loss :func:`balanced_supcon`
       (temperature 0.1), skipping background-only groups (published).

    The loss is the **sum** over scales of the mean over groups (published); the weight defaults to the
    published constant 0.001. Cost: ``G * P^2`` similarities per scale with ``P = S * B * block^2``, i.e.
    ``size^2 * (S*B)^2 * block^2`` in total: block size, not map size, drives it. Groups are processed
    ``group_chunk`` at a time under activation checkpointing, so memory holds one chunk's ``(P, P)`` matrices
    (about ``group_chunk * 5 * P^2`` floats: ~2.7 GB at the published 224 px, batch 8, 19 px blocks, chunk 4)
    at the price of recomputing them in the backward pass.
    Deviation from the public code: anchors without positives are left out of the mean instead of counting as 0.

    Args:
        in_channels: per scale, each student's channels; None (the bundles): read from the students when bound.
        scales: ``(stride, block)`` pairs.
        temperature, shuffle_blocks, skip_background_blocks, group_chunk: as above.
        hidden, out: projector widths.
        name, weight, label_key, unlabeled_start: see :class:`LossTerm`; MCSC's public code starts the
            pseudo-labelled slices at iteration 3000.
    """

    def __init__(
        self,
        in_channels: Sequence[Sequence[int]] | None = None,
        scales: Sequence[tuple[int, int]] = ((1, 19), (8, 14)),
        temperature: float = 0.1,
        shuffle_blocks: bool = True,
        skip_background_blocks: bool = True,
        group_chunk: int = 4,
        hidden: int = 256,
        out: int = 128,
        name: str = "mcsc",
        weight: float | WeightSchedule | None = 0.001,
        label_key: str = "label",
        unlabeled_start: int = 0,
    ):
        super().__init__(name, weight, label_key, unlabeled_start)
        self.scales = [(int(s), int(b)) for s, b in scales]
        self.hidden, self.out = int(hidden), int(out)
        self.projector: nn.ModuleList | None = None
        if in_channels is not None:
            self._build_projectors(in_channels)
        self.temperature = float(temperature)
        self.shuffle_blocks, self.skip_background_blocks = shuffle_blocks, skip_background_blocks
        if group_chunk < 1:
            raise ValueError(f"MCSCTerm: group_chunk must be >= 1, got {group_chunk}")
        self.group_chunk = int(group_chunk)

    def _build_projectors(self, in_channels: Sequence[Sequence[int]]) -> None:
        if len(in_channels) != len(self.scales):
            raise ValueError(f"MCSCTerm: {len(self.scales)} scales but {len(in_channels)} in_channels entries")
        self.projector = nn.ModuleList(ContrastProjector(ch, hidden=self.hidden, out=self.out) for ch in in_channels)

    def bind(self, networks: Sequence[nn.Module]) -> None:
        """Build each scale's projector from the students' channels, unless ``in_channels`` were given."""
        if self.projector is None:
            self._build_projectors([[channels_at(n, s) for n in networks] for s, _ in self.scales])

    def forward(self, ctx: StepContext) -> torch.Tensor:
        total, used, zs = None, 0, []
        for (stride, block), projector in zip(self.scales, self.projector, strict=True):
            z = embed_students(ctx, projector, stride)
            zs.append(z)
            tg = contrast_targets(ctx, stride, self.label_key)
            labels = tg.labels.masked_fill(~tg.slice_mask(self.use_unlabeled(ctx)), -1)
            loss = self._scale_loss(z, labels, block, tg.probs.shape[2])
            if loss is not None:
                total, used = (loss if total is None else total + loss), used + 1
        self.report(ctx, scales_used=used)
        return sum(zero_loss(z) for z in zs) if total is None else total

    def _scale_loss(self, z: torch.Tensor, labels: torch.Tensor, block: int, num_classes: int) -> torch.Tensor | None:
        s, b, d = z.shape[:3]
        spatial = z.shape[3:]
        blk = [min(block, n) for n in spatial]
        zt = tile_blocks(z.flatten(0, 1), blk).view(s, b, -1, d, math.prod(blk))
        yt = tile_blocks(labels.flatten(0, 1)[:, None], blk, pad_value=-1).view(s, b, -1, math.prod(blk))
        nb = zt.shape[2]
        if self.shuffle_blocks:
            perm = torch.rand(b, nb, device=z.device).argsort(dim=1)
            zt = zt.gather(2, perm[None, :, :, None, None].expand_as(zt))
            yt = yt.gather(2, perm[None, :, :, None].expand_as(yt))
        groups_z = zt.permute(2, 0, 1, 4, 3).reshape(nb, -1, d)
        groups_y = yt.permute(2, 0, 1, 3).reshape(nb, -1)
        args = (self.temperature, num_classes, self.skip_background_blocks)
        losses, used = [], []
        for start in range(0, nb, self.group_chunk):  # only one chunk's (P, P) matrices are alive at a time
            zc, yc = groups_z[start : start + self.group_chunk], groups_y[start : start + self.group_chunk]
            if torch.is_grad_enabled() and zc.requires_grad:
                out = checkpoint(balanced_supcon, zc, yc, *args, use_reentrant=False)
            else:
                out = balanced_supcon(zc, yc, *args)
            losses.append(out[0])
            used.append(out[1])
        per_group, used_groups = torch.cat(losses), torch.cat(used)
        return per_group[used_groups].mean() if bool(used_groups.any()) else None


class MCSCv2Term(AnchorTerm):
    """MCSCv2: certainty-guided anchors and per-class banks of hard negatives (U2PL-style rank rules).

    At the decoder map of ``stride`` of both students (targets as in the module docstring):

    * **anchors**: labelled pixels, and pseudo-labelled pixels whose teacher top-1 probability exceeds
      ``threshold`` (0.9) and that are not among the ``beta`` fraction of highest-entropy pixels of their
      teacher map (``beta`` decays linearly from 0.2 to 0 over training, :func:`certain_pixels`); up to
      ``num_anchors`` per class;
    * **positive** of class ``c``: normalised mean embedding of its anchor candidates (with gradient);
    * **banks**: one FIFO queue per class of ``bank_size`` (default 10 000, CPU-friendly; the thesis' best is
      60 000). Each iteration, *before* the loss, pixel ``j`` (any usable pixel, certain or not, detached) is
      pushed to the bank of every class ``c`` for which it is a hard negative: ``label_j != c`` and ``c``'s
      rank in ``j``'s teacher probabilities is in ``[rank_low, rank_high]`` (0-based: 0 is the top class;
      defaults 1 and 2 for ACDC-like data, 1 and 7 for Synapse), i.e. ``c`` is a runner-up the teacher
      confuses ``j`` with. At most ``floor(push_fraction * bank_size)`` (t_b = 0.25) are pushed per class per
      iteration (a random subset);
    * **negatives** of class ``c``: up to ``num_negatives`` drawn from its bank;
    * ``loss = mean_c mean_{a in c} -log(e^{a.p/t} / (e^{a.p/t} + sum_k e^{a.k/t}))``, t = 0.1, over classes with
      a non-empty bank.

    Args:
        in_channels, stride, num_anchors, num_negatives, threshold, temperature: as above / :class:`SCLTerm`.
        beta: entropy-drop fraction, a number or a schedule ``(iteration, max_iterations) -> fraction``.
        rank_low, rank_high, bank_size, push_fraction: the bank rules above.
        hidden, out, name, weight, label_key, unlabeled_start: as :class:`SCLTerm`.
    """

    def __init__(
        self,
        in_channels: Sequence[int] | None = None,
        stride: int = 4,
        num_anchors: int = 1000,
        num_negatives: int = 500,
        threshold: float = 0.9,
        beta: float | WeightSchedule | None = None,
        rank_low: int = 1,
        rank_high: int = 2,
        bank_size: int = 10_000,
        push_fraction: float = 0.25,
        temperature: float = 0.1,
        hidden: int = 256,
        out: int = 128,
        name: str = "mcsc2",
        weight: float | WeightSchedule | None = None,
        label_key: str = "label",
        unlabeled_start: int = 0,
    ):
        if not 0 <= rank_low <= rank_high:
            raise ValueError(f"MCSCv2Term: need 0 <= rank_low <= rank_high, got {rank_low}, {rank_high}")
        super().__init__(
            in_channels, stride=stride, num_anchors=num_anchors, num_negatives=num_negatives, threshold=threshold,
            temperature=temperature, hidden=hidden, out=out, name=name, weight=weight, label_key=label_key,
            unlabeled_start=unlabeled_start,
        )  # fmt: skip
        self.beta = as_schedule(LinearSchedule(0.2, 0.0) if beta is None else beta)
        self.rank_low, self.rank_high = int(rank_low), int(rank_high)
        self.bank_size, self.push_fraction = int(bank_size), float(push_fraction)
        self.banks: ClassFeatureQueues | None = None

    def anchor_mask(self, tg: ContrastTargets, beta: float) -> torch.Tensor:
        """``(S, B, *sp)``: labelled pixels and certain pseudo-labelled pixels (per teacher map)."""
        n_l = int(tg.labeled.sum())
        mask = torch.ones_like(tg.labels, dtype=torch.bool)
        for k in range(tg.probs.shape[0]):
            if tg.probs.shape[1] > n_l:
                mask[k, n_l:] = certain_pixels(tg.probs[k, n_l:], beta, self.threshold)
        return mask

    def forward(self, ctx: StepContext) -> torch.Tensor:
        z = embed_students(ctx, self.projector, self.stride)
        tg = contrast_targets(ctx, self.stride, self.label_key)
        num_classes, d = tg.probs.shape[2], z.shape[2]
        if self.banks is None:
            self.banks = ClassFeatureQueues(num_classes, self.bank_size, self.push_fraction)
        beta = float(self.beta(ctx.iteration, ctx.max_iterations))
        usable = tg.slice_mask(self.use_unlabeled(ctx))
        flat = z.movedim(2, -1).reshape(-1, d)
        labels = tg.labels.masked_fill(~usable, -1).reshape(-1)
        probs = tg.probs.movedim(2, -1).reshape(-1, num_classes)
        hard = hard_negative_mask(probs, labels, self.rank_low, self.rank_high)
        detached = flat.detach()
        pushed = [self.banks.push(c, detached[hard[:, c]]) for c in range(num_classes)]

        anchors_ok = (self.anchor_mask(tg, beta) & usable).reshape(-1)
        prototypes, _ = class_prototypes(flat, labels, anchors_ok, num_classes)
        anchor_idx, _ = sample_per_class(labels, anchors_ok, self.num_anchors, 0)
        anchor_cls = labels[anchor_idx]
        negs, tags = [], []
        for c in torch.unique(anchor_cls).tolist():
            sample = self.banks.sample(c, self.num_negatives)
            negs.append(sample.to(flat))
            tags.append(torch.full((sample.shape[0],), c, dtype=torch.long, device=flat.device))
        negatives = torch.cat(negs) if negs else flat.new_zeros(0, d)
        tag = torch.cat(tags) if tags else labels.new_zeros(0)
        losses, has_negative = info_nce(
            flat[anchor_idx], prototypes[anchor_cls], negatives, tag[None, :] == anchor_cls[:, None], self.temperature
        )
        loss = mean_over_classes(losses, anchor_cls, has_negative)
        self.report(ctx, anchors=anchor_idx.numel(), beta=beta, pushed=sum(pushed))
        return zero_loss(z) if loss is None else loss
