"""Evaluation reports: per-case, per-class metric tables, a summary table and PNG overlays per case.

Tables are pandas DataFrames written as CSV; figures are drawn with matplotlib's Agg canvas (no display, no
pyplot state). Every file is written atomically, so a killed job never leaves a partial table or image.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from monai_ssl.fileio import atomic_path
from monai_ssl.metrics.segmentation import (
    BOTH_EMPTY,
    CASE_COLUMNS,
    DEFAULT_BF1_TOLERANCE_MM,
    GT_EMPTY,
    PRED_EMPTY,
    ArrayLike,
    SpacingLike,
    case_metrics,
    class_name_list,
    prepare_label_maps,
)

__all__ = [
    "SUMMARY_COLUMNS",
    "SUMMARY_METRICS",
    "class_colours",
    "foreground_slices",
    "save_overlay",
    "summarize_metrics",
    "SegmentationReport",
]

logger = logging.getLogger(__name__)

SUMMARY_METRICS = ["dice", "hd95_mm", "iou", "bf1"]  # per-case columns summarised as <name>_mean, <name>_std
SUMMARY_COLUMNS = [
    "class_index",
    "class_name",
    *(f"{m}_{stat}" for m in SUMMARY_METRICS for stat in ("mean", "std")),
    "n_used",
    "n_excluded",
    "n_gt_empty",
    "n_pred_empty",
]
OVERLAY_ALPHA = 0.45


def _summary_row(class_index: Any, class_name: str, rows: pd.DataFrame) -> dict[str, Any]:
    used = rows[rows["status"] != BOTH_EMPTY]
    stats: dict[str, Any] = {}
    for m in SUMMARY_METRICS:
        values = used[m] if m in used else pd.Series(dtype=float)  # an absent metric: mean and std NaN
        stats.update({f"{m}_mean": values.mean(), f"{m}_std": values.std()})
    return {
        "class_index": class_index,
        "class_name": class_name,
        **stats,
        "n_used": len(used),
        "n_excluded": len(rows) - len(used),
        "n_gt_empty": int((rows["status"] == GT_EMPTY).sum()),
        "n_pred_empty": int((rows["status"] == PRED_EMPTY).sum()),
    }


def summarize_metrics(cases: pd.DataFrame) -> pd.DataFrame:
    """Mean and sample std (ddof=1, NaN for a single value) of each of :data:`SUMMARY_METRICS` (Dice, HD95, IoU,
    boundary F1) per class, plus an ``overall`` row.

    ``both_empty`` rows are excluded and counted in ``n_excluded``; ``gt_empty``/``pred_empty`` rows are used
    (Dice, IoU and BF1 0, HD95 = diagonal) and counted too. The ``overall`` row (``class_index`` empty) pools all
    used (case, class) rows, so its counts are of rows, not cases. A metric column missing from ``cases`` (e.g. a
    per-case table of the registration job, which has only Dice and HD95) summarises to NaN.
    """
    rows = [_summary_row(int(idx), name, grp) for (idx, name), grp in cases.groupby(["class_index", "class_name"])]
    rows.append(_summary_row(pd.NA, "overall", cases))
    return pd.DataFrame(rows, columns=SUMMARY_COLUMNS).astype({"class_index": "Int64"})


def class_colours(num_classes: int) -> np.ndarray:
    """Fixed RGBA colour per class index: background transparent, class c >= 1 gets tab10 colour c - 1."""
    palette = colormaps["tab10"].colors
    colours = np.zeros((num_classes, 4))
    for c in range(1, num_classes):
        colours[c] = (*palette[(c - 1) % len(palette)], OVERLAY_ALPHA)
    return colours


def foreground_slices(label: np.ndarray, pred: np.ndarray, count: int) -> list[int]:
    """Indices along the last axis of the ``count`` slices with the most foreground (label or prediction).

    Slices without foreground are never chosen; with no foreground at all, the middle slice is returned.
    """
    fg = (np.asarray(label) > 0) | (np.asarray(pred) > 0)
    per_slice = fg.reshape(-1, fg.shape[-1]).sum(axis=0)
    chosen = [int(i) for i in np.argsort(-per_slice, kind="stable")[:count] if per_slice[i] > 0]
    return sorted(chosen) if chosen else [fg.shape[-1] // 2]


def save_overlay(
    path: str | os.PathLike,
    label: np.ndarray,
    pred: np.ndarray,
    num_classes: int,
    image: np.ndarray | None = None,
    spacing: Sequence[float] | None = None,
    class_names: Sequence[str] | None = None,
    slices: int = 3,
    panel_inches: float = 3.0,
    dpi: int = 100,
    title: str = "",
) -> Path:
    """Write a PNG with one row per chosen slice: image, ground truth overlay, prediction overlay.

    Arrays are 2D or 3D with the same spatial shape; slices are along the last axis (see
    :func:`foreground_slices`). Each panel shows axis 0 horizontally and axis 1 vertically (origin lower left),
    with the pixel aspect ratio from ``spacing``. The image is windowed to its 1st-99th percentile. The PNG is
    ``(3 * panel_inches * dpi)`` pixels wide and ``(rows * panel_inches * dpi)`` high.
    """
    label, pred = np.asarray(label), np.asarray(pred)
    if label.ndim == 2:
        label, pred = label[..., None], pred[..., None]
        image = None if image is None else np.asarray(image)[..., None]
    if label.ndim != 3 or pred.shape != label.shape or (image is not None and np.shape(image) != label.shape):
        raise ValueError(f"{path}: overlay needs 2D/3D arrays of one shape, got label {label.shape}, pred {pred.shape}")
    colours = class_colours(num_classes)
    names = class_name_list(class_names, num_classes)
    aspect = 1.0 if spacing is None else float(spacing[1]) / float(spacing[0])
    if image is None:
        image, window = np.zeros(label.shape), (0.0, 1.0)
    else:
        image = np.asarray(image, dtype=np.float64)
        window = tuple(np.percentile(image, [1, 99]))
    chosen = foreground_slices(label, pred, slices)

    fig = Figure(figsize=(3 * panel_inches, len(chosen) * panel_inches), dpi=dpi)
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(chosen), 3, squeeze=False)
    for row, k in zip(axes, chosen, strict=True):
        for ax, (name, mask) in zip(row, (("image", None), ("ground truth", label), ("prediction", pred)), strict=True):
            ax.imshow(image[..., k].T, cmap="gray", vmin=window[0], vmax=window[1], origin="lower", aspect=aspect)
            if mask is not None:
                ax.imshow(colours[mask[..., k].T], origin="lower", aspect=aspect, interpolation="nearest")
            ax.set_title(f"{name}, slice {k}", fontsize=8)
            ax.axis("off")
    present = sorted((set(np.unique(label).tolist()) | set(np.unique(pred).tolist())) - {0})
    handles = [Patch(color=colours[c][:3], label=names[c]) for c in present]
    if handles:
        fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 5), fontsize=7, frameon=False)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.06, top=0.9 if title else 0.95, wspace=0.03, hspace=0.15)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi)
    return Path(path)


def _write_csv(frame: pd.DataFrame, path: Path) -> None:
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False)


class SegmentationReport:
    """Accumulate cases, then write a per-case/per-class CSV, a summary CSV and one overlay PNG per case.

    Overlays are drawn as cases are added, so volumes are not kept in memory; pass ``overlay_dir=None`` or
    ``overlay_slices=0`` to skip them. File names are relative to ``output_dir`` (absolute paths also work).
    ``bf1_tolerance_mm`` is the boundary F1 tolerance; every per-case row records it.
    """

    def __init__(
        self,
        output_dir: str | os.PathLike,
        num_classes: int,
        class_names: Sequence[str] | Mapping[Any, str] | None = None,
        include_background: bool = False,
        cases_csv: str = "metrics_per_case.csv",
        summary_csv: str = "metrics_summary.csv",
        overlay_dir: str | None = "overlays",
        overlay_slices: int = 3,
        panel_inches: float = 3.0,
        dpi: int = 100,
        bf1_tolerance_mm: float = DEFAULT_BF1_TOLERANCE_MM,
    ) -> None:
        self.output_dir = Path(output_dir)
        self.num_classes = num_classes
        self.class_names = class_name_list(class_names, num_classes)
        self.include_background = include_background
        self.bf1_tolerance_mm = bf1_tolerance_mm
        self.cases_csv = self.output_dir / cases_csv
        self.summary_csv = self.output_dir / summary_csv
        self.overlay_dir = None if overlay_dir is None or overlay_slices <= 0 else self.output_dir / overlay_dir
        self.overlay_slices = overlay_slices
        self.panel_inches = panel_inches
        self.dpi = dpi
        self._rows: list[dict[str, Any]] = []
        self._case_ids: set[str] = set()

    def overlay_path(self, case_id: str) -> Path | None:
        """Where the overlay of ``case_id`` goes (characters unsafe in file names become ``_``)."""
        if self.overlay_dir is None:
            return None
        return self.overlay_dir / f"{re.sub(r'[^A-Za-z0-9._-]', '_', case_id)}.png"

    def add_case(
        self,
        case_id: str,
        pred: ArrayLike,
        label: ArrayLike,
        spacing: SpacingLike = None,
        image: ArrayLike | None = None,
    ) -> list[dict[str, Any]]:
        """Evaluate one volume (see :func:`~monai_ssl.metrics.segmentation.case_metrics`), store and return rows.

        ``image`` (same spatial shape, optional leading channel of 1) is only used for the overlay.
        """
        if case_id in self._case_ids:
            raise ValueError(f"case {case_id!r} was already added to this report.")
        p, g, spacing_mm = prepare_label_maps(pred, label, self.num_classes, spacing, case_id)
        rows = case_metrics(
            p,
            g,
            self.num_classes,
            spacing_mm,
            self.class_names,
            self.include_background,
            case_id,
            self.bf1_tolerance_mm,
        )
        overlay = self.overlay_path(case_id)
        if overlay is not None:
            img = None if image is None else np.asarray(image, dtype=np.float32)
            if img is not None and img.ndim == g.ndim + 1 and img.shape[0] == 1:
                img = img[0]
            save_overlay(
                overlay,
                g.numpy(),
                p.numpy(),
                self.num_classes,
                img,
                spacing_mm,
                self.class_names,
                self.overlay_slices,
                self.panel_inches,
                self.dpi,
                title=case_id,
            )
        self._rows.extend(rows)
        self._case_ids.add(case_id)
        summary = ", ".join(
            f"{r['class_name']} Dice {r['dice']:.3f} IoU {r['iou']:.3f} HD95 {r['hd95_mm']:.1f} mm BF1 {r['bf1']:.3f}"
            for r in rows
        )
        logger.info("case %s: %s", case_id, summary)
        return rows

    def cases_frame(self) -> pd.DataFrame:
        """All rows added so far, one per (case, class), columns :data:`CASE_COLUMNS`."""
        return pd.DataFrame(self._rows, columns=CASE_COLUMNS)

    def summary_frame(self) -> pd.DataFrame:
        """Per-class and overall summary (:func:`summarize_metrics`) of the rows added so far."""
        return summarize_metrics(self.cases_frame())

    def write(self) -> tuple[pd.DataFrame, pd.DataFrame]:
        """Write both CSV files atomically and return ``(cases, summary)`` DataFrames."""
        cases, summary = self.cases_frame(), self.summary_frame()
        _write_csv(cases, self.cases_csv)
        _write_csv(summary, self.summary_csv)
        logger.info("wrote %d rows to %s and the summary to %s", len(cases), self.cases_csv, self.summary_csv)
        return cases, summary
