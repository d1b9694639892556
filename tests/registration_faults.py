"""The environment that injects faults into a registration job's workers (see registration_faults_site/)."""

from __future__ import annotations

import os
from pathlib import Path

SITE = Path(__file__).resolve().parent / "registration_faults_site"
FAULTS_ENV = "REGISTRATION_TEST_FAULTS"


def faults_env(spec: str) -> dict[str, str]:
    """``os.environ`` plus the faults ``spec`` (``"F__M=crash,A__B=sleep:30"``) and the site folder that applies
    them in every process of the job (fork server and workers)."""
    path = os.pathsep.join(p for p in (str(SITE), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, FAULTS_ENV: spec, "PYTHONPATH": path}
