"""IoU and boundary F1 (tolerance in mm): hand-worked values, an independent scipy check, empty masks, settings."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
from monai.data import MetaTensor
from monai.networks.utils import one_hot

from monai_ssl.metrics import (
    BOTH_EMPTY,
    CASE_COLUMNS,
    DEFAULT_BF1_TOLERANCE_MM,
    GT_EMPTY,
    OK,
    PRED_EMPTY,
    MillimetreSegmentationMetric,
    SegmentationReport,
    binary_metrics,
    case_metrics,
    summarize_metrics,
)
from monai_ssl.metrics.report import SUMMARY_COLUMNS
from tests.test_metrics import ACDC_SPACING, GT_2D, PRED_2D, blob_pair, empty_mask_pair, scipy_surface_distances

SPACING_2D = (2.0, 1.0)  # anisotropic: a step along axis 0 is 2 mm, along axis 1 is 1 mm


def square(shape, rows: slice, cols: slice) -> np.ndarray:
    mask = np.zeros(shape, dtype=bool)
    mask[rows, cols] = True
    return mask


def bf1(pred: np.ndarray, gt: np.ndarray, spacing, tolerance: float) -> float:
    return binary_metrics(torch.as_tensor(pred), torch.as_tensor(gt), spacing, bf1_tolerance_mm=tolerance).bf1


def scipy_bf1(pred: np.ndarray, gt: np.ndarray, spacing, tolerance: float) -> float:
    """Independent boundary F1 from scipy distance transforms (compared in float32, as the module documents)."""
    pred_to_gt, gt_to_pred = scipy_surface_distances(pred, gt, spacing)
    limit = np.float32(tolerance)
    precision = np.mean(pred_to_gt.astype(np.float32) <= limit)
    recall = np.mean(gt_to_pred.astype(np.float32) <= limit)
    return 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)


def test_iou_by_hand_on_tiny_label_map():
    # PRED_2D = [[0, 1, 1, 0], [0, 1, 2, 2], [0, 0, 2, 0]], GT_2D = [[0, 1, 0, 0], [1, 1, 2, 2], [0, 0, 2, 2]]
    rows = case_metrics(PRED_2D, GT_2D, num_classes=3, spacing=(3.0, 2.0), include_background=True)
    iou = {r["class_index"]: r["iou"] for r in rows}
    # background: pred 6, gt 5, overlap 4 -> union 7; class 1: 3, 3, overlap 2 -> union 4; class 2: 3, 4, 3 -> 4
    assert iou == pytest.approx({0: 4 / 7, 1: 2 / 4, 2: 3 / 4}, rel=1e-6)
    for r in rows:  # the same counts give Dice, and IoU = Dice / (2 - Dice)
        assert r["iou"] == pytest.approx(r["dice"] / (2 - r["dice"]), rel=1e-6)


def test_boundary_f1_by_hand_square_shifted_one_voxel_flips_at_the_spacing():
    gt = square((9, 9), slice(2, 5), slice(2, 5))  # 3x3: 8 surface voxels, the centre is interior
    down = square((9, 9), slice(3, 6), slice(2, 5))  # shifted one voxel (2 mm) along axis 0
    # pred -> gt: the 4 side voxels on rows 3-4 lie on the gt surface (0); (3, 3), which is the gt centre, is 1 mm
    # (one axis-1 step) from (3, 2); the new bottom row 5 is 2 mm (one axis-0 step) from row 4: [0,0,0,0,1,2,2,2].
    # gt -> pred is the mirror image. Within 1.9 mm: P = R = 5/8 -> BF1 = 5/8; within 2.1 mm every voxel: BF1 = 1.
    assert bf1(down, gt, SPACING_2D, 1.9) == pytest.approx(5 / 8)
    assert bf1(down, gt, SPACING_2D, 2.1) == 1.0
    assert bf1(down, gt, SPACING_2D, 2.0) == 1.0  # <= : a tolerance equal to the step counts it
    assert bf1(down, gt, SPACING_2D, 0.9) == pytest.approx(4 / 8)  # only the 4 shared surface voxels
    assert bf1(down, gt, (1.0, 1.0), 1.5) == 1.0  # in voxel units the 2 mm step would pass: spacing matters
    # shifted along axis 1 instead (1 mm steps): distances [0,0,0,0,1,1,1,1] -> flips between 0.9 and 1.1 mm
    right = square((9, 9), slice(2, 5), slice(3, 6))
    assert bf1(right, gt, SPACING_2D, 0.9) == pytest.approx(4 / 8)
    assert bf1(right, gt, SPACING_2D, 1.1) == 1.0
    # a tolerance equal to a step that is inexact in binary still counts it (6 * 1.1 - 5 * 1.1 != 1.1 in float64)
    far = square((9, 9), slice(2, 5), slice(5, 8))
    assert bf1(np.roll(far, 1, axis=1), far, (2.0, 1.1), 1.1) == 1.0
    result = binary_metrics(torch.as_tensor(down), torch.as_tensor(gt), SPACING_2D)
    # 9 and 9 voxels, 6 shared: IoU 6 / 12, Dice 12 / 18; the default tolerance (2 mm) reaches every offset
    assert (result.iou, result.dice, result.bf1) == (pytest.approx(0.5), pytest.approx(2 / 3), 1.0)
    assert result.bf1_tolerance_mm == DEFAULT_BF1_TOLERANCE_MM == 2.0


def test_boundary_f1_by_hand_precision_differs_from_recall():
    gt = square((9, 9), slice(2, 7), slice(2, 7))  # 5x5: 16 surface voxels
    pred = square((9, 9), slice(3, 6), slice(3, 6))  # the centred 3x3: 8 surface voxels
    # pred -> gt: 6 voxels are 1 mm (axis 1) from a gt side column, (3, 4) and (5, 4) are 2 mm: [1]*6 + [2]*2.
    # gt -> pred: the 6 side-column voxels of rows 3-5 are 1 mm away, the 6 non-corner voxels of rows 2 and 6 are
    # 2 mm, the 4 corners sqrt(2^2 + 1^2) = 2.236 mm.
    # 1.5 mm: P = 6/8, R = 6/16 -> 2 * 0.75 * 0.375 / 1.125 = 0.5
    assert bf1(pred, gt, SPACING_2D, 1.5) == pytest.approx(0.5)
    # 2.1 mm: P = 1, R = 12/16 -> 2 * 0.75 / 1.75 = 6/7; 2.3 mm: P = R = 1
    assert bf1(pred, gt, SPACING_2D, 2.1) == pytest.approx(6 / 7)
    assert bf1(pred, gt, SPACING_2D, 2.3) == 1.0
    assert bf1(gt, pred, SPACING_2D, 1.5) == pytest.approx(0.5)  # F1 is symmetric in P and R
    # 0.5 mm: no surface voxel of either mask is within reach: P + R = 0 -> BF1 0
    assert bf1(pred, gt, SPACING_2D, 0.5) == 0.0


def test_boundary_f1_by_hand_3d_cube_shifted_one_slice():
    gt = np.zeros((7, 7, 7), dtype=bool)
    gt[2:5, 2:5, 1:4] = True  # 3x3x3: 26 surface voxels, the centre is interior
    pred = np.roll(gt, 1, axis=2)  # one 5 mm slice up
    # pred -> gt: the 16 ring voxels of slices 2-3 lie on the gt surface (0); the pred bottom-face centre (3, 3, 2)
    # is the gt centre, 1.75 mm from (2, 3, 2); the 9 voxels of the new top slice 4 are 5 mm from slice 3.
    # gt -> pred mirrors it. So within 2 mm: P = R = 17/26; within 1 mm: 16/26; within 5.1 mm: everything.
    assert bf1(pred, gt, ACDC_SPACING, 2.0) == pytest.approx(17 / 26)
    assert bf1(pred, gt, ACDC_SPACING, 1.0) == pytest.approx(16 / 26)
    assert bf1(pred, gt, ACDC_SPACING, 4.9) == pytest.approx(17 / 26)
    assert bf1(pred, gt, ACDC_SPACING, 5.1) == 1.0
    # IoU: 2 of 3 slices shared -> 18 / 36
    assert binary_metrics(torch.as_tensor(pred), torch.as_tensor(gt), ACDC_SPACING).iou == pytest.approx(0.5)


@pytest.mark.parametrize(
    ("shape", "spacing", "seed"),
    [((40, 36, 10), ACDC_SPACING, 0), ((40, 36, 10), (0.8, 1.1, 3.3), 1), ((64, 48), (0.7, 1.9), 2)],
)
def test_boundary_f1_and_iou_match_independent_scipy_values_on_random_blobs(shape, spacing, seed):
    pred, gt = blob_pair(shape, seed)
    for tolerance in (2.0, 4.0):
        rows = case_metrics(pred, gt, num_classes=3, spacing=spacing, bf1_tolerance_mm=tolerance)
        for row in rows:
            p, g = pred == row["class_index"], gt == row["class_index"]
            assert row["status"] == OK and row["bf1_tolerance_mm"] == tolerance
            expected = scipy_bf1(p, g, spacing, tolerance)
            assert 0 < expected < 1  # a real test: neither trivial bound
            assert row["bf1"] == pytest.approx(expected, rel=1e-6)
            assert row["iou"] == pytest.approx((p & g).sum() / (p | g).sum(), rel=1e-6)


def test_empty_masks_iou_and_bf1():
    pred, gt = empty_mask_pair()  # class 2 only predicted, 3 only in the ground truth, 4 in neither
    rows = {r["class_index"]: r for r in case_metrics(pred, gt, num_classes=5, spacing=ACDC_SPACING)}
    assert rows[1]["status"] == OK and rows[1]["iou"] == pytest.approx(4 / 6)
    assert (rows[2]["status"], rows[2]["iou"], rows[2]["bf1"]) == (GT_EMPTY, 0.0, 0.0)
    assert (rows[3]["status"], rows[3]["iou"], rows[3]["bf1"]) == (PRED_EMPTY, 0.0, 0.0)
    assert rows[4]["status"] == BOTH_EMPTY and math.isnan(rows[4]["iou"]) and math.isnan(rows[4]["bf1"])
    assert all(r["bf1_tolerance_mm"] == DEFAULT_BF1_TOLERANCE_MM for r in rows.values())


def test_tolerance_is_honoured_by_case_metrics_and_the_report(tmp_path):
    gt = np.zeros((7, 7, 7), dtype=np.int64)
    gt[2:5, 2:5, 1:4] = 1
    gt[0:2, 5:7, 5] = 2  # class 2 is missed in case "m": BF1 0, counted in the mean
    pred = np.roll(np.where(gt == 1, 1, 0), 1, axis=2)
    assert case_metrics(pred, gt, 3, ACDC_SPACING)[0]["bf1"] == pytest.approx(17 / 26)  # default 2 mm
    assert case_metrics(pred, gt, 3, ACDC_SPACING, bf1_tolerance_mm=5.1)[0]["bf1"] == 1.0
    for bad in (-1.0, math.nan, math.inf):
        with pytest.raises(ValueError, match="bf1_tolerance_mm"):
            case_metrics(pred, gt, 3, ACDC_SPACING, bf1_tolerance_mm=bad)

    report = SegmentationReport(tmp_path, 3, ["background", "cube", "tab"], overlay_dir=None, bf1_tolerance_mm=5.1)
    report.add_case("m", pred, gt, spacing=ACDC_SPACING)
    report.add_case("same", gt, gt, spacing=ACDC_SPACING)
    cases, summary = report.write()
    on_disk = pd.read_csv(tmp_path / "metrics_per_case.csv")
    assert list(on_disk.columns) == CASE_COLUMNS and {"iou", "bf1", "bf1_tolerance_mm"} <= set(CASE_COLUMNS)
    assert (on_disk["bf1_tolerance_mm"] == 5.1).all()
    assert on_disk[["class_name", "iou", "bf1"]].values.tolist() == [
        ["cube", 0.5, 1.0],
        ["tab", 0.0, 0.0],
        ["cube", 1.0, 1.0],
        ["tab", 1.0, 1.0],
    ]
    summary_disk = pd.read_csv(tmp_path / "metrics_summary.csv")
    assert list(summary_disk.columns) == SUMMARY_COLUMNS
    assert SUMMARY_COLUMNS[2:10] == [f"{m}_{s}" for m in ("dice", "hd95_mm", "iou", "bf1") for s in ("mean", "std")]
    pd.testing.assert_frame_equal(summary_disk, summary, check_dtype=False)
    cube, tab, overall = (summary.iloc[i] for i in range(3))
    assert (cube["iou_mean"], cube["iou_std"]) == (pytest.approx(0.75), pytest.approx(np.std([0.5, 1.0], ddof=1)))
    assert (cube["bf1_mean"], tab["bf1_mean"]) == (1.0, pytest.approx(0.5))
    assert overall["bf1_mean"] == pytest.approx(3 / 4) and overall["iou_mean"] == pytest.approx(2.5 / 4)

    default = SegmentationReport(tmp_path / "default", 3, overlay_dir=None)
    assert default.add_case("m", pred, gt, spacing=ACDC_SPACING)[0]["bf1"] == pytest.approx(17 / 26)


def test_summary_of_a_table_without_iou_or_bf1_reports_them_as_nan():
    cases = pd.DataFrame(
        [("a", 1, "x", 0.5, 3.0, OK), ("b", 1, "x", 0.7, 1.0, OK)],
        columns=["case_id", "class_index", "class_name", "dice", "hd95_mm", "status"],
    )
    summary = summarize_metrics(cases)
    assert summary["dice_mean"].tolist() == pytest.approx([0.6, 0.6])
    assert summary[["iou_mean", "iou_std", "bf1_mean", "bf1_std"]].isna().all().all()


def _one_hot_pair(pred: np.ndarray, gt: np.ndarray, spacing) -> tuple[MetaTensor, MetaTensor]:
    """Batched one-hot MetaTensors (1, 2, *spatial) of two binary masks, with a diagonal affine."""
    affine = torch.diag(torch.tensor([*spacing, 1.0], dtype=torch.float64))
    as_onehot = [one_hot(torch.as_tensor(m, dtype=torch.long)[None, None], num_classes=2) for m in (pred, gt)]
    return MetaTensor(as_onehot[0], affine=affine), MetaTensor(as_onehot[1], affine=affine)


def test_ignite_metric_computes_iou_and_bf1_with_its_tolerance():
    gt = np.zeros((7, 7, 7), dtype=bool)
    gt[2:5, 2:5, 1:4] = True
    y_pred, y = _one_hot_pair(np.roll(gt, 1, axis=2), gt, ACDC_SPACING)
    assert MillimetreSegmentationMetric("iou")(y_pred, y)[0, 0].item() == pytest.approx(0.5)
    assert MillimetreSegmentationMetric("bf1")(y_pred, y)[0, 0].item() == pytest.approx(17 / 26)
    assert MillimetreSegmentationMetric("bf1", bf1_tolerance_mm=5.1)(y_pred, y)[0, 0].item() == 1.0
    with pytest.raises(ValueError, match="metric must be one of"):
        MillimetreSegmentationMetric("jaccard")
    with pytest.raises(ValueError, match="bf1_tolerance_mm"):
        MillimetreSegmentationMetric("bf1", bf1_tolerance_mm=-2.0)
