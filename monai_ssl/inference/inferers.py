"""The bundles' volume inferer: slice-wise for 2D (2.5D with ``context`` neighbouring slices) students, sliding
window for 3D ones.

MONAI's ``SliceInferer`` feeds a 2D network the slices of a volume, one channel set per slice; a 2.5D student was
trained on ``context`` neighbouring slices stacked as channels (``monai_ssl.data.slices.extract_slice``), so the
volume is first stacked the same way (:func:`~monai_ssl.data.slices.stack_context`, clamped at the ends).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from monai.inferers import Inferer, SliceInferer, SlidingWindowInferer

from monai_ssl.data.slices import stack_context

__all__ = ["VolumeInferer"]


class VolumeInferer(Inferer):
    """``SliceInferer`` over the last axis with ``context`` stacked slices (``spatial_dims=2``), or
    ``SlidingWindowInferer`` (``spatial_dims=3``); ``roi_size`` is the training patch size."""

    def __init__(
        self,
        roi_size: Sequence[int],
        spatial_dims: int = 2,
        context: int = 1,
        sw_batch_size: int = 16,
        overlap: float = 0.25,
    ):
        super().__init__()
        if spatial_dims == 2:
            self.inferer: Inferer = SliceInferer(
                roi_size=roi_size, spatial_dim=2, sw_batch_size=sw_batch_size, overlap=overlap
            )
        elif spatial_dims == 3:
            if context != 1:
                raise ValueError("context slices are a 2D option; use context=1 with spatial_dims=3")
            batch = max(1, sw_batch_size // 8)  # 3D windows are larger
            self.inferer = SlidingWindowInferer(roi_size=roi_size, sw_batch_size=batch, overlap=overlap)
        else:
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
        self.context = int(context)

    def __call__(self, inputs: torch.Tensor, network: Callable[..., torch.Tensor], *args: Any, **kwargs: Any):
        return self.inferer(stack_context(inputs, self.context), network, *args, **kwargs)
