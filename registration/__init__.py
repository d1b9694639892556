"""Offline ITK registration for monai-ssl: pairwise elastix registration, cycle scores, atlas selection.

This package never imports torch (or MONAI): its batch workers only need ITK, numpy and the torch-free parts
of ``monai_ssl`` (datalists, atomic file writing). Public entry points are imported lazily so that
``import registration`` stays cheap; see ``registration/README.md``.
"""

from __future__ import annotations

import importlib

__all__ = ["RegistrationStore", "RegistrationSettings", "precompute", "load_cases", "load_field"]

_EXPORTS = {
    "RegistrationStore": "registration.store",
    "RegistrationSettings": "registration.params",
    "precompute": "registration.jobs",
    "load_cases": "registration.inputs",
    "load_field": "registration.fields",
}


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'registration' has no attribute {name!r}")
