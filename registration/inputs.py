"""Datalist input for the registration job: which cases it may use, and a full check of their files.

Registration uses the training cases (labelled + unlabelled; unlabelled labels are dropped by
``training_cases``) for the pairwise job, and the validation/test cases that have labels only for the
registration-only baseline. Every problem with the files is collected before any work starts, so a user sees
the whole list at once.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from monai_ssl.data.datalist import DatalistError, group_cases, load_datalist, training_cases
from monai_ssl.fileio import atomic_write_json
from registration.pairs import check_case_id

__all__ = ["InputError", "CaseTable", "load_cases", "check_files"]

EVAL_GROUPS = ("validation", "test")


class InputError(ValueError):
    """The datalist names missing or unreadable files; the message lists every problem."""


class CaseTable:
    """Training and evaluation cases of a datalist, with absolute paths and the class names."""

    def __init__(self, datalist: dict[str, Any], include_eval: bool = True):
        self.datalist_path = datalist.get("datalist_path", "")
        self.labels = {str(k): v for k, v in datalist.get("labels", {}).items()}
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


def _header(path: str) -> tuple[tuple[int, ...], np.ndarray] | str:
    """(shape, affine) of a NIfTI file, or a problem description."""
    if not Path(path).is_file():
        return "file not found"
    try:
        img = nib.load(path)
    except Exception as e:  # nibabel raises several types for broken files
        return f"not a readable image ({type(e).__name__}: {e})"
    shape = tuple(int(s) for s in img.shape)
    if len(shape) == 4 and shape[3] == 1:
        shape = shape[:3]
    if len(shape) != 3:
        return f"expected a 3D volume, got shape {img.shape}"
    if min(shape) < 2:
        return f"volume too small to register, shape {shape}"
    return shape, img.affine


def check_files(cases: list[dict[str, Any]]) -> list[str]:
    """Every problem with the cases' ids, image and label files (existence, readability, 3D, label grid)."""
    problems = []
    for case in cases:
        cid = case["case_id"]
        bad_id = check_case_id(cid)
        if bad_id:
            problems.append(bad_id)
        image = _header(case["image"])
        if isinstance(image, str):
            problems.append(f"{case['group']} case {cid}: image {case['image']}: {image}")
        if not case.get("label"):
            continue
        label = _header(case["label"])
        if isinstance(label, str):
            problems.append(f"{case['group']} case {cid}: label {case['label']}: {label}")
        elif not isinstance(image, str):
            if label[0] != image[0]:
                problems.append(f"{case['group']} case {cid}: label shape {label[0]} != image shape {image[0]}")
            elif not np.allclose(label[1], image[1], atol=1e-3):
                problems.append(f"{case['group']} case {cid}: label affine differs from the image affine")
    return problems


def load_cases(datalist_path: str | os.PathLike, include_eval: bool = True) -> CaseTable:
    """Load a datalist and check all files the job will read; raise :class:`InputError` listing every problem."""
    try:
        table = CaseTable(load_datalist(datalist_path), include_eval=include_eval)
    except DatalistError as e:
        raise InputError(str(e)) from e
    problems = check_files(table.all)
    if len(table.training) < 2:
        problems.append(f"need at least 2 training (labelled + unlabelled) cases, found {len(table.training)}")
    if problems:
        raise InputError(f"{datalist_path}: {len(problems)} problem(s):\n  - " + "\n  - ".join(problems))
    return table
