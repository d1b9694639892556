"""The transformer student: a Swin-UNet-style U-shaped network on MONAI's Swin blocks, and its shared skeleton."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn as nn
from monai.networks.blocks import Convolution, PatchEmbed, SubpixelUpsample
from monai.networks.nets.swin_unetr import BasicLayer, PatchMergingV2
from monai.utils import ensure_tuple_rep

from monai_ssl.networks.base import (
    ChannelsLast,
    DecoderFeaturesMixin,
    DecoderLevel,
    check_spatial_dims,
    init_transformer_weights,
)

__all__ = ["PatchExpand", "UShapedTransformer", "SwinUNet", "stochastic_depth_rates"]


class PatchExpand(nn.Sequential):
    """Swin-UNet patch expanding: a linear layer to ``out * 2**spatial_dims`` channels per token, a pixel
    shuffle that doubles every spatial axis (MONAI ``SubpixelUpsample``), then a LayerNorm. Channel-first."""

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int) -> None:
        linear = ChannelsLast(nn.Linear(in_channels, out_channels * 2**spatial_dims, bias=False))
        super().__init__(
            SubpixelUpsample(spatial_dims, None, scale_factor=2, conv_block=linear, apply_pad_pool=False),
            ChannelsLast(nn.LayerNorm(out_channels)),
        )


def stochastic_depth_rates(depths: Sequence[int], rate: float) -> list[list[float]]:
    """Drop-path rate of every block, growing linearly from 0 to ``rate`` over all encoder blocks (Swin)."""
    flat = torch.linspace(0, rate, sum(depths)).tolist()
    starts = [sum(depths[:i]) for i in range(len(depths))]
    return [flat[s : s + d] for s, d in zip(starts, depths, strict=True)]


class UShapedTransformer(DecoderFeaturesMixin, nn.Module):
    """U-shaped hierarchical transformer skeleton shared by Swin-UNet and CS-Unet.

    ``make_embed()`` maps the image to ``embed_dim`` tokens at stride ``patch_size``. Level ``i`` works at
    ``dims[i] = embed_dim * 2**i`` channels, stride ``patch_size * 2**i`` and ``num_heads[i]`` heads; the
    last level is the bottleneck. Encoder level ``i`` is ``make_stage(i, rates)`` (``rates``: drop-path rate
    of each of its ``depths[i]`` blocks) followed by ``make_down(i)`` (to level ``i+1``); its output before
    downsampling is the skip. Decoder level ``i`` expands the coarser map (:class:`PatchExpand`),
    concatenates the skip, maps ``2*dims[i]`` back to ``dims[i]`` with a linear layer and runs another
    ``make_stage(i, rates)``. ``log2(patch_size)`` further patch expansions (keeping ``embed_dim``
    channels) bring the map to full resolution for the 1x1-convolution head. Linear layers get the
    truncated-normal initialisation.

    Features (coarsest first): every decoder level, then every final expansion. Channels
    ``(dims[n-2], ..., dims[0], embed_dim, ...)`` at strides ``patch_size * 2**(n-2), ..., 2, 1``.
    """

    def __init__(
        self,
        spatial_dims: int,
        out_channels: int,
        embed_dim: int,
        depths: Sequence[int],
        num_heads: Sequence[int],
        patch_size: int,
        drop_path_rate: float,
        make_embed: Callable[[], nn.Module],
        make_stage: Callable[[int, list[float]], nn.Module],
        make_down: Callable[[int], nn.Module],
    ) -> None:
        super().__init__()
        name, num_levels = type(self).__name__, len(depths)
        check_spatial_dims(spatial_dims, name)
        if num_levels < 2:
            raise ValueError(f"{name}: needs at least two levels (len(depths) >= 2), got {tuple(depths)}.")
        if len(num_heads) != num_levels:
            raise ValueError(f"{name}: num_heads {tuple(num_heads)} needs one entry per level of {tuple(depths)=}.")
        for i, heads in enumerate(num_heads):
            if (embed_dim * 2**i) % heads:
                raise ValueError(f"{name}: level {i} has {embed_dim * 2**i} channels, not divisible by {heads} heads.")
        if patch_size < 2 or patch_size & (patch_size - 1):
            raise ValueError(f"{name}: patch_size must be a power of two >= 2, got {patch_size}.")
        rates = stochastic_depth_rates(depths, drop_path_rate)
        dims = [embed_dim * 2**i for i in range(num_levels)]
        levels = range(num_levels - 2, -1, -1)  # decoder order: coarsest first
        n_final = int(math.log2(patch_size))
        self.spatial_dims = spatial_dims
        self.size_divisor = patch_size * 2 ** (num_levels - 1)
        self.feature_channels = tuple(dims[i] for i in levels) + (embed_dim,) * n_final
        self.feature_strides = tuple(patch_size * 2**i for i in levels) + tuple(2**i for i in reversed(range(n_final)))

        self.embed = make_embed()
        self.encoder = nn.ModuleList([make_stage(i, rates[i]) for i in range(num_levels - 1)])
        self.down = nn.ModuleList([make_down(i) for i in range(num_levels - 1)])
        self.bottleneck = make_stage(num_levels - 1, rates[-1])
        self.decoder = nn.ModuleList(
            DecoderLevel(
                PatchExpand(spatial_dims, dims[i + 1], dims[i]),
                nn.Sequential(ChannelsLast(nn.Linear(2 * dims[i], dims[i], bias=False)), make_stage(i, rates[i])),
            )
            for i in levels
        )
        self.final_expand = nn.ModuleList([PatchExpand(spatial_dims, embed_dim, embed_dim) for _ in range(n_final)])
        self.head = Convolution(spatial_dims, embed_dim, out_channels, kernel_size=1, conv_only=True)
        init_transformer_weights(self)

    def _forward_padded(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        x = self.embed(x)
        skips: list[torch.Tensor] = []
        for stage, down in zip(self.encoder, self.down, strict=True):
            x = stage(x)
            skips.append(x)
            x = down(x)
        x = self.bottleneck(x)
        features: list[torch.Tensor] = []
        for level, skip in zip(self.decoder, reversed(skips), strict=True):
            x = level(x, skip)
            features.append(x)
        for expand in self.final_expand:
            x = expand(x)
            features.append(x)
        return self.head(x), features


class SwinUNet(UShapedTransformer):
    """Swin-UNet-style student (Cao et al. 2021) built on MONAI's Swin blocks, trained from scratch.

    Patch embedding (MONAI ``PatchEmbed``, LayerNorm), per level a MONAI Swin ``BasicLayer`` of
    ``depths[i]`` blocks alternating regular and shifted windows, MONAI ``PatchMergingV2`` between levels,
    and the decoder of :class:`UShapedTransformer` (patch expanding, skip concatenation, Swin blocks).
    Windows larger than a feature map shrink to it; maps that are not a multiple of the window are padded
    inside MONAI's blocks. Inputs are padded to a multiple of ``patch_size * 2**(len(depths)-1)`` (32 by
    default). Defaults (``embed_dim=48``, window 7) keep it trainable on a CPU; window 7 tiles the 224x224
    maps exactly (56, 28, 14, 7).

    Args:
        spatial_dims: 2 (the intended use) or 3.
        in_channels: image channels.
        out_channels: classes.
        embed_dim: channels of the first level; level ``i`` has ``embed_dim * 2**i``.
        depths: Swin blocks per level (the last level is the bottleneck).
        num_heads: attention heads per level; ``embed_dim * 2**i`` must divide by ``num_heads[i]``.
        window_size: attention window edge.
        patch_size: patch embedding stride, a power of two.
        mlp_ratio: hidden/embedding ratio of the block MLPs.
        qkv_bias: learnable bias of the query/key/value projection.
        drop_rate: dropout after attention and MLP projections.
        attn_drop_rate: dropout on attention weights.
        drop_path_rate: stochastic depth, growing linearly to this rate over the encoder blocks.
    """

    def __init__(
        self,
        spatial_dims: int = 2,
        in_channels: int = 1,
        out_channels: int = 2,
        embed_dim: int = 48,
        depths: Sequence[int] = (2, 2, 2, 2),
        num_heads: Sequence[int] = (3, 6, 12, 24),
        window_size: int = 7,
        patch_size: int = 4,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.1,
    ) -> None:
        window = ensure_tuple_rep(window_size, spatial_dims)

        def make_stage(i: int, rates: list[float]) -> nn.Module:
            return BasicLayer(
                dim=embed_dim * 2**i, depth=depths[i], num_heads=num_heads[i], window_size=window, drop_path=rates,
                mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, drop=drop_rate, attn_drop=attn_drop_rate, downsample=None,
            )  # fmt: skip

        def make_down(i: int) -> nn.Module:
            return ChannelsLast(PatchMergingV2(embed_dim * 2**i, spatial_dims=spatial_dims))

        def make_embed() -> nn.Module:
            return PatchEmbed(patch_size, in_channels, embed_dim, norm_layer=nn.LayerNorm, spatial_dims=spatial_dims)

        super().__init__(
            spatial_dims, out_channels, embed_dim, depths, num_heads, patch_size, drop_path_rate,
            make_embed, make_stage, make_down,
        )  # fmt: skip
