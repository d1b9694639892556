"""Converters from public dataset layouts (ACDC, Synapse/BTCV) to this project's datalists.

Each converter finds the cases of a dataset folder, splits them by patient with
:func:`~monai_ssl.data.datalist.split_cases` and writes the datalist with
:func:`~monai_ssl.data.datalist.write_datalist`. Images are referenced in place; only Synapse labels are
rewritten, because its 13 original organ labels are remapped to the usual 8 (TransUNet convention).
Files are not validated here beyond their names (that is :mod:`monai_ssl.data.validation`'s job), so a
conversion of a full dataset takes seconds, apart from the one-off Synapse label remap.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from nibabel.filebasedimages import ImageFileError
from tqdm import tqdm

from monai_ssl.data.datalist import GROUPS, DatalistError, load_datalist, split_cases, write_datalist
from monai_ssl.fileio import save_nifti

__all__ = [
    "ConversionError",
    "ACDC_LABELS",
    "SYNAPSE_SOURCE_LABELS",
    "SYNAPSE_LABELS",
    "SYNAPSE_REMAP",
    "convert_acdc",
    "convert_synapse",
    "remap_label_file",
    "resplit_datalist",
]

logger = logging.getLogger(__name__)

SplitRequest = int | Iterable[str]

ACDC_LABELS = {"0": "background", "1": "RV", "2": "MYO", "3": "LV"}

#: the 13 organ labels of the Beyond-the-Cranial-Vault (Synapse) abdomen set, as distributed
SYNAPSE_SOURCE_LABELS = {
    "0": "background",
    "1": "spleen",
    "2": "right_kidney",
    "3": "left_kidney",
    "4": "gallbladder",
    "5": "esophagus",
    "6": "liver",
    "7": "stomach",
    "8": "aorta",
    "9": "inferior_vena_cava",
    "10": "portal_and_splenic_veins",
    "11": "pancreas",
    "12": "right_adrenal_gland",
    "13": "left_adrenal_gland",
}

#: the 8-organ label set used by TransUNet and the semi-supervised papers that follow it
SYNAPSE_LABELS = {
    "0": "background",
    "1": "aorta",
    "2": "gallbladder",
    "3": "left_kidney",
    "4": "right_kidney",
    "5": "liver",
    "6": "pancreas",
    "7": "spleen",
    "8": "stomach",
}

#: original label value -> 8-organ value, for every original value (esophagus, veins, adrenals -> 0)
SYNAPSE_REMAP = {0: 0, 1: 7, 2: 4, 3: 3, 4: 2, 5: 0, 6: 5, 7: 8, 8: 1, 9: 0, 10: 0, 11: 6, 12: 0, 13: 0}

_NIFTI = r"\.nii(?:\.gz)?"
_ACDC_FRAME = re.compile(rf"^(?P<patient>patient\d+)_frame(?P<frame>\d+)(?P<gt>_gt)?{_NIFTI}$")
_ACDC_4D = re.compile(rf"^patient\d+_4d{_NIFTI}$")
_SYNAPSE_NAME = {"img": re.compile(rf"^img(?P<num>\d+){_NIFTI}$"), "label": re.compile(rf"^label(?P<num>\d+){_NIFTI}$")}


class ConversionError(DatalistError):
    """A dataset folder cannot be converted; the message names the offending path and the problem."""


def convert_acdc(
    root: str | os.PathLike,
    out: str | os.PathLike,
    labeled: SplitRequest = 1,
    validation: SplitRequest = 0,
    test: SplitRequest = 0,
    seed: int = 0,
) -> dict[str, Any]:
    """Write a datalist for an ACDC folder and return it as :func:`load_datalist` reads it back.

    Cases are the frames ``patientXXX_frameYY.nii.gz`` found anywhere under ``root`` (``training/``,
    ``testing/`` or flat); ``patientXXX_4d`` files are ignored. Frames with a ``_gt`` file are labelled,
    the others are unlabelled-only. ``phase`` ("ED"/"ES") comes from the patient's ``Info.cfg`` if present.
    """
    root = _existing_dir(root, "ACDC root")
    images: dict[str, Path] = {}
    labels: dict[str, Path] = {}
    for path in sorted(root.rglob("patient*.nii*")):
        if _ACDC_4D.match(path.name):
            continue
        m = _ACDC_FRAME.match(path.name)
        if m is None:
            raise ConversionError(f"{path}: not an ACDC file name (expected patientXXX_frameYY[_gt].nii.gz)")
        case_id = f"{m['patient']}_frame{m['frame']}"
        found = labels if m["gt"] else images
        if case_id in found:
            raise ConversionError(f"{path}: duplicate of {found[case_id]} (case {case_id})")
        found[case_id] = path
    if not images:
        raise ConversionError(f"{root}: no ACDC frames (patientXXX_frameYY.nii.gz) found under this folder")
    for case_id, path in labels.items():
        if case_id not in images:
            raise ConversionError(f"{path}: label without its image {case_id}.nii.gz")
    cases = []
    phases: dict[Path, dict[int, str]] = {}
    for case_id, image in images.items():
        m = _ACDC_FRAME.match(image.name)
        case: dict[str, Any] = {"case_id": case_id, "patient_id": m["patient"], "image": str(image)}
        if case_id in labels:
            case["label"] = str(labels[case_id])
        else:
            case["unlabeled_only"] = True
        case["frame"] = int(m["frame"])
        if image.parent not in phases:
            phases[image.parent] = _acdc_phases(image.parent / "Info.cfg")
        if case["frame"] in phases[image.parent]:
            case["phase"] = phases[image.parent][case["frame"]]
        cases.append(case)
    meta = {"name": "acdc", "modality": "MR", "labels": dict(ACDC_LABELS), "source": str(root)}
    return _write_split(meta, cases, out, labeled, validation, test, seed)


def _acdc_phases(info: Path) -> dict[int, str]:
    """Frame number -> "ED"/"ES" from an ACDC ``Info.cfg`` (empty if the file does not exist)."""
    if not info.is_file():
        return {}
    values = {}
    for line in info.read_text().splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() in ("ED", "ES"):
            try:
                values[key.strip()] = int(value.strip())
            except ValueError as e:
                raise ConversionError(f"{info}: {line.strip()!r} is not 'ED: <frame>' / 'ES: <frame>'") from e
    if set(values) != {"ED", "ES"}:
        raise ConversionError(f"{info}: expected both 'ED: <frame>' and 'ES: <frame>' lines")
    # ES written first so that ED wins should both name the same frame
    return {values["ES"]: "ES", values["ED"]: "ED"}


def convert_synapse(
    root: str | os.PathLike,
    out: str | os.PathLike,
    labeled: SplitRequest = 1,
    validation: SplitRequest = 0,
    test: SplitRequest = 0,
    seed: int = 0,
    labels_dir: str | os.PathLike | None = None,
    allow_unlabeled: bool = False,
) -> dict[str, Any]:
    """Write a datalist for a Synapse (BTCV abdomen) folder and return it as :func:`load_datalist` reads it.

    ``root`` holds ``img/imgXXXX.nii.gz`` and ``label/labelXXXX.nii.gz``. Labels are remapped with
    :data:`SYNAPSE_REMAP` into ``labels_dir`` (default ``<datalist folder>/labels_8organ``); images stay
    where they are. Case ids are ``caseXXXX``. An image without label is an error unless
    ``allow_unlabeled``, which makes it an unlabelled-only case.
    """
    root = _existing_dir(root, "Synapse root")
    out = Path(out).resolve()
    labels_dir = Path(labels_dir).resolve() if labels_dir is not None else out.parent / "labels_8organ"
    if labels_dir == (root / "label").resolve():
        raise ConversionError(f"{labels_dir}: the remapped labels would overwrite the original ones")
    found = {"img": _synapse_files(root / "img", "img"), "label": {}}
    # without labels allowed, a missing label folder is an error, raised by _synapse_files
    if not allow_unlabeled or (root / "label").is_dir():
        found["label"] = _synapse_files(root / "label", "label")
    if not found["img"]:
        raise ConversionError(f"{root / 'img'}: no Synapse images (imgXXXX.nii.gz) found")
    for num, path in found["label"].items():
        if num not in found["img"]:
            raise ConversionError(f"{path}: label without its image img{num}.nii.gz")
    cases = []
    for num, image in tqdm(sorted(found["img"].items()), desc="remap Synapse labels", unit="case", disable=None):
        case: dict[str, Any] = {"case_id": f"case{num}", "patient_id": f"case{num}", "image": str(image)}
        if num in found["label"]:
            source = found["label"][num]
            case["label"] = str(remap_label_file(source, labels_dir / source.name, SYNAPSE_REMAP))
        elif allow_unlabeled:
            case["unlabeled_only"] = True
        else:
            raise ConversionError(f"{image}: no label {root / 'label'}/label{num}.nii.gz (use allow_unlabeled)")
        cases.append(case)
    meta = {
        "name": "synapse",
        "modality": "CT",
        "labels": dict(SYNAPSE_LABELS),
        "source": str(root),
        "source_labels": dict(SYNAPSE_SOURCE_LABELS),
        "label_remap": {str(k): v for k, v in SYNAPSE_REMAP.items()},
    }
    return _write_split(meta, cases, out, labeled, validation, test, seed)


def _synapse_files(folder: Path, kind: str) -> dict[str, Path]:
    """Number string -> path of the ``imgXXXX``/``labelXXXX`` NIfTIs of one Synapse folder."""
    folder = _existing_dir(folder, f"Synapse {kind} folder")
    files = {}
    for path in sorted(folder.iterdir()):
        if path.name.startswith(".") or not path.is_file():
            continue
        m = _SYNAPSE_NAME[kind].match(path.name)
        if m is None:
            raise ConversionError(f"{path}: not a Synapse file name (expected {kind}XXXX.nii.gz)")
        if m["num"] in files:
            raise ConversionError(f"{path}: duplicate of {files[m['num']]}")
        files[m["num"]] = path
    return files


def remap_label_file(source: str | os.PathLike, target: str | os.PathLike, remap: dict[int, int]) -> Path:
    """Write ``source``'s label map with values replaced by ``remap`` to ``target`` (uint8, same header).

    Every value of the source must be a key of ``remap``. Skipped when ``target`` is newer than ``source``,
    so an interrupted conversion resumes where it stopped; the write is atomic.
    """
    source, target = Path(source), Path(target)
    if target.is_file() and target.stat().st_mtime_ns > source.stat().st_mtime_ns:
        logger.debug("%s is up to date", target)
        return target
    try:
        img = nib.load(source)
        data = np.asanyarray(img.dataobj)
    except (ImageFileError, OSError, EOFError, ValueError) as e:
        raise ConversionError(f"{source}: cannot read the label volume ({e})") from e
    values = np.unique(data)
    if not np.array_equal(values, np.round(values)):
        raise ConversionError(f"{source}: label values must be integers, found {values[values != np.round(values)]}")
    unknown = sorted(set(values.astype(np.int64).tolist()) - set(remap))
    if unknown:
        raise ConversionError(f"{source}: label values {unknown} are not in the remap table {sorted(remap)}")
    lut = np.zeros(max(remap) + 1, dtype=np.uint8)
    lut[list(remap)] = list(remap.values())
    save_nifti(lut[data.astype(np.int64)], target, like=img, dtype=np.uint8)
    logger.debug("remapped %s -> %s", source, target)
    return target


def resplit_datalist(
    datalist: dict[str, Any],
    out: str | os.PathLike,
    labeled: SplitRequest = 1,
    validation: SplitRequest = 0,
    test: SplitRequest = 0,
    seed: int = 0,
) -> dict[str, Any]:
    """Re-split all cases of a loaded datalist by patient and write the result to ``out``.

    Metadata is kept; unlabelled-only and label-less cases stay unlabelled (see :func:`split_cases`).
    """
    meta = {k: v for k, v in datalist.items() if k not in GROUPS and k != "datalist_path"}
    cases = [case for group in GROUPS for case in datalist.get(group, [])]
    return _write_split(meta, cases, out, labeled, validation, test, seed)


def _write_split(
    meta: dict[str, Any],
    cases: list[dict[str, Any]],
    out: str | os.PathLike,
    labeled: SplitRequest,
    validation: SplitRequest,
    test: SplitRequest,
    seed: int,
) -> dict[str, Any]:
    """Split ``cases`` by patient, record the request under ``"split"``, write and read back the datalist."""
    requests = {"labeled": labeled, "validation": validation, "test": test}
    # a lone string is one id, not an iterable of characters
    requests = {g: r if isinstance(r, int) else [r] if isinstance(r, str) else list(r) for g, r in requests.items()}
    groups = split_cases(cases, **requests, seed=seed)
    datalist = {**meta, "split": {**requests, "seed": seed}, **groups}
    path = write_datalist(datalist, out)
    logger.info("wrote %s: %s", path, ", ".join(f"{g} {len(groups[g])}" for g in GROUPS))
    return load_datalist(path)


def _existing_dir(path: str | os.PathLike, what: str) -> Path:
    path = Path(path).resolve()
    if not path.is_dir():
        raise ConversionError(f"{path}: {what} does not exist or is not a folder")
    return path
