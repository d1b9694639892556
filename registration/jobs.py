"""The precompute job: plan the directed pairs, skip finished ones, run the rest, record everything.

Resume: a pair is finished when its sidecar says ``ok`` with the same inputs and settings digest (see
:mod:`registration.pairs`); every file is written to a temporary name and renamed, so ``kill -9`` at any
moment leaves only whole files, and running the job again computes only what is missing.

Failure isolation: a pair that raises, hangs past the per-pair timeout or crashes its worker is retried once
with fallback settings (:meth:`RegistrationSettings.fallback`); if it fails again its sidecar records
``failed`` with the reasons, and the job goes on. The summary lists failures; the CLI then exits non-zero.
"""

from __future__ import annotations

import fcntl
import logging
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pandas as pd
from tqdm.auto import tqdm

from monai_ssl.fileio import atomic_path
from registration.elastix import versions
from registration.inputs import CaseTable
from registration.layout import Layout
from registration.pairs import PairTask, is_finished, plan_pairs, read_sidecar, write_sidecar
from registration.params import RegistrationSettings

__all__ = ["JobSummary", "precompute", "write_manifest"]

log = logging.getLogger("registration")
DEFAULT_TIMEOUT_S = {"affine": 300.0, "bspline": 1800.0}


@dataclass
class JobSummary:
    """What a job run did; ``failed`` maps pair stems to their reasons."""

    total: int = 0
    skipped: int = 0
    ok: int = 0
    failed: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0

    def __str__(self) -> str:
        text = (
            f"{self.total} pairs: {self.skipped} already finished, {self.ok} computed, {len(self.failed)} failed "
            f"({self.seconds:.1f} s)"
        )
        return text + "".join(f"\n  FAILED {stem}: {why}" for stem, why in sorted(self.failed.items()))


def setup_logging(log_path: Path, level: int = logging.INFO) -> logging.Handler:
    """Log to ``log_path`` (appending across runs); warnings also reach the console through tqdm."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(log_path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    log.addHandler(handler)
    log.setLevel(level)
    return handler


def write_manifest(tasks: list[PairTask], path: Path, groups: dict[str, str]) -> pd.DataFrame:
    """One row per planned pair from its sidecar (``missing`` when it has none yet); CSV written atomically."""
    rows = []
    for t in tasks:
        side = read_sidecar(t.sidecar_path) or {}
        status = side.get("status", "missing") if side.get("settings_digest") == t.settings.digest() else "missing"
        rows.append(
            {
                "fixed": t.fixed,
                "moving": t.moving,
                "fixed_group": groups.get(t.fixed),
                "moving_group": groups.get(t.moving),
                "kind": t.settings.kind,
                "status": status,
                "seconds": side.get("seconds"),
                "cpu_seconds": side.get("cpu_seconds"),
                "attempts": side.get("attempts"),
                "fallback": side.get("fallback"),
                "threads": side.get("threads"),
                "error": side.get("error"),
                **{k: v for k, v in (side.get("metrics") or {}).items()},
                "transform": str(t.transform_path) if status == "ok" else None,
                "settings_digest": t.settings.digest(),
            }
        )
    df = pd.DataFrame(rows)
    with atomic_path(path) as tmp:
        df.to_csv(tmp, index=False)
    return df


@contextmanager
def exclusive(layout: Layout):
    """Hold the folder's lock file so two jobs never write one folder; the OS releases it when the process dies
    (:meth:`registration.layout.Layout.busy` probes it)."""
    root = layout.root
    root.mkdir(parents=True, exist_ok=True)
    with open(layout.lock_path, "w") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as e:
            raise RuntimeError(
                f"{root}: another registration job (precompute, select or report) is running on this folder"
            ) from e
        # temporary files left by a killed run (never a finished file) can go now that no one else writes here
        for tmp in root.glob("*/.tmp-*"):
            tmp.unlink(missing_ok=True)
        yield


def precompute(
    cases: CaseTable,
    out_dir: str | os.PathLike,
    settings: RegistrationSettings,
    workers: int = 1,
    threads: int = 1,
    timeout_s: float | None = None,
    fields: bool = False,
    field_factor: int = 4,
    scheduler: Any = None,
    dask_local: int | None = None,
    progress: bool = True,
    atlas_only: bool = False,
) -> JobSummary:
    """Register every planned pair of ``cases`` into ``OUT/<kind>/`` and write the manifest (and fields).

    ``scheduler`` (a Dask address or ``distributed.Client``) or ``dask_local`` (number of local Dask workers)
    run the pairs on Dask instead of the local process pool. ``atlas_only`` registers only the pairs with a
    labelled case on one side (see :func:`registration.pairs.plan_pairs`).
    """
    start = time.perf_counter()
    layout = Layout(out_dir, settings.kind)
    root, pairs_dir = layout.root, layout.pairs_dir
    pairs_dir.mkdir(parents=True, exist_ok=True)
    with exclusive(layout):
        handler = setup_logging(root / "precompute.log")
        try:
            cases.write(layout.cases_table)
            tasks = plan_pairs(cases.training, cases.evaluation, pairs_dir, settings, atlas_only)
            todo = [t for t in tasks if not is_finished(t)]
            summary = JobSummary(total=len(tasks), skipped=len(tasks) - len(todo))
            log.info(
                "precompute %s: %d pairs, %d finished, %d to run; %s; workers %d x %d threads; versions %s",
                settings.kind,
                len(tasks),
                summary.skipped,
                len(todo),
                settings,
                workers,
                threads,
                versions(),
            )
            bar = tqdm(
                total=len(tasks),
                initial=summary.skipped,
                desc=f"{settings.kind} pairs",
                unit="pair",
                disable=not progress,
            )
            on_result = _result_handler(summary, bar, threads)
            if scheduler is not None or dask_local:
                from registration.distributed import run_on_dask

                run_on_dask(todo, on_result, scheduler=scheduler, local_workers=dask_local, threads=threads)
            else:
                from registration.pool import PairPool

                PairPool(workers, threads, timeout_s or DEFAULT_TIMEOUT_S[settings.kind]).run(todo, on_result)
            bar.close()
            write_manifest(tasks, layout.manifest_path, {c["case_id"]: c["group"] for c in cases.all})
            if fields:
                write_fields(tasks, root, field_factor, progress)
            summary.seconds = time.perf_counter() - start
            log.info("summary: %s", summary)
            return summary
        finally:
            log.removeHandler(handler)
            handler.close()


def _result_handler(summary: JobSummary, bar, threads: int):
    """The per-attempt callback: count successes, retry a first failure with fallback settings, record the rest."""

    def on_result(task: PairTask, result: dict[str, Any]) -> PairTask | None:
        if result["status"] == "ok":
            log.info("ok %s in %.2f s (attempt %d)", task.stem, result["seconds"], task.attempt)
            summary.ok += 1
            bar.update()
            return None
        error = result.get("error", "unknown error")
        log.warning("pair %s failed (attempt %d): %s", task.stem, task.attempt, error)
        if task.attempt == 1:
            return replace(task, attempt=2, fallback=True, errors=[error])
        record = {
            "status": "failed",
            "error": error,
            "previous_errors": task.errors,
            "attempts": task.attempt,
            "fallback": task.fallback,
            "threads": threads,
            "versions": versions(),
        }
        write_sidecar(task, record)
        summary.failed[task.stem] = " | ".join([*task.errors, error])
        bar.update()
        return None

    return on_result


def write_fields(tasks: list[PairTask], root: Path, factor: int, progress: bool = True) -> int:
    """Write the missing low-resolution displacement fields of all finished pairs; returns how many."""
    import SimpleITK as sitk

    from registration.fields import write_field
    from registration.store import RegistrationStore

    store = RegistrationStore(root.parent, root.name)
    written = 0
    for t in tqdm([t for t in tasks if is_finished(t)], desc="fields", unit="pair", disable=not progress):
        path = store.field_path(t.fixed, t.moving)
        if path.exists() and path.stat().st_mtime >= t.transform_path.stat().st_mtime:
            continue
        reference = sitk.ReadImage(t.fixed_image, sitk.sitkFloat32)
        write_field(store.transform(t.fixed, t.moving), reference, path, factor)
        written += 1
    log.info("wrote %d displacement fields (factor %d)", written, factor)
    return written
