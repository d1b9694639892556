"""2D/3D student networks that expose logits and multi-scale decoder features, the projector, and the
inference-time parts that are not students (:mod:`.denoiser`, :mod:`.refiner`, :mod:`.ensemble`)."""

from monai_ssl.networks.base import ChannelsLast, DecoderFeaturesMixin, init_transformer_weights
from monai_ssl.networks.cs_unet import CSUNet
from monai_ssl.networks.dual_decoder import DualDecoderUNet
from monai_ssl.networks.factory import NETWORKS, build_network
from monai_ssl.networks.projector import ContrastProjector
from monai_ssl.networks.swin_unet import PatchExpand, SwinUNet, UShapedTransformer
from monai_ssl.networks.swin_unetr import FeatureSwinUNETR
from monai_ssl.networks.unet import FeatureUNet

__all__ = [
    "NETWORKS",
    "CSUNet",
    "ChannelsLast",
    "ContrastProjector",
    "DecoderFeaturesMixin",
    "DualDecoderUNet",
    "FeatureSwinUNETR",
    "FeatureUNet",
    "PatchExpand",
    "SwinUNet",
    "UShapedTransformer",
    "build_network",
    "init_transformer_weights",
]
