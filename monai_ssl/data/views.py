"""Batched views for consistency and contrastive losses: exactly invertible geometry plus intensity noise.

FixMatch-style pseudo-labelling and InfoNCE compare predictions of two views of the same slices. The geometric
part here is a per-sample flip and 90-degree rotation, which is a permutation of pixels, so it is undone exactly
(no interpolation): a pixel of the strong view maps back to exactly one pixel of the weak view. The photometric
part (contrast, intensity shift, Gaussian noise, cut-out) uses MONAI's random array transforms, per sample.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from monai.transforms import (
    Compose,
    RandAdjustContrast,
    RandCoarseDropout,
    RandGaussianNoise,
    RandScaleIntensity,
    RandShiftIntensity,
)

__all__ = ["FlipRotate", "StrongIntensity", "strong_intensity"]


class FlipRotate:
    """Per-sample ``rot90(k)`` then an optional flip of the last axis, on the last two axes of a batch.

    ``k`` is drawn from ``{0, 1, 2, 3}`` for square slices and from ``{0, 2}`` otherwise (so every sample keeps
    the batch's shape). :meth:`apply` and :meth:`invert` accept any ``(B, ...)`` tensor with the same two
    trailing spatial axes (images, logits, labels, masks), so the same draw maps everything consistently.
    """

    def __init__(self, k: Sequence[int], flip: Sequence[bool]):
        if len(k) != len(flip):
            raise ValueError(f"FlipRotate: {len(k)} rotations but {len(flip)} flips")
        self.k = [int(v) % 4 for v in k]
        self.flip = [bool(v) for v in flip]

    @classmethod
    def random(cls, batch: int, square: bool = True, generator: torch.Generator | None = None) -> FlipRotate:
        """A random draw for ``batch`` samples (odd rotations only when ``square``)."""
        k = torch.randint(0, 4 if square else 2, (batch,), generator=generator) * (1 if square else 2)
        flip = torch.randint(0, 2, (batch,), generator=generator).bool()
        return cls(k.tolist(), flip.tolist())

    @classmethod
    def for_batch(cls, x: torch.Tensor, generator: torch.Generator | None = None) -> FlipRotate:
        """A random draw fitted to ``x``: odd rotations only when its last two axes are equal."""
        return cls.random(x.shape[0], square=x.shape[-1] == x.shape[-2], generator=generator)

    def _check(self, x: torch.Tensor) -> None:
        if x.shape[0] != len(self.k):
            raise ValueError(f"FlipRotate drawn for {len(self.k)} samples, got a batch of {x.shape[0]}")
        if x.shape[-1] != x.shape[-2] and any(k % 2 for k in self.k):
            raise ValueError(f"FlipRotate: odd rotations need square slices, got {tuple(x.shape[-2:])}")

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """The view: rotate each sample by ``k * 90`` degrees, then flip it if drawn."""
        self._check(x)
        out = []
        for i, (k, flip) in enumerate(zip(self.k, self.flip, strict=True)):
            y = torch.rot90(x[i], k, dims=(-2, -1))
            out.append(y.flip(-1) if flip else y)
        return torch.stack(out)

    def invert(self, x: torch.Tensor) -> torch.Tensor:
        """Back to the original frame: undo the flip, then rotate by ``-k * 90`` degrees."""
        self._check(x)
        out = []
        for i, (k, flip) in enumerate(zip(self.k, self.flip, strict=True)):
            y = x[i].flip(-1) if flip else x[i]
            out.append(torch.rot90(y, -k, dims=(-2, -1)))
        return torch.stack(out)

    def __repr__(self) -> str:
        return f"FlipRotate(k={self.k}, flip={self.flip})"


class StrongIntensity:
    """Photometric strong augmentation applied sample by sample (MONAI random transforms, shared random state).

    Args:
        contrast: gamma range of ``RandAdjustContrast`` (identity when ``None``).
        scale: ``RandScaleIntensity`` factor range ``(-s, s)``.
        shift: ``RandShiftIntensity`` offset range ``(-s, s)``.
        noise_std: ``RandGaussianNoise`` standard deviation.
        cutout: number of cut-out holes (``RandCoarseDropout``, filled with 0) and ``cutout_size`` their size.
        prob: probability of each transform.
        seed: seed of the transforms' random state (reproducible views).
    """

    def __init__(
        self,
        contrast: tuple[float, float] | None = (0.7, 1.5),
        scale: float = 0.2,
        shift: float = 0.2,
        noise_std: float = 0.1,
        cutout: int = 1,
        cutout_size: float = 0.25,
        prob: float = 0.8,
        seed: int = 0,
    ):
        transforms = []
        if contrast is not None:
            transforms.append(RandAdjustContrast(prob=prob, gamma=tuple(contrast)))
        if scale > 0:
            transforms.append(RandScaleIntensity(factors=scale, prob=prob))
        if shift > 0:
            transforms.append(RandShiftIntensity(offsets=shift, prob=prob))
        if noise_std > 0:
            transforms.append(RandGaussianNoise(prob=prob, std=noise_std))
        self.cutout, self.cutout_size = int(cutout), float(cutout_size)
        self.prob = prob
        self.transform = Compose(transforms)
        self.transform.set_random_state(seed=seed)
        self._rng = np.random.RandomState(seed)

    def _cutout(self, spatial: Sequence[int]) -> RandCoarseDropout:
        size = [max(1, int(round(self.cutout_size * s))) for s in spatial]
        drop = RandCoarseDropout(holes=self.cutout, spatial_size=size, fill_value=0.0, prob=self.prob)
        drop.set_random_state(state=self._rng)
        return drop

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Augment a ``(B, C, *spatial)`` batch; every sample gets its own random draw."""
        drop = self._cutout(x.shape[2:]) if self.cutout > 0 else None
        out = []
        for sample in x:
            y = torch.as_tensor(self.transform(sample))
            if drop is not None:
                y = torch.as_tensor(drop(y))
            out.append(y.to(x.dtype))
        return torch.stack(out)


def strong_intensity(strength: float = 1.0, seed: int = 0) -> StrongIntensity:
    """The default strong photometric view scaled by ``strength`` (0 gives an identity view)."""
    if strength <= 0:
        return StrongIntensity(contrast=None, scale=0.0, shift=0.0, noise_std=0.0, cutout=0, seed=seed)
    gamma = (1.0 - 0.3 * strength, 1.0 + 0.5 * strength)
    return StrongIntensity(gamma, 0.2 * strength, 0.2 * strength, 0.1 * strength, cutout=1, seed=seed)
