"""Datalist input for the registration job: which cases it may use, and a full check of their files.

Registration uses the training cases (labelled + unlabelled; unlabelled labels are dropped by
``training_cases``) for the pairwise job, and the validation/test cases that have labels only for the
registration-only baseline. The files are checked by the same validator as training
(:func:`monai_ssl.data.validation.check_case`: data read in full, NaN/inf, 3D, integer labels inside the
declared classes, label grid equal to the image grid), and every problem is collected before any work starts,
so a user sees the whole list at once.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from monai_ssl.data.datalist import DatalistError, group_cases, load_datalist, num_classes, training_cases
from monai_ssl.data.validation import InputError, check_case
from monai_ssl.fileio import atomic_write_json
from registration.pairs import check_case_id

__all__ = ["InputError", "CaseTable", "load_cases", "check_files"]

EVAL_GROUPS = ("validation", "test")


class CaseTable:
    """Training and evaluation cases of a datalist, with absolute paths and the class names."""

    def __init__(self, datalist: dict[str, Any], include_eval: bool = True):
        self.datalist_path = datalist.get("datalist_path", "")
        self.labels = {str(k): v for k, v in datalist.get("labels", {}).items()}
        self.num_classes = num_classes(datalist) if self.labels else None
        self.training = training_cases(datalist)
        self.evaluation = (
            [c for g in EVAL_GROUPS for c in group_cases(datalist, g) if c.get("label")] if include_eval else []
        )

    @property
    def all(self) -> list[dict[str, Any]]:
        return self.training + self.evaluation

    def ids(self, group: str) -> list[str]:
        return [c["case_id"] for c in self.all if c["group"] == group]

    def write(self, path: str | os.PathLike) -> Path:
        """Write ``cases.json``: what :class:`registration.store.RegistrationStore` reads."""
        keep = ("case_id", "patient_id", "group", "image", "label")
        cases = [{k: c[k] for k in keep if c.get(k)} for c in self.all]
        return atomic_write_json(path, {"datalist": self.datalist_path, "labels": self.labels, "cases": cases})


def check_files(
    cases: list[dict[str, Any]], n_classes: int | None = None, load_data: bool = True, progress: bool = False
) -> list[str]:
    """Every problem with the cases' ids and files, from the shared validator; ``load_data=False`` reads
    headers only (a truncated file then passes)."""
    problems = []
    for case in tqdm(cases, desc="checking inputs", unit="case", disable=not progress):
        bad_id = check_case_id(case["case_id"])
        if bad_id:
            problems.append(bad_id)
        files = {k: case[k] for k in ("image", "label") if case.get(k)}  # never an unlabelled case's label
        problems += [f"{case['group']} case {case['case_id']}: {p}" for p in check_case(files, n_classes, load_data)]
    return problems


def load_cases(datalist_path: str | os.PathLike, include_eval: bool = True, progress: bool = False) -> CaseTable:
    """Load a datalist and check every file the job will read, in full; raise :class:`InputError` listing
    every problem (the first line names the datalist)."""
    try:
        table = CaseTable(load_datalist(datalist_path), include_eval=include_eval)
    except DatalistError as e:
        raise InputError(str(e)) from e
    problems = check_files(table.all, table.num_classes, progress=progress)
    if len(table.training) < 2:
        problems.append(f"need at least 2 training (labelled + unlabelled) cases, found {len(table.training)}")
    if problems:
        raise InputError([f"{datalist_path}: {len(problems)} problem(s):", *(f"  - {p}" for p in problems)])
    return table
