"""The CNN student: a residual U-Net built from MONAI blocks that also returns its decoder features."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
from monai.networks.blocks import Convolution, ResidualUnit, UpSample

from monai_ssl.networks.base import DecoderFeaturesMixin, DecoderLevel, check_spatial_dims

__all__ = ["FeatureUNet"]


class FeatureUNet(DecoderFeaturesMixin, nn.Module):
    """Residual U-Net (MONAI ``ResidualUnit`` / ``UpSample`` blocks) for 2D slices or 3D volumes.

    Level ``i`` has ``channels[i]`` channels at stride ``2**i``; levels below the first downsample with a
    stride-2 residual unit (as MONAI's ``UNet``). Each decoder level upsamples with a transposed
    convolution, concatenates the encoder skip and fuses with a residual unit. ``forward_features``
    returns the bottleneck and every decoder level, coarsest first: ``feature_channels = channels[::-1]``
    at strides ``2**(n-1), ..., 2, 1``. Inputs are padded to a multiple of ``2**(n-1)``.

    Args:
        spatial_dims: 2 or 3.
        in_channels: image channels.
        out_channels: classes (logit channels).
        channels: channels per level, finest first; at least two levels.
        num_res_units: convolutions per residual unit.
        kernel_size: convolution kernel size.
        act: MONAI activation name, e.g. ``"PRELU"``, ``"RELU"``, ``"LEAKYRELU"``.
        norm: MONAI normalisation name, e.g. ``"BATCH"``, ``"INSTANCE"``.
        dropout: dropout probability inside the residual units.
    """

    def __init__(
        self,
        spatial_dims: int = 2,
        in_channels: int = 1,
        out_channels: int = 2,
        channels: Sequence[int] = (16, 32, 64, 128, 256),
        num_res_units: int = 2,
        kernel_size: int = 3,
        act: str = "PRELU",
        norm: str = "BATCH",
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        check_spatial_dims(spatial_dims, "FeatureUNet")
        channels = tuple(int(c) for c in channels)
        if len(channels) < 2:
            raise ValueError(f"FeatureUNet: channels needs at least two levels, got {channels}.")
        self.spatial_dims = spatial_dims
        self.size_divisor = 2 ** (len(channels) - 1)
        self.feature_channels = channels[::-1]
        self.feature_strides = tuple(2**i for i in range(len(channels)))[::-1]

        def unit(c_in: int, c_out: int, stride: int) -> ResidualUnit:
            return ResidualUnit(
                spatial_dims, c_in, c_out, strides=stride, kernel_size=kernel_size, subunits=num_res_units,
                act=act, norm=norm, dropout=dropout,
            )  # fmt: skip

        self.encoder = nn.ModuleList([unit(in_channels, channels[0], 1)])
        self.encoder.extend(unit(channels[i - 1], channels[i], 2) for i in range(1, len(channels)))
        # decoder levels are listed coarsest first, in the order they run
        self.decoder = nn.ModuleList(
            DecoderLevel(
                UpSample(spatial_dims, channels[i + 1], channels[i], scale_factor=2, mode="deconv"),
                unit(2 * channels[i], channels[i], 1),
            )
            for i in range(len(channels) - 2, -1, -1)
        )
        self.head = Convolution(spatial_dims, channels[0], out_channels, kernel_size=1, conv_only=True)

    def _encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Every encoder level's output, finest first (the last is the bottleneck)."""
        skips: list[torch.Tensor] = []
        for stage in self.encoder:
            x = stage(x)
            skips.append(x)
        return skips

    def _decode(self, skips: list[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Logits and the bottleneck and every decoder level (coarsest first), fusing the encoder ``skips``."""
        x = skips[-1]
        features = [x]
        n = len(skips)
        for i, level in enumerate(self.decoder):
            x = level(x, skips[n - 2 - i])
            features.append(x)
        return self.head(x), features

    def _forward_padded(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        return self._decode(self._encode(x))
