"""Inference over several students: their logits mixed with recorded weights, optionally refined, as one
exportable module."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn

__all__ = ["StudentEnsemble"]


class StudentEnsemble(nn.Module):
    """Weighted mean of the students' logits; one student passes through.

    ``member_weights`` (a buffer, so checkpoints carry it) starts as the plain mean (the cross-teaching rule);
    :class:`~monai_ssl.engines.selection.StudentSelection` sets it to what validated best (one student alone,
    or a mix), and evaluation, inference and export then use exactly that. Students of weight 0 are not run.

    ``prior_weight`` (a buffer too, 0 by default) is how much of the registration prior the model's probabilities
    take at evaluation and inference, ``(1 - w) * softmax + w * prior``: chosen on validation by the same
    selection and applied after the softmax by :class:`~monai_ssl.inference.volume.MixPriord`, not by ``forward``.

    It is a plain ``nn.Module`` whose ``forward`` returns a tensor, so MONAI inferers (``SliceInferer`` feeds it
    slice batches), ``ckpt_export`` and TorchScript tracing treat it like any single network.

    Optional diffusion-style refinement: ``refiner`` (a :class:`~monai_ssl.networks.refiner.DiffusionRefiner`,
    or any module ``refiner(image, probs, steps, samples, generator) -> (mean_probs, variance)``) is saved with
    the students, so their checkpoints carry it. With ``refine_steps > 0`` the forward refines the softmax of
    the mean logits and returns ``log(mean_probs)``: logits whose softmax is the refined mean, so downstream
    softmax/argmax/entropy need no change. ``refine_variance`` appends the refinement's per-pixel variance as
    one last channel (zeros without refinement), for the inference bundle's uncertainty output.

    Args:
        networks: the students.
        refiner: optional refinement module (None: plain mean logits, same state dict as before).
        refine_steps: diffusion steps to noise and denoise (0: off; the output is then the mean logits exactly).
        refine_samples: refinement samples averaged per pixel.
        refine_variance: append the variance channel.
        refine_seed: seed of a generator created per forward (reproducible output); None draws from torch's
            global generator.
    """

    def __init__(
        self,
        networks: Sequence[nn.Module],
        refiner: nn.Module | None = None,
        refine_steps: int = 0,
        refine_samples: int = 4,
        refine_variance: bool = False,
        refine_seed: int | None = 0,
    ):
        super().__init__()
        if len(networks) == 0:
            raise ValueError("StudentEnsemble needs at least one network")
        if int(refine_steps) < 0 or int(refine_samples) < 1:
            raise ValueError(f"StudentEnsemble: need refine_steps >= 0 and refine_samples >= 1, got "
                             f"{refine_steps} and {refine_samples}")  # fmt: skip
        if refiner is None and int(refine_steps) > 0:
            raise ValueError(
                f"StudentEnsemble: refine_steps={refine_steps} needs a refiner, and this configuration has none "
                "(train a method with monai_ssl.losses.diffusion.DiffusionRefinementTerm and set network_def#refiner)"
            )
        self.networks = nn.ModuleList(networks)
        self.register_buffer("member_weights", torch.full((len(networks),), 1.0 / len(networks)))
        self.register_buffer("prior_weight", torch.zeros(()))
        self.refiner = refiner
        self.refine_steps, self.refine_samples = int(refine_steps), int(refine_samples)
        self.refine_variance, self.refine_seed = bool(refine_variance), refine_seed

    def set_member_weights(self, weights: Sequence[float]) -> None:
        """Use ``weights`` (non-negative, one per student, normalised here) from now on, and save them."""
        w = torch.as_tensor([float(v) for v in weights], dtype=torch.float32)
        if w.numel() != len(self.networks) or (w < 0).any() or w.sum() <= 0:
            raise ValueError(
                f"need {len(self.networks)} non-negative member weights with a positive sum, got {weights}"
            )
        self.member_weights.copy_(w / w.sum())

    def set_prior_weight(self, weight: float) -> None:
        """Mix ``weight`` (0..1) of the registration prior into the probabilities from now on, and save it."""
        if not 0.0 <= float(weight) <= 1.0:
            raise ValueError(f"prior weight must be within [0, 1], got {weight}")
        self.prior_weight.fill_(float(weight))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # checkpoints written before member (prior) weights existed used the plain mean (no prior)
        state_dict.setdefault(prefix + "member_weights", torch.full((len(self.networks),), 1.0 / len(self.networks)))
        state_dict.setdefault(prefix + "prior_weight", torch.zeros(()))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def mix(self, logits: Sequence[torch.Tensor | None]) -> torch.Tensor:
        """The weighted mean of per-student logits (entries of weight 0 may be None)."""
        weights = self.member_weights.tolist()
        parts = [w * o for w, o in zip(weights, logits, strict=True) if w > 0]
        out = parts[0]
        for part in parts[1:]:
            out = out + part
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights = self.member_weights.tolist()
        out = self.mix([net(x) if w > 0 else None for w, net in zip(weights, self.networks, strict=True)])
        if self.refiner is None or self.refine_steps == 0:
            return torch.cat([out, out.new_zeros(out[:, :1].shape)], 1) if self.refine_variance else out
        generator = None
        if self.refine_seed is not None:
            generator = torch.Generator(device=x.device).manual_seed(int(self.refine_seed))
        probs, variance = self.refiner(x, out.float().softmax(1), self.refine_steps, self.refine_samples, generator)
        refined = probs.clamp_min(torch.finfo(probs.dtype).tiny).log()
        return torch.cat([refined, variance], 1) if self.refine_variance else refined
