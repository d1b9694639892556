"""One optimiser and one poly learning-rate schedule per student, checkpointable as single objects.

Bundles save ``{"model": ..., "optimizer": @optimizers, "scheduler": @schedulers, "trainer": ...}`` with
MONAI's ``CheckpointSaver``; these containers give that list of optimisers/schedulers the ``state_dict`` /
``load_state_dict`` pair checkpointing needs, and ``PolySchedulers.step`` lets one ``LrScheduleHandler``
(``epoch_level=False``) step them all every iteration.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch.nn as nn
from torch.optim import AdamW, Optimizer
from torch.optim.lr_scheduler import PolynomialLR

__all__ = ["StudentOptimizers", "PolySchedulers"]


class _StateList:
    """A group of torch objects that checkpoints as the list of their state dicts.

    Deliberately not a ``Sequence``: ignite's checkpointing walks into sequences and would rebuild this
    one item by item; as a single object with ``state_dict`` it is saved and loaded whole.
    """

    def __init__(self, items: Iterable[Any]):
        self.items = list(items)

    def __iter__(self) -> Iterator[Any]:
        return iter(self.items)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> Any:
        return self.items[index]

    def state_dict(self) -> dict[str, Any]:
        return {"items": [item.state_dict() for item in self.items]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        items = state["items"]
        if len(items) != len(self.items):
            raise ValueError(f"checkpoint holds {len(items)} entries, this run has {len(self.items)}")
        for item, item_state in zip(self.items, items, strict=True):
            item.load_state_dict(item_state)


class StudentOptimizers(_StateList):
    """AdamW per student; ``lrs[k]`` is student ``k``'s learning rate (defaults: 5e-4 CNN, 1e-4 transformer).

    ``extra_modules`` (e.g. the contrastive projector held by a loss term) get one more AdamW at ``lrs[0]``,
    so every trainable parameter of a method is stepped and checkpointed.
    """

    def __init__(
        self,
        networks: Sequence[nn.Module],
        lrs: Sequence[float] = (5e-4, 1e-4),
        weight_decay: float = 5e-4,
        extra_modules: Sequence[nn.Module] = (),
    ):
        if len(lrs) < len(networks):
            raise ValueError(f"{len(networks)} students but only {len(lrs)} learning rates")
        optimizers = [
            AdamW(net.parameters(), lr=float(lr), weight_decay=weight_decay)
            for net, lr in zip(networks, lrs, strict=False)
        ]
        extra = [p for m in extra_modules for p in m.parameters() if p.requires_grad]
        if extra:
            optimizers.append(AdamW(extra, lr=float(lrs[0]), weight_decay=weight_decay))
        super().__init__(optimizers)


class PolySchedulers(_StateList):
    """``lr_i = lr_0 * (1 - i / total_iters) ** power`` for every optimiser, stepped once per iteration."""

    def __init__(self, optimizers: Sequence[Optimizer], total_iters: int, power: float = 0.9):
        super().__init__(PolynomialLR(opt, total_iters=int(total_iters), power=power) for opt in optimizers)

    def step(self) -> None:
        for scheduler in self:
            scheduler.step()

    def get_last_lr(self) -> list[float]:
        """Learning rates of every parameter group of every optimiser (for ``LrScheduleHandler(print_lr=True)``)."""
        return [lr for scheduler in self for lr in scheduler.get_last_lr()]
