"""Test-set Dice/HD95/IoU/BF1 and training seconds per iteration of each method of the ``cctr_brain_demo`` bundle.

A method is ``configs/train.json`` plus ``configs/methods/<name>.json``; every override file present is a
method. ``reg_only`` is the registration job's own label propagation (its ``report``), not a training run.
Each (method, labelled count) trains from scratch in ``WORK/labeled_<n>/<method>/`` with the same budget,
is evaluated on the datalist's ``test`` group with ``configs/evaluate.json``, and gives one row of
``benchmarks/results/methods.csv``. Seconds per iteration are measured in the same run for every method,
so their ratios to CTS compare like with like.

    .venv/bin/python benchmarks/methods.py --methods unet_ls,cps,cts --labeled 1 [--quick]
    .venv/bin/python benchmarks/methods.py --methods cts,cts_rsl,reg_only --labeled 1,2

See ``benchmarks/README.md`` for the settings and the measured figures.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import logging
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Run as a script, this folder is sys.path[0], where registration.py (the registration benchmark) would shadow
# the `registration` package that CCT-R's correspondences import in-process.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import pandas as pd  # noqa: E402
import torch  # noqa: E402

from monai_ssl.data.converters import resplit_datalist  # noqa: E402
from monai_ssl.data.datalist import GROUPS, DatalistError, labelable_patients, load_datalist, split_cases  # noqa: E402
from monai_ssl.fileio import atomic_path  # noqa: E402
from monai_ssl.metrics.report import summarize_metrics  # noqa: E402
from registration.layout import Layout  # noqa: E402

__all__ = [
    "BUNDLE",
    "PRESETS",
    "REG_ONLY",
    "RESULT",
    "SUMMARY_FIGURES",
    "BenchmarkSettings",
    "NotAvailable",
    "StepTimer",
    "ablation_table",
    "available_methods",
    "benchmark",
    "labeled_datalist",
    "main",
    "metrics_row",
    "needs_registration",
    "prepare_registration",
    "reg_only_metrics",
    "speed_table",
    "train_and_evaluate",
    "write_results",
]

logger = logging.getLogger("benchmarks.methods")

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "bundles" / "cctr_brain_demo"
CONFIGS = BUNDLE / "configs"
REG_ONLY = "reg_only"
BASELINE = "cts"  # seconds per iteration are reported as ratios to this method
RESULT = Path(__file__).parent / "results" / "methods.csv"
DEFAULT_DATALIST = REPO / "data" / "demo_brain" / "datalist.json"
DEFAULT_REGISTRATION = REPO / "runs" / "demo" / "registration"
DEFAULT_WORK = REPO / "runs" / "benchmarks" / "methods"
# result column -> (per-class prefix, column of the evaluation summary); the order is that of the table
SUMMARY_FIGURES = {
    "dice_mean": ("dice", "dice_mean"),
    "hd95_mean_mm": ("hd95", "hd95_mm_mean"),
    "iou_mean": ("iou", "iou_mean"),
    "bf1_mean": ("bf1", "bf1_mean"),
}
MAIN_COLUMNS = ["method", "labeled", "mode", *SUMMARY_FIGURES, "sec_per_iter", "sec_per_iter_vs_cts"]
INFO_COLUMNS = [
    "val_dice_mean",
    "members",
    "prior_weight",
    "variant",
    "cpu_sec_per_iter",
    "cpu_sec_per_iter_vs_cts",
    "data_sec_per_iter",
    "threads",
    "iterations",
    "patch_size",
    "batch_size",
    "train_s",
    "eval_s",
    "labels",
    "seed",
    "labeled_ids",
    "registration_kind",
    "status",
]
LABEL_KINDS = ("clean", "noisy", "scribbles")


@dataclass(frozen=True)
class BenchmarkSettings:
    """The training budget every method gets in one benchmark run."""

    mode: str
    iterations: int
    patch_size: tuple[int, ...]
    batch_size: int
    seed: int = 0
    labels: str = "clean"  # the labelled cases' labels: "clean", "noisy" (--label-noise) or "scribbles"


PRESETS = {
    # the budget `make demo` trains (Makefile DEMO_ITERS): the table answers what a user's first run buys
    "full": BenchmarkSettings("full", iterations=500, patch_size=(96, 96), batch_size=8),
    "quick": BenchmarkSettings("quick", iterations=20, patch_size=(96, 96), batch_size=8),
}


class NotAvailable(RuntimeError):
    """A method cannot run here: no override file, or registration output it needs is missing."""


# ---- methods -----------------------------------------------------------------------------------------------
def available_methods(configs: Path = CONFIGS) -> list[str]:
    """Names of the method override files ``configs/methods/<name>.json``, sorted."""
    return sorted(p.stem for p in (configs / "methods").glob("*.json"))


def needs_registration(method: str, configs: Path = CONFIGS) -> bool:
    """True for ``reg_only`` and for methods whose override refers to the registration output."""
    return method == REG_ONLY or "registration_dir" in (configs / "methods" / f"{method}.json").read_text()


def _check_method(method: str, configs: Path) -> None:
    if method != REG_ONLY and not (configs / "methods" / f"{method}.json").exists():
        raise NotAvailable(
            f"not available: no override file {configs / 'methods' / f'{method}.json'} "
            f"(available: {', '.join(available_methods(configs) + [REG_ONLY])})"
        )


# ---- timing ------------------------------------------------------------------------------------------------
class StepTimer:
    """Wall and CPU seconds of every training step, and wall seconds of every batch fetch, of an ignite trainer.

    A step is ``ITERATION_STARTED`` to ``IterationEvents.MODEL_COMPLETED``: forward passes, loss terms,
    backward and optimiser steps. Batch fetches (``GET_BATCH_*``) are the per-iteration augmentation of
    cached volumes. Dataset caching happens before the run; handlers (checkpoints, logging, validation) run
    after ``MODEL_COMPLETED``; neither is counted. CPU seconds (this process, all threads) move less than
    wall seconds when other jobs share the machine.
    """

    def __init__(
        self,
        warmup: int = 1,
        clock: Callable[[], float] = time.perf_counter,
        cpu_clock: Callable[[], float] = time.process_time,
    ):
        self.warmup = warmup
        self.clock, self.cpu_clock = clock, cpu_clock
        self.steps: list[float] = []
        self.cpu_steps: list[float] = []
        self.fetches: list[float] = []
        self._t0 = self._c0 = self._f0 = 0.0

    def attach(self, engine) -> StepTimer:
        from ignite.engine import Events
        from monai.engines.utils import IterationEvents

        engine.add_event_handler(Events.GET_BATCH_STARTED, self._fetch_start)
        engine.add_event_handler(Events.GET_BATCH_COMPLETED, self._fetch_stop)
        engine.add_event_handler(Events.ITERATION_STARTED, self._step_start)
        engine.add_event_handler(IterationEvents.MODEL_COMPLETED, self._step_stop)
        return self

    def _fetch_start(self, _engine) -> None:
        self._f0 = self.clock()

    def _fetch_stop(self, _engine) -> None:
        self.fetches.append(self.clock() - self._f0)

    def _step_start(self, _engine) -> None:
        self._t0, self._c0 = self.clock(), self.cpu_clock()

    def _step_stop(self, _engine) -> None:
        self.steps.append(self.clock() - self._t0)
        self.cpu_steps.append(self.cpu_clock() - self._c0)

    def _median(self, values: list[float]) -> float:
        values = values[self.warmup :] if len(values) > self.warmup else values
        return statistics.median(values) if values else math.nan

    @property
    def sec_per_iter(self) -> float:
        """Median wall seconds of a step after the warm-up iterations (robust to bursts of other load)."""
        return self._median(self.steps)

    @property
    def cpu_sec_per_iter(self) -> float:
        """Median CPU seconds of a step after the warm-up iterations."""
        return self._median(self.cpu_steps)

    @property
    def data_sec_per_iter(self) -> float:
        return self._median(self.fetches)


# ---- data and registration ---------------------------------------------------------------------------------
def training_labels(datalist: Path, labels: str, work_dir: Path, seed: int = 0) -> Path:
    """The datalist whose labelled cases carry ``labels``: as given ("clean"), with seeded boundary noise
    ("noisy", :func:`~monai_ssl.data.label_noise.write_noisy_datalist`) or as scribbles ("scribbles",
    :func:`~monai_ssl.data.scribbles.scribble_datalist`). Validation and test labels stay dense and clean."""
    if labels == "clean":
        return datalist
    if labels == "noisy":
        from monai_ssl.data.label_noise import write_noisy_datalist

        return Path(write_noisy_datalist(datalist, work_dir / "noisy_labels", seed=seed))
    if labels == "scribbles":
        from monai_ssl.data.scribbles import scribble_datalist

        return Path(scribble_datalist(datalist, work_dir / "scribbles", seed=seed))
    raise ValueError(f"labels must be one of {LABEL_KINDS}, got {labels!r}")


def _patient_ids(dl: Mapping[str, Any], group: str) -> list[str]:
    return sorted({str(c.get("patient_id", c["case_id"])) for c in dl.get(group, [])})


def labeled_splits(datalist: str | os.PathLike, labeled: int, seed: int = 0, every: bool = False) -> list[list[str]]:
    """The labelled patient sets to train with ``labeled`` labelled patients: the datalist's labelled patients
    stay labelled (so labelled sets are nested), validation and test stay as they are, and the others are drawn
    from the remaining labelled-eligible patients (real donors with a label; ``unlabeled_only`` cases never):
    one draw, deterministic for ``seed``, or with ``every`` each combination once (seeds repeat draws: on the
    demo, seeds 0 and 2 draw the same second donor)."""
    dl = load_datalist(datalist)
    ids = {g: _patient_ids(dl, g) for g in GROUPS}
    keep = ids["labeled"][:labeled]
    if labeled <= len(keep):
        return [keep]
    fixed = set(keep) | set(ids["validation"]) | set(ids["test"])
    pool = [c for g in GROUPS for c in dl.get(g, []) if str(c.get("patient_id", c["case_id"])) not in fixed]
    if every:
        free = labelable_patients(pool)
        if labeled - len(keep) > len(free):
            raise DatalistError(f"asked for {labeled} labelled patients but only {len(free)} labelled ones are left")
        return [keep + list(extra) for extra in itertools.combinations(free, labeled - len(keep))]
    extra = split_cases(pool, labeled=labeled - len(keep), seed=seed)["labeled"]
    return [keep + sorted({str(c.get("patient_id", c["case_id"])) for c in extra})]


def _splits(datalist: Path, labeled: int, seed: int, every: bool) -> list[list[str]]:
    try:
        return labeled_splits(datalist, labeled, seed, every)
    except DatalistError:  # too few patients or no datalist: each row reports it (labeled_datalist raises again)
        return [[]]


def labeled_datalist(
    datalist: str | os.PathLike,
    labeled: int,
    work_dir: str | os.PathLike,
    seed: int = 0,
    chosen: Sequence[str] | None = None,
) -> Path:
    """The datalist to train with ``labeled`` labelled patients; the given one if it already has that many.

    Otherwise the cases are re-split by patient into ``WORK/datalists/labeled_<n>.json`` with the labelled
    patients ``chosen`` (default: :func:`labeled_splits`'s draw for ``seed``); a ``chosen`` set is named in the
    file, ``labeled_<n>_<added ids>.json``, so that every set keeps its own datalist and registration folder.
    """
    dl = load_datalist(datalist)
    ids = {g: _patient_ids(dl, g) for g in GROUPS}
    if (len(ids["labeled"]) == labeled and chosen is None) or (chosen is not None and sorted(chosen) == ids["labeled"]):
        return Path(dl["datalist_path"])
    name = f"labeled_{labeled}"
    if chosen is not None:
        name += "".join(f"_{p}" for p in chosen if p not in ids["labeled"])
    chosen = list(chosen) if chosen is not None else labeled_splits(datalist, labeled, seed)[0]
    out = Path(work_dir) / "datalists" / f"{name}.json"
    return Path(
        resplit_datalist(dl, out, labeled=chosen, validation=ids["validation"], test=ids["test"], seed=seed)[
            "datalist_path"
        ]
    )


def _registration(*args: str) -> None:
    """Run ``python -m registration ARGS`` in a child process (ITK threading stays out of this process)."""
    cmd = [sys.executable, "-m", "registration", *args]
    logger.info("running %s", " ".join(cmd))
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = " | ".join((proc.stdout + proc.stderr).strip().splitlines()[-5:])
        raise RuntimeError(f"`python -m registration {args[0]}` failed (exit {proc.returncode}): {tail}")


def _store_datalist(layout: Layout) -> str | None:
    """The datalist a registration output folder was computed from (its ``cases.json``), or None."""
    table = layout.cases_table
    return json.loads(table.read_text()).get("datalist") if table.exists() else None


def prepare_registration(
    datalist: Path,
    registration_dir: Path,
    kind: str,
    reuse_from: Path | None = None,
    report: bool = False,
    strategy: str = "auto",
) -> Path:
    """Run the registration job for ``datalist`` into ``registration_dir``: precompute, select (and report), with
    the registered-label ``strategy`` (``auto``, ``brs``, ``fusion``).

    When ``reuse_from`` (a run on the same training volumes) is given, its pair files are hard-linked into
    ``registration_dir`` first; ``precompute`` then skips every pair whose inputs and settings match and
    registers only the new ones (evaluation cases against a newly labelled case). ``select`` and ``report``
    always rerun because they depend on which cases are labelled.
    """
    pairs = Layout(registration_dir, kind).pairs_dir
    if reuse_from is not None and (source := Layout(reuse_from, kind).pairs_dir).is_dir():
        pairs.mkdir(parents=True, exist_ok=True)
        for src in source.iterdir():
            if not src.name.startswith(".") and not (pairs / src.name).exists():  # .tmp-* files are unfinished
                try:
                    os.link(src, pairs / src.name)
                except OSError:
                    shutil.copy2(src, pairs / src.name)
    common = ["--out", str(registration_dir), "--kind", kind, "--no-progress"]
    _registration("precompute", "--datalist", str(datalist), *common)
    _registration("select", *common, "--strategy", strategy)
    if report:
        _registration("report", *common, "--strategy", strategy)
    return registration_dir


def _registration_for(
    datalist: Path,
    base_datalist: Path,
    base_registration: Path,
    work_dir: Path,
    kind: str,
    report: bool,
    strategy: str = "auto",
) -> Path:
    """The registration folder matching ``datalist``.

    For the base datalist it is ``base_registration``, read only: its selection (and reg-only report) must
    exist, made with ``strategy``. For a re-split datalist it is ``WORK/registration/<datalist stem>``, prepared
    here with ``strategy`` (for a non-affine ``kind`` its affine pairs too: REPS reads them).
    """
    if datalist != base_datalist:
        derived = work_dir / "registration" / datalist.stem
        if kind != "affine":  # REPS reads the exact affine correspondences whatever kind the labels come from
            prepare_registration(datalist, derived, "affine", base_registration, False, strategy)
        return prepare_registration(datalist, derived, kind, base_registration, report, strategy)
    layout = Layout(base_registration, kind)
    found = _store_datalist(layout)
    if found is not None and found != str(datalist):
        raise NotAvailable(f"not available: {layout.root} was computed from {found}, not {datalist}")
    if layout.busy():
        raise NotAvailable(f"not available: a registration precompute is still running on {layout.root}")
    needed = layout.report_dir / "per_case.csv" if report else layout.selection_path
    if found is None or not needed.exists():
        steps = [f"precompute --datalist {datalist} --out {base_registration} --kind {kind}"] if found is None else []
        steps.append(f"{'report' if report else 'select'} --out {base_registration} --kind {kind}")
        raise NotAvailable(
            f"not available: {needed} is missing; produce it with "
            + " then ".join(f"`python -m registration {s}`" for s in steps)
        )
    return base_registration


# ---- metrics -----------------------------------------------------------------------------------------------
def metrics_row(summary: pd.DataFrame) -> dict[str, float]:
    """The :data:`SUMMARY_FIGURES` (``dice_mean``, ``hd95_mean_mm``, ``iou_mean``, ``bf1_mean``: the ``overall``
    row) and ``dice_<class>``/``hd95_<class>``/``iou_<class>``/``bf1_<class>`` of a summary table as written by
    :func:`monai_ssl.metrics.report.summarize_metrics`; a figure the summary lacks is NaN."""
    overall = summary[summary["class_name"] == "overall"]
    if len(overall) != 1:
        raise ValueError("metrics summary has no single 'overall' row")
    classes = summary[summary["class_name"] != "overall"]
    row: dict[str, float] = {}
    for name, (prefix, column) in SUMMARY_FIGURES.items():
        values = summary[column] if column in summary else pd.Series(math.nan, index=summary.index)
        row[name] = float(values[overall.index[0]])
        row.update({f"{prefix}_{c}": float(values[i]) for i, c in classes["class_name"].items()})
    return row


def reg_only_metrics(
    registration_dir: Path, kind: str, group: str = "test", strategy: str | None = None
) -> dict[str, float]:
    """Metrics of the registration-only baseline on one group, from ``reg_only/per_case.csv``: the rows of the
    strategy ``select`` uses (``default``), or of ``strategy`` (``brs``, ``fusion``, ``oracle``).

    The per-case rows are summarised with the same function as the trained methods' evaluation, so the
    ``overall`` figures pool (case, class) rows identically.
    """
    path = Layout(registration_dir, kind).report_dir / "per_case.csv"
    per_case = pd.read_csv(path)
    keep = per_case["default"].astype(bool) if strategy is None else per_case["strategy"] == strategy
    rows = per_case[keep & (per_case["group"] == group)]
    if rows.empty:
        raise ValueError(f"{path}: no {group} case{f' of strategy {strategy}' if strategy else ''} in the report")
    return metrics_row(summarize_metrics(rows))


# ---- training and evaluation -------------------------------------------------------------------------------
def _workflow(method: str, files: Sequence[str], run_id: str, configs: Path, overrides: Mapping[str, Any]):
    from monai.bundle import ConfigWorkflow

    return ConfigWorkflow(
        config_file=[str(configs / f) for f in files] + [str(configs / "methods" / f"{method}.json")],
        meta_file=str(configs / "metadata.json"),
        logging_file=str(configs / "logging.conf"),
        workflow_type=None,
        run_id=run_id,
        **overrides,
    )


def train_and_evaluate(
    method: str,
    datalist: Path,
    output_root: Path,
    settings: BenchmarkSettings,
    registration_dir: Path | None = None,
    overrides: Mapping[str, Any] | None = None,
    configs: Path = CONFIGS,
    progress: bool = True,
) -> dict[str, Any]:
    """Train ``method`` from scratch in ``output_root/<method>``, evaluate it on the test group, return the row.

    Validation runs once, on the final model (``val_interval`` is past the end): it chooses the students'
    member weights (:class:`~monai_ssl.engines.selection.StudentSelection`), with which the model is evaluated
    on the test group; ``val_dice_mean`` is the same evaluation on the validation group (what recipes are chosen
    by), ``members`` the chosen weights and ``prior_weight`` the chosen share of the registration prior.
    """

    output_dir = output_root / method
    shutil.rmtree(output_dir, ignore_errors=True)  # fresh run: no old checkpoint can be evaluated by mistake
    common = {
        "bundle_root": str(configs.parent),
        "datalist": str(datalist),
        "output_root": str(output_root),
        "seed": settings.seed,
        **({"registration_dir": str(registration_dir)} if registration_dir is not None else {}),
        **dict(overrides or {}),
    }
    train_overrides = {
        **common,
        "max_iterations": settings.iterations,
        "val_interval": settings.iterations + 1,
        "patch_size": list(settings.patch_size),
        "batch_size": settings.batch_size,
        "resume": False,
        "progress": progress,
    }
    wf = _workflow(method, ["train.json"], "training", configs, train_overrides)
    wf.initialize()
    trainer = wf.parser.get_parsed_content("train#trainer")  # builds (and caches) the datasets now
    timer = StepTimer().attach(trainer)
    train_log = logging.getLogger("monai_ssl.train")
    level = train_log.level
    train_log.setLevel(logging.WARNING)  # the progress bar replaces the per-iteration log lines
    start = time.perf_counter()
    try:
        wf.run()
        wf.finalize()
    finally:
        train_log.setLevel(level)
    train_s = time.perf_counter() - start
    del wf, trainer
    gc.collect()

    start = time.perf_counter()
    for group in ("validation", "test"):
        eval_dir = output_dir / ("eval" if group == "test" else f"eval_{group}")
        ev = _workflow(
            method,
            ["train.json", "evaluate.json"],
            "evaluating",
            configs,
            {**common, "eval_groups": [group], "eval_dir": str(eval_dir)},
        )
        ev.initialize()
        ev.run()
        network = ev.parser.get_parsed_content("network")
        members, prior_weight = network.member_weights.tolist(), float(network.prior_weight)
        del ev, network
    eval_s = time.perf_counter() - start
    summary = pd.read_csv(output_dir / "eval" / "metrics_summary.csv")
    val_summary = pd.read_csv(output_dir / "eval_validation" / "metrics_summary.csv")
    return {
        **metrics_row(summary),
        "val_dice_mean": metrics_row(val_summary)["dice_mean"],
        "members": "/".join(f"{w:.2f}" for w in members),
        "prior_weight": prior_weight,
        "sec_per_iter": timer.sec_per_iter,
        "cpu_sec_per_iter": timer.cpu_sec_per_iter,
        "data_sec_per_iter": timer.data_sec_per_iter,
        "train_s": train_s,
        "eval_s": eval_s,
    }


# ---- the benchmark -----------------------------------------------------------------------------------------
def benchmark(
    methods: Sequence[str],
    labeled_counts: Sequence[int],
    settings: BenchmarkSettings,
    work_dir: str | os.PathLike = DEFAULT_WORK,
    datalist: str | os.PathLike = DEFAULT_DATALIST,
    registration_dir: str | os.PathLike = DEFAULT_REGISTRATION,
    registration_kind: str = "affine",
    overrides: Mapping[str, Any] | None = None,
    configs: Path = CONFIGS,
    progress: bool = True,
    on_row: Callable[[pd.DataFrame], Any] | None = None,
    registration_strategy: str = "auto",
    every_split: bool = False,
) -> pd.DataFrame:
    """One row per (method, labelled count), or with ``every_split`` per (method, labelled set): every
    combination of added labelled patients (:func:`labeled_splits`), each in ``WORK/labeled_<n>_<added ids>/``;
    ``labeled_ids`` names the set of each row. A method that fails or is not available gets its reason in
    ``status`` and NaN figures, and the others still run. ``on_row`` receives the table so far after every
    row (the CLI writes it, so a long run that is stopped keeps what it measured)."""
    work_dir, base = Path(work_dir).resolve(), Path(datalist).resolve()
    base_registration = Path(registration_dir).resolve()
    named = dict(overrides or {}) | ({} if registration_strategy == "auto" else {"strategy": registration_strategy})
    variant = ",".join(f"{k}={json.dumps(v)}" for k, v in sorted(named.items())) or "default"
    overrides = {"registration_kind": registration_kind, **dict(overrides or {})}
    rows = []
    methods = list(dict.fromkeys(methods))  # a method measured twice in one run would make its rows ambiguous
    suffix = "" if settings.labels == "clean" else f"_{settings.labels}"
    try:
        base_labeled = _patient_ids(load_datalist(base), "labeled")
    except DatalistError:  # a missing or broken datalist: every row reports it (labeled_datalist raises again)
        base_labeled = []
    runs = [(n, split) for n in dict.fromkeys(labeled_counts) for split in _splits(base, n, settings.seed, every_split)]
    for n, split in runs:
        dl_path: Path | None = None
        added = [p for p in split if p not in base_labeled] if every_split else []
        run_dir = work_dir / "_".join([f"labeled_{n}{suffix}", *added])
        for i, method in enumerate(methods, 1):
            logger.info("[%d labelled: %s] method %d/%d: %s", n, ",".join(split), i, len(methods), method)
            row: dict[str, Any] = {
                "method": method,
                "labeled": n,
                "mode": settings.mode,
                "labels": settings.labels,
                "variant": variant,
                "seed": settings.seed,
                "labeled_ids": ",".join(sorted(split)),
                "registration_kind": registration_kind,
            }
            try:
                _check_method(method, configs)
                if method == REG_ONLY and settings.labels != "clean":
                    raise NotAvailable(f"not available: {REG_ONLY} uses clean atlas labels, not {settings.labels}")
                dl_path = dl_path or training_labels(
                    labeled_datalist(base, n, work_dir, settings.seed, split if every_split and split else None),
                    settings.labels,
                    run_dir,
                    settings.seed,
                )
                reg = None
                if needs_registration(method, configs) or overrides.get("registration_prior"):
                    reg = _registration_for(
                        dl_path,
                        base,
                        base_registration,
                        work_dir,
                        registration_kind,
                        report=method == REG_ONLY,
                        strategy=registration_strategy,
                    )
                if method == REG_ONLY:
                    row.update(reg_only_metrics(reg, registration_kind))
                else:
                    row.update(
                        threads=torch.get_num_threads(),
                        iterations=settings.iterations,
                        patch_size="x".join(map(str, settings.patch_size)),
                        batch_size=settings.batch_size,
                    )
                    row.update(
                        train_and_evaluate(method, dl_path, run_dir, settings, reg, overrides, configs, progress)
                    )
                row["status"] = "ok"
            except NotAvailable as e:
                logger.warning("%s (%d labelled): %s", method, n, e)
                row["status"] = str(e)
            except Exception as e:  # a failing method is reported, the others still run
                logger.error("%s (%d labelled) failed:\n%s", method, n, traceback.format_exc())
                row["status"] = " ".join(f"failed: {type(e).__name__}: {e}".split())[:500]
            figures = [*SUMMARY_FIGURES, "sec_per_iter"]
            logger.info("%s (%d labelled): %s", method, n, {k: row.get(k) for k in figures})
            rows.append(row)
            if on_row is not None:
                on_row(_tidy(pd.DataFrame(rows)))
    return _tidy(pd.DataFrame(rows))


def _tidy(df: pd.DataFrame, ratios: bool = True) -> pd.DataFrame:
    """Fixed column order and, with ``ratios``, each method's seconds per iteration relative to CTS at the same
    labelled count (only meaningful within one run)."""
    for col in MAIN_COLUMNS + INFO_COLUMNS:
        if col not in df:
            df[col] = math.nan
    if ratios:
        cts = df[(df["method"] == BASELINE) & (df["status"] == "ok")].drop_duplicates("labeled").set_index("labeled")
        for col in ("sec_per_iter", "cpu_sec_per_iter"):
            df[f"{col}_vs_cts"] = df[col] / df["labeled"].map(cts[col])
    per_class = sorted(c for c in df.columns if c not in MAIN_COLUMNS + INFO_COLUMNS)
    classes = [c for prefix, _ in SUMMARY_FIGURES.values() for c in per_class if c.startswith(f"{prefix}_")]
    return df[MAIN_COLUMNS + classes + INFO_COLUMNS]


def write_results(df: pd.DataFrame, path: str | os.PathLike = RESULT, append: bool = False) -> Path:
    """Write the result table atomically; with ``append``, keep the rows of an existing table whose
    (method, labeled, mode, labels, variant, labeled_ids) this run did not measure (an old row without
    ``labeled_ids`` counts as measured by any set; ratios to CTS stay those of each row's own run)."""
    if append and Path(path).exists():
        old = pd.read_csv(path)
        key = ["method", "labeled", "mode", "labels", "variant"]
        old["labels"] = old["labels"].fillna("clean") if "labels" in old else "clean"
        old["variant"] = old["variant"].fillna("default") if "variant" in old else "default"
        ids = old["labeled_ids"] if "labeled_ids" in old else pd.Series(math.nan, index=old.index)
        new_ids = df["labeled_ids"] if "labeled_ids" in df else pd.Series(math.nan, index=df.index)
        measured = set(df[key].astype(str).itertuples(index=False))
        measured_sets = set(zip(df[key].astype(str).itertuples(index=False), new_ids.astype(str), strict=True))
        keys = list(old[key].astype(str).itertuples(index=False))
        old = old[[k not in measured or (isinstance(i, str) and (k, i) not in measured_sets)
                   for k, i in zip(keys, ids, strict=True)]]  # fmt: skip
        df = _tidy(pd.concat([old, df], ignore_index=True), ratios=False)
    with atomic_path(path) as tmp:
        df.to_csv(tmp, index=False, float_format="%.6g")
    return Path(path)


def ablation_table(df: pd.DataFrame) -> pd.DataFrame:
    """The thesis' ablation shape: one row per method, Dice and HD95 (mm) columns per labelled count (with
    ``--every-split``, the mean over the labelled sets of that count)."""
    values = ["dice_mean", "hd95_mean_mm"]
    table = df.pivot_table(index="method", columns="labeled", values=values, aggfunc="mean", dropna=False)
    table = table.rename(columns={"dice_mean": "Dice", "hd95_mean_mm": "HD95 (mm)"}).swaplevel(axis=1)
    table.columns.names = ["labelled", None]
    return table.sort_index(axis=1, level=0, sort_remaining=False).reindex(df["method"].unique())


def speed_table(df: pd.DataFrame) -> pd.DataFrame:
    """Wall and CPU seconds per training step with their ratios to CTS, and the status of every run."""
    cols = ["method", "labeled", "sec_per_iter", "sec_per_iter_vs_cts", "cpu_sec_per_iter", "cpu_sec_per_iter_vs_cts"]
    names = {"sec_per_iter_vs_cts": f"wall_vs_{BASELINE}", "cpu_sec_per_iter_vs_cts": f"cpu_vs_{BASELINE}"}
    return df[cols + ["data_sec_per_iter", "train_s", "status"]].rename(columns=names)


def _print_report(df: pd.DataFrame, settings: BenchmarkSettings) -> None:
    with pd.option_context("display.width", 200, "display.max_columns", None, "display.max_colwidth", 120):
        print(
            f"\nTest-set accuracy ({settings.mode}: {settings.iterations} iterations, "
            f"patch {'x'.join(map(str, settings.patch_size))}, batch {settings.batch_size}, seed {settings.seed})"
        )
        print(ablation_table(df).to_string(float_format=lambda v: f"{v:.3f}", na_rep="-"))
        print("\nTraining seconds per iteration (median step: forward, losses, backward, optimiser), same run")
        print(speed_table(df).to_string(index=False, float_format=lambda v: f"{v:.3f}", na_rep="-"))
    for _, r in df[df["method"].isin(["cctr", "cts_rsl"]) & df["sec_per_iter_vs_cts"].notna()].iterrows():
        target = " (target <= 1.15)" if r["method"] == "cctr" else ""
        print(
            f"{r['method']}/{BASELINE} seconds per iteration, {r['labeled']} labelled: "
            f"wall {r['sec_per_iter_vs_cts']:.2f}, CPU {r['cpu_sec_per_iter_vs_cts']:.2f}{target}"
        )


def _int_list(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--methods",
        default=None,
        help=f"comma-separated method names (default: every override file in {CONFIGS / 'methods'}, plus {REG_ONLY})",
    )
    parser.add_argument("--labeled", type=_int_list, default=[1], help="labelled patient counts, e.g. 1,2 (1)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 20 iterations per method")
    parser.add_argument("--iterations", type=int, default=None, help="override the preset's iterations")
    parser.add_argument("--patch", type=int, nargs=2, default=None, help="override the preset's patch size (96 96)")
    parser.add_argument("--batch", type=int, default=None, help="override the preset's batch size (8)")
    parser.add_argument("--seed", type=int, default=0, help="training seed and re-split seed (0)")
    parser.add_argument(
        "--every-split",
        action="store_true",
        help="with more labelled patients than the datalist has: train every set of added patients once, not the "
        "one --seed draws (rows named by `labeled_ids`)",
    )
    parser.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads (1: robust on a shared machine; 0: torch's default)"
    )
    parser.add_argument("--datalist", type=Path, default=DEFAULT_DATALIST, help="datalist (demo dataset)")
    parser.add_argument("--registration-dir", type=Path, default=DEFAULT_REGISTRATION, help="registration output")
    parser.add_argument("--registration-kind", default="affine", help="registration kind (affine)")
    parser.add_argument(
        "--registration-strategy",
        choices=("auto", "brs", "fusion"),
        default="auto",
        help="registered labels of re-split datalists: auto (fusion with 2+ atlases), brs or fusion; recorded in "
        "`variant` unless auto",
    )
    parser.add_argument("--work-dir", type=Path, default=DEFAULT_WORK, help="run folders (runs/benchmarks/methods)")
    parser.add_argument("--out", type=Path, default=RESULT, help="result CSV (benchmarks/results/methods.csv)")
    parser.add_argument(
        "--append", action="store_true", help="keep rows of --out for (method, labeled, mode, labels) not measured now"
    )
    labels = parser.add_mutually_exclusive_group()
    labels.add_argument(
        "--label-noise", action="store_true", help="train on seeded noisy labels (boundary erosion/dilation/jitter)"
    )
    labels.add_argument("--scribbles", action="store_true", help="train on scribbles made from the labels")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="bundle override for every method (JSON value), e.g. --set lr_cnn=0.001; recorded in `variant`",
    )
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    return parser


def _overrides(items: Sequence[str]) -> dict[str, Any]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise SystemExit(f"--set expects KEY=VALUE, got {item!r}")
        try:
            out[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            out[key.strip()] = value
    return out


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    preset = PRESETS["quick" if args.quick else "full"]
    settings = BenchmarkSettings(
        mode=preset.mode,
        iterations=args.iterations or preset.iterations,
        patch_size=tuple(args.patch or preset.patch_size),
        batch_size=args.batch or preset.batch_size,
        seed=args.seed,
        labels="noisy" if args.label_noise else "scribbles" if args.scribbles else "clean",
    )
    methods = args.methods.split(",") if args.methods else available_methods() + [REG_ONLY]
    df = benchmark(
        [m.strip() for m in methods if m.strip()],
        args.labeled,
        settings,
        work_dir=args.work_dir,
        datalist=args.datalist,
        registration_dir=args.registration_dir,
        registration_kind=args.registration_kind,
        registration_strategy=args.registration_strategy,
        every_split=args.every_split,
        progress=not args.no_progress,
        overrides=_overrides(args.set),
        on_row=lambda partial: write_results(partial, args.out, append=args.append),
    )
    path = write_results(df, args.out, append=args.append)
    _print_report(df, settings)
    print(f"\nwrote {path}")
    failed = df[df["status"] != "ok"]
    for _, r in failed.iterrows():
        print(f"NOT OK {r['method']} ({r['labeled']} labelled): {r['status']}", file=sys.stderr)
    return 1 if len(failed) else 0


if __name__ == "__main__":
    sys.exit(main())
