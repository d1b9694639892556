"""Student networks: shapes, feature access, padding, training signal, export, projector, factory, init."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from monai.losses import DiceCELoss
from monai.networks.nets import SwinUNETR
from monai.networks.nets.swin_unetr import compute_mask

from monai_ssl.networks import (
    NETWORKS,
    ContrastProjector,
    CSUNet,
    FeatureSwinUNETR,
    FeatureUNet,
    SwinUNet,
    build_network,
)
from monai_ssl.networks.cs_unet import ConvWindowAttention, window_attention_mask

# tiny configurations: same code paths as the defaults (shifted windows, several levels), seconds to run
TINY = {
    "unet": {"channels": (4, 8, 16), "num_res_units": 1},
    "dual_decoder_unet": {"channels": (4, 8, 16), "num_res_units": 1},
    "swin_unet": {"embed_dim": 12, "depths": (2, 2, 2), "num_heads": (1, 2, 4), "window_size": 4},
    "cs_unet": {"embed_dim": 12, "depths": (2, 2, 2), "num_heads": (1, 2, 4), "window_size": 4},
    "swin_unetr": {"feature_size": 12, "depths": (1, 1, 1, 1), "num_heads": (1, 2, 4, 8), "window_size": 4},
}
# smallest inputs each net handles in 2D and 3D (SwinUNETR's instance-normed bottleneck needs > 1 pixel)
SHAPES = {
    (2, "unet"): (2, 1, 32, 32),
    (2, "dual_decoder_unet"): (2, 1, 32, 32),
    (2, "swin_unet"): (2, 1, 32, 32),
    (2, "cs_unet"): (2, 1, 32, 32),
    (2, "swin_unetr"): (2, 1, 64, 64),
    (3, "unet"): (1, 1, 32, 32, 32),
    (3, "dual_decoder_unet"): (1, 1, 32, 32, 32),
    (3, "swin_unet"): (1, 1, 32, 32, 32),
    (3, "cs_unet"): (1, 1, 32, 32, 32),
    (3, "swin_unetr"): (1, 1, 32, 32, 64),
}
# torch 2.13 flags torch.jit as deprecated (it still traces and scripts; MONAI's export uses it), and tracing
# MONAI's Swin BasicLayer feeds traced sizes to np.ceil, which numpy 2 warns about
export_warnings = pytest.mark.filterwarnings(
    "ignore::torch.jit.TracerWarning", "ignore:`torch.jit.*deprecated", "ignore:__array_wrap__"
)


def tiny(name: str, spatial_dims: int = 2, out_channels: int = 3, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_network(name, spatial_dims, 1, out_channels, **TINY[name])


@pytest.mark.parametrize("spatial_dims,name", sorted(SHAPES))
def test_logits_and_feature_shapes(spatial_dims, name):
    net = tiny(name, spatial_dims).eval()
    shape = SHAPES[spatial_dims, name]
    x = torch.randn(shape)
    with torch.no_grad():
        logits, features = net.forward_features(x)
        plain = net(x)
    assert type(plain) is torch.Tensor and plain.shape == (shape[0], 3, *shape[2:])
    assert torch.equal(plain, logits)
    assert len(features) == len(net.feature_channels) == len(net.feature_strides) >= 3
    assert net.feature_strides[-1] == 1
    for i, (feature, channels, stride) in enumerate(
        zip(features, net.feature_channels, net.feature_strides, strict=True)
    ):
        assert feature.shape == (shape[0], channels, *(s // stride for s in shape[2:]))
        if i:  # each scale doubles the previous one's resolution
            assert net.feature_strides[i - 1] == 2 * stride
            assert all(a == 2 * b for a, b in zip(feature.shape[2:], features[i - 1].shape[2:], strict=True))


def test_default_feature_channels():
    """The documented defaults: every student exposes strides 16, 8, 4, 2, 1."""
    assert FeatureUNet().feature_channels == (256, 128, 64, 32, 16)
    assert SwinUNet().feature_channels == (192, 96, 48, 48, 48)
    assert CSUNet().feature_channels == (192, 96, 48, 48, 48)
    assert FeatureSwinUNETR(feature_size=24).feature_channels == (192, 96, 48, 24, 24)
    for cls in (FeatureUNet, SwinUNet, CSUNet, FeatureSwinUNETR):
        assert cls(spatial_dims=2).feature_strides == (16, 8, 4, 2, 1)


@pytest.mark.parametrize("name", sorted(NETWORKS))
def test_odd_sizes_are_padded_then_cropped(name):
    """A 100x120-like input: outputs equal those of the zero-padded input, cropped from the origin."""
    net = tiny(name).eval()
    h, w = (70, 45) if name == "swin_unetr" else (22, 37)
    x = torch.randn(1, 1, h, w)
    d = net.size_divisor
    padded = F.pad(x, (0, -w % d, 0, -h % d))
    assert padded.shape[2] % d == 0 and padded.shape[3] % d == 0 and padded.shape != x.shape
    with torch.no_grad():
        logits, features = net.forward_features(x)
        ref_logits, ref_features = net.forward_features(padded)
    assert logits.shape[2:] == (h, w)
    assert torch.allclose(logits, ref_logits[..., :h, :w], atol=1e-6)
    for feature, ref, stride in zip(features, ref_features, net.feature_strides, strict=True):
        hs, ws = math.ceil(h / stride), math.ceil(w / stride)
        assert feature.shape[2:] == (hs, ws)
        assert torch.allclose(feature, ref[..., :hs, :ws], atol=1e-6)


def test_wrong_input_rank_is_a_clear_error():
    with pytest.raises(ValueError, match=r"spatial_dims=2.*\(1, 1, 8, 8, 8\)"):
        tiny("unet")(torch.zeros(1, 1, 8, 8, 8))
    with pytest.raises(ValueError, match="1-pixel bottleneck"):
        tiny("swin_unetr")(torch.zeros(1, 1, 32, 32))


def test_swin_unetr_features_reuse_monai_graph():
    """Our logits are exactly MONAI's SwinUNETR.forward for a size it accepts."""
    net = tiny("swin_unetr").eval()
    x = torch.randn(1, 1, 64, 64)
    with torch.no_grad():
        assert torch.equal(net(x), SwinUNETR.forward(net, x))
    # state dict names are MONAI's, so a plain SwinUNETR loads the weights
    plain = SwinUNETR(in_channels=1, out_channels=3, spatial_dims=2, **TINY["swin_unetr"])
    plain.load_state_dict(net.state_dict())


@pytest.mark.parametrize("name", sorted(NETWORKS))
def test_loss_decreases_on_one_batch(name):
    """A few Adam steps on one fixed batch (two noisy disks) must clearly reduce Dice+CE."""
    size = SHAPES[2, name][-1]
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    disk = (((yy - 0.4 * size) ** 2 + (xx - 0.55 * size) ** 2) < (size / 4) ** 2).float()
    label = torch.stack([disk, disk.flip(-1)])[:, None]
    image = label + 0.3 * torch.randn(label.shape, generator=torch.Generator().manual_seed(0))
    net = tiny(name, out_channels=2).train()
    optimizer = torch.optim.Adam(net.parameters(), lr=3e-3)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    losses = []
    for _ in range(12):
        optimizer.zero_grad()
        loss = loss_fn(net(image), label)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses


@export_warnings
@pytest.mark.parametrize("name", sorted(NETWORKS))
def test_traced_forward_reproduces_eager_logits(name):
    net = tiny(name).eval()
    shape = SHAPES[2, name]
    traced = torch.jit.trace(net, torch.randn(shape))
    x = torch.randn(shape)  # a fresh input: the trace must not have frozen values of the example
    with torch.no_grad():
        assert torch.allclose(traced(x), net(x), atol=1e-5)


@export_warnings
def test_scripted_unet_reproduces_eager_logits_at_any_size():
    net = tiny("unet").eval()
    scripted = torch.jit.script(net)
    with torch.no_grad():
        for shape in [(2, 1, 32, 32), (1, 1, 22, 37)]:
            x = torch.randn(shape)
            assert torch.allclose(scripted(x), net(x), atol=1e-5)


def test_window_mask_hand_example():
    """Rows 0..3 (3 real, 1 padding), window 2x2, shift 1 on rows.

    Rolled row p holds original row (p + 1) % 4: rows 1, 2, 3 (padding), 0 (wrapped). The first window
    (rolled rows 0-1) is one region; in the second, padding (row 2) and the wrapped row (3) must not meet.
    """
    mask = window_attention_mask([4, 2], [3, 2], (2, 2), (1, 0), torch.device("cpu"))
    assert mask.shape == (2, 4, 4)
    assert mask[0].all()
    block = torch.tensor([[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 1], [0, 0, 1, 1]], dtype=torch.bool)
    assert torch.equal(mask[1], block)
    assert window_attention_mask([4, 4], [4, 4], (2, 2), (0, 0), torch.device("cpu")) is None


@pytest.mark.parametrize("padded,window,shift", [([8, 8], (4, 4), (2, 2)), ([6, 6, 6], (3, 3, 3), (1, 1, 1))])
def test_window_mask_matches_monai_shift_mask(padded, window, shift):
    ours = window_attention_mask(padded, padded, window, shift, torch.device("cpu"))
    monai = compute_mask(padded, window, shift, torch.device("cpu"))
    assert torch.equal(ours, monai == 0)


def test_conv_window_attention_equals_per_window_attention_on_real_pixels():
    """6x5 map, 4x4 windows: padded to 8x8, yet every pixel attends exactly the real pixels of its window."""
    torch.manual_seed(0)
    dim, heads, h, w = 8, 2, 6, 5
    attn = ConvWindowAttention(2, dim, heads).eval()
    x = torch.randn(2, dim, h, w)
    mask = window_attention_mask([8, 8], [h, w], (4, 4), (0, 0), x.device)
    with torch.no_grad():
        out = attn(x, (4, 4), (0, 0), mask)
        q, k, v = attn.project_qkv(x).chunk(3, dim=1)
        expected = torch.zeros(2, h, w, dim)
        for rows in (slice(0, 4), slice(4, 6)):
            for cols in (slice(0, 4), slice(4, 5)):
                # (b, heads, n, head_dim) tokens of this window
                qw, kw, vw = (t[:, :, rows, cols].flatten(2).view(2, heads, dim // heads, -1).mT for t in (q, k, v))
                weights = torch.softmax(qw @ kw.mT / math.sqrt(dim // heads), dim=-1)
                mixed = (weights @ vw).transpose(1, 2).reshape(2, -1, dim)
                expected[:, rows, cols] = attn.proj(mixed).view(2, rows.stop - rows.start, cols.stop - cols.start, dim)
    assert torch.allclose(out, expected.movedim(-1, 1), atol=1e-5)


def test_projector_shares_its_last_layer():
    torch.manual_seed(0)
    proj = ContrastProjector((6, 4), hidden=16, out=8, normalize=False)
    a, b = torch.randn(2, 6, 3, 5), torch.randn(2, 4, 3, 5, 2)  # 2D and 3D maps both work
    za, zb = proj(a, student=0), proj(b, student=1)
    assert za.shape == (2, 8, 3, 5) and zb.shape == (2, 8, 3, 5, 2)
    # by hand: shared(relu(first_0(x))) per pixel
    w1, b1 = proj.first[0].weight[..., 0], proj.first[0].bias
    w2, b2 = proj.shared.weight[..., 0], proj.shared.bias
    pixel = a[1, :, 2, 4]
    assert torch.allclose(za[1, :, 2, 4], w2 @ torch.relu(w1 @ pixel + b1) + b2, atol=1e-6)
    # one last layer: both students' graphs reach the very same parameter tensor
    shared = proj.shared.weight
    grad_a = torch.autograd.grad(za.square().sum(), shared, retain_graph=True)[0]
    grad_b = torch.autograd.grad(zb.square().sum(), shared, retain_graph=True)[0]
    assert grad_a.abs().sum() > 0 and grad_b.abs().sum() > 0
    (za.square().sum() + zb.square().sum()).backward()
    assert torch.allclose(shared.grad, grad_a + grad_b, atol=1e-5)
    assert proj.first[0].weight.grad is not None and proj.first[1].weight.grad is not None
    assert sum(p is shared for p in proj.parameters()) == 1
    assert proj.first[0].weight is not proj.first[1].weight


def test_projector_normalises_and_checks_channels():
    proj = ContrastProjector((6, 4))
    z = proj(torch.randn(2, 6, 4, 4), student=0)
    assert z.shape == (2, 128, 4, 4)
    assert torch.allclose(z.norm(dim=1), torch.ones(2, 4, 4), atol=1e-5)
    with pytest.raises(ValueError, match="student 1 expects 4 channels"):
        proj(torch.randn(2, 6, 4, 4), student=1)
    with pytest.raises(ValueError, match="student must be in"):
        proj(torch.randn(2, 6, 4, 4), student=2)


def test_factory_builds_and_rejects():
    assert isinstance(build_network("unet", 3, 2, 4, channels=(4, 8)), FeatureUNet)
    net = build_network("SWIN_UNET", 2, 1, 2, embed_dim=24, num_heads=(1, 2, 4, 8))
    assert isinstance(net, SwinUNet) and net.feature_channels[0] == 96
    assert isinstance(build_network("cs_unet", 2, 1, 2), CSUNet)
    assert isinstance(build_network("swin_unetr", 3, 1, 2), FeatureSwinUNETR)
    with pytest.raises(ValueError, match=r"unknown network 'vnet'.*'cs_unet'"):
        build_network("vnet", 2, 1, 2)
    for dims in (1, 4):
        with pytest.raises(ValueError, match=f"supports spatial_dims.*got {dims}"):
            build_network("unet", dims, 1, 2)
    with pytest.raises(ValueError, match="spatial_dims must be 2 or 3"):
        SwinUNet(spatial_dims=1)
    with pytest.raises(ValueError, match="not divisible by 5 heads"):
        build_network("swin_unet", 2, 1, 2, num_heads=(5, 6, 12, 24))
    with pytest.raises(ValueError, match="power of two"):
        build_network("cs_unet", 2, 1, 2, patch_size=3)


def test_initialisation_is_seeded_and_truncated_normal():
    first, second, other = tiny("swin_unet", seed=3), tiny("swin_unet", seed=3), tiny("swin_unet", seed=4)
    for key, value in first.state_dict().items():
        assert torch.equal(value, second.state_dict()[key]), key
    assert not all(torch.equal(v, other.state_dict()[k]) for k, v in first.state_dict().items())
    for net in (SwinUNet(), CSUNet()):
        linears = [m for m in net.modules() if isinstance(m, torch.nn.Linear)]
        weights = torch.cat([m.weight.flatten() for m in linears])
        assert 0.017 < weights.std() < 0.021  # trunc-normal(0.02) (PyTorch's default would be ~0.05 here)
        assert all(m.bias is None or not m.bias.any() for m in linears)
