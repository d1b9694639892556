"""Per-voxel uncertainty of class probabilities: the one entropy of the project (teachers, contrastive pixel
selection, scribble pseudo-labels, DALE, and the ensemble's inference uncertainty map)."""

from __future__ import annotations

import torch

__all__ = ["entropy"]


def entropy(probs: torch.Tensor, dim: int = 1, eps: float = 1e-8) -> torch.Tensor:
    """Entropy in nats of the class probabilities along ``dim`` (kept as a size-1 axis): ``(B, C, ...)`` ->
    ``(B, 1, ...)``; at most ``log(C)``. Probabilities below ``eps`` count as ``eps`` inside the log (0 log 0 = 0)."""
    return -(probs * probs.clamp_min(eps).log()).sum(dim=dim, keepdim=True)
