"""Pluggable loss terms of the semi-supervised trainer.

A term is an ``nn.Module`` that reads one :class:`StepContext` (the batch and every student's outputs) and
returns an unweighted scalar; the trainer multiplies it by ``term.weight(iteration, max_iterations)`` and
logs both under ``term.name``. Methods are lists of terms: UNet-LS is ``[SupervisedTerm]``, CPS and CTS are
``[SupervisedTerm, CrossPseudoTerm]`` over two U-Nets or a U-Net and a transformer.

Terms never take the students as arguments. A term whose own modules depend on them (an EMA teacher's copy, a
projector's input channels) builds them in :meth:`LossTerm.bind`, which :func:`bind_terms` calls once before the
optimiser collects the terms' parameters (the bundles' ``bound_loss_terms``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
from monai.losses import DiceCELoss, DiceLoss

from monai_ssl.losses.schedules import GaussianRampUp, WeightSchedule, as_schedule

__all__ = [
    "StepContext",
    "LossTerm",
    "bind_terms",
    "check_student",
    "SupervisedTerm",
    "CrossPseudoTerm",
    "RegistrationSupervisionTerm",
    "SoftDiceCELoss",
]


@dataclass
class StepContext:
    """Everything a loss term may read in one training iteration.

    ``logits_l[k]`` / ``logits_u[k]`` are student ``k``'s logits on the labelled / unlabelled slices;
    ``features_l[k]`` / ``features_u[k]`` its decoder features (coarsest first) when a term asked for them;
    ``networks[k]`` is student ``k`` itself, for a term that needs another forward pass (a strong view, another
    scale, a mixed batch): terms run students only through the context, never through references they hold.
    ``cache`` lets terms share derived tensors (e.g. pseudo-labels) within the iteration; ``scalars`` collects the
    terms' diagnostics (:meth:`LossTerm.report`), which the trainer logs.
    """

    iteration: int
    max_iterations: int
    labeled: dict[str, Any]
    unlabeled: dict[str, Any] | None
    logits_l: list[torch.Tensor]
    logits_u: list[torch.Tensor]
    features_l: list[list[torch.Tensor]] | None = None
    features_u: list[list[torch.Tensor]] | None = None
    networks: Sequence[nn.Module] = ()
    cache: dict[str, Any] = field(default_factory=dict)
    scalars: dict[str, float] = field(default_factory=dict)

    @property
    def num_students(self) -> int:
        return len(self.logits_l)

    def batch_values(self, key: str) -> Any:
        """``key`` of the labelled slices followed by the unlabelled ones (lists concatenate, tensors cat): the
        order of ``torch.cat([logits_l, logits_u])``, e.g. to pair embeddings with ``pixel_to_world``."""
        if key not in self.labeled:
            raise ValueError(f"the batch has no {key!r}: REPS needs 2D slices from SliceDataset with PixelToWorldd")
        lab = self.labeled[key]
        unl = None if self.unlabeled is None or not self.logits_u or self.logits_u[0].shape[0] == 0 else self.unlabeled
        if unl is None:
            return list(lab) if not torch.is_tensor(lab) else lab
        if torch.is_tensor(lab):
            return torch.cat([lab, unl[key].to(lab.device)])
        return list(lab) + list(unl[key])

    def pseudo_labels(self, student: int) -> torch.Tensor:
        """Hard pseudo-labels ``(B, 1, ...)`` of one student on the unlabelled slices, without gradient."""
        key = f"pseudo_{student}"
        if key not in self.cache:
            self.cache[key] = self.logits_u[student].detach().argmax(dim=1, keepdim=True)
        return self.cache[key]


class LossTerm(nn.Module):
    """Base class: a named, weighted loss. Subclasses implement ``forward(ctx) -> scalar``.

    Class attributes tell the trainer what the term needs: ``needs_features`` (decoder features),
    ``needs_unlabeled`` (skip the term on a batch without unlabelled slices) and ``min_students``. A term whose
    weight is 0 at an iteration is not evaluated (e.g. a warm-up-only term), and ``step_completed`` runs after
    every optimiser step whether or not the term was evaluated. A term whose modules depend on the students
    overrides :meth:`bind`.
    """

    needs_features = False
    needs_unlabeled = False
    min_students = 1

    def __init__(self, name: str, weight: float | WeightSchedule = 1.0):
        super().__init__()
        self.last_stats: dict[str, float] = {}
        self.name = name
        self.weight = as_schedule(weight)
        self.bound = False

    def bind(self, networks: Sequence[nn.Module]) -> None:
        """Build what depends on the students (read, never registered, so never optimised twice); a no-op here.
        Called once, by :func:`bind_terms`."""

    def forward(self, ctx: StepContext) -> torch.Tensor:
        raise NotImplementedError

    def report(self, ctx: StepContext, **stats: Any) -> None:
        """This iteration's diagnostics (fractions, counts, phases): ``ctx.scalars["<name>/<stat>"]``, which the
        trainer logs to the console and TensorBoard at the iteration; also kept in ``last_stats``."""
        self.last_stats = {k: float(v) for k, v in stats.items()}
        ctx.scalars.update({f"{self.name}/{k}": v for k, v in self.last_stats.items()})

    def step_completed(self, iteration: int) -> None:
        """Called once per iteration after the optimisers stepped (e.g. to update an EMA teacher)."""

    def extra_repr(self) -> str:
        return f"name={self.name!r}, weight={self.weight!r}"


def check_student(name: str, students: Sequence[nn.Module], student: int) -> None:
    """Raise a ValueError naming loss term ``name`` unless ``student`` indexes ``students``."""
    if not 0 <= student < len(students):
        raise ValueError(f"loss term {name!r}: student {student} out of range for {len(students)} students")


def bind_terms(terms: Sequence[LossTerm], networks: Sequence[nn.Module]) -> list[LossTerm]:
    """Bind every term not yet bound to ``networks`` (:meth:`LossTerm.bind`) and return the terms as a list.

    Call it before building the optimiser from the terms' parameters: binding creates them.
    """
    networks = list(networks)
    for term in terms:
        if len(networks) < term.min_students:
            raise ValueError(f"loss term {term.name!r} needs {term.min_students} students, got {len(networks)}")
        if not term.bound:
            term.bind(networks)
            term.bound = True
    return list(terms)


class SupervisedTerm(LossTerm):
    """``lambda_dice * Dice + lambda_ce * CE`` of every student on the labelled slices, summed over students.

    The default ``0.5 * (Dice + CE)`` is the cross-teaching recipe. Dice is computed over the whole batch
    (``batch=True``) so that classes absent from a single slice do not dominate.
    """

    def __init__(
        self,
        name: str = "sup",
        weight: float | WeightSchedule = 1.0,
        lambda_dice: float = 0.5,
        lambda_ce: float = 0.5,
        label_key: str = "label",
    ):
        super().__init__(name, weight)
        self.label_key = label_key
        self.loss = DiceCELoss(to_onehot_y=True, softmax=True, batch=True, lambda_dice=lambda_dice, lambda_ce=lambda_ce)

    def forward(self, ctx: StepContext) -> torch.Tensor:
        target = ctx.labeled[self.label_key]
        return sum(self.loss(logits, target) for logits in ctx.logits_l)


class SoftDiceCELoss(nn.Module):
    """``lambda_dice * Dice + lambda_ce * CE`` against class probabilities ``(B, C, *spatial)``: MONAI's
    ``DiceLoss(soft_label=True)`` and torch's cross-entropy with probability targets (MONAI's ``DiceCELoss`` has no
    soft-label Dice)."""

    def __init__(self, lambda_dice: float = 0.5, lambda_ce: float = 0.5):
        super().__init__()
        self.lambda_dice, self.lambda_ce = lambda_dice, lambda_ce
        self.dice = DiceLoss(softmax=True, batch=True, soft_label=True)
        self.ce = nn.CrossEntropyLoss()

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        target = target.to(logits.dtype)
        return self.lambda_dice * self.dice(logits, target) + self.lambda_ce * self.ce(logits, target)


class RegistrationSupervisionTerm(SupervisedTerm):
    """CCT-R's registration supervision loss (RSL): every student's prediction on the unlabelled slices
    against the registered label (``reg_label``: the registered atlas label, or the fusion of several, warped into
    the unlabelled volume, carried through the same augmentation as the image).

    Same ``lambda_dice * Dice + lambda_ce * CE`` as the supervised term, summed over students; constant weight
    0.5 by default, since registered labels are available, and usable, from the first iteration. ``soft=True``
    takes the fused class probabilities (``reg_prob``, resampled linearly) as soft targets instead: soft Dice and
    cross-entropy against a distribution, so voxels where the atlases disagree pull less.
    """

    needs_unlabeled = True

    def __init__(
        self,
        name: str = "rsl",
        weight: float | WeightSchedule = 0.5,
        lambda_dice: float = 0.5,
        lambda_ce: float = 0.5,
        label_key: str | None = None,
        soft: bool = False,
    ):
        super().__init__(name, weight, lambda_dice, lambda_ce, label_key or ("reg_prob" if soft else "reg_label"))
        self.soft = bool(soft)
        if self.soft:  # targets are (B, C, H, W) probabilities
            self.loss = SoftDiceCELoss(lambda_dice, lambda_ce)

    def forward(self, ctx: StepContext) -> torch.Tensor:
        if ctx.unlabeled is None or self.label_key not in ctx.unlabeled:
            what = "registered_probabilities" if self.soft else "registered_labels"
            raise KeyError(
                f"loss term {self.name!r} needs '{self.label_key}' on unlabelled slices: pass the registration "
                f"output's {what.replace('_', ' ')} to the datasets ({what}=...)"
            )
        target = ctx.unlabeled[self.label_key]
        return sum(self.loss(logits, target) for logits in ctx.logits_u)


class CrossPseudoTerm(LossTerm):
    """Cross pseudo supervision / cross teaching on unlabelled slices.

    Each student's softmax is pulled towards the other student's argmax, with no gradient through the target:
    ``Dice(softmax(A), argmax(B)) + Dice(softmax(B), argmax(A))`` (``criterion="dice"``, CTS) or the same with
    cross-entropy (``criterion="ce"``, the original CPS). The weight defaults to the Gaussian ramp-up
    ``0.1 * exp(-5 (1 - i/T)^2)``.
    """

    needs_unlabeled = True
    min_students = 2

    def __init__(self, name: str = "cps", weight: float | WeightSchedule | None = None, criterion: str = "dice"):
        super().__init__(name, GaussianRampUp(0.1) if weight is None else weight)
        if criterion == "dice":
            self.loss: nn.Module = DiceLoss(to_onehot_y=True, softmax=True, batch=True)
        elif criterion == "ce":
            self.loss = nn.CrossEntropyLoss()
        else:
            raise ValueError(f"criterion must be 'dice' or 'ce', got {criterion!r}")
        self.criterion = criterion

    def _one(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.loss(logits, target) if self.criterion == "dice" else self.loss(logits, target[:, 0])

    def forward(self, ctx: StepContext) -> torch.Tensor:
        a, b = ctx.logits_u[0], ctx.logits_u[1]
        return self._one(a, ctx.pseudo_labels(1)) + self._one(b, ctx.pseudo_labels(0))
