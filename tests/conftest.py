"""Shared test helpers: tiny NIfTI volumes written with nibabel."""

from __future__ import annotations

import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

# keep torch/ITK from oversubscribing the 2 CI cores
os.environ.setdefault("OMP_NUM_THREADS", "1")


def write_nifti(path, array, affine=None, dtype=None) -> str:
    """Write ``array`` as NIfTI at ``path`` (parents created) and return the path as a string."""
    path = os.fspath(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    arr = np.asarray(array)
    if dtype is not None:
        arr = arr.astype(dtype)
    nib.save(nib.Nifti1Image(arr, np.eye(4) if affine is None else np.asarray(affine, dtype=float)), path)
    return path


@pytest.fixture
def nifti_writer():
    """The :func:`write_nifti` helper as a fixture."""
    return write_nifti


@pytest.fixture(scope="session")
def tiny_registered(tmp_path_factory):
    """A tiny dataset and a real (affine) registration output for it, for the registration-guided methods."""
    import subprocess
    import sys

    from tests.test_trainer import tiny_dataset

    root = tmp_path_factory.mktemp("tiny_registered")
    datalist = tiny_dataset(root / "data")
    for cmd in ("precompute", "select"):
        extra = ["--workers", "1", "--no-progress"] if cmd == "precompute" else ["--no-progress"]
        res = subprocess.run(
            [sys.executable, "-m", "registration", cmd, "--datalist", str(datalist), "--out", str(root / "reg")]
            + ["--kind", "affine", *extra],
            capture_output=True,
            text=True,
            cwd=Path(__file__).resolve().parents[1],
        )
        assert res.returncode == 0, res.stderr[-3000:]
    return root
