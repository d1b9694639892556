"""Read side of a registration output folder: the one entry point for later code (training, reports).

Direction convention. The ordered pair (fixed=F, moving=M) stores ``T_FM``: it maps points of F's physical
space to the anatomically corresponding points of M (what a registration with fixed=F, moving=M yields, and
what resamples M onto F's grid). Hence

* ``transform(src, dst)`` is the pair (fixed=src, moving=dst), mapping src's points to dst's;
* ``map_points(src, dst, pts_ras)`` uses it: RAS -> LPS, ``TransformPoint``, LPS -> RAS;
* ``warp(src, onto=dst)`` uses the pair (fixed=dst, moving=src) and resamples src on dst's grid.
"""

from __future__ import annotations

import json
import os
from functools import lru_cache
from typing import Any

import numpy as np
import SimpleITK as sitk

from registration.cycle import CycleScore, cycle_scores, foreground_mask
from registration.fields import DisplacementField, load_field
from registration.geometry import array_xyz, flip_xy, image_affine_ras, linear_transform_ras
from registration.layout import Layout
from registration.pairs import read_sidecar

__all__ = ["RegistrationStore", "INTERPOLATORS"]

INTERPOLATORS = {
    "linear": sitk.sitkLinear,
    "nearest": sitk.sitkNearestNeighbor,
    "label_gaussian": sitk.sitkLabelGaussian,
}


class RegistrationStore(Layout):
    """Transforms, mappings, scores and selections of ``OUT/<kind>`` written by ``python -m registration``;
    the paths and the selection reader are :class:`registration.layout.Layout`'s."""

    def __init__(self, out_dir: str | os.PathLike, kind: str):
        super().__init__(out_dir, kind)
        table = self.cases_table
        if not table.exists():
            raise FileNotFoundError(f"{table}: no case table; run `python -m registration precompute` first")
        meta = json.loads(table.read_text())
        self.labels: dict[str, str] = meta.get("labels", {})
        self.datalist: str = meta.get("datalist", "")
        self.cases: dict[str, dict[str, Any]] = {c["case_id"]: c for c in meta["cases"]}
        self._transform = lru_cache(maxsize=256)(self._read_transform)
        self._image = lru_cache(maxsize=64)(self._read_image)
        self._mask = lru_cache(maxsize=64)(lambda cid: foreground_mask(self._image(cid, "image")))

    # ---- paths -------------------------------------------------------------------------------------------
    def pair_status(self, fixed: str, moving: str) -> dict[str, Any] | None:
        """The pair's sidecar record, or None if it was never computed."""
        return read_sidecar(self.pair_path(fixed, moving, ".json"))

    def has_pair(self, fixed: str, moving: str) -> bool:
        side = self.pair_status(fixed, moving)
        return bool(side and side.get("status") == "ok" and self.pair_path(fixed, moving).exists())

    # ---- reading -----------------------------------------------------------------------------------------
    def _read_transform(self, fixed: str, moving: str) -> sitk.Transform:
        path = self.pair_path(fixed, moving)
        if not self.has_pair(fixed, moving):
            raise FileNotFoundError(f"{path}: pair (fixed={fixed}, moving={moving}) has no finished registration")
        tr = sitk.ReadTransform(os.fspath(path)).Downcast()
        if isinstance(tr, sitk.CompositeTransform):
            tr.FlattenTransform()
        return tr

    def _read_image(self, case_id: str, key: str) -> sitk.Image:
        case = self.cases.get(case_id)
        if case is None:
            raise KeyError(f"unknown case {case_id!r} in {self.root / 'cases.json'}")
        if not case.get(key):
            raise KeyError(f"case {case_id!r} has no {key} (unlabelled cases never expose labels)")
        if key == "image":
            return sitk.ReadImage(case[key], sitk.sitkFloat32)
        label = sitk.ReadImage(case[key])
        if label.GetPixelID() in (sitk.sitkFloat32, sitk.sitkFloat64):  # float-stored labels: round to integers
            label = sitk.Cast(label + 0.5, sitk.sitkInt16)
        return label

    def image(self, case_id: str) -> sitk.Image:
        return self._image(case_id, "image")

    def label(self, case_id: str) -> sitk.Image:
        return self._image(case_id, "label")

    @property
    def num_classes(self) -> int:
        """Classes including background: from the datalist's label table, else the atlases' largest label + 1."""
        if self.labels:
            return max(int(k) for k in self.labels) + 1
        return 1 + max(int(sitk.GetArrayViewFromImage(self.label(a)).max()) for a in self.group("labeled"))

    def affine_ras(self, case_id: str) -> np.ndarray:
        """Voxel -> RAS 4x4 of a case's image (equal to nibabel's affine of the file)."""
        return image_affine_ras(self.image(case_id))

    # ---- mapping -----------------------------------------------------------------------------------------
    def transform(self, src: str, dst: str) -> sitk.Transform:
        """SimpleITK transform mapping src's LPS points to dst's: the pair (fixed=src, moving=dst)."""
        return self._transform(src, dst)

    def pair_affine_ras(self, src: str, dst: str) -> np.ndarray:
        """Exact RAS->RAS 4x4 mapping src's points to dst's (affine kind only; ValueError for B-splines)."""
        return linear_transform_ras(self.transform(src, dst))

    def map_points(self, src: str, dst: str, points_ras: np.ndarray) -> np.ndarray:
        """Map (N, 3) RAS world points of ``src`` to the corresponding RAS points of ``dst``."""
        pts = np.asarray(points_ras, np.float64).reshape(-1, 3)
        tr = self.transform(src, dst)
        try:
            m = linear_transform_ras(tr)
        except ValueError:  # deformable: exact per-point evaluation in LPS
            lps = flip_xy(pts)
            return flip_xy(np.array([tr.TransformPoint(p) for p in lps.tolist()]).reshape(-1, 3))
        return pts @ m[:3, :3].T + m[:3, 3]

    def warp_image(self, src: str, onto: str, what: str = "image", interpolation: str | None = None) -> sitk.Image:
        """Resample src's ``image`` or ``label`` onto ``onto``'s grid through the pair (fixed=onto, moving=src).

        Labels default to nearest-neighbour (``label_gaussian`` is the smooth alternative); never linear.
        """
        if what not in ("image", "label"):
            raise ValueError(f"what must be 'image' or 'label', got {what!r}")
        interpolation = interpolation or ("linear" if what == "image" else "nearest")
        if what == "label" and interpolation == "linear":
            raise ValueError("labels must use 'nearest' or 'label_gaussian' interpolation, not 'linear'")
        moving = self.image(src) if what == "image" else self.label(src)
        return sitk.Resample(
            moving, self.image(onto), self.transform(onto, src), INTERPOLATORS[interpolation], 0.0, moving.GetPixelID()
        )

    def warp(self, src: str, onto: str, what: str = "image", interpolation: str | None = None) -> np.ndarray:
        """Like :meth:`warp_image`, as an ``[i, j, k]`` array aligned with ``onto``'s file (nibabel order)."""
        return array_xyz(self.warp_image(src, onto, what, interpolation))

    def field(self, src: str, dst: str) -> DisplacementField:
        """The low-resolution RAS displacement field of src -> dst (written by ``precompute --fields``)."""
        return load_field(self.field_path(src, dst))

    # ---- scores and selection ----------------------------------------------------------------------------
    def cycle(self, j: str, q: str, w_rmse: float = 1.0, w_mi: float = 1.0) -> CycleScore:
        """Cycle scores of the round trip j -> q -> j (needs both directions registered)."""
        return cycle_scores(self.image(j), self.transform(j, q), self.transform(q, j), self._mask(j), w_rmse, w_mi)

    def group(self, group: str) -> list[str]:
        return [cid for cid, c in self.cases.items() if c["group"] == group]
