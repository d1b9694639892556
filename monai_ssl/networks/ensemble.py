"""Inference over several students: their logits averaged, as one exportable module."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn

__all__ = ["StudentEnsemble"]


class StudentEnsemble(nn.Module):
    """Mean of the students' logits (the cross-teaching inference rule); one student passes through.

    It is a plain ``nn.Module`` whose ``forward`` returns a tensor, so MONAI inferers, ``ckpt_export`` and
    TorchScript tracing treat it like any single network.
    """

    def __init__(self, networks: Sequence[nn.Module]):
        super().__init__()
        if len(networks) == 0:
            raise ValueError("StudentEnsemble needs at least one network")
        self.networks = nn.ModuleList(networks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.networks[0](x)
        for net in self.networks[1:]:
            out = out + net(x)
        return out / len(self.networks)
