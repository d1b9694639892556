"""2.5D slice sampling from cached volumes, and mixed labelled/unlabelled batches.

A :class:`VolumeDataset` caches the preprocessed volumes; a :class:`SliceDataset` indexes every slice of
them and returns augmented 2D samples (optionally with ``k`` neighbouring slices as channels) that carry
``case_id``, ``slice_index`` and ``pixel_to_world``; :class:`SemiSupervisedLoader` draws endless batches
that mix both kinds of slices in a fixed ratio.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.data import CacheDataset, DataLoader, MetaTensor
from monai.transforms import Compose, Randomizable, apply_transform
from monai.utils import convert_to_tensor

from monai_ssl.data.transforms import IMAGE_KEY, SLICE_BASE_KEY
from monai_ssl.data.validation import LABEL_KEYS, InputError, check_case

__all__ = ["VolumeDataset", "SliceDataset", "SemiSupervisedLoader", "extract_slice", "slice_base_affine"]

#: scalar per-case keys copied from a volume onto each of its slices
CASE_KEYS = ("case_id", "patient_id", "group")


class VolumeDataset(CacheDataset):
    """``CacheDataset`` of whole preprocessed volumes that checks files up front and names the failing case.

    Headers of every case are checked before caching (missing, unreadable, 2D or mismatched files are all
    reported together); a failure while loading is re-raised as :class:`InputError` naming the image file.
    """

    def __init__(self, cases: Sequence[Mapping[str, Any]], transform: Callable, num_workers: int = 0, **kwargs):
        problems = [p for case in cases for p in check_case(case, load_data=False)]
        if problems:
            raise InputError(problems)
        kwargs.setdefault("copy_cache", False)
        super().__init__(list(cases), transform, cache_rate=1.0, num_workers=num_workers, **kwargs)

    def _load_cache_item(self, idx: int):
        try:
            return super()._load_cache_item(idx)
        except Exception as e:
            cause: BaseException | None = e
            while cause is not None and not isinstance(cause, InputError):
                cause = cause.__cause__
            if cause is not None:
                raise InputError(cause.problems) from e
            root = e
            while root.__cause__ is not None:
                root = root.__cause__
            raise InputError(f"{self.data[idx].get('image')}: cannot load case ({type(root).__name__}: {root})") from e


def slice_base_affine(volume_affine: Any, index: int) -> np.ndarray:
    """Voxel->world affine of slice ``index`` along the last axis: ``A @ [i, j, d, 1]`` with ``d`` relative."""
    shift = np.eye(4)
    shift[2, 3] = index
    return np.asarray(volume_affine, dtype=np.float64) @ shift


def extract_slice(
    volume: Mapping[str, Any], index: int, context: int = 1, label_keys: Sequence[str] = LABEL_KEYS
) -> dict[str, Any]:
    """Cut slice ``index`` (last spatial axis) out of a channel-first volume dict.

    ``context`` (odd) neighbouring slices become channels, clamped at the volume's ends. The 2D image and
    labels get an identity affine, so later MONAI spatial transforms record exactly the in-plane mapping;
    the slice's 3D placement goes to ``slice_base_affine``.
    """
    if context < 1 or context % 2 == 0:
        raise ValueError(f"context must be a positive odd number of slices, got {context}")
    image = volume[IMAGE_KEY]
    depth = image.shape[-1]
    if not 0 <= index < depth:
        raise IndexError(f"slice {index} outside a volume of {depth} slices ({volume.get('case_id')})")
    r = context // 2
    idx = torch.as_tensor(np.clip(np.arange(index - r, index + r + 1), 0, depth - 1))
    raw = convert_to_tensor(image, track_meta=False).index_select(-1, idx)  # (C, H, W, k)
    img2d = raw.movedim(-1, 1).reshape(-1, *raw.shape[1:3]).clone()
    out: dict[str, Any] = {
        IMAGE_KEY: MetaTensor(img2d, affine=torch.eye(3, dtype=torch.float64)),
        "slice_index": index,
        SLICE_BASE_KEY: slice_base_affine(image.affine, index),
    }
    for key in CASE_KEYS:
        if key in volume:
            out[key] = volume[key]
    for key in label_keys:
        if key in volume:
            lab = convert_to_tensor(volume[key], track_meta=False)[..., index].clone()
            out[key] = MetaTensor(lab, affine=torch.eye(3, dtype=torch.float64))
    return out


class SliceDataset(torch.utils.data.Dataset):
    """Every slice of a set of preprocessed volumes, each extracted and passed through ``transform``.

    Args:
        volumes: a sequence of preprocessed volume dicts (e.g. a :class:`VolumeDataset`).
        transform: slice transforms, typically ``slice_augmentations(...) + [PixelToWorldd()]``.
        context: odd number of neighbouring slices stacked as channels (2.5D).
        label_keys: label keys to carry along when a volume has them.
    """

    def __init__(
        self,
        volumes: Sequence[Mapping[str, Any]],
        transform: Callable | Sequence[Callable] | None = None,
        context: int = 1,
        label_keys: Sequence[str] = LABEL_KEYS,
    ):
        self.volumes = volumes
        self.context, self.label_keys = context, tuple(label_keys)
        self.transform = Compose(transform) if isinstance(transform, Sequence) else transform
        self.index = [(v, z) for v in range(len(volumes)) for z in range(volumes[v][IMAGE_KEY].shape[-1])]

    def __len__(self) -> int:
        return len(self.index)

    def set_random_state(self, seed: int) -> SliceDataset:
        """Seed the random transforms (used when loading in the main process)."""
        if isinstance(self.transform, Randomizable):
            self.transform.set_random_state(seed)
        return self

    def __getitem__(self, i: int) -> dict[str, Any]:
        v, z = self.index[i]
        sample = extract_slice(self.volumes[v], z, self.context, self.label_keys)
        return apply_transform(self.transform, sample) if self.transform is not None else sample


class SemiSupervisedLoader:
    """Endless mixed batches ``{"labeled": batch, "unlabeled": batch}`` drawn with replacement.

    ``round(batch_size * labeled_ratio)`` slices per step are labelled (at least one), the rest unlabelled;
    unlabelled samples carry no ``label``. Draws are reproducible by ``seed``. With no unlabelled dataset
    (supervised-only training) every slice of the batch is labelled.
    """

    def __init__(
        self,
        labeled: torch.utils.data.Dataset,
        unlabeled: torch.utils.data.Dataset | None = None,
        batch_size: int = 8,
        labeled_ratio: float = 0.5,
        num_workers: int = 0,
        seed: int = 0,
    ):
        if unlabeled is None or len(unlabeled) == 0:
            n_lab = batch_size
        else:
            n_lab = min(batch_size - 1, max(1, round(batch_size * labeled_ratio)))
        if n_lab < 1:
            raise ValueError(f"batch_size {batch_size} leaves no room for a labelled slice")
        self.batch_sizes = {"labeled": n_lab, "unlabeled": batch_size - n_lab}
        self.datasets = {"labeled": labeled, "unlabeled": unlabeled}
        self.num_workers, self.seed = num_workers, seed

    def _loader(self, name: str, offset: int) -> DataLoader:
        ds = self.datasets[name]
        if isinstance(ds, SliceDataset) and self.num_workers == 0:
            ds.set_random_state(self.seed + offset)
        generator = torch.Generator().manual_seed(self.seed + offset)
        sampler = torch.utils.data.RandomSampler(ds, replacement=True, num_samples=2**31 - 1, generator=generator)
        return DataLoader(
            ds,
            batch_size=self.batch_sizes[name],
            sampler=sampler,
            num_workers=self.num_workers,
            generator=generator,
            persistent_workers=self.num_workers > 0,
        )

    def __iter__(self) -> Iterator[dict[str, Any]]:
        names = [n for n, size in self.batch_sizes.items() if size > 0]
        iterators = [iter(self._loader(n, offset)) for offset, n in enumerate(names)]
        while True:
            yield {name: next(it) for name, it in zip(names, iterators, strict=True)}
