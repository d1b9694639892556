"""Locally weighted voting (registration.fusion), checked by hand."""

import numpy as np
import pytest

from registration.fusion import EPS, Fusion, vote


def test_each_atlas_decides_where_its_image_matches_the_target():
    """Atlas 0 matches the target on the left half, atlas 1 on the right: the fused label takes each atlas's
    label where it matches, and the probabilities are the normalised inverse-distance weights."""
    target = np.zeros((8, 4, 3), np.float32)
    target[:4] = 1.0
    left_ok = target.copy()
    left_ok[4:] = 0.5  # wrong on the right by 0.5
    right_ok = target.copy()
    right_ok[:4] = 0.0  # wrong on the left by 1.0
    labels = [np.full(target.shape, 1, np.int16), np.full(target.shape, 2, np.int16)]
    fused, probs = vote(target, [left_ok, right_ok], labels, 3, (1e-3, 1e-3, 1e-3), power=2.0)
    assert (fused[:4] == 1).all() and (fused[4:] == 2).all()
    w_match, w_left_wrong, w_right_wrong = EPS**-2, (1.0 + EPS) ** -2, (0.25 + EPS) ** -2
    np.testing.assert_allclose(probs[1, 0, 0, 0], w_match / (w_match + w_left_wrong), rtol=1e-5)
    np.testing.assert_allclose(probs[2, 7, 0, 0], w_match / (w_match + w_right_wrong), rtol=1e-5)
    np.testing.assert_allclose(probs.sum(0), 1.0, rtol=1e-6)
    assert (probs[0] == 0).all()  # no atlas votes background


def test_power_zero_is_majority_voting():
    rng = np.random.default_rng(0)
    target = rng.random((5, 5, 5)).astype(np.float32)
    images = [rng.random((5, 5, 5)).astype(np.float32) for _ in range(3)]
    labels = [rng.integers(0, 3, (5, 5, 5)) for _ in range(3)]
    _, probs = vote(target, images, labels, 3, (1.0, 1.0, 1.0), power=0.0)
    counts = np.stack([sum((lab == c) for lab in labels) for c in range(3)]) / 3.0
    np.testing.assert_allclose(probs, counts, rtol=1e-6)


def test_window_follows_the_smallest_spacing_and_bad_input_is_refused():
    assert Fusion().sigma_voxels((1.75, 1.75, 5.0)) == pytest.approx((1.0, 1.0, 0.35))
    assert Fusion(sigma_mm=3.5).sigma_voxels((1.75, 1.75, 5.0)) == pytest.approx((2.0, 2.0, 0.7))
    with pytest.raises(ValueError, match="sigma_mm"):
        Fusion(sigma_mm=0)
    target = np.zeros((2, 2, 2), np.float32)
    with pytest.raises(ValueError, match="outside the classes 0..1"):
        vote(target, [target], [np.full((2, 2, 2), 5)], 2, (1, 1, 1))
    with pytest.raises(ValueError, match="one label per atlas"):
        vote(target, [target, target], [np.zeros((2, 2, 2))], 2, (1, 1, 1))
