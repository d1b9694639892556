"""The students' optimiser: one AdamW with a parameter group per student (its own learning rate).

One optimiser is what MONAI's ``CheckpointSaver`` and ``LrScheduleHandler`` expect, and torch's ``PolynomialLR``
decays every group by the same factor; AdamW's update is per parameter, so this steps exactly as one AdamW per
student would.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn as nn
from torch.optim import AdamW

__all__ = ["student_optimizer"]


def student_optimizer(
    networks: Sequence[nn.Module],
    lrs: Sequence[float] = (5e-4, 1e-4),
    weight_decay: float = 5e-4,
    extra_modules: Sequence[nn.Module] = (),
) -> AdamW:
    """AdamW with group ``k`` = student ``k`` at ``lrs[k]`` (defaults: 5e-4 CNN, 1e-4 transformer).

    The trainable parameters of ``extra_modules`` (e.g. a contrastive projector held by a loss term) form one more
    group at ``lrs[0]``, so every trainable parameter of a method is stepped and checkpointed.
    """
    if len(lrs) < len(networks):
        raise ValueError(f"{len(networks)} students but only {len(lrs)} learning rates")
    groups = [{"params": list(net.parameters()), "lr": float(lr)} for net, lr in zip(networks, lrs, strict=False)]
    extra = [p for m in extra_modules for p in m.parameters() if p.requires_grad]
    if extra:
        groups.append({"params": extra, "lr": float(lrs[0])})
    return AdamW(groups, lr=float(lrs[0]), weight_decay=weight_decay)
