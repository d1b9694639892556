"""2.5D slice and 3D patch sampling from cached volumes, class-balanced draws, and mixed labelled/unlabelled batches.

A :class:`VolumeDataset` caches the preprocessed volumes; a :class:`SliceDataset` indexes every slice of
them and returns augmented 2D samples (optionally with ``k`` neighbouring slices as channels) that carry
``case_id``, ``slice_index`` and ``pixel_to_world``; a :class:`PatchDataset` returns random 3D patches. With
a :class:`ForegroundSampler`, a fraction of the draws is centred on a voxel of a foreground class chosen
uniformly among the classes present (nnU-Net's oversampling, so small structures are seen as often as large
ones). :class:`SemiSupervisedLoader` draws endless batches that mix both kinds of samples in a fixed ratio.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.data import CacheDataset, DataLoader, MetaTensor
from monai.transforms import Compose, Randomizable, apply_transform
from monai.transforms.utils import map_classes_to_indices
from monai.utils import convert_to_tensor

from monai_ssl.data.transforms import CROP_CENTRE_KEY, IMAGE_KEY, SLICE_BASE_KEY
from monai_ssl.data.validation import LABEL_KEYS, PROBABILITY_KEYS, InputError, check_case

__all__ = [
    "VolumeDataset",
    "SliceDataset",
    "PatchDataset",
    "ForegroundSampler",
    "SemiSupervisedLoader",
    "extract_slice",
    "slice_base_affine",
    "SAMPLED_CLASS_KEY",
]

#: the foreground class a sample was centred on (-1: an ordinary uniform draw)
SAMPLED_CLASS_KEY = "sampled_class"

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


def context_indices(index: int, depth: int, context: int) -> np.ndarray:
    """The ``context`` (odd) slice indices centred on ``index``, clamped at the volume's ends: the 2.5D rule that
    training (:func:`extract_slice`) and inference (:func:`stack_context`) share."""
    if context < 1 or context % 2 == 0:
        raise ValueError(f"context must be a positive odd number of slices, got {context}")
    r = context // 2
    return np.clip(np.arange(index - r, index + r + 1), 0, depth - 1)


def stack_context(volume: torch.Tensor, context: int) -> torch.Tensor:
    """``(B, C, H, W, D)`` -> ``(B, C * context, H, W, D)``: slice ``z`` of the result holds the ``context``
    neighbouring slices of every channel, in :func:`extract_slice`'s channel order, so a slice-wise inferer
    feeds a 2.5D network exactly what it was trained on."""
    if context == 1:
        return volume
    depth = volume.shape[-1]
    idx = torch.as_tensor(np.stack([context_indices(z, depth, context) for z in range(depth)], 1))  # (k, D)
    shifted = torch.stack([volume.index_select(-1, row.to(volume.device)) for row in idx], 2)  # (B, C, k, H, W, D)
    return shifted.reshape(volume.shape[0], -1, *volume.shape[2:])


def extract_slice(
    volume: Mapping[str, Any], index: int, context: int = 1, label_keys: Sequence[str] = LABEL_KEYS
) -> dict[str, Any]:
    """Cut slice ``index`` (last spatial axis) out of a channel-first volume dict.

    ``context`` (odd) neighbouring slices become channels, clamped at the volume's ends. The 2D image,
    labels and probability maps (:data:`PROBABILITY_KEYS`) get an identity affine, so later MONAI spatial
    transforms record exactly the in-plane mapping; the slice's 3D placement goes to ``slice_base_affine``.
    """
    image = volume[IMAGE_KEY]
    depth = image.shape[-1]
    if not 0 <= index < depth:
        raise IndexError(f"slice {index} outside a volume of {depth} slices ({volume.get('case_id')})")
    idx = torch.as_tensor(context_indices(index, depth, context))
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
    for key in (*label_keys, *PROBABILITY_KEYS):
        if key in volume:
            lab = convert_to_tensor(volume[key], track_meta=False)[..., index].clone()
            out[key] = MetaTensor(lab, affine=torch.eye(3, dtype=torch.float64))
    return out


class ForegroundSampler(Randomizable):
    """Class-balanced draws over cached volumes: with probability ``fraction`` a draw picks a foreground class
    uniformly among those present in ``key`` of any volume, then one of its voxels uniformly.

    Voxel indices are listed once per volume with MONAI's ``map_classes_to_indices``, at most
    ``max_per_class`` per class and volume (MONAI's evenly spaced subsample of them, deterministic; nnU-Net
    also caches a capped list of class locations), so a draw costs a few random numbers. Classes outside
    ``[1, num_classes)`` (e.g. 255, unannotated scribble pixels) are never centres.

    Args:
        volumes: preprocessed channel-first volume dicts.
        fraction: share of the draws that are class-centred (0: off).
        key: the label key whose classes are balanced (``"label"``; ``"reg_label"`` for registered labels).
        num_classes: classes including background (default: the largest value found + 1).
        max_per_class: cap on the listed voxels per class and volume.
        seed: seed of the draws.
    """

    def __init__(
        self,
        volumes: Sequence[Mapping[str, Any]],
        fraction: float = 0.33,
        key: str = "label",
        num_classes: int | None = None,
        max_per_class: int = 10000,
        seed: int = 0,
    ):
        if not 0.0 <= float(fraction) <= 1.0:
            raise ValueError(f"foreground fraction must be in [0, 1], got {fraction}")
        self.fraction, self.key = float(fraction), key
        self.set_random_state(seed)
        tables: dict[int, list[np.ndarray]] = {}
        for v, volume in enumerate(volumes if self.fraction > 0 else []):
            if key not in volume:
                continue
            label = convert_to_tensor(volume[key], track_meta=False)[0]
            valid = label.max().item() + 1 if num_classes is None else int(num_classes)
            masked = torch.where(label < valid, label, torch.zeros_like(label))
            indices = map_classes_to_indices(masked[None], num_classes=valid, max_samples_per_class=max_per_class)
            for c, flat in enumerate(indices[1:], start=1):
                flat = np.asarray(flat, dtype=np.int64)
                if flat.size:
                    ijk = np.stack(np.unravel_index(flat, tuple(label.shape)), 1)
                    tables.setdefault(c, []).append(np.concatenate([np.full((flat.size, 1), v), ijk], 1))
        self.classes = sorted(tables)
        self.voxels = {c: np.concatenate(tables[c]) for c in self.classes}

    def randomize(self, data: Any = None) -> None:
        self._centred = self.R.rand() < self.fraction

    def draw(self) -> tuple[int, int, np.ndarray] | None:
        """``(class, volume index, voxel index)`` for a class-centred draw, or None for an ordinary one."""
        self.randomize()
        if not self._centred or not self.classes:
            return None
        c = self.classes[self.R.randint(len(self.classes))]
        row = self.voxels[c][self.R.randint(len(self.voxels[c]))]
        return c, int(row[0]), row[1:]


class _Sampled(torch.utils.data.Dataset):
    """Shared seeding of a sample dataset's transforms and its optional :class:`ForegroundSampler`."""

    transform: Callable | None
    foreground: ForegroundSampler | None

    def set_random_state(self, seed: int) -> _Sampled:
        """Seed the random transforms and the class-balanced draws (main process, or per worker by MONAI)."""
        if isinstance(self.transform, Randomizable):
            self.transform.set_random_state(seed)
        if self.foreground is not None:
            self.foreground.set_random_state(seed + 1)
        return self

    def _finish(self, sample: dict[str, Any], sampled_class: int) -> dict[str, Any]:
        sample[SAMPLED_CLASS_KEY] = sampled_class
        return apply_transform(self.transform, sample) if self.transform is not None else sample


class SliceDataset(_Sampled):
    """Every slice of a set of preprocessed volumes, each extracted and passed through ``transform``.

    With a ``foreground`` sampler, a class-centred draw replaces the indexed slice by the slice through the
    drawn voxel and asks the crop (:class:`~monai_ssl.data.transforms.CropAroundCentred`) to centre on it.

    Args:
        volumes: a sequence of preprocessed volume dicts (e.g. a :class:`VolumeDataset`).
        transform: slice transforms, typically ``slice_augmentations(...) + [PixelToWorldd()]``.
        context: odd number of neighbouring slices stacked as channels (2.5D).
        label_keys: label keys to carry along when a volume has them.
        foreground: optional class-balanced sampler over ``volumes``.
    """

    def __init__(
        self,
        volumes: Sequence[Mapping[str, Any]],
        transform: Callable | Sequence[Callable] | None = None,
        context: int = 1,
        label_keys: Sequence[str] = LABEL_KEYS,
        foreground: ForegroundSampler | None = None,
    ):
        self.volumes, self.foreground = volumes, foreground
        self.context, self.label_keys = context, tuple(label_keys)
        self.transform = Compose(transform) if isinstance(transform, Sequence) else transform
        self.index = [(v, z) for v in range(len(volumes)) for z in range(volumes[v][IMAGE_KEY].shape[-1])]

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> dict[str, Any]:
        v, z = self.index[i]
        drawn = self.foreground.draw() if self.foreground is not None else None
        if drawn is None:
            return self._finish(extract_slice(self.volumes[v], z, self.context, self.label_keys), -1)
        c, v, (i, j, k) = drawn
        sample = extract_slice(self.volumes[v], int(k), self.context, self.label_keys)
        sample[CROP_CENTRE_KEY] = [float(i), float(j)]  # pixel indices: an extracted slice's affine is the identity
        return self._finish(sample, c)


class PatchDataset(_Sampled):
    """One random 3D patch per cached volume and draw; class-centred with a ``foreground`` sampler.

    ``transform`` is typically :func:`monai_ssl.data.pipeline.patch_augmentations`; the drawn voxel is given
    in world coordinates (the volume's affine), which the crop maps back through the current affine.
    """

    def __init__(
        self,
        volumes: Sequence[Mapping[str, Any]],
        transform: Callable | Sequence[Callable] | None = None,
        foreground: ForegroundSampler | None = None,
    ):
        self.volumes, self.foreground = volumes, foreground
        self.transform = Compose(transform) if isinstance(transform, Sequence) else transform

    def __len__(self) -> int:
        return len(self.volumes)

    def __getitem__(self, i: int) -> dict[str, Any]:
        drawn = self.foreground.draw() if self.foreground is not None else None
        if drawn is None:
            return self._finish(dict(self.volumes[i]), -1)
        c, v, ijk = drawn
        sample = dict(self.volumes[v])
        affine = np.asarray(sample[IMAGE_KEY].affine, dtype=np.float64)
        sample[CROP_CENTRE_KEY] = (affine @ np.append(ijk.astype(np.float64), 1.0))[:3].tolist()
        return self._finish(sample, c)


class _Draws(torch.utils.data.Dataset):
    """Draw ``d`` of an endless stream over ``dataset``: the item and its augmentation are seeded by ``(seed, d)``
    alone, so the stream can start at any draw (a resumed run continues exactly where the killed one left off)
    and does not depend on the number of loader workers."""

    def __init__(self, dataset: torch.utils.data.Dataset, seed: int):
        self.dataset, self.seed = dataset, int(seed)

    def __len__(self) -> int:
        return 2**62

    def __getitem__(self, d: int) -> dict[str, Any]:
        rng = np.random.default_rng([self.seed, int(d)])
        item = int(rng.integers(len(self.dataset)))
        if isinstance(self.dataset, _Sampled):
            self.dataset.set_random_state(int(rng.integers(2**31 - 1)))
        return self.dataset[item]


class SemiSupervisedLoader:
    """Endless mixed batches ``{"labeled": batch, "unlabeled": batch}`` drawn with replacement.

    ``round(batch_size * labeled_ratio)`` slices per step are labelled (at least one), the rest unlabelled;
    unlabelled samples carry no ``label``. Draw ``d`` of each stream depends only on ``(seed, stream, d)``, so
    :meth:`start_at` resumes the exact stream of an uninterrupted run. With no unlabelled dataset
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
        self.start_iteration = 0

    def start_at(self, iteration: int) -> None:
        """Make the next iteration over this loader begin with the batch of training iteration ``iteration``."""
        self.start_iteration = int(iteration)

    def _loader(self, name: str, offset: int) -> DataLoader:
        size = self.batch_sizes[name]
        first = self.start_iteration * size
        return DataLoader(
            _Draws(self.datasets[name], self.seed + offset),
            batch_size=size,
            sampler=range(first, 2**62),
            num_workers=self.num_workers,
            # its own generator: creating the iterator must not draw from the global torch RNG, which a resumed
            # run restores at the checkpoint (the workers' base seed is unused: draws are seeded per draw)
            generator=torch.Generator().manual_seed(self.seed + offset),
            persistent_workers=self.num_workers > 0,
        )

    def __iter__(self) -> Iterator[dict[str, Any]]:
        names = [n for n, size in self.batch_sizes.items() if size > 0]
        iterators = [iter(self._loader(n, offset)) for offset, n in enumerate(names)]
        while True:
            yield {name: next(it) for name, it in zip(names, iterators, strict=True)}
