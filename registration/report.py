"""The registration-only baseline ("Reg. only" row): propagate atlas labels to labelled evaluation cases.

Each validation/test case with a label is a target (evaluation cases are registered to the labelled cases only).
Every usable atlas's label is warped onto it, and three strategies are scored against the case's own label:

* ``brs``: the atlas chosen by the cycle score (:func:`registration.select.choose_atlas`);
* ``fusion``: the locally weighted vote of all usable atlases (:mod:`registration.fusion`); with one atlas it is
  that atlas's label;
* ``oracle``: the single atlas with the best mean Dice on this case, known only from the evaluation label: the
  ceiling of any single-atlas selection.

``default`` marks the rows of the strategy ``select`` uses with the same settings, i.e. the baseline of the
trained methods. The metrics (Dice, HD95 mm, IoU, boundary F1) are computed by ``python -m monai_ssl.metrics
score`` in a child process, the same implementation as every evaluation, so this process stays torch-free.
Outputs in ``reg_only/``: ``per_case.csv``, ``summary.csv`` (per strategy and class, plus ``overall``),
``per_atlas.csv``, ``selection.json`` (scores, choices, the oracle atlas and BRS's pick rate) and the labels.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import pandas as pd
from tqdm.auto import tqdm

from monai_ssl.fileio import atomic_path, atomic_write_json
from registration.select import Selection, choose_atlas, propagate, registered_label
from registration.store import RegistrationStore

__all__ = ["STRATEGY_ROWS", "run_report", "score_labels", "strategy_rows", "summarise"]

log = logging.getLogger("registration")
STRATEGY_ROWS = ("brs", "fusion", "oracle")


def _write_csv(df: pd.DataFrame, path) -> None:
    with atomic_path(path) as tmp:
        df.to_csv(tmp, index=False)


def score_labels(predictions: pd.DataFrame, store: RegistrationStore, work: Path, progress: bool) -> pd.DataFrame:
    """Per-class metrics of the label files in ``predictions`` (columns ``prediction``, ``reference``, ...),
    computed by ``python -m monai_ssl.metrics score`` in a child process."""
    table, out = work / ".predictions.csv", work / ".scores.csv"
    _write_csv(predictions, table)
    cmd = [sys.executable, "-m", "monai_ssl.metrics", "score", str(table), str(out)]
    cmd += ["--num-classes", str(store.num_classes), "--class-names", json.dumps(store.labels)]
    proc = subprocess.run(cmd + ([] if progress else ["--no-progress"]), stderr=subprocess.PIPE, text=True)
    if proc.returncode:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"scoring the registration-only labels failed (exit {proc.returncode}): {last}")
    try:
        return pd.read_csv(out)
    finally:
        table.unlink(missing_ok=True)
        out.unlink(missing_ok=True)


def summarise(per_case: pd.DataFrame) -> pd.DataFrame:
    """:func:`monai_ssl.metrics.report.summarize_metrics` per strategy (imported here: pandas only, no torch)."""
    from monai_ssl.metrics.report import summarize_metrics

    parts = [summarize_metrics(g).assign(strategy=s) for s, g in per_case.groupby("strategy", sort=False)]
    out = pd.concat(parts, ignore_index=True)
    return out[["strategy", *[c for c in out.columns if c != "strategy"]]]


def oracle_atlases(per_atlas: pd.DataFrame) -> dict[str, str]:
    """Per case the atlas with the highest mean Dice over the case's classes (ties: the first listed)."""
    mean_dice = per_atlas.groupby(["case_id", "atlas"], sort=False)["dice"].mean()
    return {case: mean_dice[case].idxmax() for case in mean_dice.index.get_level_values(0).unique()}


def strategy_rows(per_atlas: pd.DataFrame, fused: pd.DataFrame, choices: dict[str, str]) -> pd.DataFrame:
    """``brs``, ``fusion`` and ``oracle`` rows from the per-atlas scores, the fused scores and BRS's choices.

    The oracle is the atlas with the highest mean Dice over the case's classes (ties: the first atlas listed).
    Cases without a fused label (one usable atlas) take the atlas's rows as their fusion rows.
    """
    oracle = oracle_atlases(per_atlas)

    def atlas_rows(chosen: dict[str, str]) -> pd.DataFrame:
        return per_atlas[per_atlas["case_id"].map(chosen) == per_atlas["atlas"]]

    unfused = {c: a for c, a in choices.items() if c not in set(fused["case_id"])}
    return pd.concat(
        [
            atlas_rows(choices).assign(strategy="brs"),
            pd.concat([fused, atlas_rows(unfused)]).assign(strategy="fusion"),
            atlas_rows(oracle).assign(strategy="oracle"),
        ],
        ignore_index=True,
    )


def run_report(store: RegistrationStore, how: Selection = Selection(), progress: bool = True) -> dict[str, Any]:
    """Write ``reg_only/{per_case.csv, summary.csv, per_atlas.csv, selection.json, labels/}``; return the tables."""
    atlases = store.group("labeled")
    targets = [c for c in store.group("validation") + store.group("test") if store.cases[c].get("label")]
    if not targets:
        raise ValueError(f"{store.root}: no validation or test case with a label to evaluate")
    out = store.report_dir
    selection, failed, singles, fused, default = {}, {}, [], [], {}
    for target in tqdm(targets, desc="reg-only", unit="case", disable=not progress):
        entry = choose_atlas(store, target, atlases, how)
        selection[target] = entry
        if entry["choice"] is None:
            failed[target] = "no labelled atlas has both directions registered"
            continue
        case = store.cases[target]
        usable = [a for a, s in entry["scores"].items() if s["status"] == "ok"]
        for atlas in usable:
            path = out / "labels" / "atlas" / f"{target}__{atlas}.nii.gz"
            registered_label(store, atlas, target, path, how.interpolation)
            singles.append({"case_id": target, "group": case["group"], "atlas": atlas, "prediction": str(path)})
        default[target] = how.strategy_for(len(usable))
        # the baseline's label, exactly as `select` would write it for this case
        propagate(store, target, entry, how, out / "labels" / f"{target}.nii.gz")
        if len(usable) >= 2:
            label = out / "labels" / f"{target}.nii.gz"
            fused.append({"case_id": target, "group": case["group"], "atlas": "+".join(usable), "prediction": label})
            if default[target] != "fusion":  # the baseline is BRS: fuse separately for the comparison
                path = out / "labels" / "fusion" / f"{target}.nii.gz"
                propagate(store, target, entry, replace(how, strategy="fusion"), path)
                fused[-1]["prediction"] = path
    columns = ["case_id", "group", "strategy", "default", "atlas", "class_index", "class_name", "dice", "hd95_mm"]
    if not singles:
        per_case = pd.DataFrame(columns=columns)
        per_atlas = per_case
    else:
        refs = {t: store.cases[t]["label"] for t in targets}
        table = pd.DataFrame(singles + fused)
        table["reference"] = table["case_id"].map(refs)
        scores = score_labels(table, store, out, progress)
        is_fused = scores["atlas"].str.contains("+", regex=False)
        per_atlas = scores[~is_fused].reset_index(drop=True)
        choices = {t: e["choice"] for t, e in selection.items() if e["choice"]}
        per_case = strategy_rows(per_atlas, scores[is_fused], choices)
        per_case["default"] = per_case["strategy"] == per_case["case_id"].map(default)
        per_case = per_case[columns + [c for c in per_case.columns if c not in columns]]
        _pick_rate(selection, per_atlas, choices)
    summary = summarise(per_case) if len(per_case) else pd.DataFrame()
    _write_csv(per_case, out / "per_case.csv")
    _write_csv(per_atlas, out / "per_atlas.csv")
    _write_csv(summary, out / "summary.csv")
    atomic_write_json(
        out / "selection.json",
        {
            "score": how.score,
            "strategy": how.strategy,
            "fusion": {"sigma_mm": how.fusion.sigma_mm, "power": how.fusion.power},
            "weights": {"rmse": how.w_rmse, "mi": how.w_mi},
            "default_strategy": default,
            "cases": selection,
            "failed": failed,
        },
    )
    return {"per_case": per_case, "summary": summary, "failed": failed, "selection": selection}


def _pick_rate(selection: dict[str, Any], per_atlas: pd.DataFrame, choices: dict[str, str]) -> None:
    """Record per case the oracle atlas and whether BRS picked it (in ``selection``), and log the rate."""
    mean_dice = per_atlas.groupby(["case_id", "atlas"], sort=False)["dice"].mean()
    oracle = oracle_atlases(per_atlas)
    picked = []
    for case, choice in choices.items():
        dice = mean_dice[case]
        entry = selection[case]
        entry["oracle"] = str(oracle[case])
        entry["atlas_mean_dice"] = {str(a): float(v) for a, v in dice.items()}
        if len(dice) >= 2:
            entry["brs_is_oracle"] = bool(choice == entry["oracle"])
            picked.append((entry["brs_is_oracle"], 1.0 / len(dice)))
    if picked:
        log.info(
            "BRS picked the oracle atlas in %d of %d cases (%.2f expected by chance)",
            sum(p for p, _ in picked),
            len(picked),
            sum(c for _, c in picked),
        )
