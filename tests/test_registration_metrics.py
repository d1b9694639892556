"""Similarity and segmentation metrics of registration/ (numpy/scipy), checked by hand and against MONAI."""

import numpy as np
import pytest
from scipy.ndimage import binary_dilation, gaussian_filter

from registration.metrics import dice, hd95, mutual_information, normalise_intensity, rmse, segmentation_scores


def test_rmse_by_hand():
    assert rmse(np.array([1.0, 2.0, 3.0]), np.array([1.0, 0.0, 3.0])) == pytest.approx(np.sqrt(4 / 3))
    assert rmse(np.array([1.0, 2.0]), np.array([3.0, 2.0]), mask=np.array([False, True])) == 0.0


def test_mutual_information_by_hand():
    a = np.repeat([0.0, 1.0], 500)  # two equally likely values: MI(a, a) = H(a) = ln 2
    assert mutual_information(a, a, bins=8) == pytest.approx(np.log(2))
    assert mutual_information(a, 1.0 - a, bins=8) == pytest.approx(np.log(2))  # any bijection keeps MI
    b = np.tile([0.0, 1.0], 500)  # independent of a: MI 0
    assert mutual_information(a, b, bins=8) == pytest.approx(0.0, abs=1e-12)
    # four equally likely values -> ln 4
    c = np.repeat([0.0, 1.0, 2.0, 3.0], 100)
    assert mutual_information(c, c, bins=4) == pytest.approx(np.log(4))


def test_normalise_intensity_uses_reference_percentiles():
    ref = np.linspace(0, 100, 1001)
    out = normalise_intensity(np.array([1.0, 99.0]), ref)
    np.testing.assert_allclose(out, [0.0, 1.0], atol=1e-6)


def test_dice_and_hd95_by_hand():
    pred = np.zeros((10, 10, 10), bool)
    gt = np.zeros_like(pred)
    pred[2, 2, 2] = True
    gt[5, 2, 2] = True
    assert dice(pred, gt) == 0.0
    assert hd95(pred, gt, (2.0, 1.0, 1.0)) == pytest.approx(6.0)  # 3 voxels along x at 2 mm
    pred[5, 2, 2] = True
    assert dice(pred, gt) == pytest.approx(2 / 3)
    assert np.isnan(dice(np.zeros(3, bool), np.zeros(3, bool)))


def test_hd95_matches_monai():
    torch = pytest.importorskip("torch")
    from monai.metrics import compute_hausdorff_distance

    rng = np.random.default_rng(0)
    spacing = (1.5, 0.8, 4.0)
    for seed in range(3):
        blob = gaussian_filter(rng.random((30, 26, 12)), 3) > 0.5
        other = binary_dilation(np.roll(blob, seed + 1, axis=0), iterations=seed + 1)
        ref = compute_hausdorff_distance(
            torch.tensor(other[None, None]),
            torch.tensor(blob[None, None]),
            include_background=True,
            percentile=95,
            spacing=spacing,
        )
        assert hd95(other, blob, spacing) == pytest.approx(float(ref), rel=1e-5)


def test_segmentation_scores_empty_masks():
    gt = np.zeros((4, 5, 6), np.uint8)
    gt[1:3, 1:3, 1:3] = 1
    gt[0, 0, 0] = 3
    pred = gt.copy()
    pred[0, 0, 0] = 0  # class 3 missing in pred
    rows = {r["class"]: r for r in segmentation_scores(pred, gt, (1.0, 2.0, 3.0), {0: "bg", 1: "a", 2: "b", 3: "c"})}
    assert 0 not in rows
    assert rows[1]["status"] == "ok" and rows[1]["dice"] == 1.0 and rows[1]["hd95_mm"] == 0.0
    assert rows[2]["status"] == "both_empty" and np.isnan(rows[2]["dice"]) and np.isnan(rows[2]["hd95_mm"])
    diagonal = np.sqrt(3**2 + 8**2 + 15**2)
    assert rows[3] == {
        "class": 3,
        "class_name": "c",
        "dice": 0.0,
        "hd95_mm": pytest.approx(diagonal),
        "status": "pred_empty",
    }
    with pytest.raises(ValueError, match="shape"):
        segmentation_scores(pred[:2], gt, (1, 1, 1), [1])
