"""Per-volume, per-class Dice, IoU, 95% Hausdorff distance and boundary F1 in mm, with an explicit empty-mask policy.

Dice and IoU (Jaccard) come from MONAI (``compute_dice``, ``compute_iou``). HD95 and boundary F1 share one call of
MONAI's ``get_edge_surface_distance`` (the surface distances ``compute_hausdorff_distance`` uses), always with the
volume's real voxel spacing, so anisotropic volumes (e.g. 1.75 x 1.75 x 5 mm) are measured in mm, not voxels.

**Surfaces** (MONAI's ``get_mask_edges`` without sub-voxel areas): the surface of a binary mask is the set of its
voxels removed by one binary erosion with the face-connected (cross) structuring element, voxels outside the array
counting as background, so foreground touching the array border is surface. For every surface voxel of one mask,
the surface distance is the Euclidean distance in mm (voxel index times spacing) to the nearest surface voxel of the
other mask.

**HD95** (MONAI's, symmetric) = max(q95(pred -> gt), q95(gt -> pred)), where q95 is the 95th percentile with linear
interpolation between order statistics (``torch.quantile``, the same as numpy's default ``"linear"`` method).

**Boundary F1** (BF1) with a tolerance ``bf1_tolerance_mm`` (default 2.0 mm, :data:`DEFAULT_BF1_TOLERANCE_MM`):
precision P = the fraction of predicted surface voxels whose distance to the ground-truth surface is <= the
tolerance, recall R = the fraction of ground-truth surface voxels within the tolerance of the predicted surface,
BF1 = 2PR / (P + R), and 0 when P + R = 0. Distances are float32, so the tolerance is compared in float32 too: a
tolerance equal to a voxel step (e.g. 1.75) counts a one-step offset as within it. BF1 scores how much of the
outline is right regardless of the region's size, where Dice and IoU are dominated by large interiors.

**Empty-mask policy**, per class (never a silent perfect score; MONAI itself returns NaN or inf here):

==============  ===============================  ==================  ===========  ============
status          condition                        Dice, IoU           HD95 (mm)    BF1
==============  ===============================  ==================  ===========  ============
``ok``          both non-empty                   MONAI values        MONAI value  as above
``both_empty``  prediction and ground truth      NaN (not in means)  NaN          NaN
``gt_empty``    only the prediction has voxels   0 (false positive)  diagonal     0
``pred_empty``  only the ground truth has voxels 0 (missed)          diagonal     0
==============  ===============================  ==================  ===========  ============

"diagonal" is :func:`diagonal_mm`, the distance between the centres of opposite corner voxels: the largest
HD95 any pair of non-empty masks on this grid can reach, i.e. the worst case, finite so it enters means.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np
import torch
from monai.data import MetaTensor
from monai.data.utils import affine_to_spacing
from monai.metrics import CumulativeIterationMetric, compute_dice, compute_iou
from monai.metrics.utils import do_metric_reduction, get_edge_surface_distance, prepare_spacing
from monai.utils import MetricReduction

# MONAI 1.6 warns on every HD95 call about its own internal use of a deprecated argument; it is not ours.
warnings.filterwarnings("ignore", message=".*always_return_as_numpy.*")

__all__ = [
    "OK",
    "BOTH_EMPTY",
    "GT_EMPTY",
    "PRED_EMPTY",
    "CASE_COLUMNS",
    "DEFAULT_BF1_TOLERANCE_MM",
    "METRIC_FIELDS",
    "ClassResult",
    "binary_metrics",
    "case_metrics",
    "class_name_list",
    "diagonal_mm",
    "labels_from_channels",
    "meta_spacing",
    "prepare_label_maps",
    "MillimetreSegmentationMetric",
]

OK = "ok"
BOTH_EMPTY = "both_empty"
GT_EMPTY = "gt_empty"
PRED_EMPTY = "pred_empty"

CASE_COLUMNS = [
    "case_id",
    "class_index",
    "class_name",
    "dice",
    "hd95_mm",
    "iou",
    "bf1",
    "bf1_tolerance_mm",
    "pred_voxels",
    "gt_voxels",
    "status",
]
DEFAULT_BF1_TOLERANCE_MM = 2.0
METRIC_FIELDS = {"dice": "dice", "hd95": "hd95_mm", "iou": "iou", "bf1": "bf1"}  # metric name -> ClassResult field

ArrayLike = np.ndarray | torch.Tensor
SpacingLike = float | Sequence[float] | None


class ClassResult(NamedTuple):
    """Metrics of one class in one volume; ``status`` says which branch of the empty-mask policy applied."""

    dice: float
    hd95_mm: float
    iou: float
    bf1: float
    bf1_tolerance_mm: float
    pred_voxels: int
    gt_voxels: int
    status: str


def diagonal_mm(shape: Sequence[int], spacing: Sequence[float]) -> float:
    """Distance in mm between the centres of the first and last voxel of a grid: the largest possible HD."""
    extent = (np.asarray(shape, dtype=np.float64) - 1) * np.asarray(spacing, dtype=np.float64)
    return float(np.sqrt(np.sum(extent**2)))


def labels_from_channels(x: ArrayLike, channel_dim: int = 0) -> torch.Tensor:
    """Integer label map from one-hot masks, probabilities or logits: argmax over ``channel_dim``.

    Use ``channel_dim=1`` for a batch ``(B, C, *spatial)``. A MetaTensor stays a MetaTensor (affine kept).
    """
    return torch.argmax(torch.as_tensor(x), dim=channel_dim)


def meta_spacing(x: Any, spatial_dims: int) -> list[tuple[float, ...]] | None:
    """Voxel spacing in mm from a MetaTensor's affine: one tuple per affine (one per batch item when batched).

    Returns None when ``x`` carries no affine, so callers can fall back or raise.
    """
    if not isinstance(x, MetaTensor):
        return None
    affine = x.affine
    affines = [affine] if affine.ndim == 2 else list(affine)
    return [tuple(float(s) for s in affine_to_spacing(a, r=spatial_dims)) for a in affines]


def _spacing_tuple(spacing: float | Sequence[float], spatial_dims: int, where: str) -> tuple[float, ...]:
    """Check a spacing and expand a scalar to one value per spatial dimension."""
    values = np.atleast_1d(np.asarray(spacing, dtype=np.float64))
    if values.size == 1:
        values = np.repeat(values, spatial_dims)
    if values.ndim != 1 or values.size != spatial_dims:
        raise ValueError(f"{where}spacing {spacing!r} must have one value per spatial dimension ({spatial_dims}).")
    if not np.all(np.isfinite(values) & (values > 0)):
        raise ValueError(f"{where}spacing {spacing!r} must be positive and finite (mm per voxel).")
    return tuple(float(v) for v in values)


def _as_tensor(x: ArrayLike) -> torch.Tensor:
    """A plain tensor view of a numpy array, tensor or MetaTensor (metadata dropped)."""
    if isinstance(x, MetaTensor):
        return x.as_tensor()
    if isinstance(x, np.ndarray):
        return torch.as_tensor(np.ascontiguousarray(x))
    return torch.as_tensor(x)


def _label_map(x: ArrayLike, spatial_dims: int, num_classes: int, what: str, where: str) -> torch.Tensor:
    """Validate an integer label map of shape ``spatial`` or ``(1, *spatial)`` and return it as int64."""
    t = _as_tensor(x)
    if t.ndim == spatial_dims + 1 and t.shape[0] == 1:
        t = t[0]
    if t.ndim != spatial_dims:
        raise ValueError(
            f"{where}{what} has shape {tuple(t.shape)}, which does not match {spatial_dims} spatial dimensions (one "
            "per spacing value, optionally after a leading channel of size 1). For one-hot or probabilities use "
            "labels_from_channels first."
        )
    if t.dtype.is_floating_point and not torch.equal(t, torch.round(t)):
        raise ValueError(
            f"{where}{what} has non-integer values; it looks like probabilities. Use labels_from_channels first."
        )
    t = t.long()
    bad = torch.unique(t[(t < 0) | (t >= num_classes)])
    if bad.numel():
        raise ValueError(f"{where}{what} has labels {bad.tolist()} outside [0, {num_classes - 1}].")
    return t


def prepare_label_maps(
    pred: ArrayLike, label: ArrayLike, num_classes: int, spacing: SpacingLike = None, case_id: str = ""
) -> tuple[torch.Tensor, torch.Tensor, tuple[float, ...]]:
    """Validate a prediction and ground truth label map pair and resolve the spacing.

    Label maps are integer arrays (numpy, torch or MetaTensor) of shape ``spatial`` or ``(1, *spatial)``, 2D or
    3D (any N-D works). ``spacing`` (mm) is a sequence with one value per spatial dimension, a scalar (every
    array dimension then counts as spatial), or None to read it from the affine of ``label`` or ``pred`` when
    one is a MetaTensor. Errors name the case and the problem.
    """
    where = f"case {case_id!r}: " if case_id else ""
    if spacing is None:
        meta = next((m for m in (label, pred) if isinstance(m, MetaTensor)), None)
        if meta is None:
            raise ValueError(f"{where}no spacing given and neither input is a MetaTensor with an affine.")
        spatial_dims = min(meta.affine.shape[-1] - 1, meta.ndim)
        spacing = meta_spacing(meta, spatial_dims)[0]
    elif np.ndim(spacing) == 0:
        spatial_dims = _as_tensor(label).ndim
    else:
        spatial_dims = len(spacing)
    spacing_mm = _spacing_tuple(spacing, spatial_dims, where)
    p = _label_map(pred, spatial_dims, num_classes, "prediction", where)
    g = _label_map(label, spatial_dims, num_classes, "ground truth", where)
    if p.shape != g.shape:
        raise ValueError(f"{where}prediction shape {tuple(p.shape)} differs from ground truth {tuple(g.shape)}.")
    return p, g, spacing_mm


def _check_tolerance(bf1_tolerance_mm: float) -> float:
    """The boundary F1 tolerance as a float, rejected unless finite and >= 0 mm."""
    tolerance = float(bf1_tolerance_mm)
    if not (math.isfinite(tolerance) and tolerance >= 0):
        raise ValueError(f"bf1_tolerance_mm must be a finite distance >= 0 mm, got {bf1_tolerance_mm!r}.")
    return tolerance


def _surface_metrics(
    pred: torch.Tensor, gt: torch.Tensor, spacing: Sequence[float], bf1_tolerance_mm: float
) -> tuple[float, float]:
    """HD95 (mm) and boundary F1 of two non-empty masks from one symmetric surface-distance computation."""
    _, (pred_to_gt, gt_to_pred), _ = get_edge_surface_distance(pred, gt, spacing=list(spacing), symmetric=True)
    hd95 = max(float(torch.quantile(d.float(), 0.95)) for d in (pred_to_gt, gt_to_pred))
    limit = torch.tensor(bf1_tolerance_mm, dtype=pred_to_gt.dtype)
    precision = float((pred_to_gt <= limit).double().mean())
    recall = float((gt_to_pred <= limit).double().mean())
    bf1 = 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)
    return hd95, bf1


def binary_metrics(
    pred: torch.Tensor,
    gt: torch.Tensor,
    spacing: Sequence[float],
    surface: bool = True,
    bf1_tolerance_mm: float = DEFAULT_BF1_TOLERANCE_MM,
) -> ClassResult:
    """Dice, HD95 (mm), IoU and boundary F1 of one binary mask pair, applying the module's empty-mask policy.

    ``surface=False`` skips the (costly) surface distances and reports NaN for HD95 and BF1 on non-empty pairs.
    """
    tolerance = _check_tolerance(bf1_tolerance_mm)
    pred, gt = pred.bool(), gt.bool()
    n_pred, n_gt = int(pred.sum()), int(gt.sum())
    if n_pred == 0 and n_gt == 0:
        return ClassResult(math.nan, math.nan, math.nan, math.nan, tolerance, 0, 0, BOTH_EMPTY)
    if n_pred == 0 or n_gt == 0:
        status = PRED_EMPTY if n_pred == 0 else GT_EMPTY
        return ClassResult(0.0, diagonal_mm(gt.shape, spacing), 0.0, 0.0, tolerance, n_pred, n_gt, status)
    p, g = pred[None, None].float(), gt[None, None].float()
    dice = float(compute_dice(p, g, include_background=True, ignore_empty=False)[0, 0])
    iou = float(compute_iou(p, g, include_background=True, ignore_empty=False)[0, 0])
    hd, bf1 = _surface_metrics(pred, gt, spacing, tolerance) if surface else (math.nan, math.nan)
    return ClassResult(dice, hd, iou, bf1, tolerance, n_pred, n_gt, OK)


def class_name_list(class_names: Sequence[str] | Mapping[Any, str] | None, num_classes: int) -> list[str]:
    """Names per class index; a mapping may use int or str keys (as a datalist's ``labels``)."""
    if class_names is None:
        return [f"class_{i}" for i in range(num_classes)]
    if isinstance(class_names, Mapping):
        by_index = {int(k): str(v) for k, v in class_names.items()}
        return [by_index.get(i, f"class_{i}") for i in range(num_classes)]
    if len(class_names) != num_classes:
        raise ValueError(f"{len(class_names)} class names given for {num_classes} classes.")
    return [str(n) for n in class_names]


def case_metrics(
    pred: ArrayLike,
    label: ArrayLike,
    num_classes: int,
    spacing: SpacingLike = None,
    class_names: Sequence[str] | Mapping[Any, str] | None = None,
    include_background: bool = False,
    case_id: str = "",
    bf1_tolerance_mm: float = DEFAULT_BF1_TOLERANCE_MM,
) -> list[dict[str, Any]]:
    """Per-class Dice, HD95 (mm), IoU and boundary F1 of one volume, one row (:data:`CASE_COLUMNS`) per class.

    Inputs and ``spacing`` are as in :func:`prepare_label_maps`; rows follow the empty-mask policy in the
    module docstring and always carry ``status``, the voxel counts and the BF1 tolerance (mm) they used.
    """
    p, g, spacing_mm = prepare_label_maps(pred, label, num_classes, spacing, case_id)
    names = class_name_list(class_names, num_classes)
    rows = []
    for c in range(0 if include_background else 1, num_classes):
        result = binary_metrics(p == c, g == c, spacing_mm, bf1_tolerance_mm=bf1_tolerance_mm)
        rows.append({"case_id": case_id, "class_index": c, "class_name": names[c], **result._asdict()})
    return rows


class MillimetreSegmentationMetric(CumulativeIterationMetric):
    """Dice, IoU, HD95 (mm) or boundary F1 per batch item and class, for validation loops (``IgniteMetricHandler``).

    Inputs are binarised one-hot ``(B, C, *spatial)`` tensors or lists of channel-first ones, as for MONAI's
    metrics. The spacing comes from the affine of ``y`` (else ``y_pred``) when it is a MetaTensor, so values are
    millimetres, unlike MONAI's ignite ``HausdorffDistance`` handler, which passes no spacing (voxel units).
    A ``spacing=`` keyword at call time overrides it (same forms as MONAI's ``prepare_spacing``). The empty-mask
    policy of this module applies; ``both_empty`` entries are NaN and skipped by the reduction. ``metric`` is one
    of :data:`METRIC_FIELDS`; ``bf1_tolerance_mm`` is the boundary F1 tolerance (only used by ``"bf1"``).

    Example::

        hd95 = MillimetreSegmentationMetric("hd95")
        IgniteMetricHandler(hd95, output_transform=from_engine(["pred", "label"])).attach(evaluator, "val_hd95_mm")
    """

    def __init__(
        self,
        metric: str = "dice",
        include_background: bool = False,
        reduction: MetricReduction | str = MetricReduction.MEAN,
        get_not_nans: bool = False,
        bf1_tolerance_mm: float = DEFAULT_BF1_TOLERANCE_MM,
    ) -> None:
        super().__init__()
        if metric not in METRIC_FIELDS:
            raise ValueError(f"metric must be one of {sorted(METRIC_FIELDS)}, got {metric!r}.")
        self.metric = metric
        self.bf1_tolerance_mm = _check_tolerance(bf1_tolerance_mm)
        self.include_background = include_background
        self.reduction = reduction
        self.get_not_nans = get_not_nans

    def _compute_tensor(self, y_pred: torch.Tensor, y: torch.Tensor, **kwargs: Any) -> torch.Tensor:  # type: ignore[override]
        if y is None or y_pred.shape != y.shape or y_pred.ndim < 3:
            raise ValueError(f"y_pred and y must be one-hot (B, C, *spatial) of equal shape, got {y_pred.shape}.")
        batch, spatial_dims = y_pred.shape[0], y_pred.ndim - 2
        spacing = kwargs.get("spacing")
        if spacing is not None:
            spacings = prepare_spacing(spacing, batch, spatial_dims)
        else:
            spacings = meta_spacing(y, spatial_dims) or meta_spacing(y_pred, spatial_dims)
            if spacings is None:
                raise ValueError("no spacing: pass MetaTensors with an affine or spacing=...; voxels are not mm.")
            if len(spacings) == 1:
                spacings = spacings * batch
        pred, gt = _as_tensor(y_pred), _as_tensor(y)
        if ((pred != 0) & (pred != 1)).any() or ((gt != 0) & (gt != 1)).any():
            raise ValueError("y_pred and y must be binarised one-hot, e.g. AsDiscrete(argmax=True, to_onehot=C).")
        first = 0 if self.include_background else 1
        surface = self.metric in ("hd95", "bf1")
        out = torch.empty((batch, y_pred.shape[1] - first), dtype=torch.float32)
        for b, c in np.ndindex(batch, y_pred.shape[1] - first):
            s = _spacing_tuple(spacings[b], spatial_dims, f"batch item {b}: ")
            result = binary_metrics(pred[b, c + first], gt[b, c + first], s, surface, self.bf1_tolerance_mm)
            out[b, c] = getattr(result, METRIC_FIELDS[self.metric])
        return out

    def aggregate(
        self, reduction: MetricReduction | str | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Reduce the buffered ``(N, C)`` values over non-NaN entries (MONAI's ``do_metric_reduction``)."""
        data = self.get_buffer()
        if not isinstance(data, torch.Tensor):
            raise ValueError("nothing to aggregate: call the metric on at least one batch first.")
        f, not_nans = do_metric_reduction(data, reduction or self.reduction)
        return (f, not_nans) if self.get_not_nans else f
