"""What every student network shares: input padding, logits/feature access and weight initialisation."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.networks.layers import trunc_normal_

__all__ = ["DecoderFeaturesMixin", "DecoderLevel", "ChannelsLast", "init_transformer_weights", "check_spatial_dims"]


def check_spatial_dims(spatial_dims: int, network: str) -> None:
    """Raise a ValueError naming ``network`` unless ``spatial_dims`` is 2 or 3."""
    if spatial_dims not in (2, 3):
        raise ValueError(f"{network}: spatial_dims must be 2 or 3, got {spatial_dims!r}.")


class DecoderFeaturesMixin:
    """Give a network ``forward`` (logits only) and ``forward_features`` (logits and decoder features).

    A subclass sets ``spatial_dims``, ``size_divisor``, ``feature_channels`` and ``feature_strides`` and
    implements ``_forward_padded(x)`` for inputs whose spatial sizes are multiples of ``size_divisor``.
    Other sizes (e.g. 100x120) are zero-padded at the far end of each axis and the outputs cropped back, so
    logits always match the input size and a feature map of stride ``s`` has ``ceil(size / s)`` pixels,
    pixel ``i`` covering input pixels ``[i*s, (i+1)*s)``.
    (No class-level annotations here: TorchScript cannot resolve postponed ones.)
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits at the input's spatial size (a plain tensor, for inferers and export)."""
        return self.forward_features(x)[0]

    def forward_features(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Logits and the decoder feature maps, coarsest first, with ``feature_channels`` channels."""
        if not torch.jit.is_scripting() and not torch.jit.is_tracing():
            self._check_input(x)
        spatial = [int(s) for s in x.shape[2:]]
        pads: list[int] = []
        for s in spatial[::-1]:  # F.pad lists the last axis first
            pads += [0, (self.size_divisor - s % self.size_divisor) % self.size_divisor]
        if any(p > 0 for p in pads):
            x = F.pad(x, pads)
        logits, features = self._forward_padded(x)
        cropped: list[torch.Tensor] = []
        for feature in features:
            stride = x.shape[2] // feature.shape[2]  # equals feature_strides[i]; read here so TorchScript compiles
            cropped.append(_crop(feature, [(s + stride - 1) // stride for s in spatial]))
        return _crop(logits, spatial), cropped

    @torch.jit.unused
    def _check_input(self, x: torch.Tensor) -> None:
        if x.dim() != self.spatial_dims + 2:
            raise ValueError(
                f"{type(self).__name__} (spatial_dims={self.spatial_dims}) expects a (batch, channel, "
                f"{self.spatial_dims} spatial) tensor, got shape {tuple(x.shape)}."
            )

    def _forward_padded(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        raise NotImplementedError


def _crop(x: torch.Tensor, size: list[int]) -> torch.Tensor:
    """Keep the first ``size[i]`` elements of each spatial axis of ``x``."""
    for axis, length in enumerate(size):
        if x.shape[axis + 2] != length:
            x = x.narrow(axis + 2, 0, length)
    return x


class ChannelsLast(nn.Module):
    """Apply a channel-last module (``nn.Linear``, ``nn.LayerNorm``, Swin patch merging) to a channel-first map."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x.movedim(1, -1)).movedim(-1, 1)


class DecoderLevel(nn.Module):
    """One U-Net decoder level: upsample the coarser map, concatenate the skip on channels, fuse."""

    def __init__(self, upsample: nn.Module, fuse: nn.Module) -> None:
        super().__init__()
        self.upsample = upsample
        self.fuse = fuse

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.fuse(torch.cat([self.upsample(x), skip], dim=1))


def init_transformer_weights(module: nn.Module, std: float = 0.02) -> None:
    """Swin/ViT initialisation: truncated-normal linear weights, zero biases, unit LayerNorms."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
