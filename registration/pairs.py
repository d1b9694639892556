"""Directed registration pairs: which pairs a job computes, where their files live, and when one is finished.

Layout under ``OUT/<kind>/pairs/`` for the ordered pair (fixed=F, moving=M), stem ``F__M``:

* ``F__M.h5``: the ITK composite transform; it maps points of F's physical (LPS) space to M's.
* ``F__M.TransformParameters.<i>.txt``: elastix's parameter text of stage ``i`` (0 affine, 1 B-spline).
* ``F__M.json``: the sidecar (status, seconds, metrics, threads, versions). It is written last, so a pair
  is finished exactly when its sidecar says ``"status": "ok"`` with the job's settings digest and the
  transform file exists.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from monai_ssl.fileio import atomic_write_json
from registration.params import RegistrationSettings

__all__ = ["PairTask", "pair_stem", "plan_pairs", "read_sidecar", "is_finished", "write_sidecar", "check_case_id"]

_CASE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9.\-_]*$")


def check_case_id(case_id: str) -> str | None:
    """Return a problem description when ``case_id`` cannot be used in a pair file name, else None."""
    if not _CASE_ID.match(case_id) or "__" in case_id:
        return f"case_id {case_id!r} must be letters, digits, '.', '-', '_' without '__' (it names pair files)"
    return None


def pair_stem(fixed: str, moving: str) -> str:
    """File stem of the ordered pair (fixed, moving)."""
    return f"{fixed}__{moving}"


@dataclass
class PairTask:
    """One directed registration: everything a worker needs, picklable, and idempotent to run again."""

    fixed: str
    moving: str
    fixed_image: str
    moving_image: str
    pairs_dir: str
    settings: RegistrationSettings
    attempt: int = 1
    fallback: bool = False
    errors: list[str] = field(default_factory=list)

    @property
    def stem(self) -> str:
        return pair_stem(self.fixed, self.moving)

    @property
    def transform_path(self) -> Path:
        return Path(self.pairs_dir) / f"{self.stem}.h5"

    @property
    def sidecar_path(self) -> Path:
        return Path(self.pairs_dir) / f"{self.stem}.json"

    def parameter_path(self, stage: int) -> Path:
        return Path(self.pairs_dir) / f"{self.stem}.TransformParameters.{stage}.txt"

    def identity(self) -> dict[str, Any]:
        """The fields a finished sidecar must match for the pair to be reused."""
        return {
            "fixed": self.fixed,
            "moving": self.moving,
            "fixed_image": self.fixed_image,
            "moving_image": self.moving_image,
            "kind": self.settings.kind,
            "settings_digest": self.settings.digest(),
        }


def plan_pairs(
    training: list[dict[str, Any]],
    evaluation: list[dict[str, Any]],
    pairs_dir: str | os.PathLike,
    settings: RegistrationSettings,
    atlas_only: bool = False,
) -> list[PairTask]:
    """All ordered pairs among the training cases, plus both directions between each evaluation case and
    each labelled training case (for the registration-only baseline). ``atlas_only``: only the pairs with a
    labelled case on one side, all that ``select`` and ``report`` read (REPS's unlabelled pairs come from the
    affine kind)."""
    tasks = []

    def add(f: dict[str, Any], m: dict[str, Any]) -> None:
        tasks.append(PairTask(f["case_id"], m["case_id"], f["image"], m["image"], os.fspath(pairs_dir), settings))

    for f in training:
        for m in training:
            if f["case_id"] != m["case_id"] and (not atlas_only or "labeled" in (f["group"], m["group"])):
                add(f, m)
    atlases = [c for c in training if c["group"] == "labeled"]
    for e in evaluation:
        for a in atlases:
            add(e, a)
            add(a, e)
    return tasks


def read_sidecar(path: str | os.PathLike) -> dict[str, Any] | None:
    """The sidecar JSON, or None when it is missing or unreadable (an unreadable sidecar means: recompute)."""
    try:
        return json.loads(Path(path).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def is_finished(task: PairTask) -> bool:
    """True when the pair was computed successfully with the same inputs and settings."""
    side = read_sidecar(task.sidecar_path)
    if not side or side.get("status") != "ok" or not task.transform_path.exists():
        return False
    return all(side.get(k) == v for k, v in task.identity().items())


def write_sidecar(task: PairTask, record: dict[str, Any]) -> Path:
    """Write the sidecar atomically (always last, after the transform and parameter files)."""
    return atomic_write_json(task.sidecar_path, {**task.identity(), **record})
