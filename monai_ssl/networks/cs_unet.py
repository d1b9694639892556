"""CS-Unet: a U-shaped transformer whose window attention and feed-forward blocks are convolutional."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.networks.blocks import Convolution
from monai.networks.layers import DropPath
from monai.networks.nets.swin_unetr import get_window_size, window_partition, window_reverse
from monai.utils import ensure_tuple_rep

from monai_ssl.networks.base import ChannelsLast
from monai_ssl.networks.swin_unet import UShapedTransformer

__all__ = ["CSUNet", "ConvTokenEmbedding", "ConvWindowAttention", "SeparableFeedForward", "window_attention_mask"]


def window_attention_mask(
    padded: Sequence[int], valid: Sequence[int], window: Sequence[int], shift: Sequence[int], device: torch.device
) -> torch.Tensor | None:
    """Which token pairs of each window may attend each other, as a boolean ``(windows, N, N)`` tensor.

    The map is zero-padded at the far end from ``valid`` to ``padded`` (multiples of ``window``) and
    rolled by ``-shift``. Tokens attend within their window only if they come from the same side of the
    cyclic wrap-around on every axis (the Swin shifted-window mask) and are not padding, so no real token
    ever sees a padded one. Returns None when every pair may attend (no shift, no padding).
    """
    if not any(shift) and list(padded) == list(valid):
        return None
    ndim = len(padded)
    region = torch.zeros(padded, dtype=torch.long, device=device)
    is_pad = torch.zeros(padded, dtype=torch.bool, device=device)
    for axis in range(ndim):
        length, pos = padded[axis], torch.arange(padded[axis], device=device)
        shape = [1] * ndim
        shape[axis] = length
        wrapped = pos >= length - shift[axis]  # positions the roll brought round from the start
        region = region + wrapped.long().view(shape) * 2**axis
        is_pad = is_pad | ((pos + shift[axis]) % length >= valid[axis]).view(shape)
    region = region.masked_fill(is_pad, -1)
    ids = window_partition(region[None, ..., None].float(), window).squeeze(-1)  # (windows, N)
    return ids.unsqueeze(-1) == ids.unsqueeze(-2)


class ConvTokenEmbedding(nn.Sequential):
    """Overlapping convolutional token embedding (CvT): kernel ``2*stride-1``, then a LayerNorm per token."""

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__(
            Convolution(
                spatial_dims, in_channels, out_channels, strides=stride, kernel_size=2 * stride - 1, conv_only=True
            ),
            ChannelsLast(nn.LayerNorm(out_channels)),
        )


class ConvWindowAttention(nn.Module):
    """(Shifted-)window multi-head attention with depth-wise separable convolutional Q/K/V projections.

    Each of query, key and value is a 3x3 depth-wise convolution with BatchNorm followed by a point-wise
    projection (CvT), computed on the whole map so neighbouring windows inform the tokens; positions are
    encoded by these convolutions, so there is no relative position bias. Channel-first in and out.
    """

    def __init__(self, spatial_dims: int, dim: int, num_heads: int, attn_drop: float = 0.0, drop: float = 0.0):
        super().__init__()
        self.num_heads = num_heads
        self.attn_drop = attn_drop
        # three 3x3 depth-wise filters per channel (one for each of q, k, v), then grouped point-wise projections
        self.depthwise = Convolution(
            spatial_dims, dim, 3 * dim, kernel_size=3, groups=dim, bias=False, norm="BATCH", act=None
        )
        self.pointwise = Convolution(spatial_dims, 3 * dim, 3 * dim, kernel_size=1, groups=3, conv_only=True)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(drop)

    def project_qkv(self, x: torch.Tensor) -> torch.Tensor:
        """Queries, keys and values of every pixel, stacked as channels ``[q | k | v]`` (``3 * dim``)."""
        b, c, *spatial = x.shape
        qkv = self.depthwise(x)  # channel 3*i + j is filter j of input channel i
        qkv = qkv.view(b, c, 3, *spatial).transpose(1, 2).reshape(b, 3 * c, *spatial)  # regroup as [q | k | v]
        return self.pointwise(qkv)

    def forward(
        self, x: torch.Tensor, window: Sequence[int], shift: Sequence[int], mask: torch.Tensor | None
    ) -> torch.Tensor:
        """Attend within windows of size ``window`` rolled by ``-shift``, ``mask`` as :func:`window_attention_mask`."""
        b, c, *spatial = x.shape
        qkv = self.project_qkv(x).movedim(1, -1)
        pads: list[int] = [0, 0]
        for s, w in zip(spatial[::-1], window[::-1], strict=True):
            pads += [0, (w - s % w) % w]
        qkv = F.pad(qkv, pads)
        padded = list(qkv.shape[1:-1])
        axes = tuple(range(1, len(spatial) + 1))
        if any(shift):
            qkv = torch.roll(qkv, shifts=[-s for s in shift], dims=axes)
        windows = window_partition(qkv, window)  # (b * n_windows, N, 3c)
        n_tokens = windows.shape[1]
        q, k, v = windows.view(b, -1, n_tokens, 3, self.num_heads, c // self.num_heads).permute(3, 0, 1, 4, 2, 5)
        if mask is not None:
            mask = mask.unsqueeze(1)  # (n_windows, 1, N, N) broadcasts over batch and heads
        dropout = self.attn_drop if self.training else 0.0
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)
        out = self.proj_drop(self.proj(out.transpose(2, 3).reshape(-1, n_tokens, c)))
        out = window_reverse(out, window, [b, *padded])
        if any(shift):
            out = torch.roll(out, shifts=list(shift), dims=axes)
        for axis, s in enumerate(spatial):
            out = out.narrow(axis + 1, 0, s)
        return out.movedim(-1, 1)


class SeparableFeedForward(nn.Sequential):
    """Depth-wise separable feed-forward block: point-wise expansion, 3x3 depth-wise conv, point-wise projection."""

    def __init__(self, spatial_dims: int, dim: int, hidden: int, drop: float = 0.0) -> None:
        super().__init__(
            Convolution(spatial_dims, dim, hidden, kernel_size=1, act="GELU", norm=None),
            Convolution(spatial_dims, hidden, hidden, kernel_size=3, groups=hidden, act="GELU", norm=None),
            Convolution(spatial_dims, hidden, dim, kernel_size=1, conv_only=True),
            nn.Dropout(drop),
        )


class ConvSwinBlock(nn.Module):
    """Pre-norm residual block: convolutional (shifted-)window attention, then the separable feed-forward."""

    def __init__(
        self,
        spatial_dims: int,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: float = 0.0,
    ) -> None:
        super().__init__()
        self.norm1 = ChannelsLast(nn.LayerNorm(dim))
        self.attn = ConvWindowAttention(spatial_dims, dim, num_heads, attn_drop, drop)
        self.norm2 = ChannelsLast(nn.LayerNorm(dim))
        self.ffn = SeparableFeedForward(spatial_dims, dim, int(dim * mlp_ratio), drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(
        self, x: torch.Tensor, window: Sequence[int], shift: Sequence[int], mask: torch.Tensor | None
    ) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x), window, shift, mask))
        return x + self.drop_path(self.ffn(self.norm2(x)))


class ConvSwinStage(nn.Module):
    """Blocks alternating regular and half-window-shifted windows, one per ``drop_path`` rate; the attention
    masks are computed once per call for all blocks."""

    def __init__(
        self,
        spatial_dims: int,
        dim: int,
        num_heads: int,
        window_size: int,
        drop_path: Sequence[float],
        mlp_ratio: float = 4.0,
        drop: float = 0.0,
        attn_drop: float = 0.0,
    ) -> None:
        super().__init__()
        self.window = ensure_tuple_rep(window_size, spatial_dims)
        self.blocks = nn.ModuleList(
            [ConvSwinBlock(spatial_dims, dim, num_heads, mlp_ratio, drop, attn_drop, rate) for rate in drop_path]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        spatial = list(x.shape[2:])
        window, shift = get_window_size(spatial, self.window, tuple(w // 2 for w in self.window))
        padded = [-(-s // w) * w for s, w in zip(spatial, window, strict=True)]
        no_shift = (0,) * len(window)
        masks = {
            False: window_attention_mask(padded, spatial, window, no_shift, x.device),
            True: window_attention_mask(padded, spatial, window, shift, x.device),
        }
        for i, block in enumerate(self.blocks):
            shifted = i % 2 == 1 and any(shift)
            x = block(x, window, shift if shifted else no_shift, masks[shifted])
        return x


class CSUNet(UShapedTransformer):
    """CS-Unet (Liu et al. 2023) student: a U-shaped transformer with convolutions inside its blocks.

    Convolutional token embedding (overlapping stride-``patch_size`` conv + LayerNorm) and strided 3x3
    convolutional token embeddings between levels, :class:`ConvSwinBlock` stages (shifted-window attention
    with depth-wise separable conv Q/K/V, depth-wise separable feed-forward), and the patch-expanding
    decoder with skips of :class:`~monai_ssl.networks.swin_unet.UShapedTransformer`. Padding inside
    windows is masked out of the attention. Arguments as :class:`~monai_ssl.networks.swin_unet.SwinUNet`
    (without ``qkv_bias``).
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
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.1,
    ) -> None:

        def make_stage(i: int, rates: list[float]) -> nn.Module:
            dim, heads = embed_dim * 2**i, num_heads[i]
            return ConvSwinStage(spatial_dims, dim, heads, window_size, rates, mlp_ratio, drop_rate, attn_drop_rate)

        def make_down(i: int) -> nn.Module:
            return ConvTokenEmbedding(spatial_dims, embed_dim * 2**i, embed_dim * 2 ** (i + 1), stride=2)

        def make_embed() -> nn.Module:
            return ConvTokenEmbedding(spatial_dims, in_channels, embed_dim, stride=patch_size)

        super().__init__(
            spatial_dims, out_channels, embed_dim, depths, num_heads, patch_size, drop_path_rate,
            make_embed, make_stage, make_down,
        )  # fmt: skip
