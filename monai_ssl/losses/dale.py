"""Fuzzy-region alternating learning (DALE-style) for segmentation with noisy labels (issue #8).

The term wraps a supervised segmentation loss and any student with decoder features (``forward_features``).
Per labelled batch and per student:

* **Partition** (:func:`fuzzy_partition`). Two per-pixel scores in ``[0, 1]``: the error ``e = 1 - p(label)``
  and the normalised entropy ``h = H(p) / ln C``. Each is soft-thresholded against the batch's own statistics:
  ``f_s = sigmoid((s - t) / (T * d))`` with ``t = mean(s) + k * d`` and ``d = max(std(s), delta)`` over the
  valid pixels **of the pixel's label class** (``per_class``, the default), so the threshold follows the batch
  as training sharpens the predictions, and a small class that is still unlearned keeps its easier pixels
  stable (with one threshold over the whole batch, every pixel of such a class is fuzzy in the stable phases,
  and the class is never learned; measured in the bundle README). A pixel is fuzzy by
  either score (a soft OR): ``fuzzy = 1 - (1 - f_e)(1 - f_h)``. Confident but wrong pixels (likely noisy labels)
  are fuzzy by error, boundary pixels by entropy. The partition carries no gradient.
* **Alternation** by iteration: the first ``warmup_iterations`` learn every pixel (weight 1: the partition
  needs a network that has learned something), then, in a cycle, ``stable_iterations``
  iterations learn only the non-fuzzy pixels (pixel weight ``1 - fuzzy``); the next ``fuzzy_iterations``
  iterations learn every pixel with weight ``(1 - fuzzy) + fuzzy * c``, where ``c`` is the pixel's label
  confidence, and add the distribution alignment.
* **Label confidence** (:class:`LabelConfidence`). Pixels are identified across iterations, through any
  augmentation, by the voxel of their labelled volume they come from: ``pixel_to_world`` maps the augmented
  pixel to a world point, the inverse of the cached volume's voxel->world affine maps it to a voxel index
  (rounded; pixels outside the volume, e.g. rotation padding, have no voxel). Per voxel the memory keeps an EMA
  of the cross-entropy (mean and variance, as an exponentially weighted Welford update, averaged over the
  students) and an EMA of label flips (the label differs from the one last seen at that voxel). The weight is
  ``c = exp(-std / tau) * (1 - flip_rate)``: a pixel whose loss jumps between iterations, or whose label flips,
  looks noisy and is down-weighted; unseen voxels get 1. Without volume geometry the confidence is 1.
* **Distribution alignment**. At one decoder scale (default: each student's finest map; labels, fuzzy
  memberships and confidences brought to it as in :mod:`monai_ssl.losses.contrastive`), L2-normalised pixel
  features give class-conditional Gaussians (mean, diagonal variance; classes by the given label). Stable
  pixels (weight ``1 - fuzzy``) update running estimates (buffers, checkpointed, momentum ``stats_momentum``);
  fuzzy pixels (weight ``fuzzy * c``) give the batch's fuzzy Gaussians, pulled towards the running stable ones by
  the closed-form 2-Wasserstein distance between diagonal Gaussians (:func:`gaussian_w2`), averaged over the
  classes with at least ``min_pixels`` (soft) pixels on both sides. Only the fuzzy side has gradient.
* **Supervised loss**: ``lambda_ce * mean_w(pixel loss) + lambda_dice * weighted soft Dice`` (batch Dice over
  every class, as :class:`~monai_ssl.losses.terms.SupervisedTerm`'s ``DiceCELoss``). The pixel loss is
  cross-entropy unless ``pixel_loss`` is given: any callable ``(logits, target (B, 1, ...)) -> (B, K, ...)``
  per-pixel map (channels are summed), e.g. ``monai.losses.FocalLoss(reduction="none", to_onehot_y=True,
  use_softmax=True)``. Dice is weighted by hand because MONAI's Dice takes only class weights or binary masks.
  Pixels with label ``ignore_index`` get weight 0 everywhere (no gradient, no memory update).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from monai_ssl.losses.contrastive import channels_at, labels_at, probs_at, select_scale
from monai_ssl.losses.schedules import WeightSchedule
from monai_ssl.losses.terms import LossTerm, StepContext
from monai_ssl.metrics.uncertainty import entropy

__all__ = [
    "fuzzy_partition",
    "gaussian_w2",
    "class_moments",
    "weighted_dice",
    "case_grids",
    "LabelConfidence",
    "DALETerm",
]


def _soft_above(
    score: torch.Tensor, valid: torch.Tensor, k: float, temperature: float, delta: float, groups: torch.Tensor | None
) -> torch.Tensor:
    """``sigmoid((s - t) / (T d))`` with ``t = mean + k d``, ``d = max(std, delta)`` over the valid pixels, or
    over the valid pixels of each group (a pixel's label) when ``groups`` is given."""
    out = torch.zeros_like(score)
    masks = [valid] if groups is None else [valid & (groups == g) for g in groups[valid].unique()]
    for mask in masks:
        values = score[mask]
        if values.numel() == 0:
            continue
        mean = values.mean()
        spread = values.std(unbiased=False).clamp_min(delta) if values.numel() > 1 else score.new_tensor(delta)
        out = torch.where(mask, torch.sigmoid((score - mean - k * spread) / (temperature * spread)), out)
    return out


@torch.no_grad()
def fuzzy_partition(
    probs: torch.Tensor,
    target: torch.Tensor,
    valid: torch.Tensor | None = None,
    k: float = 1.0,
    temperature: float = 0.25,
    delta: float = 1e-3,
    per_class: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Soft fuzzy membership ``(B, 1, ...)`` in ``[0, 1]`` of every pixel, with the error and normalised entropy.

    ``probs`` ``(B, C, ...)``, ``target`` ``(B, 1, ...)`` integer labels (valid where ``valid``; invalid pixels get
    membership 0). See the module docstring for the thresholds; ``per_class`` takes them per label class.
    """
    num_classes = probs.shape[1]
    valid = torch.ones_like(target, dtype=torch.bool) if valid is None else valid.bool()
    labels = target.long().clamp(0, num_classes - 1)
    error = 1.0 - probs.gather(1, labels)
    ent = entropy(probs) / math.log(max(num_classes, 2))
    groups = labels if per_class else None
    f_e = _soft_above(error, valid, k, temperature, delta, groups)
    f_h = _soft_above(ent, valid, k, temperature, delta, groups)
    fuzzy = (1.0 - (1.0 - f_e) * (1.0 - f_h)) * valid.to(probs.dtype)
    return fuzzy, error, ent


def gaussian_w2(
    mean1: torch.Tensor, var1: torch.Tensor, mean2: torch.Tensor, var2: torch.Tensor, eps: float = 1e-12
) -> torch.Tensor:
    """Squared 2-Wasserstein distance between diagonal Gaussians, over the last axis (closed form):
    ``||m1 - m2||^2 + ||sqrt(v1) - sqrt(v2)||^2``. ``eps`` keeps the square root's gradient finite at 0."""
    std1, std2 = var1.clamp_min(eps).sqrt(), var2.clamp_min(eps).sqrt()
    return ((mean1 - mean2) ** 2).sum(-1) + ((std1 - std2) ** 2).sum(-1)


def class_moments(
    x: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor, num_classes: int, eps: float = 1e-8
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Weighted per-class mean ``(C, D)``, diagonal variance ``(C, D)`` and mass ``(C,)`` of ``x`` ``(N, D)``."""
    labels = labels.long()
    w = weights.to(x.dtype)
    mass = x.new_zeros(num_classes).index_add(0, labels, w)
    s1 = x.new_zeros(num_classes, x.shape[1]).index_add(0, labels, w[:, None] * x)
    s2 = x.new_zeros(num_classes, x.shape[1]).index_add(0, labels, w[:, None] * x * x)
    denom = mass.clamp_min(eps)[:, None]
    mean = s1 / denom
    return mean, (s2 / denom - mean * mean).clamp_min(0.0), mass


def weighted_dice(
    probs: torch.Tensor, onehot: torch.Tensor, weights: torch.Tensor, smooth: float = 1e-5
) -> torch.Tensor:
    """Batch soft Dice loss with per-pixel weights, averaged over classes (background included):
    ``1 - (2 sum w p y + s) / (sum w (p + y) + s)``."""
    dims = [0, *range(2, probs.dim())]
    inter = (weights * probs * onehot).sum(dims)
    total = (weights * (probs + onehot)).sum(dims)
    return (1.0 - (2.0 * inter + smooth) / (total + smooth)).mean()


def case_grids(volumes: Any) -> dict[str, tuple[np.ndarray, tuple[int, ...]]]:
    """``case_id -> (voxel->world affine, spatial shape)`` of preprocessed volumes.

    ``volumes`` is a sequence of volume dicts (``image`` a channel-first MetaTensor), a
    :class:`~monai_ssl.data.slices.SliceDataset` (its ``volumes``) or a MONAI ``Dataset`` of volumes (its ``data``),
    i.e. what :func:`~monai_ssl.data.pipeline.training_datasets` returns for the labelled cases.
    """
    source = getattr(volumes, "volumes", None)
    if source is None:
        source = getattr(volumes, "data", volumes)
    out = {}
    for i in range(len(source)):
        volume = source[i]
        image = volume["image"]
        out[str(volume["case_id"])] = (
            np.asarray(image.affine, dtype=np.float64),
            tuple(int(s) for s in image.shape[1:]),
        )
    return out


class LabelConfidence(nn.Module):
    """Per-voxel memory of the supervised loss's behaviour, keyed in each labelled volume's own voxel grid.

    Args:
        grids: ``case_id -> (voxel->world affine, spatial shape)`` of the labelled volumes (:func:`case_grids`).
        momentum: EMA factor of the loss mean/variance and of the flip rate.
        temperature: ``tau`` of ``exp(-std / tau)``, in loss units (nats for cross-entropy).

    Buffers ``loss_mean``, ``loss_var``, ``flip_rate`` and ``last_label`` (-1: never seen) are checkpointed; the
    world->voxel matrices are not (rebuilt from the data).
    """

    def __init__(self, grids: Mapping[str, tuple[Any, Sequence[int]]], momentum: float = 0.9, temperature: float = 0.5):
        super().__init__()
        if not 0.0 <= momentum < 1.0 or temperature <= 0:
            raise ValueError(
                f"LabelConfidence: need 0 <= momentum < 1 and temperature > 0, got {momentum}, {temperature}"
            )
        self.case_ids = [str(c) for c in grids]
        self._index = {c: i for i, c in enumerate(self.case_ids)}
        self.momentum, self.temperature = float(momentum), float(temperature)
        shapes = [tuple(int(s) for s in grids[c][1]) + (1,) * (3 - len(grids[c][1])) for c in self.case_ids]
        sizes = [int(np.prod(s)) for s in shapes]
        inv = [np.linalg.inv(np.asarray(grids[c][0], dtype=np.float64)) for c in self.case_ids]
        n = sum(sizes)
        self.register_buffer("world_to_voxel", torch.as_tensor(np.array(inv).reshape(-1, 4, 4)), persistent=False)
        self.register_buffer("shapes", torch.tensor(shapes, dtype=torch.long).reshape(-1, 3), persistent=False)
        self.register_buffer("offsets", torch.tensor([0, *np.cumsum(sizes)[:-1]], dtype=torch.long)[: len(sizes)],
                             persistent=False)  # fmt: skip
        self.register_buffer("loss_mean", torch.zeros(n))
        self.register_buffer("loss_var", torch.zeros(n))
        self.register_buffer("flip_rate", torch.zeros(n))
        self.register_buffer("last_label", torch.full((n,), -1, dtype=torch.int16))

    @torch.no_grad()
    def keys(self, pixel_to_world: torch.Tensor, case_ids: Sequence[str], spatial: Sequence[int]) -> torch.Tensor:
        """Flat voxel keys ``(B, *spatial)`` of every pixel of a batch (``-1``: unknown case or outside the volume).

        ``pixel_to_world`` ``(B, 4, 4)`` maps pixel ``(i, j[, k])`` to RAS world; 2D pixels use ``[i, j, 0, 1]``.
        """
        device = self.loss_mean.device
        b, nd = pixel_to_world.shape[0], len(spatial)
        case = torch.tensor([self._index.get(str(c), -1) for c in case_ids], dtype=torch.long, device=device)
        known = case >= 0
        c = case.clamp(min=0)
        grid = torch.meshgrid(
            *[torch.arange(int(n), device=device, dtype=torch.float64) for n in spatial], indexing="ij"
        )
        homog = torch.zeros(grid[0].numel(), 4, dtype=torch.float64, device=device)
        homog[:, :nd] = torch.stack([g.reshape(-1) for g in grid], -1)
        homog[:, 3] = 1.0
        if len(self.case_ids) == 0:
            return torch.full((b, *spatial), -1, dtype=torch.long, device=device)
        m = self.world_to_voxel[c] @ pixel_to_world.to(device, torch.float64)  # (B, 4, 4): pixel -> voxel
        vox = torch.einsum("brc,pc->bpr", m[:, :3], homog).round().long()  # (B, P, 3)
        shape = self.shapes[c][:, None, :]
        inside = ((vox >= 0) & (vox < shape)).all(-1) & known[:, None]
        flat = self.offsets[c][:, None] + (vox[..., 0] * shape[..., 1] + vox[..., 1]) * shape[..., 2] + vox[..., 2]
        return torch.where(inside, flat, torch.full_like(flat, -1)).view(b, *spatial)

    @torch.no_grad()
    def observe(self, keys: torch.Tensor, loss: torch.Tensor, label: torch.Tensor) -> None:
        """Update the memory with one iteration's per-pixel losses and labels (same shape as ``keys``).

        Pixels sharing a voxel in one batch are averaged (their label: the largest) before the EMA update.
        """
        k = keys.reshape(-1)
        ok = k >= 0
        if not bool(ok.any()):
            return
        k, x, y = k[ok], loss.reshape(-1)[ok].to(self.loss_mean), label.reshape(-1)[ok].long()
        uniq, inv = torch.unique(k, return_inverse=True)
        count = torch.zeros(len(uniq), device=k.device).index_add(0, inv, torch.ones_like(x))
        x = torch.zeros(len(uniq), device=k.device).index_add(0, inv, x) / count
        y = torch.full((len(uniq),), -1, dtype=torch.long, device=k.device).scatter_reduce(0, inv, y, reduce="amax")
        a = 1.0 - self.momentum
        seen = self.last_label[uniq] >= 0
        mean, var, flips = self.loss_mean[uniq], self.loss_var[uniq], self.flip_rate[uniq]
        delta = x - mean
        flipped = (y != self.last_label[uniq].long()).to(x)
        self.loss_mean[uniq] = torch.where(seen, mean + a * delta, x)
        self.loss_var[uniq] = torch.where(seen, (1.0 - a) * (var + a * delta * delta), torch.zeros_like(x))
        self.flip_rate[uniq] = torch.where(seen, self.momentum * flips + a * flipped, torch.zeros_like(x))
        self.last_label[uniq] = y.to(torch.int16)

    @torch.no_grad()
    def weights(self, keys: torch.Tensor) -> torch.Tensor:
        """Label confidence ``exp(-std / tau) * (1 - flip_rate)`` per pixel; 1 where the voxel is unknown."""
        k = keys.clamp(min=0)
        w = torch.exp(-self.loss_var[k].sqrt() / self.temperature) * (1.0 - self.flip_rate[k])
        known = (keys >= 0) & (self.last_label[k] >= 0)
        return torch.where(known, w, torch.ones_like(w))


class DALETerm(LossTerm):
    """Fuzzy-region alternating learning with label confidence and Gaussian W2 alignment (module docstring).

    Args:
        num_classes: classes including background.
        name, weight: as every term.
        volumes: the labelled training volumes (a dataset or volume dicts, see :func:`case_grids`) or ready
            ``grids``; without either, label confidence is 1 everywhere.
        pixel_loss: per-pixel supervised loss ``(logits, target) -> (B, K, ...)`` (default: cross-entropy).
        lambda_dice, lambda_ce: weights of the weighted Dice and of the weighted mean pixel loss.
        feature_stride: decoder scale of the alignment (default: each student's finest map).
        k, temperature: the partition's soft threshold ``mean + k std`` and its width ``temperature * std``.
        per_class: thresholds per label class (default) or over the whole batch (see :func:`fuzzy_partition`).
        warmup_iterations, stable_iterations, fuzzy_iterations: the alternation schedule.
        align_weight: weight of the W2 alignment (fuzzy phases only); 0 disables it.
        stats_momentum: EMA factor of the running stable class statistics.
        confidence_momentum, confidence_temperature: :class:`LabelConfidence`'s ``momentum`` and ``temperature``.
        min_pixels: soft pixel count a class needs, on each side, to enter the statistics and the alignment.
        ignore_index: label value of unlabelled pixels (no loss, no gradient), or None.
        label_key: the labelled batch's label key.
    """

    needs_features = True

    def __init__(
        self,
        num_classes: int,
        name: str = "dale",
        weight: float | WeightSchedule = 1.0,
        volumes: Any = None,
        grids: Mapping[str, tuple[Any, Sequence[int]]] | None = None,
        pixel_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
        lambda_dice: float = 0.5,
        lambda_ce: float = 0.5,
        feature_stride: int | None = None,
        k: float = 1.0,
        temperature: float = 0.25,
        per_class: bool = True,
        warmup_iterations: int = 0,
        stable_iterations: int = 20,
        fuzzy_iterations: int = 20,
        align_weight: float = 0.1,
        stats_momentum: float = 0.9,
        confidence_momentum: float = 0.9,
        confidence_temperature: float = 0.5,
        min_pixels: float = 4.0,
        ignore_index: int | None = None,
        label_key: str = "label",
    ):
        super().__init__(name, weight)
        if stable_iterations < 1 or fuzzy_iterations < 0 or warmup_iterations < 0:
            raise ValueError(
                f"DALETerm: need stable_iterations >= 1, fuzzy_iterations >= 0 and warmup_iterations >= 0, got "
                f"{stable_iterations}, {fuzzy_iterations}, {warmup_iterations}"
            )
        self.num_classes = int(num_classes)
        self.pixel_loss = pixel_loss
        self.lambda_dice, self.lambda_ce = float(lambda_dice), float(lambda_ce)
        self.k, self.temperature, self.per_class = float(k), float(temperature), bool(per_class)
        self.warmup_iterations, self.stable_iterations = int(warmup_iterations), int(stable_iterations)
        self.fuzzy_iterations = int(fuzzy_iterations)
        self.align_weight, self.stats_momentum, self.min_pixels = (
            float(align_weight),
            float(stats_momentum),
            float(min_pixels),
        )
        self.ignore_index, self.label_key = ignore_index, label_key
        if grids is None and volumes is not None:
            grids = case_grids(volumes)
        self.confidence = (
            LabelConfidence(grids, confidence_momentum, confidence_temperature) if grids is not None else None
        )
        self.feature_stride = None if feature_stride is None else int(feature_stride)
        self.strides: list[int] = []

    def bind(self, networks: Sequence[nn.Module]) -> None:
        """One running stable mean / variance per class at each student's feature map (its channels)."""
        for i, net in enumerate(networks):
            stride = self.feature_stride if self.feature_stride is not None else int(min(net.feature_strides))
            channels = channels_at(net, stride)
            self.strides.append(stride)
            self.register_buffer(f"stable_mean_{i}", torch.zeros(self.num_classes, channels))
            self.register_buffer(f"stable_var_{i}", torch.zeros(self.num_classes, channels))
            self.register_buffer(f"stable_seen_{i}", torch.zeros(self.num_classes, dtype=torch.bool))

    def phase(self, iteration: int) -> str:
        """``"warmup"`` (every pixel, weight 1), ``"stable"`` (non-fuzzy pixels only) or ``"fuzzy"`` (every pixel,
        confidence-weighted, plus alignment)."""
        if iteration < self.warmup_iterations:
            return "warmup"
        if self.fuzzy_iterations == 0:
            return "stable"
        r = (iteration - self.warmup_iterations) % (self.stable_iterations + self.fuzzy_iterations)
        return "stable" if r < self.stable_iterations else "fuzzy"

    def label_confidence(
        self, ctx: StepContext, target: torch.Tensor, valid: torch.Tensor, ce: torch.Tensor
    ) -> torch.Tensor:
        """Observe this batch's per-pixel loss ``ce`` ``(B, 1, ...)``, then return the confidence ``(B, 1, ...)``."""
        labeled = ctx.labeled
        if self.confidence is None or "pixel_to_world" not in labeled or "case_id" not in labeled:
            return torch.ones_like(ce)
        keys = self.confidence.keys(labeled["pixel_to_world"], list(labeled["case_id"]), target.shape[2:])
        keys = torch.where(valid[:, 0], keys, torch.full_like(keys, -1))
        self.confidence.observe(keys, ce[:, 0], target[:, 0])
        return self.confidence.weights(keys)[:, None].to(ce)

    @torch.no_grad()
    def _update_stable(self, student: int, mean: torch.Tensor, var: torch.Tensor, mass: torch.Tensor) -> None:
        run_mean, run_var = getattr(self, f"stable_mean_{student}"), getattr(self, f"stable_var_{student}")
        seen = getattr(self, f"stable_seen_{student}")
        enough = mass >= self.min_pixels
        a = torch.where(seen, torch.full_like(mass, 1.0 - self.stats_momentum), torch.ones_like(mass))
        a = (a * enough.to(a))[:, None]
        run_mean.mul_(1.0 - a).add_(a * mean.to(run_mean))
        run_var.mul_(1.0 - a).add_(a * var.to(run_var))
        seen |= enough

    def alignment(
        self, student: int, features: Sequence[torch.Tensor], target: torch.Tensor, fuzzy: torch.Tensor,
        conf: torch.Tensor, valid: torch.Tensor, align: bool = True,
    ) -> torch.Tensor | None:  # fmt: skip
        """Update the running stable statistics; with ``align``, return the mean W2^2 of the fuzzy class Gaussians
        to the running stable ones (None otherwise, e.g. in a stable phase)."""
        stride = self.strides[student]
        feat = F.normalize(select_scale(features, target.shape[2:], stride).float(), dim=1)
        labels = labels_at(target, stride).reshape(-1)
        v = labels_at(valid, stride)[:, None].to(feat)  # validity of the pixel whose label is sampled
        f = probs_at(fuzzy.to(feat), stride)
        c = probs_at(conf.to(feat), stride)
        x = feat.movedim(1, -1).reshape(-1, feat.shape[1])
        w_stable = ((1.0 - f) * v).reshape(-1)
        w_fuzzy = (f * c * v).reshape(-1)
        with torch.no_grad():
            self._update_stable(student, *class_moments(x.detach(), labels, w_stable, self.num_classes))
        if not align:
            return None
        mean, var, mass = class_moments(x, labels, w_fuzzy, self.num_classes)
        use = (mass >= self.min_pixels) & getattr(self, f"stable_seen_{student}")
        if not bool(use.any()):
            return x.sum() * 0.0
        run_mean, run_var = getattr(self, f"stable_mean_{student}"), getattr(self, f"stable_var_{student}")
        return gaussian_w2(mean[use], var[use], run_mean[use], run_var[use]).mean()

    def forward(self, ctx: StepContext) -> torch.Tensor:
        target = ctx.labeled[self.label_key].long()
        if target.dim() == ctx.logits_l[0].dim() - 1:
            target = target[:, None]
        valid = torch.ones_like(target, dtype=torch.bool) if self.ignore_index is None else target != self.ignore_index
        target = torch.where(valid, target, torch.zeros_like(target)).clamp(0, self.num_classes - 1)
        phase = self.phase(ctx.iteration)
        ces = [F.cross_entropy(lg, target[:, 0], reduction="none")[:, None] for lg in ctx.logits_l]
        conf = self.label_confidence(ctx, target, valid, torch.stack([c.detach() for c in ces]).mean(0))
        onehot = F.one_hot(target[:, 0], self.num_classes).movedim(-1, 1)
        total = ctx.logits_l[0].new_zeros(())
        fuzzy_fraction, w2s = [], {}
        for i, logits in enumerate(ctx.logits_l):
            probs = torch.softmax(logits, dim=1)
            fuzzy, _, _ = fuzzy_partition(
                probs.detach(), target, valid, self.k, self.temperature, per_class=self.per_class
            )
            fuzzy_fraction.append(fuzzy.sum() / valid.sum().clamp_min(1))
            if phase == "warmup":
                keep = torch.ones_like(fuzzy)
            elif phase == "stable":
                keep = 1.0 - fuzzy
            else:
                keep = (1.0 - fuzzy) + fuzzy * conf
            w = keep * valid.to(keep)
            pix = ces[i] if self.pixel_loss is None else self.pixel_loss(logits, target).sum(dim=1, keepdim=True)
            loss = self.lambda_ce * (w * pix).sum() / w.sum().clamp_min(1e-8)
            loss = loss + self.lambda_dice * weighted_dice(probs, onehot.to(probs), w)
            if self.align_weight > 0 and ctx.features_l is not None:
                w2 = self.alignment(i, ctx.features_l[i], target, fuzzy, conf, valid, align=phase == "fuzzy")
                if w2 is not None:
                    w2s[f"w2_{i}"] = w2.detach()
                    loss = loss + self.align_weight * w2
            total = total + loss
        self.report(
            ctx,
            fuzzy_phase=phase == "fuzzy",
            fuzzy_fraction=torch.stack(fuzzy_fraction).mean(),
            confidence=conf[valid].mean() if bool(valid.any()) else 1.0,
            **w2s,
        )
        return total
