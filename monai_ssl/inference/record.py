"""The model's record of its preprocessing (``models/model.json``): what inference and evaluation need to feed
the model what it was trained on, so that a CT model is never silently normalised as MR.

Training writes it when it starts (:class:`ModelRecord`); ``inference.json`` and ``evaluate.json`` take modality,
spacing, slice layout, patch size, context and classes from it, and refuse an explicit override that contradicts
it (:func:`check_matches`), naming both values.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ignite.engine import Engine, Events

from monai_ssl.data.validation import InputError
from monai_ssl.fileio import atomic_write_json

__all__ = ["MODEL_RECORD", "RECORDED_KEYS", "ModelRecord", "read_model_record", "recorded", "check_matches"]

logger = logging.getLogger(__name__)
MODEL_RECORD = "model.json"
#: what a model records; every key is also a bundle key of the same name
RECORDED_KEYS = ("method", "modality", "num_classes", "class_names", "pixdim", "spatial_dims", "context",
                 "patch_size", "registration_prior", "registration_kind")  # fmt: skip


def _plain(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if hasattr(value, "tolist"):
        return value.tolist()
    return value


class ModelRecord:
    """Training handler: write ``<ckpt_dir>/model.json`` (atomically) when the run starts."""

    def __init__(self, ckpt_dir: str | os.PathLike, **fields: Any):
        unknown = sorted(set(fields) - set(RECORDED_KEYS))
        if unknown:
            raise ValueError(f"ModelRecord: unknown field(s) {unknown}; expected {list(RECORDED_KEYS)}")
        self.path = Path(ckpt_dir) / MODEL_RECORD
        self.fields = {k: _plain(v) for k, v in fields.items()}

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, lambda _e: atomic_write_json(self.path, self.fields))


def read_model_record(ckpt_dir: str | os.PathLike) -> dict[str, Any] | None:
    """The record of the model in ``ckpt_dir``, or None for a model trained before records existed."""
    path = Path(ckpt_dir) / MODEL_RECORD
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise InputError(f"{path}: unreadable model record ({e})") from None


def recorded(record: Mapping[str, Any] | None, key: str, where: str | os.PathLike = "", default: Any = None) -> Any:
    """``record[key]``; for a model without a record (trained by an earlier version, or not trained yet) the
    bundle's documented ``default``, with a warning that names the file (pass ``--<key>`` to be explicit)."""
    if record is not None and key in record:
        return record[key]
    logger.warning("%s: no record of the model's %s; using %s (pass --%s to set it)", Path(where) / MODEL_RECORD,
                   key, json.dumps(_plain(default)), key)  # fmt: skip
    return default


def check_matches(record: Mapping[str, Any] | None, where: str | os.PathLike = "", **given: Any) -> None:
    """Refuse settings that contradict the model's record (e.g. ``--modality CT`` for an MR model)."""
    if record is None:
        return
    problems = []
    for key, value in given.items():
        if key in record and _plain(value) != record[key] and not _same_number(_plain(value), record[key]):
            problems.append(
                f"{Path(where) / MODEL_RECORD}: the model was trained with {key}={json.dumps(record[key])}, this run "
                f"asks for {key}={json.dumps(_plain(value))}; drop the override (the model's value is used) or use "
                "another model"
            )
    if problems:
        raise InputError(problems)


def _same_number(a: Any, b: Any) -> bool:
    if isinstance(a, Sequence) and isinstance(b, Sequence) and not isinstance(a, str):
        return len(a) == len(b) and all(_same_number(x, y) for x, y in zip(a, b, strict=True))
    try:
        return float(a) == float(b)
    except (TypeError, ValueError):
        return False
