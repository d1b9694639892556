"""Diffusion-style mask refinement (monai_ssl.networks.refiner, .denoiser): schedule, forward/reverse chain,
refinement."""

import math

import pytest
import torch
import torch.nn as nn
from monai.networks.utils import one_hot

from monai_ssl.networks.denoiser import ConditionalDenoiser
from monai_ssl.networks.ensemble import StudentEnsemble
from monai_ssl.networks.refiner import DiffusionRefiner, LinearNoiseSchedule, mask_to_probs, refine


class OracleDenoiser(nn.Module):
    """Knows the clean mask: the coarse prediction it is conditioned on, ``x_0 = 2 p - 1``; returns the exact noise."""

    def __init__(self, schedule: LinearNoiseSchedule):
        super().__init__()
        self.schedule = schedule

    def forward(self, x_t, image, coarse_probs, t):
        alphabar = float(self.schedule.alphabar[t])
        return (x_t - math.sqrt(alphabar) * (2 * coarse_probs - 1)) / math.sqrt(1 - alphabar)


class ScaleDenoiser(nn.Module):
    """A stub with one parameter: ``eps_hat = w * x_t``."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.tensor(0.5))

    def forward(self, x_t, image, coarse_probs, t):
        return self.w * x_t


def onehot_mask(b=2, c=3, h=6, w=5, seed=0):
    labels = torch.randint(0, c, (b, 1, h, w), generator=torch.Generator().manual_seed(seed))
    return labels, one_hot(labels, c, dim=1)


def test_schedule_values_by_hand():
    s = LinearNoiseSchedule(4, beta_start=0.1, beta_end=0.4)
    assert torch.allclose(s.betas, torch.tensor([0.0, 0.1, 0.2, 0.3, 0.4], dtype=torch.float64))
    assert torch.allclose(s.alphabar, torch.tensor([1.0, 0.9, 0.72, 0.504, 0.3024], dtype=torch.float64))
    # posterior sigma_t^2 = beta_t (1 - alphabar_{t-1}) / (1 - alphabar_t); none on the last step (t = 1)
    assert float(s.sigmas[1]) == 0.0
    assert math.isclose(float(s.sigmas[2]), math.sqrt(0.2 * 0.1 / 0.28))
    assert math.isclose(float(s.sigmas[4]), math.sqrt(0.4 * (1 - 0.504) / (1 - 0.3024)))
    beta = LinearNoiseSchedule(4, beta_start=0.1, beta_end=0.4, variance="beta")
    assert float(beta.sigmas[1]) == 0.0 and math.isclose(float(beta.sigmas[3]), math.sqrt(0.3))
    default = LinearNoiseSchedule()
    assert default.num_timesteps == 100
    assert math.isclose(float(default.betas[1]), 1e-3) and math.isclose(float(default.betas[100]), 0.2)
    assert float(default.alphabar[100]) < 1e-4  # the last step is nearly pure noise
    with pytest.raises(ValueError, match="T >= 21"):
        LinearNoiseSchedule(4)
    with pytest.raises(ValueError, match="variance"):
        LinearNoiseSchedule(50, variance="learned")


def test_q_sample_formula_per_sample_steps_and_step_zero():
    s = LinearNoiseSchedule(4, beta_start=0.1, beta_end=0.4)
    _, x0 = onehot_mask()
    x0 = 2 * x0 - 1
    noise = torch.randn_like(x0)
    xt = s.q_sample(x0, torch.tensor([3, 0]), noise)
    assert torch.allclose(xt[0], math.sqrt(0.504) * x0[0] + math.sqrt(1 - 0.504) * noise[0])
    assert torch.equal(xt[1], x0[1])
    assert torch.allclose(xt[:1], s.q_sample(x0[:1], 3, noise[:1]))


@pytest.mark.parametrize("variance", ["posterior", "beta"])
@pytest.mark.parametrize("start", [1, 2, 37, 100])
def test_forward_noising_then_reverse_with_true_noise_recovers_the_mask(variance, start):
    s = LinearNoiseSchedule(100, variance=variance)
    _, x0 = onehot_mask()
    x0 = 2 * x0 - 1
    gen = torch.Generator().manual_seed(start)
    x = s.q_sample(x0, start, torch.randn(x0.shape, generator=gen))
    for t in range(start, 0, -1):
        eps = (x - math.sqrt(float(s.alphabar[t])) * x0) / math.sqrt(1 - float(s.alphabar[t]))  # the true noise
        x = s.p_step(x, eps, t, gen)
    assert torch.allclose(x, x0, atol=1e-5)
    assert torch.equal(mask_to_probs(x.clamp(-1, 1).round()), (x0 + 1) / 2)
    with pytest.raises(ValueError, match="t must be in"):
        s.p_step(x, x, 0)


def test_refine_with_oracle_returns_the_coarse_prediction_and_no_variance():
    s = LinearNoiseSchedule(30)
    probs = torch.softmax(torch.randn(2, 3, 6, 5), 1)
    mean, var = refine(OracleDenoiser(s), torch.rand(2, 1, 6, 5), probs, steps=30, samples=3, schedule=s)
    assert mean.shape == probs.shape and var.shape == (2, 1, 6, 5)
    assert torch.allclose(mean, probs, atol=1e-5) and var.abs().max() < 1e-9


def test_refinement_with_zero_steps_is_the_identity():
    class Never(nn.Module):
        def forward(self, *args):
            raise AssertionError("steps=0 must not call the denoiser")

    probs = torch.softmax(torch.randn(2, 3, 6, 5), 1)
    mean, var = refine(Never(), torch.rand(2, 1, 6, 5), probs, steps=0, samples=4)
    assert torch.equal(mean, probs) and torch.equal(var, torch.zeros(2, 1, 6, 5))
    # and in the inference ensemble: the mean logits, bit for bit, plus a zero variance channel on request
    students = [nn.Conv2d(1, 3, 3, padding=1), nn.Conv2d(1, 3, 1)]
    refiner = DiffusionRefiner(Never(), LinearNoiseSchedule(30))
    x = torch.rand(2, 1, 6, 5)
    plain = StudentEnsemble(students)(x)
    assert torch.equal(StudentEnsemble(students, refiner, refine_steps=0)(x), plain)
    with_var = StudentEnsemble(students, refiner, refine_steps=0, refine_variance=True)(x)
    assert torch.equal(with_var[:, :3], plain) and torch.equal(with_var[:, 3:], torch.zeros(2, 1, 6, 5))
    with pytest.raises(ValueError, match="needs a refiner"):
        StudentEnsemble(students, None, refine_steps=3)


def test_refine_shapes_range_variance_and_reproducibility():
    s = LinearNoiseSchedule(30)
    probs = torch.softmax(3 * torch.randn(2, 4, 7, 9), 1)
    zero = ScaleDenoiser()
    with torch.no_grad():
        zero.w.zero_()  # predicts no noise: the samples keep different noise and disagree
    runs = [refine(zero, torch.rand(2, 1, 7, 9), probs, 10, 5, torch.Generator().manual_seed(1), s) for _ in range(2)]
    mean, var = runs[0]
    assert mean.shape == (2, 4, 7, 9) and var.shape == (2, 1, 7, 9)
    assert torch.allclose(mean.sum(1), torch.ones(2, 7, 9)) and mean.min() >= 0
    assert var.min() >= 0 and var.max() > 0 and var.max() <= 1 - 1 / 4 + 1e-6
    assert torch.equal(runs[1][0], mean) and torch.equal(runs[1][1], var)  # same generator seed, same result
    one = refine(zero, torch.rand(2, 1, 7, 9), probs, 10, 1, torch.Generator().manual_seed(1), s)[1]
    assert torch.equal(one, torch.zeros_like(one))  # a single sample agrees with itself
    with pytest.raises(ValueError, match="steps must be in"):
        refine(zero, torch.rand(2, 1, 7, 9), probs, 31, 2, schedule=s)


def test_denoiser_shapes_any_size_and_timestep_matters():
    torch.manual_seed(0)
    net = ConditionalDenoiser(2, in_channels=2, num_classes=3, channels=(8, 16), norm_num_groups=4)
    with torch.no_grad():  # MONAI zero-initialises the output layer and each block's last convolution
        for param in net.parameters():
            param.add_(0.1 * torch.randn_like(param))
    x, img, p = torch.randn(2, 3, 10, 7), torch.rand(2, 2, 10, 7), torch.softmax(torch.randn(2, 3, 10, 7), 1)
    out = net(x, img, p, torch.tensor([1, 50]))
    assert out.shape == (2, 3, 10, 7)
    assert not torch.allclose(net(x, img, p, 1), net(x, img, p, 50))
    with pytest.raises(ValueError, match="3 channels"):
        net(x[:, :2], img, p, 1)
