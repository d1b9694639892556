"""Similarity measures of registration/ (numpy), checked by hand."""

import numpy as np
import pytest

from registration.metrics import mutual_information, normalise_intensity, rmse


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
