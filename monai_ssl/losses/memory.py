"""Feature memories of the contrastive terms: a FIFO bank of slice feature maps (REPS) and per-class queues.

* :class:`SliceFeatureBank` keeps the detached, projected feature maps of recently seen slices with their
  pixel -> world affines, keyed by ``(case_id, slice_index)``, and reads them back at world points with
  bilinear interpolation, all lookups of a batch at once on the device.
* :class:`ClassFeatureQueues` keeps one fixed-size FIFO queue of embeddings per class (MCSCv2's negative banks).

Neither memory is part of a ``state_dict``: both are caches that refill within a few iterations after a resume.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence

import torch

__all__ = ["SliceFeatureBank", "ClassFeatureQueues"]

_SNAP = 1e-6  # pixel coordinates this close to an integer are read exactly at that pixel


class SliceFeatureBank:
    """FIFO bank of 2D feature maps ``(D, h, w)`` with their ``pixel_to_world`` (4x4, RAS) at the map's resolution.

    ``pixel_to_world @ [i, j, k, 1]`` is the world point of feature pixel ``(i, j)``; its third column is the
    slice normal scaled by the slice spacing, so ``k`` measures the distance to the slice plane in slices.

    Slots are keyed by ``(case_id, slice_index)``. Updating a slice that is already stored **replaces** its map
    and affine and **refreshes** its FIFO position (it becomes the newest entry): the bank then evicts the
    stalest features first, never a map that was just written. When full, the oldest entry is evicted.
    Storage is allocated on the first update, on the device of the features, as one ``(capacity, D, h, w)``
    tensor: every map must have the same size (training patches do). Memory: ``capacity * D * h * w`` values of
    ``dtype``, e.g. 260 ACDC slices x 128 x 56 x 56 float32 = 0.42 GB (``dtype=torch.float16`` halves it).

    Args:
        capacity: number of slices kept (the thesis keeps one fifth of the training slices).
        case_ids: the volume vocabulary: ``volume_index`` of a stored slice is the position of its case id here
            (-1 for unknown cases, never matched). ``None`` grows the vocabulary as cases arrive.
        dtype: storage dtype of the feature maps.
    """

    def __init__(self, capacity: int, case_ids: Sequence[str] | None = None, dtype: torch.dtype = torch.float32):
        if int(capacity) < 1:
            raise ValueError(f"SliceFeatureBank: capacity must be at least 1, got {capacity}")
        self.capacity = int(capacity)
        self.dtype = dtype
        self.fixed_vocabulary = case_ids is not None
        self.vocabulary: dict[str, int] = {c: i for i, c in enumerate(case_ids or [])}
        self.slots: dict[tuple[str, int], int] = {}
        self.slot_keys: list[tuple[str, int] | None] = [None] * self.capacity
        self.stamps = [-1] * self.capacity  # insertion counter per slot (-1: empty); smallest = oldest
        self.counter = 0
        self.features: torch.Tensor | None = None  # (capacity, h, w, D): channels last, one pixel = one row
        self.inverse: torch.Tensor | None = None  # (capacity, 4, 4) float64: world -> feature pixel
        self.pixel_to_world: torch.Tensor | None = None
        self.volume: torch.Tensor | None = None  # (capacity,) long: vocabulary index, -1 empty or unknown

    # ---- bookkeeping ---------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.slots)

    def __contains__(self, key: Hashable) -> bool:
        return key in self.slots

    def keys(self) -> list[tuple[str, int]]:
        """Stored ``(case_id, slice_index)`` keys, oldest first (the eviction order)."""
        return sorted(self.slots, key=lambda k: self.stamps[self.slots[k]])

    def get(self, case_id: str, slice_index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The stored ``(D, h, w)`` map and 4x4 ``pixel_to_world`` of one slice (KeyError if absent)."""
        slot = self.slots[(case_id, int(slice_index))]
        return self.features[slot].permute(2, 0, 1), self.pixel_to_world[slot]

    def volume_index(self, case_id: str) -> int:
        if case_id not in self.vocabulary and not self.fixed_vocabulary:
            self.vocabulary[case_id] = len(self.vocabulary)
        return self.vocabulary.get(case_id, -1)

    def _allocate(self, like: torch.Tensor) -> None:
        _, d, h, w = like.shape
        dev = like.device
        self.features = torch.zeros(self.capacity, h, w, d, dtype=self.dtype, device=dev)
        self.inverse = torch.zeros(self.capacity, 4, 4, dtype=torch.float64, device=dev)
        self.pixel_to_world = torch.zeros(self.capacity, 4, 4, dtype=torch.float64, device=dev)
        self.volume = torch.full((self.capacity,), -1, dtype=torch.long, device=dev)

    def _slot_for(self, key: tuple[str, int]) -> int:
        if key in self.slots:
            return self.slots[key]
        if len(self.slots) < self.capacity:
            slot = self.stamps.index(-1)
        else:  # evict the oldest entry
            slot = min(range(self.capacity), key=self.stamps.__getitem__)
            del self.slots[self.slot_keys[slot]]
        self.slots[key] = slot
        self.slot_keys[slot] = key
        return slot

    # ---- writing -------------------------------------------------------------------------------------------
    @torch.no_grad()
    def update(
        self,
        features: torch.Tensor,
        pixel_to_world: torch.Tensor,
        case_ids: Sequence[str],
        slice_index: Sequence[int] | torch.Tensor,
    ) -> None:
        """Store ``features`` ``(B, D, h, w)`` (detached) with their ``(B, 4, 4)`` affines at this resolution."""
        if features.dim() != 4:
            raise ValueError(f"SliceFeatureBank stores 2D maps (B, D, h, w), got shape {tuple(features.shape)}")
        b = features.shape[0]
        indices = [int(i) for i in (slice_index.tolist() if torch.is_tensor(slice_index) else slice_index)]
        if not (len(case_ids) == len(indices) == b == pixel_to_world.shape[0]):
            raise ValueError(
                f"SliceFeatureBank.update: {b} maps, {pixel_to_world.shape[0]} affines, {len(case_ids)} case ids "
                f"and {len(indices)} slice indices must agree"
            )
        if self.features is None:
            self._allocate(features)
        elif features.shape[1:] != self.features.permute(0, 3, 1, 2).shape[1:]:
            raise ValueError(
                f"SliceFeatureBank holds maps of shape {tuple(self.features.permute(0, 3, 1, 2).shape[1:])}, got "
                f"{tuple(features.shape[1:])}: train on patches of one size"
            )
        rows: dict[int, int] = {}  # slot -> batch row; a slice drawn twice in one batch keeps its last copy
        for row, key in enumerate(zip(map(str, case_ids), indices, strict=True)):
            slot = self._slot_for(key)
            self.stamps[slot] = self.counter
            self.counter += 1
            rows[slot] = row
        slots = torch.tensor(list(rows), dtype=torch.long, device=self.features.device)
        src = torch.tensor(list(rows.values()), dtype=torch.long, device=features.device)
        m = pixel_to_world.to(self.features.device, torch.float64)[src.to(self.features.device)]
        self.features[slots] = features.detach()[src].permute(0, 2, 3, 1).to(self.features.device, self.dtype)
        self.pixel_to_world[slots] = m
        self.inverse[slots] = torch.linalg.inv(m)
        volumes = [self.volume_index(str(case_ids[r])) for r in rows.values()]
        self.volume[slots] = torch.tensor(volumes, dtype=torch.long, device=self.features.device)

    # ---- reading -------------------------------------------------------------------------------------------
    @torch.no_grad()
    def read(
        self,
        points: torch.Tensor,
        group: torch.Tensor,
        to_volume: torch.Tensor,
        valid: torch.Tensor,
        max_slice_distance: float = 0.5,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Sum and count of the stored features found at the corresponding points of other volumes, per query.

        Args:
            points: ``(N, 3)`` world points of the queries.
            group: ``(N,)`` each query's source group in ``[0, U)`` (e.g. its volume; a batch has a few).
            to_volume: ``(U, V, 4, 4)`` affines from group ``u``'s world to vocabulary volume ``v``'s world.
            valid: ``(U, V)`` which of those affines exist.
            max_slice_distance: a stored slice answers a point within this many slice spacings of its plane.

        A stored slice of volume ``v`` answers query ``n`` when ``valid[group[n], v]``, the mapped point lies within
        ``max_slice_distance`` of the slice plane and inside the map (pixel centres ``0..h-1``, ``0..w-1``); it
        answers the bilinear interpolation of its map there. Returns ``(sum (N, D) float32, count (N,) long)``
        over all answering slices. World -> entry pixel affines are composed once per (group, entry); queries
        are processed per group (tensorised inside), never one by one.
        """
        n = points.shape[0]
        dev = points.device if self.features is None else self.features.device
        count = torch.zeros(n, dtype=torch.long, device=dev)
        if self.features is None or not self.slots:
            return torch.zeros(n, 0, device=dev), count
        points, group = points.to(dev, torch.float64), group.to(dev)
        to_volume, valid = to_volume.to(dev, torch.float64), valid.to(dev)
        entries = torch.tensor(sorted(self.slots.values()), dtype=torch.long, device=dev)
        volume = self.volume[entries]
        if int(volume.max()) >= to_volume.shape[1]:
            raise ValueError(f"SliceFeatureBank.read: affines cover {to_volume.shape[1]} volumes, bank uses more")
        entries, volume = entries[volume >= 0], volume[volume >= 0]
        h, w, d = self.features.shape[1:]
        out = torch.zeros(n, d, dtype=torch.float32, device=dev)
        if entries.numel() == 0:
            return out, count
        composite = self.inverse[entries][None] @ to_volume[:, volume]  # (U, E, 4, 4): world of u -> pixel of e
        usable = valid[:, volume]
        hits = []
        for u in torch.unique(group).tolist():
            rows, cols = (group == u).nonzero().squeeze(1), usable[u].nonzero().squeeze(1)
            if cols.numel() == 0:
                continue
            c, p = composite[u, cols, :3], points[rows]  # (E_u, 3, 4), (N_u, 3)
            k = p @ c[:, 2, :3].t() + c[:, 2, 3]  # (N_u, E_u): offset from each slice plane, in slices
            a, b = (k.abs() <= max_slice_distance + _SNAP).nonzero(as_tuple=True)
            ij = (c[b, :2, :3] @ p[a, :, None])[..., 0] + c[b, :2, 3]  # (M_u, 2) pixel coordinates
            hits.append((rows[a], cols[b], ij))
        if not hits:
            return out, count
        qn, qe, ij = (torch.cat(x) for x in zip(*hits, strict=True))
        near = ij.round()
        ij = torch.where((ij - near).abs() < _SNAP, near, ij)
        inside = (ij[:, 0] >= 0) & (ij[:, 0] <= h - 1) & (ij[:, 1] >= 0) & (ij[:, 1] <= w - 1)
        qn, qe, ij = qn[inside], qe[inside], ij[inside]
        lo = ij.floor()
        frac = (ij - lo).float()
        lo = lo.long()
        i0, j0 = lo[:, 0], lo[:, 1]
        i1, j1 = (i0 + 1).clamp(max=h - 1), (j0 + 1).clamp(max=w - 1)
        corners_i, corners_j = torch.stack([i0, i1, i0, i1], 1), torch.stack([j0, j0, j1, j1], 1)
        di, dj = frac[:, :1], frac[:, 1:]
        weights = torch.cat([(1 - di) * (1 - dj), di * (1 - dj), (1 - di) * dj, di * dj], 1)  # (M, 4)
        rows = (entries[qe][:, None] * h + corners_i) * w + corners_j  # (M, 4) rows of the (capacity*h*w, D) view
        values = self.features.view(-1, d).index_select(0, rows.flatten()).view(-1, 4, d).float()
        out.index_add_(0, qn, torch.bmm(weights[:, None], values)[:, 0])
        count += torch.bincount(qn, minlength=n)
        return out, count


class ClassFeatureQueues:
    """One FIFO queue of embeddings per class, each of fixed ``capacity`` (MCSCv2's negative memory banks).

    ``push(c, feats)`` is one update of queue ``c``: at most ``floor(max_push_fraction * capacity)`` embeddings
    (a uniformly random subset, in their original order, when more are offered) are appended, overwriting the
    oldest once the queue is full. Storage is one ``(num_classes, capacity, D)`` ring buffer allocated on the
    first push, on the pushed tensor's device.
    """

    def __init__(self, num_classes: int, capacity: int, max_push_fraction: float = 0.25):
        if num_classes < 1 or capacity < 1:
            raise ValueError(f"ClassFeatureQueues: num_classes ({num_classes}) and capacity ({capacity}) must be >= 1")
        if not 0 < max_push_fraction <= 1:
            raise ValueError(f"ClassFeatureQueues: max_push_fraction must be in (0, 1], got {max_push_fraction}")
        self.num_classes, self.capacity = int(num_classes), int(capacity)
        self.max_push = max(1, math.floor(max_push_fraction * self.capacity))
        self.data: torch.Tensor | None = None
        self.head = [0] * self.num_classes  # next write position
        self.counts = [0] * self.num_classes

    def __len__(self) -> int:
        return sum(self.counts)

    def count(self, c: int) -> int:
        return self.counts[c]

    @torch.no_grad()
    def push(self, c: int, features: torch.Tensor) -> int:
        """Append up to ``max_push`` rows of ``features`` ``(M, D)`` (detached) to queue ``c``; returns how many."""
        if not 0 <= c < self.num_classes:
            raise ValueError(f"ClassFeatureQueues: class {c} outside [0, {self.num_classes})")
        m = features.shape[0]
        if m == 0:
            return 0
        if self.data is None:
            self.data = features.new_zeros(self.num_classes, self.capacity, features.shape[1])
        if m > self.max_push:
            keep = torch.randperm(m, device=features.device)[: self.max_push].sort().values
            features, m = features[keep], self.max_push
        pos = (self.head[c] + torch.arange(m, device=self.data.device)) % self.capacity
        self.data[c, pos] = features.detach().to(self.data)
        self.head[c] = (self.head[c] + m) % self.capacity
        self.counts[c] = min(self.counts[c] + m, self.capacity)
        return m

    def features(self, c: int) -> torch.Tensor:
        """Queue ``c``'s embeddings, oldest first."""
        if self.data is None or self.counts[c] == 0:
            return torch.zeros(0, 0) if self.data is None else self.data.new_zeros(0, self.data.shape[2])
        if self.counts[c] < self.capacity:
            return self.data[c, : self.counts[c]]
        return torch.roll(self.data[c], -self.head[c], dims=0)

    def sample(self, c: int, n: int) -> torch.Tensor:
        """Up to ``n`` embeddings of queue ``c``, drawn uniformly without replacement."""
        feats = self.features(c)
        if feats.shape[0] <= n:
            return feats
        return feats[torch.randperm(feats.shape[0], device=feats.device)[:n]]
