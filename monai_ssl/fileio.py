"""Crash-safe file writing: every output is written to a temporary file, then renamed into place (NIfTI with
header reuse, text, JSON), and the one file hash. Pinned downloads live with the demo's source
(:mod:`monai_ssl.demo.source`)."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

__all__ = [
    "atomic_path",
    "atomic_write_text",
    "atomic_write_json",
    "file_sha256",
]

logger = logging.getLogger(__name__)


@contextmanager
def atomic_path(path: str | os.PathLike, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only if the block succeeds.

    The temporary name keeps the final suffix (``.nii.gz``, ``.h5``...) so that writers which infer the
    format from the extension (ITK, nibabel) still work. A killed process leaves at most a ``.tmp-*``
    file, never a partial ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if suffix is None:
        suffix = "".join(path.suffixes)
    fd, tmp = tempfile.mkstemp(prefix=f".tmp-{path.name.split('.')[0]}-", suffix=suffix, dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp creates 0600; give outputs the usual permissions
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def save_nifti(
    array: Any,
    path: str | os.PathLike,
    affine: Any = None,
    like: Any = None,
    dtype: Any = None,
    scale: float = 1.0,
    descrip: str | None = None,
) -> Path:
    """Write an ``[i, j, k]`` (or ``[i, j, k, c]``) array as NIfTI, atomically: the project's one NIfTI writer.

    With ``like`` (a path or nibabel image) its header and affine are reused, so nibabel and MONAI see exactly that
    grid, and its shape must match; otherwise ``affine`` is written as qform and sform (code 1, mm units).
    ``scale`` is the NIfTI slope readers apply (stored values times ``scale``, e.g. 1/255 for uint8 probabilities).
    """
    import nibabel as nib
    import numpy as np

    data = np.asarray(array, dtype=dtype or np.asarray(array).dtype)
    if like is not None:
        ref = like if hasattr(like, "header") else nib.load(os.fspath(like))
        if tuple(data.shape[:3]) != tuple(ref.shape[:3]):
            raise ValueError(f"{path}: array shape {data.shape} does not match the reference shape {ref.shape}")
        header = ref.header.copy()
        header.set_data_dtype(data.dtype)
        img = nib.Nifti1Image(data, ref.affine, header)
    else:
        affine = np.asarray(affine, dtype=np.float64)
        img = nib.Nifti1Image(data, affine)
        img.header.set_xyzt_units("mm")
        img.set_qform(affine, code=1)
        img.set_sform(affine, code=1)
    img.header.set_slope_inter(scale, 0.0)
    if descrip is not None:
        img.header["descrip"] = descrip.encode()[:79]
    with atomic_path(path) as tmp:
        nib.save(img, tmp)
    return Path(path)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` atomically and return the path."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def atomic_write_json(path: str | os.PathLike, obj: Any, indent: int = 2) -> Path:
    """Write ``obj`` as JSON to ``path`` atomically and return the path."""
    return atomic_write_text(path, json.dumps(obj, indent=indent, sort_keys=False, default=_json_default) + "\n")


def _json_default(obj: Any) -> Any:
    """Serialise numpy scalars and arrays, and paths, which json does not know."""
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    raise TypeError(f"object of type {type(obj).__name__} is not JSON serialisable")


def file_sha256(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
