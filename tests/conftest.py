"""Shared test helpers: tiny NIfTI volumes written with nibabel."""

from __future__ import annotations

import os

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
