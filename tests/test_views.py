"""Views of a batch (monai_ssl.data.views): exact flip/rotate inverses, reproducible strong intensity changes."""

import pytest
import torch

from monai_ssl.data.views import FlipRotate, StrongIntensity, strong_intensity


@pytest.mark.parametrize("k, flip", [(1, False), (2, True), (3, True), (0, True)])
def test_flip_rotate_maps_pixels_back_exactly(k, flip):
    x = torch.zeros(1, 1, 4, 4)
    x[0, 0, 0, 1] = 1.0  # one marked pixel at row 0, column 1
    view = FlipRotate([k], [flip])
    y = view.apply(x)
    # by hand: rot90 (counter-clockwise in (row, col)) sends (r, c) -> (n-1-c, r); the flip sends c -> n-1-c
    r, c = 0, 1
    for _ in range(k):
        r, c = 3 - c, r
    if flip:
        c = 3 - c
    assert y[0, 0, r, c] == 1.0 and y.sum() == 1.0
    assert torch.equal(view.invert(y), x)


def test_flip_rotate_non_square_uses_even_rotations_only():
    x = torch.arange(2 * 1 * 3 * 5, dtype=torch.float).view(2, 1, 3, 5)
    view = FlipRotate.for_batch(x, torch.Generator().manual_seed(0))
    assert all(k % 2 == 0 for k in view.k)
    assert torch.equal(view.invert(view.apply(x)), x)
    with pytest.raises(ValueError, match="square"):
        FlipRotate([1, 0], [False, False]).apply(x)


def test_strong_intensity_changes_values_but_is_reproducible():
    x = torch.rand(3, 1, 8, 8)
    a, b = strong_intensity(1.0, seed=3)(x), strong_intensity(1.0, seed=3)(x)
    assert torch.equal(a, b) and not torch.equal(a, x) and a.shape == x.shape
    assert torch.equal(strong_intensity(0.0)(x), x)
    holes = StrongIntensity(contrast=None, scale=0, shift=0, noise_std=0, cutout=1, cutout_size=0.5, prob=1.0)(x)
    assert ((holes == 0).float().sum(dim=(1, 2, 3)) >= 16).all()  # a 4x4 hole per sample
