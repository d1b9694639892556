"""The conditional denoiser of diffusion-style mask refinement: predicts the noise in a noisy one-hot mask."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.networks.nets import DiffusionModelUNet

from monai_ssl.networks.base import check_spatial_dims

__all__ = ["ConditionalDenoiser"]


class ConditionalDenoiser(nn.Module):
    """A small MONAI ``DiffusionModelUNet`` conditioned on the image and the students' coarse prediction.

    ``forward(x_t, image, coarse_probs, t)`` concatenates the noisy mask ``x_t`` (``num_classes`` channels, a
    one-hot mask scaled to [-1, 1] and noised to step ``t``), the image (``in_channels``) and the coarse class
    probabilities rescaled to [-1, 1] (``num_classes``), and returns the predicted noise (``num_classes``
    channels). The timestep enters through MONAI's sinusoidal embedding, added as a bias inside every residual
    block. No attention except MONAI's bottleneck block, so it stays cheap on a CPU. Inputs of any spatial size
    are zero-padded at the far end to a multiple of ``size_divisor`` and the output cropped back, as for the
    students. The output layer starts at zero (MONAI's choice), so an untrained denoiser predicts no noise.

    Args:
        spatial_dims: 2 (slices) or 3.
        in_channels: image channels (``context`` slices).
        num_classes: classes of the mask.
        channels: channels per level, finest first; each a multiple of ``norm_num_groups``.
        num_res_blocks: residual blocks per level.
        norm_num_groups: GroupNorm groups.
        num_head_channels: channels per head of the bottleneck attention.
    """

    def __init__(
        self,
        spatial_dims: int = 2,
        in_channels: int = 1,
        num_classes: int = 2,
        channels: Sequence[int] = (16, 32, 32),
        num_res_blocks: int = 1,
        norm_num_groups: int = 8,
        num_head_channels: int = 8,
    ) -> None:
        super().__init__()
        check_spatial_dims(spatial_dims, "ConditionalDenoiser")
        channels = tuple(int(c) for c in channels)
        if any(c % norm_num_groups for c in channels):
            raise ValueError(f"ConditionalDenoiser: channels {channels} must be multiples of norm_num_groups.")
        self.spatial_dims, self.in_channels, self.num_classes = spatial_dims, int(in_channels), int(num_classes)
        self.size_divisor = 2 ** (len(channels) - 1)
        self.unet = DiffusionModelUNet(
            spatial_dims=spatial_dims,
            in_channels=2 * self.num_classes + self.in_channels,
            out_channels=self.num_classes,
            num_res_blocks=num_res_blocks,
            channels=channels,
            attention_levels=(False,) * len(channels),
            norm_num_groups=norm_num_groups,
            num_head_channels=num_head_channels,
        )

    def forward(
        self, x_t: torch.Tensor, image: torch.Tensor, coarse_probs: torch.Tensor, t: torch.Tensor | int
    ) -> torch.Tensor:
        """Predicted noise ``(B, num_classes, *spatial)``; ``t`` is one step for all or one step per sample."""
        if x_t.shape[1] != self.num_classes or coarse_probs.shape[1] != self.num_classes:
            raise ValueError(
                f"ConditionalDenoiser: x_t and coarse_probs need {self.num_classes} channels, got "
                f"{tuple(x_t.shape)} and {tuple(coarse_probs.shape)}."
            )
        z = torch.cat([x_t, image.to(x_t.dtype), 2 * coarse_probs.to(x_t.dtype) - 1], dim=1)
        t = torch.as_tensor(t, device=z.device).long().expand(z.shape[0])
        spatial = z.shape[2:]
        pad = [(-int(s)) % self.size_divisor for s in spatial]
        if any(pad):
            z = F.pad(z, [p for amount in reversed(pad) for p in (0, amount)])
        out = self.unet(z, t)
        return out[(..., *(slice(0, int(s)) for s in spatial))]
