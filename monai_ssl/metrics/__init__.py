"""Per-volume, per-class segmentation metrics in millimetres, and evaluation reports.

- :mod:`.segmentation`: Dice, IoU (Jaccard), HD95 in mm and boundary F1 with a tolerance in mm (default
  :data:`DEFAULT_BF1_TOLERANCE_MM` = 2 mm) per class and volume, from MONAI's definitions with the real voxel
  spacing and an explicit empty-mask policy (``status`` per row), and :class:`MillimetreSegmentationMetric`
  (any of those four) for ignite validation that reads the spacing from MetaTensor affines.
- :mod:`.report`: :class:`SegmentationReport` writes per-case and summary (mean, std) CSVs and PNG overlays.
"""

from monai_ssl.metrics.report import SegmentationReport, foreground_slices, save_overlay, summarize_metrics
from monai_ssl.metrics.segmentation import (
    BOTH_EMPTY,
    CASE_COLUMNS,
    DEFAULT_BF1_TOLERANCE_MM,
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
    "DEFAULT_BF1_TOLERANCE_MM",
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
