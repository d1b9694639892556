"""Diffusion-style mask refinement at inference: a small conditional denoiser refines the students' masks.

Its training term is :class:`monai_ssl.losses.diffusion.DiffusionRefinementTerm`.

Conventions (DDPM, Ho et al. 2020, with a short schedule):

* **Steps** are counted ``t = 1 .. T``; step 0 is the clean mask. ``betas`` rise linearly, ``alpha_t = 1 - beta_t``
  and ``alphabar_t = prod_{s <= t} alpha_s`` (``alphabar_0 = 1``). The default range is DDPM's ``1e-4 .. 0.02`` at
  ``T = 1000`` scaled by ``1000 / T`` (``1e-3 .. 0.2`` at the default ``T = 100``), so ``alphabar_T`` is about
  ``2e-5`` for any ``T``: the last step is (nearly) pure noise.
* **Masks** live in ``[-1, 1]``: ``x_0 = 2 * onehot - 1`` in training, ``2 * probabilities - 1`` for the coarse
  prediction. Forward noising: ``x_t = sqrt(alphabar_t) x_0 + sqrt(1 - alphabar_t) eps``.
* **Reverse step**: ``x_{t-1} = 1/sqrt(alpha_t) * (x_t - (1 - alpha_t)/sqrt(1 - alphabar_t) * eps) + sigma_t z``,
  ``z ~ N(0, I)``, with ``sigma_t^2`` the posterior variance ``beta_t (1 - alphabar_{t-1}) / (1 - alphabar_t)``
  by default (``variance="beta"``: ``sigma_t^2 = beta_t``); ``z = 0`` at the last step (``t = 1``).
* **Refinement** (SDEdit-style): the coarse prediction is noised to step ``steps <= T`` and denoised back to 0,
  conditioned on the image and the coarse probabilities, ``samples`` times. Each sample is mapped back to class
  probabilities by ``p = (clamp(x, -1, 1) + 1) / 2`` renormalised to sum 1 over classes (uniform where all are 0).
  The refined mask is the mean of the samples' probabilities; the uncertainty is their variance per class (over
  samples, population variance) **summed over classes**, one channel in ``[0, 1 - 1/C]``.
  ``steps = 0`` returns the coarse probabilities unchanged and a zero variance, without calling the denoiser.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["LinearNoiseSchedule", "mask_to_probs", "refine", "DiffusionRefiner"]


class LinearNoiseSchedule(nn.Module):
    """DDPM noise schedule with ``num_timesteps`` linear betas, forward noising and one reverse update.

    The buffers ``betas``, ``alphas``, ``alphabar`` and ``sigmas`` have ``T + 1`` entries, index ``t`` for step
    ``t``, with the clean step 0 first (``beta_0 = 0``, ``alphabar_0 = 1``, ``sigma_0 = 0``). They are float64 and
    persistent, so a checkpoint of a refiner trained with another ``T`` refuses to load instead of silently
    mismatching. See the module docstring for the formulas. Ours, not MONAI's ``DDPMScheduler``: that one is not
    an ``nn.Module`` (a checkpoint would neither carry nor check ``T``), has no clean step 0 and float32 betas.

    Args:
        num_timesteps: ``T``.
        beta_start, beta_end: ``beta_1`` and ``beta_T``; default ``0.1 / T`` and ``20 / T`` (needs ``T >= 21``).
        variance: ``"posterior"`` (``sigma_t^2 = beta_t (1 - alphabar_{t-1}) / (1 - alphabar_t)``) or ``"beta"``.
    """

    def __init__(
        self,
        num_timesteps: int = 100,
        beta_start: float | None = None,
        beta_end: float | None = None,
        variance: str = "posterior",
    ) -> None:
        super().__init__()
        n = int(num_timesteps)
        if n < 1:
            raise ValueError(f"LinearNoiseSchedule: num_timesteps must be positive, got {num_timesteps!r}.")
        start = 0.1 / n if beta_start is None else float(beta_start)
        end = 20.0 / n if beta_end is None else float(beta_end)
        if not 0.0 < start <= end < 1.0:
            raise ValueError(
                f"LinearNoiseSchedule: need 0 < beta_start <= beta_end < 1, got {start} and {end} "
                f"(the defaults 0.1/T and 20/T need T >= 21; pass betas for shorter schedules)."
            )
        if variance not in ("posterior", "beta"):
            raise ValueError(f"LinearNoiseSchedule: variance must be 'posterior' or 'beta', got {variance!r}.")
        self.num_timesteps, self.variance = n, variance
        betas = torch.cat([torch.zeros(1, dtype=torch.float64), torch.linspace(start, end, n, dtype=torch.float64)])
        alphas = 1.0 - betas
        alphabar = torch.cumprod(alphas, 0)
        sigmas2 = betas.clone()
        if variance == "posterior":
            sigmas2[1:] = betas[1:] * (1.0 - alphabar[:-1]) / (1.0 - alphabar[1:])
        sigmas2[:2] = 0.0  # no noise on the last reverse step (t = 1)
        self.register_buffer("betas", betas)
        self.register_buffer("alphas", alphas)
        self.register_buffer("alphabar", alphabar)
        self.register_buffer("sigmas", sigmas2.sqrt())

    def extra_repr(self) -> str:
        return f"num_timesteps={self.num_timesteps}, variance={self.variance!r}"

    def _at(self, values: torch.Tensor, t: torch.Tensor | int, like: torch.Tensor) -> torch.Tensor:
        """``values[t]`` in ``like``'s dtype, shaped to broadcast over ``like`` (one step, or one per sample)."""
        v = values[torch.as_tensor(t, device=values.device).long()]
        return v.to(device=like.device, dtype=like.dtype).reshape(-1, *([1] * (like.dim() - 1)))

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor | int, noise: torch.Tensor) -> torch.Tensor:
        """Forward noising to step ``t`` (an int, or ``(B,)`` steps): ``sqrt(ab_t) x0 + sqrt(1 - ab_t) noise``."""
        alphabar = self._at(self.alphabar, t, x0)
        return alphabar.sqrt() * x0 + (1.0 - alphabar).sqrt() * noise

    def p_step(
        self, x_t: torch.Tensor, eps: torch.Tensor, t: int, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """One reverse update ``x_t -> x_{t-1}`` from the predicted noise ``eps`` (formula in the module docstring)."""
        if not 1 <= int(t) <= self.num_timesteps:
            raise ValueError(f"LinearNoiseSchedule.p_step: t must be in [1, {self.num_timesteps}], got {t}.")
        t = int(t)
        alpha, alphabar, sigma = (float(v[t]) for v in (self.alphas, self.alphabar, self.sigmas))
        x = (x_t - (1.0 - alpha) / math.sqrt(1.0 - alphabar) * eps) / math.sqrt(alpha)
        if sigma > 0.0:
            x = x + sigma * torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        return x


def mask_to_probs(x: torch.Tensor) -> torch.Tensor:
    """Class probabilities from a mask in [-1, 1] (channels = classes): clamp, ``(x + 1) / 2``, renormalise."""
    p = (x.clamp(-1.0, 1.0) + 1.0) / 2.0
    total = p.sum(1, keepdim=True)
    return torch.where(total > 0, p / total.clamp_min(torch.finfo(p.dtype).tiny), 1.0 / p.shape[1])


@torch.no_grad()
def refine(
    denoiser: nn.Module,
    image: torch.Tensor,
    coarse_probs: torch.Tensor,
    steps: int,
    samples: int = 4,
    generator: torch.Generator | None = None,
    schedule: LinearNoiseSchedule | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Refine ``coarse_probs`` ``(B, C, *spatial)``: noise to ``steps``, denoise to 0, ``samples`` times.

    ``denoiser(x_t, image, coarse_probs, t)`` predicts the noise. Returns the mean probabilities ``(B, C, ...)``
    and the per-pixel variance summed over classes ``(B, 1, ...)``; ``steps = 0`` returns ``coarse_probs`` itself
    and zeros. ``schedule`` defaults to ``LinearNoiseSchedule()`` (``T = 100``) and must be the training one.
    """
    schedule = LinearNoiseSchedule().to(coarse_probs.device) if schedule is None else schedule
    steps, samples = int(steps), int(samples)
    if not 0 <= steps <= schedule.num_timesteps:
        raise ValueError(f"refine: steps must be in [0, {schedule.num_timesteps}], got {steps}.")
    if samples < 1:
        raise ValueError(f"refine: samples must be positive, got {samples}.")
    b, c, *spatial = coarse_probs.shape
    if steps == 0:
        return coarse_probs, coarse_probs.new_zeros((b, 1, *spatial))
    repeat = (samples,) + (1,) * (coarse_probs.dim() - 1)
    cond_image, cond_probs = image.repeat(repeat), coarse_probs.repeat(repeat)  # sample-major: s * B + i
    x0 = 2.0 * cond_probs - 1.0
    noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
    x = schedule.q_sample(x0, steps, noise)
    for t in range(steps, 0, -1):
        eps = denoiser(x, cond_image, cond_probs, t).to(x.dtype)
        x = schedule.p_step(x, eps, t, generator)
    probs = mask_to_probs(x).reshape(samples, b, c, *spatial)
    return probs.mean(0), probs.var(0, correction=0).sum(1, keepdim=True)


class DiffusionRefiner(nn.Module):
    """A denoiser and its noise schedule: the trainable refinement module (saved with the students' ensemble).

    ``refiner(image, coarse_probs, steps, samples, generator)`` is :func:`refine` with this schedule;
    :meth:`loss` is the training objective. Bundle configs build both parts by ``_target_``::

        {"_target_": "monai_ssl.networks.refiner.DiffusionRefiner",
         "denoiser": {"_target_": "monai_ssl.networks.denoiser.ConditionalDenoiser", "spatial_dims": 2,
                      "in_channels": 1, "num_classes": 10},
         "schedule": {"_target_": "monai_ssl.networks.refiner.LinearNoiseSchedule", "num_timesteps": 100}}
    """

    def __init__(self, denoiser: nn.Module, schedule: LinearNoiseSchedule | None = None) -> None:
        super().__init__()
        self.denoiser = denoiser
        self.schedule = LinearNoiseSchedule() if schedule is None else schedule

    def forward(
        self,
        image: torch.Tensor,
        coarse_probs: torch.Tensor,
        steps: int,
        samples: int = 4,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Refined mean probabilities and summed per-class variance (see :func:`refine`)."""
        return refine(self.denoiser, image, coarse_probs, steps, samples, generator, self.schedule)

    def loss(
        self, x0: torch.Tensor, image: torch.Tensor, coarse_probs: torch.Tensor, t: torch.Tensor, noise: torch.Tensor
    ) -> torch.Tensor:
        """``MSE(denoiser(q_sample(x0, t, noise), image, coarse_probs, t), noise)`` for steps ``t`` ``(B,)``."""
        x_t = self.schedule.q_sample(x0, t, noise)
        return F.mse_loss(self.denoiser(x_t, image, coarse_probs, t).float(), noise.float())
