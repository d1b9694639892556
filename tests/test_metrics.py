"""Segmentation metrics in mm and evaluation reports, checked against hand and independent scipy values."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pandas as pd
import pytest
import torch
from ignite.engine import Engine
from matplotlib.image import imread
from monai.data import MetaTensor, list_data_collate
from monai.handlers import HausdorffDistance, IgniteMetricHandler, from_engine
from monai.metrics import DiceMetric
from monai.networks.utils import one_hot
from scipy import ndimage

from monai_ssl.metrics import (
    BOTH_EMPTY,
    CASE_COLUMNS,
    GT_EMPTY,
    OK,
    PRED_EMPTY,
    MillimetreSegmentationMetric,
    SegmentationReport,
    case_metrics,
    diagonal_mm,
    foreground_slices,
    labels_from_channels,
)
from monai_ssl.metrics.report import SUMMARY_COLUMNS

ACDC_SPACING = (1.75, 1.75, 5.0)

# Tiny 2D pair whose metrics are worked out by hand in the tests below.
PRED_2D = np.array([[0, 1, 1, 0], [0, 1, 2, 2], [0, 0, 2, 0]])
GT_2D = np.array([[0, 1, 0, 0], [1, 1, 2, 2], [0, 0, 2, 2]])


def scipy_surface_distances(a: np.ndarray, b: np.ndarray, spacing) -> tuple[np.ndarray, np.ndarray]:
    """Independent surface distances (a -> b, b -> a) in mm: surfaces by cross erosion, scipy distance transforms."""
    cross = ndimage.generate_binary_structure(a.ndim, 1)
    surf_a = a & ~ndimage.binary_erosion(a, structure=cross, border_value=0)
    surf_b = b & ~ndimage.binary_erosion(b, structure=cross, border_value=0)
    a_to_b = ndimage.distance_transform_edt(~surf_b, sampling=spacing)[surf_a]
    b_to_a = ndimage.distance_transform_edt(~surf_a, sampling=spacing)[surf_b]
    return a_to_b, b_to_a


def scipy_hd95(a: np.ndarray, b: np.ndarray, spacing) -> float:
    """Independent HD95: the max of the two 95th percentiles of :func:`scipy_surface_distances`."""
    return max(np.percentile(d, 95) for d in scipy_surface_distances(a, b, spacing))


def blob_pair(shape, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Ground truth and a perturbed prediction with classes 1 and 2 from thresholded smooth noise."""
    rng = np.random.default_rng(seed)
    sigma = [3.0] * (len(shape) - 1) + [1.0]
    field = ndimage.gaussian_filter(rng.normal(size=shape), sigma)
    noise = ndimage.gaussian_filter(rng.normal(size=shape), sigma)
    levels = [np.quantile(field, 0.5), np.quantile(field, 0.8)]
    return np.digitize(field + 0.5 * noise, levels), np.digitize(field, levels)


def test_dice_by_hand_on_tiny_array():
    rows = case_metrics(PRED_2D, GT_2D, num_classes=3, spacing=(3.0, 2.0), include_background=True)
    dice = {r["class_index"]: r["dice"] for r in rows}
    # background: pred 6 voxels, gt 5, overlap 4; class 1: 3, 3, overlap 2; class 2: 3, 4, overlap 3
    assert dice[0] == pytest.approx(8 / 11, rel=1e-6)
    assert dice[1] == pytest.approx(4 / 6, rel=1e-6)
    assert dice[2] == pytest.approx(6 / 7, rel=1e-6)
    assert [(r["pred_voxels"], r["gt_voxels"], r["status"]) for r in rows] == [(6, 5, OK), (3, 3, OK), (3, 4, OK)]


def test_hd95_by_hand_uses_spacing_per_axis_and_linear_percentile():
    rows = case_metrics(PRED_2D, GT_2D, num_classes=3, spacing=(3.0, 2.0))
    hd = {r["class_index"]: r["hd95_mm"] for r in rows}
    # class 2: gt->pred distances [0, 0, 0, 2] (a 2 mm step along axis 1) -> q95 = 0.85 * 2; pred->gt all 0
    assert hd[2] == pytest.approx(1.7, rel=1e-6)
    # class 1: both directions [0, 0, 2] -> q95 at position 1.9 = 0.9 * 2
    assert hd[1] == pytest.approx(1.8, rel=1e-6)
    assert [r["class_index"] for r in rows] == [1, 2]  # background excluded by default


@pytest.mark.parametrize(
    ("shape", "spacing", "seed"),
    [((40, 36, 10), ACDC_SPACING, 0), ((40, 36, 10), (0.8, 1.1, 3.3), 1), ((64, 48), (0.7, 1.9), 2)],
)
def test_hd95_matches_scipy_distance_transforms(shape, spacing, seed):
    pred, gt = blob_pair(shape, seed)
    rows = case_metrics(torch.as_tensor(pred), gt, num_classes=3, spacing=spacing, case_id=f"blob{seed}")
    for row in rows:
        p, g = pred == row["class_index"], gt == row["class_index"]
        assert row["status"] == OK and row["pred_voxels"] == p.sum() and row["gt_voxels"] == g.sum()
        expected = scipy_hd95(p, g, spacing)
        assert row["hd95_mm"] == pytest.approx(expected, rel=1e-4)
        assert row["hd95_mm"] != pytest.approx(scipy_hd95(p, g, [1.0] * len(shape)), rel=1e-3)  # voxels differ
        assert row["dice"] == pytest.approx(2 * (p & g).sum() / (p.sum() + g.sum()), rel=1e-5)
        assert row["case_id"] == f"blob{seed}"


def empty_mask_pair() -> tuple[np.ndarray, np.ndarray]:
    """(pred, gt) of 5 classes: class 1 in both (6 and 4 voxels, 4 shared), 2 only predicted, 3 only in gt, 4 absent."""
    gt = np.zeros((4, 5, 3), dtype=np.int64)
    pred = np.zeros_like(gt)
    gt[1:3, 1:3, 1] = 1
    pred[1:3, 1:4, 1] = 1
    pred[0, 0, 0] = 2  # class 2: false positive only
    gt[3, 4, 2] = 3  # class 3: missed
    return pred, gt


def test_empty_mask_policy_never_reports_a_perfect_zero():
    pred, gt = empty_mask_pair()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rows = case_metrics(pred, gt, num_classes=5, spacing=ACDC_SPACING, class_names=["bg", "a", "b", "c", "d"])
    assert not [w for w in caught if "all 0" in str(w.message)]  # MONAI never sees an empty mask
    by_class = {r["class_name"]: r for r in rows}
    diagonal = math.sqrt((3 * 1.75) ** 2 + (4 * 1.75) ** 2 + (2 * 5.0) ** 2)
    assert diagonal_mm(gt.shape, ACDC_SPACING) == pytest.approx(diagonal)
    assert by_class["a"]["status"] == OK and by_class["a"]["dice"] == pytest.approx(8 / 10)
    assert by_class["b"]["status"] == GT_EMPTY
    assert (by_class["b"]["dice"], by_class["b"]["hd95_mm"]) == (0.0, pytest.approx(diagonal))
    assert (by_class["b"]["pred_voxels"], by_class["b"]["gt_voxels"]) == (1, 0)
    assert by_class["c"]["status"] == PRED_EMPTY
    assert (by_class["c"]["dice"], by_class["c"]["hd95_mm"]) == (0.0, pytest.approx(diagonal))
    assert (by_class["c"]["pred_voxels"], by_class["c"]["gt_voxels"]) == (0, 1)
    assert by_class["d"]["status"] == BOTH_EMPTY
    assert math.isnan(by_class["d"]["dice"]) and math.isnan(by_class["d"]["hd95_mm"])


def test_probabilities_go_through_labels_from_channels():
    probs = one_hot(torch.as_tensor(PRED_2D)[None, None], num_classes=3)[0] * 0.6 + 0.1
    rows = case_metrics(labels_from_channels(probs), GT_2D, num_classes=3, spacing=(3.0, 2.0))
    assert [r["dice"] for r in rows] == pytest.approx([4 / 6, 6 / 7], rel=1e-6)
    with pytest.raises(ValueError, match="labels_from_channels"):
        case_metrics(probs[1], GT_2D, num_classes=3, spacing=(3.0, 2.0))


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match=r"case 'x': prediction shape \(3, 3\) differs"):
        case_metrics(PRED_2D[:, :3], GT_2D[:2], 3, (1.0, 1.0), case_id="x")
    with pytest.raises(ValueError, match=r"ground truth has labels \[5\] outside \[0, 2\]"):
        case_metrics(PRED_2D, np.where(GT_2D == 2, 5, GT_2D), 3, (1.0, 1.0))
    with pytest.raises(ValueError, match=r"shape \(3, 4\), which does not match 4 spatial dimensions"):
        case_metrics(PRED_2D, GT_2D, 3, (1.0, 1.0, 1.0, 1.0))
    with pytest.raises(ValueError, match="must be positive and finite"):
        case_metrics(PRED_2D, GT_2D, 3, (1.0, 0.0))
    with pytest.raises(ValueError, match="no spacing given"):
        case_metrics(PRED_2D, GT_2D, 3)


def test_case_metrics_reads_spacing_from_metatensor_affine():
    pred, gt = blob_pair((24, 20, 6), 3)
    affine = torch.diag(torch.tensor([*ACDC_SPACING, 1.0], dtype=torch.float64))
    from_meta = case_metrics(pred, MetaTensor(torch.as_tensor(gt)[None], affine=affine), num_classes=3)
    explicit = case_metrics(pred, gt, num_classes=3, spacing=ACDC_SPACING)
    assert pd.DataFrame(from_meta).equals(pd.DataFrame(explicit))


def _report_cases() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Case a: class 2 absent everywhere (both_empty); case b: class 2 present in both."""
    gt_a = np.zeros((12, 10, 4), dtype=np.int64)
    gt_a[2:6, 2:6, 1:3] = 1
    pred_a = np.zeros_like(gt_a)
    pred_a[3:6, 2:6, 1:3] = 1
    gt_b, pred_b = gt_a.copy(), pred_a.copy()
    gt_b[8:11, 6:9, 2] = 2
    pred_b[8:10, 6:9, 2] = 2
    return {"a": (pred_a, gt_a), "b": (pred_b, gt_b)}


def test_report_csvs_exclude_both_empty_from_means(tmp_path):
    report = SegmentationReport(tmp_path / "eval", 3, {"0": "background", "1": "lv", "2": "rv"}, overlay_dir=None)
    rows = {cid: report.add_case(cid, pred, gt, spacing=ACDC_SPACING) for cid, (pred, gt) in _report_cases().items()}
    cases, summary = report.write()
    with pytest.raises(ValueError, match="already added"):
        report.add_case("a", *_report_cases()["a"], spacing=ACDC_SPACING)

    on_disk = pd.read_csv(tmp_path / "eval" / "metrics_per_case.csv", dtype={"case_id": str})
    assert list(on_disk.columns) == CASE_COLUMNS
    assert on_disk[["case_id", "class_name", "status"]].values.tolist() == [
        ["a", "lv", OK],
        ["a", "rv", BOTH_EMPTY],
        ["b", "lv", OK],
        ["b", "rv", OK],
    ]
    pd.testing.assert_frame_equal(on_disk, cases, check_dtype=False)
    assert rows["a"][0]["dice"] == pytest.approx(2 * 24 / (32 + 24), rel=1e-6)

    summary_disk = pd.read_csv(tmp_path / "eval" / "metrics_summary.csv")
    assert list(summary_disk.columns) == SUMMARY_COLUMNS
    pd.testing.assert_frame_equal(summary_disk, summary, check_dtype=False)
    lv, rv, overall = (summary.iloc[i] for i in range(3))
    lv_dice = [rows["a"][0]["dice"], rows["b"][0]["dice"]]
    assert lv["dice_mean"] == pytest.approx(np.mean(lv_dice))
    assert lv["dice_std"] == pytest.approx(np.std(lv_dice, ddof=1))
    assert (lv["n_used"], lv["n_excluded"]) == (2, 0)
    assert rv["dice_mean"] == pytest.approx(rows["b"][1]["dice"])
    assert rv["hd95_mm_mean"] == pytest.approx(rows["b"][1]["hd95_mm"])
    assert (rv["n_used"], rv["n_excluded"]) == (1, 1) and math.isnan(rv["dice_std"])
    used = [rows["a"][0], rows["b"][0], rows["b"][1]]
    assert overall["class_name"] == "overall" and pd.isna(summary_disk["class_index"].iloc[2])
    assert overall["hd95_mm_mean"] == pytest.approx(np.mean([r["hd95_mm"] for r in used]))
    assert (overall["n_used"], overall["n_excluded"]) == (3, 1)


def test_report_counts_one_sided_empty_cases_with_worst_case_distance(tmp_path):
    report = SegmentationReport(tmp_path, 3, overlay_dir=None)
    pred, gt = _report_cases()["b"]
    report.add_case("missed", np.where(pred == 2, 0, pred), gt, spacing=ACDC_SPACING)
    report.add_case("b", pred, gt, spacing=ACDC_SPACING)
    _, summary = report.write()
    cls2 = summary.iloc[1]
    diagonal = diagonal_mm(gt.shape, ACDC_SPACING)
    assert (cls2["n_used"], cls2["n_excluded"], cls2["n_pred_empty"], cls2["n_gt_empty"]) == (2, 0, 1, 0)
    assert cls2["hd95_mm_mean"] > diagonal / 2  # the missed structure weighs in at the full diagonal


def test_foreground_slices_pick_the_fullest_slices():
    label = np.zeros((4, 4, 6), dtype=np.int64)
    label[:2, :2, 1] = 1  # 4 voxels
    label[:, :, 4] = 2  # 16 voxels
    pred = np.zeros_like(label)
    pred[:3, :3, 2] = 1  # 9 voxels
    assert foreground_slices(label, pred, 2) == [2, 4]
    assert foreground_slices(label, pred, 5) == [1, 2, 4]  # empty slices are never chosen
    assert foreground_slices(np.zeros_like(label), pred * 0, 3) == [3]


def test_report_writes_valid_png_overlays_of_expected_size(tmp_path):
    report = SegmentationReport(tmp_path, 3, overlay_slices=2, panel_inches=1.0, dpi=60)
    pred, gt = _report_cases()["b"]
    image = np.random.default_rng(0).normal(size=gt.shape).astype(np.float32)
    report.add_case("case/b", pred, gt, spacing=ACDC_SPACING, image=image[None])
    path = report.overlay_path("case/b")
    assert path == tmp_path / "overlays" / "case_b.png"
    png = imread(path)
    assert png.shape == (2 * 60, 3 * 60, 4)  # two slices with foreground (z=1, z=2), three panels
    assert png[..., :3].std() > 0.05
    report.add_case("flat", pred[..., 2], gt[..., 2], spacing=ACDC_SPACING[:2])  # 2D, no image: one row
    assert imread(report.overlay_path("flat")).shape == (60, 180, 4)
    assert not list(tmp_path.glob("**/.tmp-*"))


def _single_voxel_pair(shape, spacing, dz: int) -> tuple[MetaTensor, MetaTensor]:
    """One-hot (2, *shape) MetaTensors: a single voxel, and the same voxel ``dz`` steps along the last axis."""
    gt, pred = torch.zeros(2, *shape), torch.zeros(2, *shape)
    centre = tuple(s // 2 for s in shape[:-1])
    gt[(1, *centre, 1)] = 1
    pred[(1, *centre, 1 + dz)] = 1
    gt[0], pred[0] = 1 - gt[1], 1 - pred[1]
    affine = torch.diag(torch.tensor([*spacing, 1.0], dtype=torch.float64))
    return MetaTensor(pred, affine=affine), MetaTensor(gt, affine=affine)


def test_ignite_metric_reports_millimetres_from_affine_where_monai_handler_reports_voxels():
    items = [_single_voxel_pair((6, 6, 5), ACDC_SPACING, 2), _single_voxel_pair((6, 6, 5), (1.0, 1.0, 2.5), 2)]
    engine = Engine(lambda e, batch: batch)
    IgniteMetricHandler(MillimetreSegmentationMetric("hd95"), output_transform=from_engine(["pred", "label"])).attach(
        engine, "hd95_mm"
    )
    IgniteMetricHandler(MillimetreSegmentationMetric("dice"), output_transform=from_engine(["pred", "label"])).attach(
        engine, "dice"
    )
    voxel_handler = HausdorffDistance(percentile=95, output_transform=from_engine(["pred", "label"]))
    voxel_handler.attach(engine, "hd95_voxels")
    batch = {"pred": [p for p, _ in items], "label": [g for _, g in items]}  # decollated, as MONAI evaluators do
    engine.run([batch], max_epochs=1)
    assert engine.state.metrics["hd95_mm"] == pytest.approx((2 * 5.0 + 2 * 2.5) / 2)
    assert engine.state.metrics["hd95_voxels"] == pytest.approx(2.0)
    assert engine.state.metrics["dice"] == 0.0


def test_metric_on_batched_2d_metatensor_and_empty_policy():
    pairs = [_single_voxel_pair((5, 7), (0.5, 3.0), 3), _single_voxel_pair((5, 7), (0.5, 3.0), 0)]
    y_pred = list_data_collate([{"x": p} for p, _ in pairs])["x"]
    y = list_data_collate([{"x": g} for _, g in pairs])["x"]
    assert y.affine.shape == (2, 3, 3)
    hd = MillimetreSegmentationMetric("hd95", reduction="none")
    assert hd(y_pred, y)[:, 0].tolist() == pytest.approx([9.0, 0.0])
    with pytest.raises(ValueError, match="no spacing"):
        hd(y_pred.as_tensor(), y.as_tensor())
    assert hd(y_pred.as_tensor(), y.as_tensor(), spacing=(1.0, 1.0))[:, 0].tolist() == pytest.approx([3.0, 0.0])

    false_positive = y.clone()
    false_positive[1, 1] = 0  # item 1: ground truth empty, prediction has one voxel
    false_positive[1, 0] = 1
    dice = MillimetreSegmentationMetric("dice", reduction="none")
    monai_dice = DiceMetric(include_background=False, reduction="none", ignore_empty=True)
    assert dice(y_pred, false_positive)[1, 0].item() == 0.0  # policy: a false positive scores 0...
    assert math.isnan(monai_dice(y_pred, false_positive)[1, 0].item())  # ...where MONAI would drop it
    assert hd(y_pred, false_positive)[1, 0].item() == pytest.approx(diagonal_mm((5, 7), (0.5, 3.0)))
    both_empty = MillimetreSegmentationMetric("dice", get_not_nans=True)
    empty = torch.stack([torch.ones(5, 7), torch.zeros(5, 7)])[None]
    values = both_empty(MetaTensor(empty, affine=torch.eye(3)), MetaTensor(empty, affine=torch.eye(3)))
    assert math.isnan(values[0, 0].item())
    assert both_empty.aggregate()[1].item() == 0  # both_empty is NaN and not counted by the reduction
