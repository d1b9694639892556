"""Per-volume, per-class segmentation metrics in millimetres, and evaluation reports.

- :mod:`.segmentation`: Dice and HD95 (MONAI's definitions, real voxel spacing) per class and volume with an
  explicit empty-mask policy (``status`` per row), and :class:`MillimetreSegmentationMetric` for ignite
  validation that reads the spacing from MetaTensor affines.
- :mod:`.report`: :class:`SegmentationReport` writes per-case and summary CSVs and PNG overlays.
"""

from monai_ssl.metrics.report import SegmentationReport, foreground_slices, save_overlay, summarize_metrics
from monai_ssl.metrics.segmentation import (
    BOTH_EMPTY,
    CASE_COLUMNS,
    GT_EMPTY,
    OK,
    PRED_EMPTY,
    MillimetreSegmentationMetric,
    binary_metrics,
    case_metrics,
    diagonal_mm,
    labels_from_channels,
    meta_spacing,
)

__all__ = [
    "BOTH_EMPTY",
    "CASE_COLUMNS",
    "GT_EMPTY",
    "OK",
    "PRED_EMPTY",
    "MillimetreSegmentationMetric",
    "SegmentationReport",
    "binary_metrics",
    "case_metrics",
    "diagonal_mm",
    "foreground_slices",
    "labels_from_channels",
    "meta_spacing",
    "save_overlay",
    "summarize_metrics",
]
