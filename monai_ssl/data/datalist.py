"""Decathlon-style JSON datalists with semi-supervised groups, and a patient-level split helper.

A datalist is a JSON object with dataset metadata and one list of cases per group::

    {
      "name": "demo_brain", "modality": "MR",
      "labels": {"0": "background", "1": "cortex", ...},
      "labeled":    [{"case_id": "d9861", "patient_id": "9861", "image": "images/d9861.nii.gz",
                      "label": "labels/d9861.nii.gz", "group": "labeled"}, ...],
      "unlabeled":  [...], "validation": [...], "test": [...]
    }

Relative paths are relative to the datalist file, as in MONAI's ``load_decathlon_datalist``. This module is
deliberately torch-free (plain ``json``), because the registration workers import it.
"""

from __future__ import annotations

import copy
import json
import os
import zlib
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from monai_ssl.fileio import atomic_write_json

__all__ = [
    "GROUPS",
    "TRAINING_GROUPS",
    "DatalistError",
    "load_datalist",
    "write_datalist",
    "group_cases",
    "training_cases",
    "split_cases",
    "labelable_patients",
    "num_classes",
    "case_seed",
]

GROUPS = ("labeled", "unlabeled", "validation", "test")
TRAINING_GROUPS = ("labeled", "unlabeled")
PATH_KEYS = ("image", "label")


class DatalistError(ValueError):
    """A datalist file or one of its cases is malformed; the message names the file and the problem."""


def load_datalist(path: str | os.PathLike) -> dict[str, Any]:
    """Read and structurally check a datalist; return it with absolute ``image``/``label`` paths.

    Files are not opened here (see :mod:`monai_ssl.data.validation` for that). The returned dict keeps the
    metadata keys and adds ``"datalist_path"``.
    """
    path = Path(path).resolve()
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError as e:
        raise DatalistError(f"{path}: datalist file not found") from e
    except json.JSONDecodeError as e:
        raise DatalistError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(raw, dict):
        raise DatalistError(f"{path}: top level must be a JSON object with the groups {GROUPS}")
    problems = check_structure(raw)
    if problems:
        raise DatalistError(f"{path}: " + "; ".join(problems))
    data = copy.deepcopy(raw)
    for group in GROUPS:
        for case in data.get(group, []):
            case.setdefault("group", group)
            case.setdefault("patient_id", case["case_id"])
            for key in PATH_KEYS:
                if case.get(key):
                    case[key] = str((path.parent / case[key]).resolve())
    data["datalist_path"] = str(path)
    return data


def check_structure(raw: dict[str, Any]) -> list[str]:
    """Return every structural problem of a raw datalist (missing keys, duplicate ids, wrong groups)."""
    problems: list[str] = []
    if not any(g in raw for g in GROUPS):
        problems.append(f"no case groups: expected at least one of {GROUPS}")
    if "labels" in raw and not isinstance(raw["labels"], dict):
        problems.append('"labels" must map class index strings to names')
    seen: dict[str, str] = {}
    for group in GROUPS:
        cases = raw.get(group, [])
        if not isinstance(cases, list):
            problems.append(f'"{group}" must be a list of cases')
            continue
        for i, case in enumerate(cases):
            where = f"{group}[{i}]"
            if not isinstance(case, dict):
                problems.append(f"{where}: a case must be an object")
                continue
            cid = case.get("case_id")
            if not cid:
                problems.append(f"{where}: missing case_id")
            elif cid in seen:
                problems.append(f"{where}: case_id {cid!r} also in {seen[cid]}")
            else:
                seen[cid] = group
            if not case.get("image"):
                problems.append(f"{where} ({cid}): missing image")
            if case.get("group", group) != group:
                problems.append(f"{where} ({cid}): group field {case['group']!r} but listed under {group!r}")
            if group in ("labeled", "validation", "test") and not case.get("label"):
                problems.append(f"{where} ({cid}): a {group} case needs a label")
    return problems


def write_datalist(datalist: dict[str, Any], path: str | os.PathLike) -> Path:
    """Write a datalist atomically, turning paths under the file's folder into relative ones."""
    path = Path(path).resolve()
    out = {k: v for k, v in datalist.items() if k != "datalist_path" and k not in GROUPS}
    for group in GROUPS:
        if group not in datalist:
            continue
        out[group] = []
        for case in datalist[group]:
            case = dict(case)
            case["group"] = group
            for key in PATH_KEYS:
                if case.get(key):
                    case[key] = _relative(case[key], path.parent)
            out[group].append(case)
    problems = check_structure(out)
    if problems:
        raise DatalistError(f"{path}: refusing to write an invalid datalist: " + "; ".join(problems))
    return atomic_write_json(path, out)


def _relative(p: str, base: Path) -> str:
    p_abs = Path(p) if Path(p).is_absolute() else (base / p)
    try:
        return str(p_abs.resolve().relative_to(base))
    except ValueError:
        return str(p_abs.resolve())


def group_cases(datalist: dict[str, Any], group: str) -> list[dict[str, Any]]:
    """Return copies of the cases of one group.

    Unlabelled cases never carry a ``label`` key, even when the datalist names a label file: training code
    works on what this returns, so it cannot read an unlabelled case's label by accident.
    """
    if group not in GROUPS:
        raise DatalistError(f"unknown group {group!r}; expected one of {GROUPS}")
    cases = [dict(c) for c in datalist.get(group, [])]
    if group == "unlabeled":
        for case in cases:
            case.pop("label", None)
    return cases


def training_cases(datalist: dict[str, Any]) -> list[dict[str, Any]]:
    """Labelled then unlabelled cases: the volumes that training and registration may use."""
    return [c for g in TRAINING_GROUPS for c in group_cases(datalist, g)]


def num_classes(datalist: dict[str, Any]) -> int:
    """Number of classes including background, from the ``labels`` table."""
    if "labels" not in datalist:
        raise DatalistError(f"{datalist.get('datalist_path', 'datalist')}: no 'labels' table")
    return max(int(k) for k in datalist["labels"]) + 1


def split_cases(
    cases: Sequence[dict[str, Any]],
    labeled: int | Iterable[str] = 1,
    validation: int | Iterable[str] = 0,
    test: int | Iterable[str] = 0,
    seed: int = 0,
) -> dict[str, list[dict[str, Any]]]:
    """Assign cases to groups by patient, deterministically for a seed.

    Each of ``labeled``, ``validation`` and ``test`` is either a number of patients or a list of patient or
    case ids. All cases of one patient (e.g. the ED and ES frames of an ACDC patient) land in one group. Cases
    with ``"unlabeled_only": true`` or without a label always go to ``unlabeled``; every other patient not
    picked goes there too. Counts are drawn, after explicit ids, from a seeded shuffle of the sorted patients.
    """
    patients = _patients(cases)
    eligible = labelable_patients(cases)
    order = [eligible[i] for i in np.random.default_rng(seed).permutation(len(eligible))]
    taken: set[str] = set()
    chosen: dict[str, list[str]] = {}
    # explicit ids first so that counts never steal a patient that was asked for by name
    requests = {"labeled": labeled, "validation": validation, "test": test}
    for group, req in requests.items():
        if isinstance(req, int):
            continue
        ids = []
        for ident in req:
            pid = _patient_of(ident, patients)
            if pid not in eligible:
                raise DatalistError(f"{group}: {ident!r} has no label or is unlabelled-only, cannot be {group}")
            if pid in taken:
                raise DatalistError(f"{group}: patient {pid!r} is already in another group")
            taken.add(pid)
            ids.append(pid)
        chosen[group] = ids
    for group, req in requests.items():
        if not isinstance(req, int):
            continue
        free = [p for p in order if p not in taken]
        if req > len(free):
            raise DatalistError(f"{group}: asked for {req} patients but only {len(free)} labelled ones are left")
        chosen[group] = free[:req]
        taken.update(chosen[group])
    groups: dict[str, list[dict[str, Any]]] = {g: [] for g in GROUPS}
    for pid in sorted(patients):
        group = next((g for g, ids in chosen.items() if pid in ids), "unlabeled")
        for case in sorted(patients[pid], key=lambda c: c["case_id"]):
            case["group"] = group
            groups[group].append(case)
    return groups


def _patients(cases: Sequence[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    patients: dict[str, list[dict[str, Any]]] = {}
    for case in cases:
        patients.setdefault(str(case.get("patient_id", case["case_id"])), []).append(dict(case))
    return patients


def labelable_patients(cases: Sequence[dict[str, Any]]) -> list[str]:
    """Sorted ids of the patients that may be labelled, validation or test: every case has a label and none is
    ``unlabeled_only``."""
    return sorted(
        p for p, cs in _patients(cases).items() if all(c.get("label") and not c.get("unlabeled_only") for c in cs)
    )


def _patient_of(ident: str, patients: dict[str, list[dict[str, Any]]]) -> str:
    if ident in patients:
        return ident
    for pid, cs in patients.items():
        if any(c["case_id"] == ident for c in cs):
            return pid
    raise DatalistError(f"unknown patient or case id {ident!r}")


def case_seed(seed: int, case_id: str) -> list[int]:
    """Entropy of a per-case ``numpy`` generator: ``(seed, crc32(case_id))``, so a case's draws do not depend on
    the other cases of the datalist or their order."""
    return [int(seed), zlib.crc32(str(case_id).encode())]
