"""Contrastive pretraining branch: NT-Xent values by hand and exact view alignment."""

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from monai_ssl.losses.infonce import InfoNCETerm
from monai_ssl.losses.schedules import WarmupWeight
from monai_ssl.losses.terms import StepContext, bind_terms


class Equivariant(nn.Module):
    """Pointwise features, a stride-4 average pool and its global pool: equivariant to flips and rot90."""

    feature_channels = (3, 3)
    feature_strides = (4, 1)

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 1)

    def forward_features(self, x):
        f = torch.tanh(self.conv(x))
        return f[:, :2], [F.avg_pool2d(f, 4), f]

    def forward(self, x):
        return self.forward_features(x)[0]


def np_ntxent(a, b, tau):
    """NT-Xent by hand: pair i of a with row i of b; every other row of either is a negative."""
    z = np.concatenate([a, b])
    z = z / np.linalg.norm(z, axis=1, keepdims=True)
    s = np.exp(z @ z.T / tau)
    n = len(a)
    pos = np.concatenate([np.diag(s, n), np.diag(s, -n)])
    return float(np.mean(-np.log(pos / (s.sum(1) - np.diag(s)))))


def test_infonce_matches_hand_ntxent_when_views_align():
    torch.manual_seed(0)
    net = Equivariant()
    term = InfoNCETerm(pixels=10_000, hidden=8, out=5, strength=0.0, temperature=0.5)
    bind_terms([term], [net])
    x = torch.randn(4, 1, 8, 8)
    _, feats = net.forward_features(x)
    ctx = StepContext(
        iteration=0,
        max_iterations=1,
        labeled={"image": x[:2]},
        unlabeled={"image": x[2:]},
        logits_l=[x[:2]],
        logits_u=[x[2:]],
        features_l=[[f[:2] for f in feats]],
        features_u=[[f[2:] for f in feats]],
        networks=[net],
    )
    with torch.no_grad():
        g = term.global_head(feats[0].mean(dim=(2, 3))).numpy()
        z = term.local_head(feats[0], student=0).movedim(1, -1).reshape(-1, 5).numpy()
        # the flip/rot90 views give the same features at the mapped-back positions: positives are identical
        expected = np_ntxent(g, g, 0.5) + np_ntxent(z, z, 0.5)
        assert term(ctx).item() == pytest.approx(expected, rel=1e-4)


def test_infonce_rejects_sizes_that_do_not_map_pixels_onto_pixels():
    net = Equivariant()
    term = InfoNCETerm(hidden=4, out=2)
    bind_terms([term], [net])
    x = torch.randn(2, 1, 10, 10)
    _, feats = net.forward_features(x)
    ctx = StepContext(0, 1, {"image": x}, None, [x], [x[:0]], [feats], None, [net])
    with pytest.raises(ValueError, match="not a multiple of 4"):
        term(ctx)


def test_warmup_weight():
    w = WarmupWeight(0.5, warmup_iterations=3)
    assert [w(i, 10) for i in range(5)] == [0.5, 0.5, 0.5, 0.0, 0.0]
    assert WarmupWeight(1.0)(19, 100) == 1.0 and WarmupWeight(1.0)(20, 100) == 0.0
