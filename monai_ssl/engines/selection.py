"""Per-student validation: which student, or which mix of them, the model should infer with.

The thesis infers with the CNN student alone; at short budgets a slow transformer student can cost Dice in
an equal-weight ensemble. So before every validation each student is scored alone and in weighted mixes on the
validation volumes, and the best becomes the ensemble's ``member_weights``: the evaluator's metrics (and so
the best checkpoint ``model.pt``) then describe the selected model, which carries its weights.

When the validation volumes carry a registration prior (``reg_prob``: their atlases' fused labels), each mix is
also scored with ``w`` of the prior in its probabilities, ``(1 - w) * softmax + w * prior`` for ``w`` in
:data:`PRIOR_WEIGHTS` (``w = 1`` is registration alone), and the best ``w`` becomes ``prior_weight``. One
number for all classes: per-class weights fitted to one or two validation volumes would follow their noise.
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

from monai_ssl.data.validation import PROBABILITY_KEYS
from monai_ssl.networks.ensemble import StudentEnsemble

__all__ = ["PRIOR_WEIGHTS", "StudentSelection", "candidate_weights"]

logger = logging.getLogger(__name__)
#: share of the registration prior tried by the selection (0: the network alone; 1: registration alone)
PRIOR_WEIGHTS = tuple(k / 10 for k in range(11))
PRIOR_KEY = PROBABILITY_KEYS[0]


def candidate_weights(n_students: int, steps: int = 4) -> list[tuple[float, ...]]:
    """Each student alone, and for two students the mixes ``(1 - k/steps, k/steps)``; for more, the plain mean."""
    alone = [tuple(float(i == k) for i in range(n_students)) for k in range(n_students)]
    if n_students == 2:
        return [alone[0], *[(1 - k / steps, k / steps) for k in range(1, steps)], alone[1]]
    return alone + ([tuple(1.0 / n_students for _ in range(n_students))] if n_students > 2 else [])


def _name(weights: Sequence[float], prior: float = 0.0) -> str:
    alone = [k for k, w in enumerate(weights) if w == 1.0]
    name = f"student{alone[0]}" if alone else "mix_" + "_".join(f"{w:.2f}" for w in weights)
    return name + (f"_prior{prior:.1f}" if prior else "")


class StudentSelection:
    """Evaluator handler: at ``EPOCH_STARTED``, score every candidate mix of ``ensemble``'s students (and, with
    priors in the data, every share of the prior) by mean foreground Dice over the validator's volumes and set
    the best as the ensemble's member weights and prior weight.

    Each student runs once per volume through ``inferer``; mixes reuse those logits. Scores go to the
    evaluator's ``state.metrics`` as ``val_dice_<candidate>`` (logged with the other validation metrics) and
    ``best_scores`` keeps each candidate's best so far. Ties go to the smaller prior share, then to a single
    student (cheaper at inference), then to the earlier candidate (student 0 first).

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
        engine.add_event_handler(Events.EPOCH_STARTED, self)

    @torch.no_grad()
    def scores(self, engine: Engine) -> tuple[tuple[float, ...], list[list[float]]]:
        """The prior shares tried (:data:`PRIOR_WEIGHTS` when the data has priors, else none) and the mean
        foreground Dice of every candidate mix (rows) with each share (columns) over the evaluator's data
        (classes absent from both ignored)."""
        metrics = [
            [DiceMetric(include_background=False, ignore_empty=True) for _ in PRIOR_WEIGHTS] for _ in self.candidates
        ]
        device, with_prior = engine.state.device, False
        self.ensemble.eval()
        for batch in engine.data_loader:
            image, label = batch[Keys.IMAGE].to(device), batch[Keys.LABEL].to(device)
            prior = batch[PRIOR_KEY].to(device).float() if PRIOR_KEY in batch else None
            with_prior = with_prior or prior is not None
            logits = [self.inferer(image, net) for net in self.ensemble.networks]
            target = one_hot(label.long(), self.num_classes)
            for weights, row in zip(self.candidates, metrics, strict=True):
                probs = sum(w * o for w, o in zip(weights, logits, strict=True) if w > 0).float().softmax(1)
                for w, metric in zip(PRIOR_WEIGHTS, row if prior is not None else row[:1], strict=False):
                    out = probs if w == 0.0 else probs * (1.0 - w) + prior * w
                    metric(one_hot(out.argmax(1, keepdim=True), self.num_classes), target)
        priors = PRIOR_WEIGHTS if with_prior else PRIOR_WEIGHTS[:1]
        # multi-process validation (DistributedSampler): every process scored its share; gather all cases
        table = [[float(do_metric_reduction(idist.all_gather(m.get_buffer()), "mean")[0]) for m in row[: len(priors)]]
                 for row in metrics]  # fmt: skip
        return priors, table

    def __call__(self, engine: Engine) -> None:
        if len(self.candidates) == 1 and PRIOR_KEY not in next(iter(engine.data_loader), {}):
            return  # one student and no prior: nothing to choose
        priors, table = self.scores(engine)
        pairs = [(k, j) for j in range(len(priors)) for k in range(len(self.candidates))]
        # ties: the smaller prior share, then one student alone (cheaper to run), then the earlier candidate
        k, j = max(pairs, key=lambda kj: (table[kj[0]][kj[1]], -kj[1], max(self.candidates[kj[0]]) == 1.0, -kj[0]))
        self.ensemble.set_member_weights(self.candidates[k])
        self.ensemble.set_prior_weight(priors[j])
        named = {_name(w, p): table[a][b] for a, w in enumerate(self.candidates) for b, p in enumerate(priors)}
        for name, score in named.items():
            engine.state.metrics[f"val_dice_{name}"] = score
            self.best_scores[name] = max(score, self.best_scores.get(name, float("-inf")))
        logger.info(
            "student selection: %s -> %s",
            ", ".join(f"{n} {s:.4f}" for n, s in named.items()),
            _name(self.candidates[k], priors[j]),
        )
