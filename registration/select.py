"""Best registration selection (BRS) and registered labels.

For each target volume j (an unlabelled training case, or an evaluation case for the baseline) and each
labelled atlas q with both directions registered, compute both cycle scores of j -> q -> j and pick the
atlas with the lowest score (the published ``S = w_rmse * RMSE - w_mi * MI`` by default, or the
transform-space ``transform_mm``). The chosen atlas's label, warped onto j's grid, is j's registered label.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from monai_ssl.fileio import atomic_write_json
from registration.geometry import save_like
from registration.store import RegistrationStore

__all__ = ["SCORES", "Selection", "choose_atlas", "registered_label", "run_select"]

log = logging.getLogger("registration")
SCORES = {"published": "score", "transform": "transform_mm"}


@dataclass(frozen=True)
class Selection:
    """How atlases are chosen and their labels propagated (shared by ``select`` and ``report``)."""

    score: str = "published"  # or "transform"
    w_rmse: float = 1.0
    w_mi: float = 1.0
    interpolation: str = "nearest"  # or "label_gaussian"

    def __post_init__(self):
        if self.score not in SCORES:
            raise ValueError(f"score must be one of {list(SCORES)}, got {self.score!r}")
        if self.interpolation not in ("nearest", "label_gaussian"):
            raise ValueError(f"label interpolation must be nearest or label_gaussian, got {self.interpolation!r}")


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
    save_like(label, store.cases[target]["image"], path, dtype=label.dtype)
    return label


def run_select(store: RegistrationStore, how: Selection = Selection(), progress: bool = True) -> dict[str, Any]:
    """BRS for every unlabelled case: write ``brs.json`` and ``registered_labels/<case_id>.nii.gz``."""
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
            path = store.registered_label_path(target)
            registered_label(store, entry["choice"], target, path, how.interpolation)
            entry["registered_label"] = str(path.relative_to(store.root))
            log.info("select %s: atlas %s", target, entry["choice"])
        cases[target] = entry
    result = {
        "kind": store.kind,
        "score": how.score,
        "weights": {"rmse": how.w_rmse, "mi": how.w_mi},
        "definition": "score = w_rmse*RMSE - w_mi*MI of volume j and its round trip j->q->j resampled once "
        "(lower is better); transform_mm = mean |T_qj(T_jq(x)) - x| over j's foreground",
        "label_interpolation": how.interpolation,
        "cases": cases,
        "failed": failed,
        "mean_choice_score": float(
            np.mean([c["scores"][c["choice"]][SCORES[how.score]] for c in cases.values() if c["choice"]])
        )
        if len(failed) < len(cases)
        else None,
    }
    atomic_write_json(store.root / "brs.json", result)
    return result
