"""A U-Net with one shared encoder and two different decoders (PCLMix's heterogeneous dual decoder).

The **main** decoder is :class:`~monai_ssl.networks.unet.FeatureUNet`'s: transposed-convolution upsampling and
residual units. The **auxiliary** decoder differs in kind: bilinear (trilinear in 3D) upsampling, attention
gates on the skips (MONAI's Attention U-Net ``AttentionBlock``) and plain convolution blocks, fed through
dropout. Two decoders that see the same encoder but upsample and fuse differently make different mistakes,
which the consistency loss between them exploits.

Only the main decoder serves inference: ``forward`` returns its logits and never runs the auxiliary decoder, so
``StudentEnsemble``, the inferers and the traced export treat this network as a plain U-Net. The auxiliary
logits are reachable two ways:

* ``forward_both(x) -> (main_logits, aux_logits, main_features)`` runs both decoders explicitly;
* ``forward_features(x)`` in **training** mode also runs the auxiliary decoder and keeps its logits in the
  attribute ``aux_logits`` (``None`` otherwise). The trainer's one forward per iteration then serves the loss
  terms of both decoders (see :func:`auxiliary_logits` and :mod:`monai_ssl.losses.scribble`).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
from monai.networks.blocks import Convolution, UpSample
from monai.networks.nets.attentionunet import AttentionBlock

from monai_ssl.networks.base import DecoderFeaturesMixin
from monai_ssl.networks.unet import FeatureUNet

__all__ = ["DualDecoderUNet", "AttentionDecoderLevel", "auxiliary_logits"]


class AttentionDecoderLevel(nn.Module):
    """Upsample (interpolation + conv), gate the skip by attention on the upsampled map, concatenate, fuse."""

    def __init__(
        self, spatial_dims: int, in_channels: int, out_channels: int, act: str, norm: str, kernel_size: int = 3
    ) -> None:
        super().__init__()
        interp = {2: "bilinear", 3: "trilinear"}[spatial_dims]
        self.upsample = UpSample(
            spatial_dims, in_channels, out_channels, scale_factor=2, mode="nontrainable", interp_mode=interp
        )
        self.gate = AttentionBlock(spatial_dims, f_int=max(1, out_channels // 2), f_g=out_channels, f_l=out_channels)
        self.fuse = nn.Sequential(
            Convolution(spatial_dims, 2 * out_channels, out_channels, kernel_size=kernel_size, act=act, norm=norm),
            Convolution(spatial_dims, out_channels, out_channels, kernel_size=kernel_size, act=act, norm=norm),
        )

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        up = self.upsample(x)
        return self.fuse(torch.cat([self.gate(up, skip), up], dim=1))


class DualDecoderUNet(FeatureUNet):
    """:class:`FeatureUNet` (shared encoder, main decoder) plus an attention-gated auxiliary decoder.

    ``feature_channels`` / ``feature_strides`` describe the main decoder's maps (as ``FeatureUNet``).

    Args:
        aux_dropout: dropout on the bottleneck as the auxiliary decoder sees it (a feature perturbation).
        aux_act, aux_norm: MONAI activation and normalisation names of the auxiliary decoder's 3x3 convolutions.
        kwargs: :class:`FeatureUNet`'s arguments (``spatial_dims``, ``in_channels``, ``out_channels``,
            ``channels``, ...), for the encoder and the main decoder; the auxiliary decoder mirrors its levels.
    """

    def __init__(self, aux_dropout: float = 0.1, aux_act: str = "RELU", aux_norm: str = "BATCH", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        spatial_dims, ch = self.spatial_dims, self.feature_channels[::-1]
        out_channels = self.head.conv.out_channels
        self.aux_dropout = nn.Dropout(aux_dropout)
        self.aux_decoder = nn.ModuleList(
            AttentionDecoderLevel(spatial_dims, ch[i + 1], ch[i], aux_act, aux_norm) for i in range(len(ch) - 2, -1, -1)
        )
        self.aux_head = Convolution(spatial_dims, ch[0], out_channels, kernel_size=1, conv_only=True)
        self.with_aux = False
        self.aux_logits: torch.Tensor | None = None

    def _forward_padded(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        skips = self._encode(x)
        logits, features = self._decode(skips)
        if self.with_aux:  # the auxiliary logits ride as one last "feature" map so the mixin crops them too
            y = self.aux_dropout(skips[-1])
            for level, skip in zip(self.aux_decoder, skips[-2::-1], strict=True):
                y = level(y, skip)
            features.append(self.aux_head(y))
        return logits, features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Main decoder logits only (inference, export, ensembles); the auxiliary decoder does not run."""
        return DecoderFeaturesMixin.forward_features(self, x)[0]

    def forward_both(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        """Main logits, auxiliary logits (both at the input size) and the main decoder's features."""
        self.with_aux = True
        try:
            logits, features = DecoderFeaturesMixin.forward_features(self, x)
        finally:
            self.with_aux = False
        return logits, features[-1], features[:-1]

    def forward_features(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Main logits and features; in training mode also sets ``aux_logits`` (else clears it)."""
        if not self.training:
            self.aux_logits = None
            return DecoderFeaturesMixin.forward_features(self, x)
        logits, self.aux_logits, features = self.forward_both(x)
        return logits, features


def auxiliary_logits(network: nn.Module, batch_size: int) -> torch.Tensor | None:
    """The auxiliary logits a dual-decoder network kept from its last training ``forward_features``, if they
    cover ``batch_size`` samples; ``None`` for other networks."""
    aux = getattr(network, "aux_logits", None)
    return aux if isinstance(aux, torch.Tensor) and aux.shape[0] == batch_size else None
