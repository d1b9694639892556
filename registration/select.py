"""Registered labels: best registration selection (BRS) or multi-atlas label fusion.

For each target volume j (an unlabelled training case, or an evaluation case for the baseline) and each
labelled atlas q with both directions registered, both cycle scores of j -> q -> j are computed and the atlas
with the lowest score is BRS's choice (the published ``S = w_rmse * RMSE - w_mi * MI`` by default, or the
transform-space ``transform_mm``). The registered label of j is then, by ``strategy``:

* ``brs``: the chosen atlas's label warped onto j's grid;
* ``fusion``: the locally weighted vote of every usable atlas (:mod:`registration.fusion`), with per-voxel class
  probabilities written beside it (``registered_probabilities/<case_id>.nii.gz``, for soft RSL targets);
* ``auto`` (default): ``fusion`` when two or more atlases are usable, else ``brs``. On the demo and on deformable
  cohorts the cycle score picked the best atlas no more often than chance (``registration/README.md``).

``select`` also writes the registration prior of every validation and test case (``priors/<case_id>.nii.gz``:
the same strategy's class probabilities, one-hot for ``brs``), which the trained model may mix into its own
(``monai_ssl.inference.volume.MixPriord``). Only images are registered, so no evaluation label is read.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from monai_ssl.fileio import atomic_write_json, save_nifti
from registration.fusion import Fusion, fuse_labels
from registration.store import RegistrationStore

__all__ = [
    "SCORES",
    "STRATEGIES",
    "Selection",
    "choose_atlas",
    "registered_label",
    "propagate",
    "write_prior",
    "run_select",
]

log = logging.getLogger("registration")
SCORES = {"published": "score", "transform": "transform_mm"}
STRATEGIES = ("auto", "brs", "fusion")
#: probabilities are stored as uint8 with this NIfTI scale factor (0..1 in 1/255 steps): 4x smaller than float32
PROBABILITY_SCALE = 1.0 / 255.0


@dataclass(frozen=True)
class Selection:
    """How atlases are chosen and their labels propagated (shared by ``select`` and ``report``)."""

    score: str = "published"  # or "transform"
    w_rmse: float = 1.0
    w_mi: float = 1.0
    interpolation: str = "nearest"  # or "label_gaussian" (BRS warps; fusion votes with nearest-neighbour labels)
    strategy: str = "auto"  # or "brs", "fusion"
    fusion: Fusion = Fusion()

    def __post_init__(self):
        if self.score not in SCORES:
            raise ValueError(f"score must be one of {list(SCORES)}, got {self.score!r}")
        if self.interpolation not in ("nearest", "label_gaussian"):
            raise ValueError(f"label interpolation must be nearest or label_gaussian, got {self.interpolation!r}")
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {list(STRATEGIES)}, got {self.strategy!r}")

    def strategy_for(self, usable_atlases: int) -> str:
        """``brs`` or ``fusion`` for a target with this many usable atlases (fusing one atlas is that atlas)."""
        if usable_atlases < 2:
            return "brs"
        return "fusion" if self.strategy in ("auto", "fusion") else "brs"


def choose_atlas(
    store: RegistrationStore, target: str, atlases: list[str], how: Selection = Selection()
) -> dict[str, Any]:
    """Score every atlas for ``target``; return ``{"choice", "choice_published", "choice_transform", "scores"}``.

    An atlas without both directions registered gets ``status: "missing"`` and is never chosen; ``choice`` is
    None when no atlas is usable.
    """
    scores: dict[str, dict[str, Any]] = {}
    for atlas in atlases:
        missing = [f"{f}__{m}" for f, m in ((target, atlas), (atlas, target)) if not store.has_pair(f, m)]
        if missing:
            scores[atlas] = {"status": "missing", "missing_pairs": missing}
        else:
            scores[atlas] = {"status": "ok", **store.cycle(target, atlas, how.w_rmse, how.w_mi).as_dict()}
    ok = {a: s for a, s in scores.items() if s["status"] == "ok"}
    best = {name: (min(ok, key=lambda a, k=key: ok[a][k]) if ok else None) for name, key in SCORES.items()}
    return {"choice": best[how.score], **{f"choice_{n}": c for n, c in best.items()}, "scores": scores}


def registered_label(
    store: RegistrationStore, atlas: str, target: str, path, interpolation: str = "nearest"
) -> np.ndarray:
    """Warp ``atlas``'s label onto ``target``'s grid, write it as NIfTI with the target image's header, and
    return it as an ``[i, j, k]`` array."""
    label = store.warp(atlas, onto=target, what="label", interpolation=interpolation)
    save_nifti(label, path, like=store.cases[target]["image"])
    return label


def save_probabilities(probs: np.ndarray, reference, path) -> None:
    """Write ``(C, i, j, k)`` class probabilities as a 4D ``[i, j, k, c]`` uint8 NIfTI scaled by 1/255."""
    data = np.rint(np.moveaxis(probs, 0, -1) / PROBABILITY_SCALE).astype(np.uint8)
    save_nifti(data, path, like=reference, scale=PROBABILITY_SCALE)


def propagate(
    store: RegistrationStore,
    target: str,
    entry: dict[str, Any],
    how: Selection,
    label_path,
    probabilities_path=None,
) -> tuple[str, np.ndarray]:
    """Write ``target``'s registered label by the strategy for its usable atlases; return (strategy, label).

    ``entry`` is :func:`choose_atlas`'s record; fusion also writes the class probabilities when a path is given.
    """
    usable = [a for a, s in entry["scores"].items() if s["status"] == "ok"]
    strategy = how.strategy_for(len(usable))
    if strategy == "brs":
        return strategy, registered_label(store, entry["choice"], target, label_path, how.interpolation)
    label, probs = fuse_labels(store, target, usable, store.num_classes, how.fusion)
    reference = store.cases[target]["image"]
    save_nifti(label, label_path, like=reference, dtype=np.int16)
    if probabilities_path is not None:
        save_probabilities(probs, reference, probabilities_path)
    return strategy, label


def write_prior(store: RegistrationStore, target: str, entry: dict[str, Any], how: Selection, path) -> str:
    """Write ``target``'s class probabilities by the strategy for its usable atlases (``brs``: the chosen atlas
    alone, i.e. its one-hot label) as :func:`save_probabilities` does; return the strategy."""
    usable = [a for a, s in entry["scores"].items() if s["status"] == "ok"]
    strategy = how.strategy_for(len(usable))
    atlases = usable if strategy == "fusion" else [entry["choice"]]
    _, probs = fuse_labels(store, target, atlases, store.num_classes, how.fusion)
    save_probabilities(probs, store.cases[target]["image"], path)
    return strategy


def run_select(store: RegistrationStore, how: Selection = Selection(), progress: bool = True) -> dict[str, Any]:
    """Registered labels for every unlabelled case: ``brs.json`` (every score, BRS's choice, the strategy used),
    ``registered_labels/<case_id>.nii.gz`` and, for fused cases, ``registered_probabilities/<case_id>.nii.gz``;
    and the registration prior of every validation and test case (``priors/<case_id>.nii.gz``, under
    ``priors`` in ``brs.json``, apart from the training cases so no training reader can take one)."""
    atlases, targets = store.group("labeled"), store.group("unlabeled")
    if not atlases:
        raise ValueError(f"{store.root}: the datalist has no labelled case to select from")
    cases, failed = {}, {}
    for target in tqdm(targets, desc="select", unit="case", disable=not progress):
        entry = choose_atlas(store, target, atlases, how)
        if entry["choice"] is None:
            failed[target] = "no labelled atlas has both directions registered"
            log.warning("select %s: %s", target, failed[target])
        else:
            path, probs = store.registered_label_path(target), store.registered_probabilities_path(target)
            strategy, _ = propagate(store, target, entry, how, path, probs)
            entry["strategy"] = strategy
            entry["registered_label"] = str(path.relative_to(store.root))
            if strategy == "fusion":
                entry["registered_probabilities"] = str(probs.relative_to(store.root))
                entry["atlases"] = [a for a, s in entry["scores"].items() if s["status"] == "ok"]
            else:
                probs.unlink(missing_ok=True)  # a stale fusion of an earlier run must not pass for this one
            log.info("select %s: %s (BRS atlas %s)", target, strategy, entry["choice"])
        cases[target] = entry
    priors = {}
    for target in tqdm(
        store.group("validation") + store.group("test"), desc="priors", unit="case", disable=not progress
    ):
        entry = choose_atlas(store, target, atlases, how)
        if entry["choice"] is None:
            log.warning("prior %s: no labelled atlas has both directions registered; no prior", target)
            store.prior_path(target).unlink(missing_ok=True)
            continue
        entry["strategy"] = write_prior(store, target, entry, how, store.prior_path(target))
        entry["prior"] = str(store.prior_path(target).relative_to(store.root))
        priors[target] = entry
    result = {
        "kind": store.kind,
        "score": how.score,
        "strategy": how.strategy,
        "fusion": {"sigma_mm": how.fusion.sigma_mm, "power": how.fusion.power},
        "weights": {"rmse": how.w_rmse, "mi": how.w_mi},
        "definition": "score = w_rmse*RMSE - w_mi*MI of volume j and its round trip j->q->j resampled once "
        "(lower is better); transform_mm = mean |T_qj(T_jq(x)) - x| over j's foreground; fusion = locally "
        "weighted voting of all usable atlases (registration/fusion.py)",
        "label_interpolation": how.interpolation,
        "cases": cases,
        "failed": failed,
        "priors": priors,
        "mean_choice_score": float(
            np.mean([c["scores"][c["choice"]][SCORES[how.score]] for c in cases.values() if c["choice"]])
        )
        if len(failed) < len(cases)
        else None,
    }
    atomic_write_json(store.selection_path, result)
    return result
