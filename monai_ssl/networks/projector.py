"""Contrastive projection heads for the students' decoder features, with a last layer shared between them."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["ContrastProjector"]


class ContrastProjector(nn.Module):
    """Per-pixel projection head: a 1x1 conv to ``hidden`` channels + ReLU per student, then one shared 1x1 conv.

    Sharing the last layer puts both students' embeddings in one space, so a contrastive loss can compare
    a pixel of student A with a pixel of student B. Works for any number of spatial dimensions (the 1x1
    convolutions run on the flattened map).

    Args:
        in_channels: feature channels of each student, e.g. ``(unet.feature_channels[1], swin.feature_channels[1])``.
        hidden: channels after the per-student layer.
        out: embedding channels.
        normalize: L2-normalise the embedding of every pixel.

    Example::

        proj = ContrastProjector((128, 96))
        za = proj(features_a, student=0)  # (B, 128, H, W)
        zb = proj(features_b, student=1)
    """

    def __init__(self, in_channels: Sequence[int], hidden: int = 256, out: int = 128, normalize: bool = True) -> None:
        super().__init__()
        if len(in_channels) < 1:
            raise ValueError("ContrastProjector: in_channels needs one entry per student, got none.")
        self.in_channels = tuple(int(c) for c in in_channels)
        self.normalize = normalize
        self.first = nn.ModuleList([nn.Conv1d(c, hidden, kernel_size=1) for c in self.in_channels])
        self.shared = nn.Conv1d(hidden, out, kernel_size=1)

    def forward(self, x: torch.Tensor, student: int) -> torch.Tensor:
        """Embed the ``(B, C, *spatial)`` features of student number ``student``; returns ``(B, out, *spatial)``."""
        if not 0 <= student < len(self.first):
            raise ValueError(f"ContrastProjector: student must be in [0, {len(self.first)}), got {student}.")
        if x.shape[1] != self.in_channels[student]:
            raise ValueError(
                f"ContrastProjector: student {student} expects {self.in_channels[student]} channels, "
                f"got features of shape {tuple(x.shape)}."
            )
        b, _, *spatial = x.shape
        z = self.shared(F.relu(self.first[student](x.flatten(2))))
        if self.normalize:
            z = F.normalize(z, dim=1)
        return z.view(b, -1, *spatial)
