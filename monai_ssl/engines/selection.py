"""Per-student validation: which student, or which mix of them, the model should infer with.

The thesis infers with the CNN student alone; at short budgets a slow transformer student can cost Dice in
an equal-weight ensemble. So before every validation each student is scored alone and in weighted mixes on the
validation volumes, and the best becomes the ensemble's ``member_weights``: the evaluator's metrics (and so
the best checkpoint ``model.pt``) then describe the selected model, which carries its weights.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import ignite.distributed as idist
import torch
from ignite.engine import Engine, Events
from monai.metrics import DiceMetric
from monai.metrics.utils import do_metric_reduction
from monai.networks import one_hot
from monai.utils.enums import CommonKeys as Keys

from monai_ssl.networks.ensemble import StudentEnsemble

__all__ = ["StudentSelection", "candidate_weights"]

logger = logging.getLogger(__name__)


def candidate_weights(n_students: int, steps: int = 4) -> list[tuple[float, ...]]:
    """Each student alone, and for two students the mixes ``(1 - k/steps, k/steps)``; for more, the plain mean."""
    alone = [tuple(float(i == k) for i in range(n_students)) for k in range(n_students)]
    if n_students == 2:
        return [alone[0], *[(1 - k / steps, k / steps) for k in range(1, steps)], alone[1]]
    return alone + ([tuple(1.0 / n_students for _ in range(n_students))] if n_students > 2 else [])


def _name(weights: Sequence[float]) -> str:
    alone = [k for k, w in enumerate(weights) if w == 1.0]
    return f"student{alone[0]}" if alone else "mix_" + "_".join(f"{w:.2f}" for w in weights)


class StudentSelection:
    """Evaluator handler: at ``EPOCH_STARTED``, score every candidate mix of ``ensemble``'s students by mean
    foreground Dice over the validator's volumes and set the best as the ensemble's member weights.

    Each student runs once per volume through ``inferer``; mixes reuse those logits. Scores go to the
    evaluator's ``state.metrics`` as ``val_dice_<candidate>`` (logged with the other validation metrics) and
    ``best_scores`` keeps each candidate's best so far. Ties go to a single student (cheaper at inference), then
    to the earlier candidate (student 0 first).

    Args:
        ensemble: the :class:`~monai_ssl.networks.ensemble.StudentEnsemble` being validated.
        inferer: the validation inferer (e.g. ``SliceInferer``), called as ``inferer(image, network)``.
        num_classes: classes including background.
        steps: mixes per pair of students (4: weights 0.25, 0.5, 0.75 besides each student alone).
    """

    def __init__(self, ensemble: StudentEnsemble, inferer: Callable, num_classes: int, steps: int = 4):
        self.ensemble, self.inferer, self.num_classes = ensemble, inferer, int(num_classes)
        self.candidates = candidate_weights(len(ensemble.networks), steps)
        self.best_scores: dict[str, float] = {}

    def attach(self, engine: Engine) -> None:
        if len(self.candidates) > 1:
            engine.add_event_handler(Events.EPOCH_STARTED, self)

    @torch.no_grad()
    def scores(self, engine: Engine) -> list[float]:
        """Mean foreground Dice of every candidate over the evaluator's data (classes absent from both ignored)."""
        metrics = [DiceMetric(include_background=False, ignore_empty=True) for _ in self.candidates]
        device = engine.state.device
        self.ensemble.eval()
        for batch in engine.data_loader:
            image, label = batch[Keys.IMAGE].to(device), batch[Keys.LABEL].to(device)
            logits = [self.inferer(image, net) for net in self.ensemble.networks]
            target = one_hot(label.long(), self.num_classes)
            for weights, metric in zip(self.candidates, metrics, strict=True):
                mixed = sum(w * o for w, o in zip(weights, logits, strict=True) if w > 0)
                metric(one_hot(mixed.argmax(1, keepdim=True), self.num_classes), target)
        # multi-process validation (DistributedSampler): every process scored its share; gather all cases
        return [float(do_metric_reduction(idist.all_gather(m.get_buffer()), "mean")[0]) for m in metrics]

    def __call__(self, engine: Engine) -> None:
        scores = self.scores(engine)
        # ties: one student alone (cheaper to run), then the earlier candidate
        best = max(range(len(scores)), key=lambda k: (scores[k], max(self.candidates[k]) == 1.0, -k))
        self.ensemble.set_member_weights(self.candidates[best])
        for weights, score in zip(self.candidates, scores, strict=True):
            engine.state.metrics[f"val_dice_{_name(weights)}"] = score
            self.best_scores[_name(weights)] = max(score, self.best_scores.get(_name(weights), float("-inf")))
        logger.info(
            "student selection: %s -> %s",
            ", ".join(f"{_name(w)} {s:.4f}" for w, s in zip(self.candidates, scores, strict=True)),
            _name(self.candidates[best]),
        )
