"""MONAI dictionary transforms for the volume pipeline and for augmented 2D slices with world geometry.

Volumes: load -> channel first -> check -> reorient (RAS) -> resample in-plane (slice axis kept) ->
normalise (CT window or MR percentiles). Slices: pad/crop to the patch size, flip, rotate/scale, then
:class:`PixelToWorldd` records where every pixel of the augmented slice sits in the 3D world.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import (
    CastToTyped,
    Compose,
    EnsureChannelFirstd,
    EnsureTyped,
    LoadImaged,
    MapTransform,
    Orientationd,
    RandAdjustContrastd,
    RandAffined,
    RandFlipd,
    RandHistogramShiftd,
    Randomizable,
    RandSpatialCropd,
    ScaleIntensityRanged,
    ScaleIntensityRangePercentilesd,
    Spacingd,
    SpatialCropd,
    SpatialPadd,
    Transform,
)
from monai.transforms.utils import correct_crop_centers

from monai_ssl.data.geometry import check_slice_axis
from monai_ssl.data.validation import (
    LABEL_KEYS,
    PROBABILITY_KEYS,
    InputError,
    check_geometry,
    check_image_array,
    check_label_array,
    check_probability_array,
)

__all__ = [
    "CheckVolumed",
    "CropAroundCentred",
    "LabelFromProbabilitiesd",
    "PixelToWorldd",
    "volume_transforms",
    "slice_augmentations",
    "intensity_augmentations",
    "embed_slice_affine",
    "IMAGE_KEY",
    "SLICE_BASE_KEY",
    "PIXEL_TO_WORLD_KEY",
    "CROP_CENTRE_KEY",
    "DEFAULT_FLIP_AXES",
    "DEFAULT_PIXDIM",
]

IMAGE_KEY = "image"
#: 4x4 voxel->world (RAS) affine of the extracted slice before augmentation, with the slice index folded in
SLICE_BASE_KEY = "slice_base_affine"
#: 4x4 pixel->world (RAS) affine of the augmented slice: ``world = M @ [i, j, 0, 1]``
PIXEL_TO_WORLD_KEY = "pixel_to_world"
#: where a class-balanced draw asks the crop to centre, in the coordinates of the sample's MetaTensor affine at the
#: time of the draw (identity for an extracted slice: its pixel indices), so padding before the crop cannot shift it
CROP_CENTRE_KEY = "crop_centre"
#: no flips unless asked: an axis is flipped only where the anatomy is mirror-symmetric across it (brain: the
#: left-right axis 0 after RAS reorientation; abdomen, heart: none) and its classes are not lateralised
DEFAULT_FLIP_AXES: tuple[int, ...] = ()
#: axis labels of the project's world frame (RAS, like NIfTI); passed explicitly to ``Orientationd``
RAS_LABELS = (("L", "R"), ("P", "A"), ("I", "S"))
#: the CT window used by the Synapse literature (abdomen soft tissue)
DEFAULT_CT_WINDOW = (-125.0, 275.0)
#: target spacing (mm): 1.75 mm in plane, the slice spacing kept (non-positive entries keep the original)
DEFAULT_PIXDIM = (1.75, 1.75, -1.0)


def _filename(data: Any) -> str:
    meta = getattr(data, "meta", {}) or {}
    return str(meta.get("filename_or_obj", "<in-memory array>"))


class CheckVolumed(MapTransform):
    """Reject a loaded case with a clear error naming the file: wrong dimensionality, NaN/inf intensities,
    labels outside ``[0, num_classes)`` (``ignore_index`` also allowed when given: scribbles) or label grids that
    differ from the image grid.

    Apply after ``EnsureChannelFirstd`` and before any resampling, so geometry is compared as stored.
    """

    def __init__(
        self,
        image_key: str = IMAGE_KEY,
        label_keys: KeysCollection = LABEL_KEYS,
        num_classes: int | None = None,
        spatial_dims: int = 3,
        ignore_index: int | None = None,
        probability_keys: KeysCollection = PROBABILITY_KEYS,
        slices: bool = False,
    ):
        super().__init__([image_key, *label_keys, *probability_keys], allow_missing_keys=True)
        self.slices = slices
        self.image_key, self.label_keys = image_key, tuple(label_keys)
        self.probability_keys = tuple(probability_keys)
        self.num_classes, self.spatial_dims, self.ignore_index = num_classes, spatial_dims, ignore_index

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        image = d[self.image_key]
        name = _filename(image)
        problems = check_image_array(image, name, self.spatial_dims)
        if self.slices:  # 2D training and inference cut axial slices: the thick axis must be S-I
            problems += check_slice_axis(np.asarray(image.affine), name)
        for key in self.label_keys:
            if key not in d:
                continue
            label = d[key]
            problems += check_geometry(
                name, image.shape[1:], image.affine, _filename(label), label.shape[1:], label.affine
            )
            problems += check_label_array(label, _filename(label), self.num_classes, self.ignore_index)
        for key in self.probability_keys:
            if key in d:
                probs, pname = d[key], _filename(d[key])
                problems += check_geometry(name, image.shape[1:], image.affine, pname, probs.shape[1:], probs.affine)
                problems += check_probability_array(probs, pname, self.num_classes)
        if problems:
            raise InputError(problems)
        return d


class LabelFromProbabilitiesd(MapTransform):
    """Give a case that has class probabilities but no ``label_key`` the probabilities' argmax (uint8) as that
    label, and drop the probabilities unless ``keep``: a volume with only a registration prior then trains like
    one with a registered label. (MONAI's ``AsDiscreted`` overwrites its input and cannot fill only missing keys.)
    """

    def __init__(self, probability_key: str = PROBABILITY_KEYS[0], label_key: str = LABEL_KEYS[1], keep: bool = False):
        super().__init__(probability_key)
        self.probability_key, self.label_key, self.keep = probability_key, label_key, keep

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        if self.probability_key not in d or self.label_key in d:
            return d
        d[self.label_key] = torch.as_tensor(d[self.probability_key]).argmax(dim=0, keepdim=True).to(torch.uint8)
        if not self.keep:
            del d[self.probability_key]
        return d


def volume_transforms(
    modality: str = "MR",
    pixdim: Sequence[float] = DEFAULT_PIXDIM,
    num_classes: int | None = None,
    axcodes: str = "RAS",
    ct_window: Sequence[float] = DEFAULT_CT_WINDOW,
    mr_percentiles: Sequence[float] = (1.0, 99.0),
    label_keys: KeysCollection = LABEL_KEYS,
    reader: str | None = None,
    ignore_index: int | None = None,
    probability_keys: KeysCollection = PROBABILITY_KEYS,
    slices: bool = True,
) -> Compose:
    """Deterministic per-volume preprocessing, meant to be cached by ``CacheDataset``.

    Non-positive ``pixdim`` entries keep the original spacing (default: the slice spacing). ``modality``
    ``"CT"`` maps the HU window ``ct_window`` to [0, 1]; ``"MR"`` maps the per-volume percentiles to [0, 1].
    Labels use nearest-neighbour resampling and are stored as uint8; ``ignore_index`` (e.g. 255, unannotated
    pixels of scribbles) passes the label check and survives both. Probability maps (4D, one channel per class)
    are resampled linearly and kept as float32. ``slices`` (2D models) refuses volumes whose low-resolution axis
    is not S-I (:func:`~monai_ssl.data.geometry.check_slice_axis`).
    """
    label_keys, probability_keys = tuple(label_keys), tuple(probability_keys)
    keys = (IMAGE_KEY, *label_keys, *probability_keys)
    if modality.upper() == "CT":
        normalise = ScaleIntensityRanged(IMAGE_KEY, *ct_window, b_min=0.0, b_max=1.0, clip=True)
    elif modality.upper() in ("MR", "MRI"):
        lo, hi = mr_percentiles
        normalise = ScaleIntensityRangePercentilesd(IMAGE_KEY, lo, hi, b_min=0.0, b_max=1.0, clip=True)
    else:
        raise ValueError(f"unknown modality {modality!r}: expected 'CT' or 'MR'")
    return Compose(
        [
            LoadImaged(keys, reader=reader, image_only=True, allow_missing_keys=True),
            EnsureChannelFirstd(keys, allow_missing_keys=True),
            CheckVolumed(
                IMAGE_KEY,
                label_keys,
                num_classes,
                ignore_index=ignore_index,
                probability_keys=probability_keys,
                slices=slices,
            ),  # fmt: skip
            Orientationd(keys, axcodes=axcodes, labels=RAS_LABELS, allow_missing_keys=True),
            Spacingd(
                keys,
                pixdim=pixdim,
                mode=["bilinear"] + ["nearest"] * len(label_keys) + ["bilinear"] * len(probability_keys),
                allow_missing_keys=True,
            ),
            normalise,
            CastToTyped((IMAGE_KEY, *probability_keys), dtype=np.float32, allow_missing_keys=True),
        ]
        + ([CastToTyped(label_keys, dtype=np.uint8, allow_missing_keys=True)] if label_keys else [])
    )


class CropAroundCentred(Randomizable, MapTransform):
    """Crop ``roi_size`` at random (MONAI ``RandSpatialCropd``), or centred on ``data[CROP_CENTRE_KEY]`` when a
    class-balanced draw put it there (MONAI ``SpatialCropd``, the centre shifted so the crop lies inside).

    The centre is given in the coordinates of the MetaTensor affine of the first key when it was drawn; it is
    mapped through the current affine, so a ``SpatialPadd`` before this crop cannot move it. Both crops are MONAI
    spatial transforms, so the affine (hence ``pixel_to_world``) stays exact.
    """

    def __init__(self, keys: KeysCollection, roi_size: Sequence[int], allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.roi_size = tuple(int(s) for s in roi_size)
        self.random_crop = RandSpatialCropd(keys, roi_size=roi_size, random_size=False, allow_missing_keys=True)

    def set_random_state(self, seed: int | None = None, state: np.random.RandomState | None = None):
        self.random_crop.set_random_state(seed, state)
        return super().set_random_state(seed, state)

    def randomize(self, data: Any = None) -> None:  # randomness lives in the wrapped RandSpatialCropd
        pass

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        centre = d.pop(CROP_CENTRE_KEY, None)
        if centre is None:
            return self.random_crop(d)
        ref = d[self.first_key(d)]
        n = len(self.roi_size)
        to_pixels = np.linalg.inv(np.asarray(ref.affine, dtype=np.float64))
        pixel = (to_pixels @ np.append(np.asarray(centre, dtype=np.float64), 1.0))[:n]
        centres = correct_crop_centers([int(round(c)) for c in pixel], self.roi_size, ref.shape[1:], allow_smaller=True)
        centre_px = [int(c) for c in centres]
        return SpatialCropd(self.keys, roi_center=centre_px, roi_size=self.roi_size, allow_missing_keys=True)(d)


def spatial_crop_and_flips(
    patch_size: Sequence[int], keys: Sequence[str], flip_axes: Sequence[int], flip_prob: float
) -> list[Transform]:
    """Pad to ``patch_size``, crop (random or class-centred), then flip each of ``flip_axes`` with ``flip_prob``."""
    axes = flip_axes if flip_prob > 0 else ()
    flips = [RandFlipd(keys, prob=flip_prob, spatial_axis=int(a), allow_missing_keys=True) for a in axes]
    return [
        SpatialPadd(keys, spatial_size=patch_size, allow_missing_keys=True),
        CropAroundCentred(keys, roi_size=patch_size, allow_missing_keys=True),
        *flips,
    ]


def intensity_augmentations(prob: float) -> list[Transform]:
    """Random contrast of the image only, each transform with ``prob`` (0: none): a monotone histogram remap
    (``RandHistogramShiftd``, which narrows or widens the gaps between tissue intensities, as they differ between
    subjects and scanners) and a gamma in [0.7, 1.5] (nnU-Net's range). Geometry and labels are untouched."""
    if prob <= 0:
        return []
    return [RandHistogramShiftd(IMAGE_KEY, prob=prob), RandAdjustContrastd(IMAGE_KEY, prob=prob, gamma=(0.7, 1.5))]


def slice_augmentations(
    patch_size: Sequence[int],
    label_keys: KeysCollection = LABEL_KEYS,
    flip_prob: float = 0.5,
    rotate_deg: float = 15.0,
    scale: float = 0.1,
    affine_prob: float = 0.5,
    flip_axes: Sequence[int] = DEFAULT_FLIP_AXES,
    probability_keys: KeysCollection = PROBABILITY_KEYS,
    intensity_prob: float = 0.0,
) -> list[Transform]:
    """In-plane augmentation of a 2D slice: pad, crop to ``patch_size``, flips, rotation and scaling.

    ``flip_axes`` are the slice axes flipped (each with ``flip_prob``): after RAS reorientation axis 0 runs
    left-right and axis 1 back-front; flip only where the anatomy is mirror-symmetric (see
    :data:`DEFAULT_FLIP_AXES`). Every transform here updates the MetaTensor affine, which :class:`PixelToWorldd`
    turns into the pixel -> world mapping; ``RandZoomd`` is deliberately not used because its affine update is
    wrong with ``keep_size=True`` (checked by the tests of this module). ``intensity_prob`` adds
    :func:`intensity_augmentations`.
    """
    keys = (IMAGE_KEY, *label_keys, *probability_keys)
    modes = ["bilinear"] + ["nearest"] * len(tuple(label_keys)) + ["bilinear"] * len(tuple(probability_keys))
    bad = [a for a in flip_axes if int(a) not in (0, 1)]
    if bad:
        raise ValueError(f"flip_axes of a 2D slice must be 0 and/or 1, got {list(flip_axes)}")
    out = spatial_crop_and_flips(patch_size, keys, flip_axes, flip_prob) + intensity_augmentations(intensity_prob)
    if affine_prob > 0 and (rotate_deg > 0 or scale > 0):
        out.append(
            RandAffined(
                keys,
                prob=affine_prob,
                rotate_range=np.deg2rad(rotate_deg),
                scale_range=(scale, scale),
                mode=modes,
                padding_mode="zeros",
                allow_missing_keys=True,
            )
        )
    return out


def embed_slice_affine(affine_2d: Any) -> np.ndarray:
    """Lift a 3x3 in-plane affine (homogeneous 2D) to 4x4, leaving the slice axis untouched."""
    a = np.asarray(affine_2d, dtype=np.float64)
    out = np.eye(4)
    out[:2, :2], out[:2, 3] = a[:2, :2], a[:2, 2]
    return out


class PixelToWorldd(Transform):
    """Record ``pixel_to_world`` (4x4, RAS) of an augmented 2D slice or 3D patch, then drop the metadata.

    A slice is extracted with an identity 2D affine, so after MONAI's spatial transforms its affine maps
    augmented pixels to pixels of the original slice; ``pixel_to_world = base @ embed(affine_2d)``. A 3D
    patch keeps its MetaTensor voxel->world affine, which becomes ``pixel_to_world`` directly. The image
    and labels then become plain tensors (labels as int64), which batch cheaply.
    """

    def __init__(self, label_keys: KeysCollection = LABEL_KEYS, probability_keys: KeysCollection = PROBABILITY_KEYS):
        self.label_keys = tuple(label_keys)
        keys = [IMAGE_KEY, *self.label_keys, *probability_keys]
        self.to_plain = EnsureTyped(keys, track_meta=False, allow_missing_keys=True)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        image = d[IMAGE_KEY]
        if SLICE_BASE_KEY in d:  # a 2D slice: compose its 3D placement with the in-plane augmentation
            affine_2d = image.affine if isinstance(image, MetaTensor) else np.eye(3)
            matrix = np.asarray(d.pop(SLICE_BASE_KEY), dtype=np.float64) @ embed_slice_affine(affine_2d)
        else:  # a 3D patch: MONAI's spatial transforms already keep its voxel->world affine
            matrix = np.asarray(image.affine, dtype=np.float64)
        d[PIXEL_TO_WORLD_KEY] = torch.as_tensor(matrix, dtype=torch.float64)
        d = self.to_plain(d)
        for key in self.label_keys:
            if key in d:
                d[key] = d[key].round().long()
        return d
