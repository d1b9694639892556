"""The registration-only baseline ("Reg. only" row): propagate atlas labels to labelled evaluation cases.

Each validation/test case with a label is a target: the atlas is chosen by the same cycle-score selection
as for unlabelled cases (evaluation cases are registered to the labelled cases only), its label is warped
onto the case, and per-class Dice and HD95 (mm) against the case's own label are written to
``reg_only/per_case.csv`` with a per-class summary in ``reg_only/summary.csv``.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from monai_ssl.fileio import atomic_path, atomic_write_json
from registration.geometry import array_xyz
from registration.metrics import segmentation_scores
from registration.select import Selection, choose_atlas, registered_label
from registration.store import RegistrationStore

__all__ = ["run_report", "summarise"]

log = logging.getLogger("registration")


def _write_csv(df: pd.DataFrame, path) -> None:
    with atomic_path(path) as tmp:
        df.to_csv(tmp, index=False)


def summarise(per_case: pd.DataFrame) -> pd.DataFrame:
    """Per-class mean/std of Dice and HD95 over cases (``both_empty`` rows excluded) plus a class-mean row."""
    used = per_case[per_case["status"] != "both_empty"]
    rows = []
    for (c, name), g in used.groupby(["class", "class_name"], sort=True):
        rows.append(
            {
                "class": c,
                "class_name": name,
                "cases": len(g),
                "dice_mean": g["dice"].mean(),
                "dice_std": g["dice"].std(ddof=0),
                "hd95_mm_mean": g["hd95_mm"].mean(),
                "hd95_mm_std": g["hd95_mm"].std(ddof=0),
            }
        )
    out = pd.DataFrame(rows)
    if len(out):
        mean = {"class": -1, "class_name": "mean", "cases": int(out["cases"].max())}
        mean.update({k: out[k].mean() for k in ("dice_mean", "dice_std", "hd95_mm_mean", "hd95_mm_std")})
        out = pd.concat([out, pd.DataFrame([mean])], ignore_index=True)
    return out


def run_report(store: RegistrationStore, how: Selection = Selection(), progress: bool = True) -> dict[str, Any]:
    """Write ``reg_only/{per_case.csv, summary.csv, selection.json, labels/}``; return the tables and failures."""
    atlases = store.group("labeled")
    targets = [c for c in store.group("validation") + store.group("test") if store.cases[c].get("label")]
    if not targets:
        raise ValueError(f"{store.root}: no validation or test case with a label to evaluate")
    out = store.root / "reg_only"
    rows, selection, failed = [], {}, {}
    for target in tqdm(targets, desc="reg-only", unit="case", disable=not progress):
        entry = choose_atlas(store, target, atlases, how)
        selection[target] = entry
        if entry["choice"] is None:
            failed[target] = "no labelled atlas has both directions registered"
            continue
        path = out / "labels" / f"{target}.nii.gz"
        pred = registered_label(store, entry["choice"], target, path, how.interpolation)
        gt = array_xyz(store.label(target))
        classes = {int(k): v for k, v in store.labels.items()} or {int(c): str(c) for c in np.union1d(pred, gt)}
        for row in segmentation_scores(pred, gt, store.image(target).GetSpacing(), classes):
            rows.append({"case_id": target, "group": store.cases[target]["group"], "atlas": entry["choice"], **row})
    per_case = pd.DataFrame(
        rows, columns=["case_id", "group", "atlas", "class", "class_name", "dice", "hd95_mm", "status"]
    )
    summary = summarise(per_case)
    _write_csv(per_case, out / "per_case.csv")
    _write_csv(summary, out / "summary.csv")
    atomic_write_json(
        out / "selection.json",
        {"score": how.score, "weights": {"rmse": how.w_rmse, "mi": how.w_mi}, "cases": selection, "failed": failed},
    )
    return {"per_case": per_case, "summary": summary, "failed": failed}
