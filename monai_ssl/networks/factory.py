"""Build a student network by name (the entry point for MONAI bundle configs)."""

from __future__ import annotations

import torch.nn as nn

from monai_ssl.networks.cs_unet import CSUNet
from monai_ssl.networks.dual_decoder import DualDecoderUNet
from monai_ssl.networks.swin_unet import SwinUNet
from monai_ssl.networks.swin_unetr import FeatureSwinUNETR
from monai_ssl.networks.unet import FeatureUNet

__all__ = ["NETWORKS", "build_network"]

#: name -> (class, supported spatial_dims)
NETWORKS: dict[str, tuple[type[nn.Module], tuple[int, ...]]] = {
    "unet": (FeatureUNet, (2, 3)),
    "swin_unet": (SwinUNet, (2, 3)),
    "cs_unet": (CSUNet, (2, 3)),
    "swin_unetr": (FeatureSwinUNETR, (2, 3)),
    "dual_decoder_unet": (DualDecoderUNet, (2, 3)),
}


def build_network(name: str, spatial_dims: int, in_channels: int, out_channels: int, **kwargs) -> nn.Module:
    """Construct network ``name`` (one of :data:`NETWORKS`); ``kwargs`` go to its constructor.

    Bundle usage: ``{"_target_": "monai_ssl.networks.build_network", "name": "unet", "spatial_dims": 2,
    "in_channels": 1, "out_channels": 4, "channels": [16, 32, 64, 128, 256]}``.
    """
    key = str(name).lower()
    if key not in NETWORKS:
        raise ValueError(f"build_network: unknown network {name!r}; choose one of {sorted(NETWORKS)}.")
    cls, dims = NETWORKS[key]
    if spatial_dims not in dims:
        raise ValueError(f"build_network: {key!r} supports spatial_dims {dims}, got {spatial_dims!r}.")
    return cls(spatial_dims=spatial_dims, in_channels=in_channels, out_channels=out_channels, **kwargs)
