"""The training term of diffusion-style mask refinement; the refiner itself (schedule, reverse process) is
:mod:`monai_ssl.networks.refiner`, which inference uses without this module."""

from __future__ import annotations

import torch
from monai.networks.utils import one_hot

from monai_ssl.losses.schedules import WeightSchedule
from monai_ssl.losses.terms import LossTerm, StepContext
from monai_ssl.networks.refiner import DiffusionRefiner

__all__ = ["DiffusionRefinementTerm"]


class DiffusionRefinementTerm(LossTerm):
    """Trains the refiner's denoiser on the labelled slices (noise prediction, DDPM's simple loss).

    ``x_0 = 2 onehot(label) - 1``; per slice a step ``t`` uniform in ``1..T`` (drawn first), then ``eps ~ N(0, I)``;
    the loss is ``MSE(eps_hat, eps)``. The conditioning is the image and the students' mean softmax on the
    labelled slices, **detached**: the term never sends gradients into the students, only into the denoiser,
    which ``student_optimizer(extra_modules=bound_loss_terms)`` steps.

    Args:
        refiner: the :class:`DiffusionRefiner`; pass the ensemble's one (``"$@network.refiner"``) so that the
            students' checkpoints (``model.pt``, ``model_final.pt``) carry the trained denoiser to inference.
        name, weight: see :class:`LossTerm` (constant 1.0 by default: the denoiser is independent of the students).
        label_key, image_key: keys of the labelled batch.
    """

    def __init__(
        self,
        refiner: DiffusionRefiner,
        name: str = "diffusion",
        weight: float | WeightSchedule = 1.0,
        label_key: str = "label",
        image_key: str = "image",
    ):
        super().__init__(name, weight)
        self.refiner = refiner
        self.label_key, self.image_key = label_key, image_key

    def forward(self, ctx: StepContext) -> torch.Tensor:
        image, label = ctx.labeled[self.image_key], ctx.labeled[self.label_key]
        with torch.no_grad():
            coarse = torch.stack([logits.detach().float().softmax(1) for logits in ctx.logits_l]).mean(0)
        x0 = 2.0 * one_hot(label, coarse.shape[1], dim=1, dtype=coarse.dtype) - 1.0
        t = torch.randint(1, self.refiner.schedule.num_timesteps + 1, (x0.shape[0],), device=x0.device)
        noise = torch.randn_like(x0)
        return self.refiner.loss(x0, image, coarse, t, noise)
