"""MONAI's SwinUNETR (the 3D transformer student) with access to its decoder features."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.networks.nets import SwinUNETR

from monai_ssl.networks.base import DecoderFeaturesMixin, check_spatial_dims, init_transformer_weights

__all__ = ["FeatureSwinUNETR"]


class FeatureSwinUNETR(DecoderFeaturesMixin, SwinUNETR):
    """``monai.networks.nets.SwinUNETR`` (patch size 2, trained from scratch) that also returns decoder features.

    The parameters and their names are MONAI's, so state dicts load into a plain ``SwinUNETR``. Inputs are
    padded to a multiple of 32 instead of being rejected. Features, coarsest first: the outputs of
    ``decoder5 ... decoder1`` with ``(8, 4, 2, 1, 1) * feature_size`` channels at strides 16, 8, 4, 2, 1.
    Transformer linear layers get the truncated-normal initialisation of the other students.

    Args:
        spatial_dims: 3 (the intended use) or 2.
        in_channels, out_channels: image channels and classes.
        feature_size: channels of the first level; a multiple of 12.
        depths, num_heads: Swin blocks and attention heads of the four encoder stages.
        window_size: attention window edge.
        norm_name: normalisation of the convolutional encoder/decoder blocks.
        drop_rate, attn_drop_rate, dropout_path_rate: dropout, attention dropout, stochastic depth.
        use_checkpoint: gradient checkpointing (less memory, more compute).
        use_v2: SwinUNETR-v2 (a residual conv block before each Swin stage).
    """

    def __init__(
        self,
        spatial_dims: int = 3,
        in_channels: int = 1,
        out_channels: int = 2,
        feature_size: int = 24,
        depths: Sequence[int] = (2, 2, 2, 2),
        num_heads: Sequence[int] = (3, 6, 12, 24),
        window_size: int = 7,
        norm_name: str = "instance",
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        dropout_path_rate: float = 0.0,
        use_checkpoint: bool = False,
        use_v2: bool = False,
    ) -> None:
        check_spatial_dims(spatial_dims, "FeatureSwinUNETR")
        if len(depths) != 4 or len(num_heads) != 4:
            raise ValueError(f"FeatureSwinUNETR: depths and num_heads need 4 stages, got {depths} and {num_heads}.")
        super().__init__(
            in_channels=in_channels, out_channels=out_channels, patch_size=2, depths=depths, num_heads=num_heads,
            window_size=window_size, feature_size=feature_size, norm_name=norm_name, drop_rate=drop_rate,
            attn_drop_rate=attn_drop_rate, dropout_path_rate=dropout_path_rate, use_checkpoint=use_checkpoint,
            spatial_dims=spatial_dims, use_v2=use_v2,
        )  # fmt: skip
        self.spatial_dims = spatial_dims
        self.size_divisor = 32
        self.feature_channels = tuple(feature_size * m for m in (8, 4, 2, 1, 1))
        self.feature_strides = (16, 8, 4, 2, 1)
        self.norm_name = norm_name
        init_transformer_weights(self.swinViT)

    @torch.jit.unused
    def _check_input(self, x: torch.Tensor) -> None:
        super()._check_input(x)
        if "instance" in str(self.norm_name).lower() and all(s <= 32 for s in x.shape[2:]):
            raise ValueError(
                f"FeatureSwinUNETR: input of spatial size {tuple(x.shape[2:])} leaves a 1-pixel bottleneck, "
                "which instance normalisation cannot normalise; use a size above 32 on some axis."
            )

    def _forward_padded(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        # the same graph as SwinUNETR.forward, keeping the decoder outputs
        hidden = self.swinViT(x, self.normalize)
        enc0 = self.encoder1(x)
        enc1 = self.encoder2(hidden[0])
        enc2 = self.encoder3(hidden[1])
        enc3 = self.encoder4(hidden[2])
        dec4 = self.encoder10(hidden[4])
        dec3 = self.decoder5(dec4, hidden[3])
        dec2 = self.decoder4(dec3, enc3)
        dec1 = self.decoder3(dec2, enc2)
        dec0 = self.decoder2(dec1, enc1)
        out = self.decoder1(dec0, enc0)
        return self.out(out), [dec3, dec2, dec1, dec0, out]
