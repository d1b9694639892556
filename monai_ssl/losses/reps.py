"""Registration-enhanced positive sampling (REPS): anatomically corresponding features of other volumes.

An anchor pixel of a training slice has a world (RAS) point. The offline registration job provides, for each
ordered pair of training volumes ``(src, dst)``, a RAS->RAS affine mapping src's points to the anatomically
corresponding points of dst (:class:`AffineCorrespondences`). :class:`RegistrationPositives` maps every anchor
into every other volume at once, reads the features stored at those points in a FIFO bank of recent slice
feature maps (:class:`~monai_ssl.losses.memory.SliceFeatureBank`), and averages them into a registration
positive that is blended with the anchor's label positive.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from monai_ssl.losses.memory import SliceFeatureBank

__all__ = ["AffineCorrespondences", "RegistrationPositives", "feature_pixel_to_world", "pixel_world"]

logger = logging.getLogger(__name__)


def feature_pixel_to_world(pixel_to_world: torch.Tensor, stride: int) -> torch.Tensor:
    """``(B, 4, 4)`` pixel -> world of a stride-``stride`` feature map from the input slice's ``pixel_to_world``.

    Feature pixel ``i`` covers input pixels ``[i*s, (i+1)*s)``; its centre is input pixel ``i*s + (s-1)/2``.
    The slice (third) column is unchanged.
    """
    s = float(stride)
    scale = torch.eye(4, dtype=torch.float64, device=pixel_to_world.device)
    scale[0, 0] = scale[1, 1] = s
    scale[0, 3] = scale[1, 3] = (s - 1.0) / 2.0
    return pixel_to_world.to(torch.float64) @ scale


def pixel_world(pixel_to_world: torch.Tensor, i: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
    """World points ``(N, 3)`` of pixels ``(i, j)`` given each pixel's ``(N, 4, 4)`` pixel -> world matrix."""
    m = pixel_to_world.to(torch.float64)
    return m[:, :3, 0] * i.to(m)[:, None] + m[:, :3, 1] * j.to(m)[:, None] + m[:, :3, 3]


class AffineCorrespondences(nn.Module):
    """RAS->RAS affines between training volumes, applied to many points of many volumes at once.

    Args:
        case_ids: the volumes; their order defines volume indices.
        matrices: ``{(src, dst): 4x4}`` mapping src world points to the corresponding dst points. Pairs that are
            absent (or ``src == dst``) have no correspondence.

    The matrices live in non-persistent float64 buffers, so they move with ``.to(device)`` but stay out of
    checkpoints (they are rebuilt from the registration output).
    """

    def __init__(self, case_ids: Sequence[str], matrices: Mapping[tuple[str, str], np.ndarray | torch.Tensor]):
        super().__init__()
        self.case_ids = [str(c) for c in case_ids]
        if len(set(self.case_ids)) != len(self.case_ids):
            raise ValueError("AffineCorrespondences: case_ids must be unique")
        self._index = {c: i for i, c in enumerate(self.case_ids)}
        v = len(self.case_ids)
        mats = torch.eye(4, dtype=torch.float64).repeat(v, v, 1, 1)
        valid = torch.zeros(v, v, dtype=torch.bool)
        for (src, dst), m in matrices.items():
            unknown = [c for c in (src, dst) if c not in self._index]
            if unknown:
                raise ValueError(f"AffineCorrespondences: pair ({src}, {dst}) names unknown case(s) {unknown}")
            m = torch.as_tensor(np.asarray(m, dtype=np.float64))
            if m.shape != (4, 4) or not torch.isfinite(m).all():
                raise ValueError(f"AffineCorrespondences: pair ({src}, {dst}) needs a finite 4x4 matrix, got {m}")
            if src == dst:
                continue
            a, b = self._index[src], self._index[dst]
            mats[a, b], valid[a, b] = m, True
        self.register_buffer("matrices", mats, persistent=False)
        self.register_buffer("valid", valid, persistent=False)

    def __len__(self) -> int:
        return len(self.case_ids)

    def index(self, case_ids: Sequence[str]) -> torch.Tensor:
        """Volume indices of ``case_ids`` (-1 for cases without correspondences)."""
        return torch.tensor([self._index.get(str(c), -1) for c in case_ids], dtype=torch.long, device=self.valid.device)

    def map_all(self, src_index: torch.Tensor, points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Map points ``(N, 3)`` of volumes ``src_index`` ``(N,)`` into every volume.

        Returns ``(N, V, 3)`` float64 points and an ``(N, V)`` mask of the pairs that exist (never the source
        itself, never an unknown source with index -1).
        """
        src = src_index.to(self.valid.device).long()
        known = src >= 0
        s = src.clamp(min=0)
        p = points.to(self.matrices.device, torch.float64)
        a = self.matrices[s]  # (N, V, 4, 4)
        out = torch.einsum("nvrc,nc->nvr", a[..., :3, :3], p) + a[..., :3, 3]
        return out, self.valid[s] & known[:, None]

    def map(self, src_index: torch.Tensor, points: torch.Tensor, dst_index: torch.Tensor | int) -> torch.Tensor:
        """Map points ``(N, 3)`` of volumes ``src_index`` into volumes ``dst_index``; NaN where no pair exists."""
        src = src_index.to(self.valid.device).long()
        dst = torch.as_tensor(dst_index, device=src.device).long().expand_as(src)
        ok = (src >= 0) & (dst >= 0)
        s, d = src.clamp(min=0), dst.clamp(min=0)
        a = self.matrices[s, d]
        out = torch.einsum("nrc,nc->nr", a[:, :3, :3], points.to(a)) + a[:, :3, 3]
        return out.masked_fill(~(ok & self.valid[s, d])[:, None], float("nan"))

    @classmethod
    def from_registration(
        cls, out_dir: str | os.PathLike, kind: str = "affine", case_ids: Sequence[str] | None = None
    ) -> AffineCorrespondences:
        """Read the ``pair_affine_ras`` of every finished ordered pair of ``out_dir/<kind>`` (the registration job).

        ``case_ids`` defaults to every case of the job's case table. Pairs never computed (or failed) are left
        out with a warning. Deformable kinds have no exact affine and raise ``ValueError``.
        """
        from tqdm import tqdm

        from registration import RegistrationStore

        store = RegistrationStore(out_dir, kind)
        ids = list(store.cases) if case_ids is None else [str(c) for c in case_ids]
        unknown = [c for c in ids if c not in store.cases]
        if unknown:
            raise ValueError(f"{store.cases_table}: no registration input for case(s) {unknown}")
        matrices, missing = {}, []
        for src in tqdm(ids, desc=f"reading {kind} correspondences", leave=False):
            for dst in ids:
                if src == dst:
                    continue
                if not store.has_pair(src, dst):
                    missing.append((src, dst))
                    continue
                try:
                    matrices[(src, dst)] = store.pair_affine_ras(src, dst)
                except ValueError as e:
                    raise ValueError(
                        f"{store.pair_path(src, dst)}: {e}; REPS reads exact affines, use the 'affine' kind"
                    ) from e
        if missing:
            logger.warning(
                "%s: %d of %d ordered pairs have no finished registration and give no REPS positives (e.g. %s)",
                store.root,
                len(missing),
                len(ids) * (len(ids) - 1),
                missing[:3],
            )
        return cls(ids, matrices)


class RegistrationPositives(nn.Module):
    """Registration positives of anchors from a bank of recent slice embeddings and inter-volume affines.

    ``lookup`` maps each anchor's world point into every other volume that has a registration, reads the bank
    there (bilinear, only slices within ``max_slice_distance`` slice spacings of the point) and averages all
    answers. ``positives`` blends: ``normalize(w_l * normalize(label_pos) + w_r * normalize(reg_pos))`` where
    a registered feature was found, the label positive alone elsewhere. ``update`` stores a batch's detached
    embeddings with their feature-resolution affines.

    Args:
        correspondences: the inter-volume affines; its ``case_ids`` are the bank's volume vocabulary.
        capacity: slices kept in the bank (the thesis: one fifth of the training slices).
        label_weight, registration_weight: ``w_l`` and ``w_r``.
        max_slice_distance: in slice spacings (0.5: the slice that contains the point).
        dtype: storage dtype of the bank.
    """

    def __init__(
        self,
        correspondences: AffineCorrespondences,
        capacity: int,
        label_weight: float = 0.5,
        registration_weight: float = 0.5,
        max_slice_distance: float = 0.5,
        dtype: torch.dtype = torch.float32,
    ):
        super().__init__()
        if label_weight < 0 or registration_weight <= 0:
            raise ValueError(
                f"RegistrationPositives: label_weight ({label_weight}) must be >= 0 and "
                f"registration_weight ({registration_weight}) > 0"
            )
        self.correspondences = correspondences
        self.bank = SliceFeatureBank(capacity, correspondences.case_ids, dtype=dtype)
        self.label_weight, self.registration_weight = float(label_weight), float(registration_weight)
        self.max_slice_distance = float(max_slice_distance)

    def case_index(self, case_ids: Sequence[str]) -> torch.Tensor:
        return self.correspondences.index(case_ids)

    @torch.no_grad()
    def lookup(self, src_index: torch.Tensor, world: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean registered feature ``(N, D)`` of anchors at ``world`` ``(N, 3)`` in volumes ``src_index``, and
        a ``found`` mask ``(N,)``; rows without any registered feature are zero."""
        sources, group = torch.unique(src_index, return_inverse=True)  # the few volumes of a batch
        known = sources.to(self.correspondences.valid.device) >= 0
        s = sources.to(known.device).clamp(min=0)
        affines, valid = self.correspondences.matrices[s], self.correspondences.valid[s] & known[:, None]
        total, count = self.bank.read(world, group, affines, valid, self.max_slice_distance)
        return total / count.clamp(min=1)[:, None].to(total), count > 0

    def positives(
        self, label_positive: torch.Tensor, src_index: torch.Tensor, world: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The positive of each anchor ``(N, D)`` and whether it used a registered feature ``(N,)``."""
        registered, found = self.lookup(src_index, world)
        found = found.to(label_positive.device)
        if not bool(found.any()):
            return label_positive, found
        registered = F.normalize(registered.to(label_positive), dim=1)
        blend = self.label_weight * F.normalize(label_positive, dim=1) + self.registration_weight * registered
        return torch.where(found[:, None], F.normalize(blend, dim=1), label_positive), found

    def update(
        self,
        embeddings: torch.Tensor,
        pixel_to_world: torch.Tensor,
        case_ids: Sequence[str],
        slice_index: Sequence[int] | torch.Tensor,
        stride: int,
    ) -> None:
        """Store ``(B, D, h, w)`` embeddings of slices with input-resolution ``pixel_to_world`` ``(B, 4, 4)``."""
        self.bank.update(embeddings, feature_pixel_to_world(pixel_to_world, stride), case_ids, slice_index)
