"""Where the registration job writes each file of ``OUT/<kind>/``, and the one reader of its selection.

Free of ITK and torch, so training code (``monai_ssl.data.pipeline``) and benchmarks read the same layout that
``python -m registration`` writes, without loading ITK::

    OUT/<kind>/cases.json                      the case table of the last precompute (inputs, groups, labels)
    OUT/<kind>/manifest.csv, precompute.log    its pairs' status and its log; ``.lock`` while a job runs
    OUT/<kind>/pairs/F__M.{h5,json,...}        one ordered pair (see registration.pairs)
    OUT/<kind>/fields/F__M.nii.gz              low-resolution displacement fields (precompute --fields)
    OUT/<kind>/brs.json                        the selection written by ``select``
    OUT/<kind>/registered_labels/<case>.nii.gz           registered label of each unlabelled case
    OUT/<kind>/registered_probabilities/<case>.nii.gz    fused class probabilities (4D, uint8 / 255)
    OUT/<kind>/priors/<case>.nii.gz                      registration prior of each validation/test case (same)
    OUT/<kind>/reg_only/                       the registration-only baseline written by ``report``
"""

from __future__ import annotations

import fcntl
import json
import os
from pathlib import Path
from typing import Any

from monai_ssl.data.validation import InputError
from registration.pairs import pair_stem

__all__ = ["Layout", "SELECTED_FILES"]

# what a brs.json case entry may point to -> how error messages name it
SELECTED_FILES = {
    "registered_label": "registered label",
    "registered_probabilities": "registered probabilities",
    "prior": "registration prior",
}


class Layout:
    """Paths of one registration output ``OUT/<kind>`` and the reader of its selection (``brs.json``)."""

    def __init__(self, out_dir: str | os.PathLike, kind: str):
        self.root = Path(out_dir) / kind
        self.kind = kind

    @property
    def cases_table(self) -> Path:
        return self.root / "cases.json"

    @property
    def manifest_path(self) -> Path:
        """One row per pair of the last precompute: status, seconds, metrics."""
        return self.root / "manifest.csv"

    @property
    def lock_path(self) -> Path:
        """Held exclusively by precompute, select and report (see ``registration.jobs.exclusive``)."""
        return self.root / ".lock"

    @property
    def pairs_dir(self) -> Path:
        return self.root / "pairs"

    @property
    def selection_path(self) -> Path:
        return self.root / "brs.json"

    @property
    def report_dir(self) -> Path:
        return self.root / "reg_only"

    def busy(self) -> bool:
        """True while a job holds :attr:`lock_path` (``registration.jobs.exclusive``): outputs are then partial."""
        if not self.lock_path.exists():
            return False
        with open(self.lock_path) as fh:
            try:
                fcntl.flock(fh, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                return True
            fcntl.flock(fh, fcntl.LOCK_UN)
        return False

    def pair_path(self, fixed: str, moving: str, suffix: str = ".h5") -> Path:
        return self.pairs_dir / f"{pair_stem(fixed, moving)}{suffix}"

    def field_path(self, src: str, dst: str) -> Path:
        return self.root / "fields" / f"{pair_stem(src, dst)}.nii.gz"

    def registered_label_path(self, case_id: str) -> Path:
        """Where ``select`` writes the registered label of an unlabelled case."""
        return self.root / "registered_labels" / f"{case_id}.nii.gz"

    def registered_probabilities_path(self, case_id: str) -> Path:
        """Where ``select`` writes the fused class probabilities of an unlabelled case (4D, uint8 / 255)."""
        return self.root / "registered_probabilities" / f"{case_id}.nii.gz"

    def prior_path(self, case_id: str) -> Path:
        """Where ``select`` writes the registration prior of a validation or test case (4D, uint8 / 255)."""
        return self.root / "priors" / f"{case_id}.nii.gz"

    def read_selection(self) -> dict[str, Any]:
        """``brs.json`` as written by ``select``: every score, the choice and strategy of each unlabelled case."""
        if not self.selection_path.exists():
            raise InputError(
                f"{self.selection_path}: no best-registration selection; run `python -m registration precompute` "
                "and `python -m registration select` first"
            )
        return json.loads(self.selection_path.read_text())

    def selected(self, what: str = "registered_label") -> dict[str, Path]:
        """case_id -> the ``what`` file (a key of :data:`SELECTED_FILES`) of every case the selection gave one;
        a listed file that is missing is an error naming it."""
        if what not in SELECTED_FILES:
            raise ValueError(f"what must be one of {sorted(SELECTED_FILES)}, got {what!r}")
        cases = self.read_selection().get("priors" if what == "prior" else "cases", {})
        out = {cid: self.root / c[what] for cid, c in cases.items() if c.get(what)}
        listed = f"{SELECTED_FILES[what]} listed in {self.selection_path} is missing"
        missing = [f"{p}: {listed}" for p in out.values() if not p.exists()]
        if missing:
            raise InputError(missing)
        return out
