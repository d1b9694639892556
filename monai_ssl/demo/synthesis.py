"""Demo synthesis: random invertible deformations (extra subjects), the clinical slice grid with exact box
resampling (partial volume), and T1-like MR intensities painted from the labels."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi
from scipy.spatial.transform import Rotation

from monai_ssl.demo.anatomy import CLASS_NAMES

__all__ = [
    "T1_MEANS",
    "DEFAULT_SPACING",
    "DEFAULT_IN_PLANE",
    "SliceGrid",
    "random_smooth_deformation",
    "jacobian_determinant",
    "warp_labels",
    "slice_grid",
    "resample_to_slices",
    "class_means",
    "bias_field",
    "add_rician_noise",
    "synthesize_mr",
]

logger = logging.getLogger(__name__)

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


# ------------------------------------------------------------------------------------------------ deformation


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
    a = Rotation.from_rotvec(angle * axis).as_matrix() @ np.diag(scale)
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
    """Smooth multiplicative field in ``[1 - amplitude, 1 + amplitude]``: random low-frequency cosines in mm.

    Ours, not MONAI's ``RandBiasField`` (a polynomial in voxel indices): a field in mm is the same over the anatomy
    whatever the grid, and drawing from the subject's one generator keeps the built data as they are.
    """
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
    """Magnitude of the image plus complex Gaussian noise (Rician), as in magnitude MR images.

    Ours, not MONAI's ``RandRicianNoise``: that draws from its own ``RandomState``; every draw of a subject comes
    from the subject's one generator, so each subject is reproducible on its own and the demo data stay as built.
    """
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
