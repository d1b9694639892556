"""Abdominal CT example dataset: one real CT with TotalSegmentator organ labels, plus deformed copies of it.

The ``totalsegmentator==2.18.0`` source archive on PyPI (Apache-2.0) ships a real abdominal CT
(``tests/reference_files/example_ct.nii.gz``, 3 mm isotropic) and the label map that TotalSegmentator's
fast model predicts for it (``example_seg_fast_force_split.nii.gz``). This script downloads that archive with
``pip download`` (the archive is only read, never installed or built), checks its pinned sha256, remaps the
labels to the 8 Synapse organs and, because there is a single real volume, makes a small semi-supervised set:
the real volume is the labelled case; unlabelled, validation and test subjects are smooth random deformations
of it (``monai_ssl.demo.random_smooth_deformation``). Every file is written atomically.

Run ``python examples/abdomen_ct/build_dataset.py --out data/abdomen_ct [--cache DIR] [--seed S]
[--num-unlabeled N]``; the cache defaults to ``$MONAI_SSL_CACHE`` or ``~/.cache/monai_ssl``.
"""

from __future__ import annotations

import argparse
import gzip
import logging
import os
import tarfile
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pandas as pd
from scipy import ndimage as ndi
from tqdm.auto import tqdm

from monai_ssl.data.converters import SYNAPSE_LABELS, remap_label_file
from monai_ssl.data.datalist import write_datalist
from monai_ssl.demo import default_cache_dir, pip_download_pinned, random_smooth_deformation, warp_labels
from monai_ssl.fileio import atomic_path, atomic_write_text

__all__ = [
    "TOTALSEG_VERSION",
    "ARCHIVE",
    "ARCHIVE_SHA256",
    "CT_MEMBER",
    "SEG_MEMBER",
    "TOTALSEG_TO_SYNAPSE",
    "SourceDataError",
    "DownloadError",
    "fetch_archive",
    "read_members",
    "synapse_remap",
    "deform_ct",
    "build_dataset",
    "build_parser",
    "main",
]

logger = logging.getLogger("abdomen_ct")

TOTALSEG_VERSION = "2.18.0"
ARCHIVE = f"totalsegmentator-{TOTALSEG_VERSION}.tar.gz"
ARCHIVE_SHA256 = "5d4223ef93973bc36d710869d11e7742ead2c154c72f7f9edcaaadd5b6c4bd03"
_ROOT = f"totalsegmentator-{TOTALSEG_VERSION}"
CT_MEMBER = f"{_ROOT}/tests/reference_files/example_ct.nii.gz"
SEG_MEMBER = f"{_ROOT}/tests/reference_files/example_seg_fast_force_split.nii.gz"
LICENSE_MEMBER = f"{_ROOT}/LICENSE"

#: TotalSegmentator "total" task id -> Synapse 8-organ id (names: ``SYNAPSE_LABELS``); every other id -> 0
TOTALSEG_TO_SYNAPSE = {52: 1, 4: 2, 3: 3, 2: 4, 5: 5, 7: 6, 1: 7, 6: 8}
#: the TotalSegmentator names of those ids (``totalsegmentator/map_to_binary.py``, task "total")
TOTALSEG_NAMES = {
    52: "aorta",
    4: "gallbladder",
    3: "kidney_left",
    2: "kidney_right",
    5: "liver",
    7: "pancreas",
    1: "spleen",
    6: "stomach",
}
REAL_PATIENT = "totalseg_example_ct"
# deformation sizes in mm, turned into voxels of the source grid (the library function works in voxels)
DEFORMATION_MM = {"max_translation": 6.0, "max_displacement": 9.0, "smoothing": 24.0}


class SourceDataError(RuntimeError):
    """The source archive cannot be obtained or read; the message says which file and what to do."""


class DownloadError(SourceDataError):
    """``pip download`` could not fetch the archive (typically: no access to the package index)."""


@dataclass(frozen=True)
class Subject:
    """One output case: its id, group and, for a synthetic subject, the index of its deformation."""

    case_id: str
    group: str
    index: int = 0  # 0: the real volume; k > 0: the k-th deformation

    @property
    def synthetic(self) -> bool:
        return self.index > 0


def _by_hand(cache: Path) -> str:
    return (
        f"Put {ARCHIVE} (sha256 {ARCHIVE_SHA256}) into {cache} by hand: on a machine with access to PyPI run "
        f"`pip download --no-deps --no-binary :all: totalsegmentator=={TOTALSEG_VERSION} -d {cache}` or fetch it "
        f"from https://pypi.org/project/TotalSegmentator/{TOTALSEG_VERSION}/#files, or point --cache / "
        "$MONAI_SSL_CACHE to a folder that holds it."
    )


def fetch_archive(cache_dir: str | os.PathLike | None = None) -> Path:
    """Path of the cached source archive, downloaded with ``pip download --no-binary :all:`` when absent.

    pip downloads into a temporary folder inside the cache; the archive is renamed into place only once its
    sha256 matches :data:`ARCHIVE_SHA256`. Raises :class:`DownloadError` when pip cannot fetch it.
    """
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    if not (cache / ARCHIVE).exists():
        logger.info("downloading %s (38 MB) into %s", ARCHIVE, cache)
    try:
        return pip_download_pinned(
            f"totalsegmentator=={TOTALSEG_VERSION}", ARCHIVE, ARCHIVE_SHA256, cache,
            f"the totalsegmentator {TOTALSEG_VERSION} source archive", SourceDataError,
            pip_args=("--no-binary", ":all:"), hint=_by_hand(cache),
        )  # fmt: skip
    except SourceDataError as e:
        if str(e).startswith("could not download"):
            raise DownloadError(str(e)) from e
        raise


def read_members(archive: str | os.PathLike, members: Sequence[str]) -> dict[str, bytes]:
    """The bytes of the named archive members, read in one pass; a missing member is an error."""
    wanted, found = set(members), {}
    try:
        with tarfile.open(archive, "r:gz") as tar:
            for info in tar:
                if info.name in wanted and info.isfile():
                    found[info.name] = tar.extractfile(info).read()
                    if len(found) == len(wanted):
                        break
    except (tarfile.TarError, OSError, EOFError) as e:
        raise SourceDataError(f"{archive}: not a readable .tar.gz archive ({e})") from e
    missing = sorted(wanted - set(found))
    if missing:
        raise SourceDataError(f"{archive}: has no member(s) {missing}")
    return found


def _nifti(data: bytes, name: str) -> nib.Nifti1Image:
    try:
        return nib.Nifti1Image.from_bytes(gzip.decompress(data))
    except (OSError, EOFError, ValueError) as e:
        raise SourceDataError(f"{name}: not a readable .nii.gz ({e})") from e


def synapse_remap(max_id: int = 255) -> dict[int, int]:
    """Every TotalSegmentator id ``0..max_id`` -> its Synapse 8-organ id (0 for the organs Synapse lacks)."""
    return {i: TOTALSEG_TO_SYNAPSE.get(i, 0) for i in range(max_id + 1)}


def deform_ct(
    image: np.ndarray, labels: np.ndarray, voxel_mm: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, float]:
    """A smooth random deformation of a CT and its labels on the same grid: (image int16, labels, min Jacobian).

    The sampling map comes from :func:`monai_ssl.demo.random_smooth_deformation` with the sizes of
    :data:`DEFORMATION_MM`; intensities are interpolated linearly (edge values outside the field of view),
    labels with nearest neighbour (background outside).
    """
    sizes = {k: v / voxel_mm for k, v in DEFORMATION_MM.items()}
    coords, min_jacobian = random_smooth_deformation(image.shape, rng, control_spacing=2, **sizes)
    warped = ndi.map_coordinates(image.astype(np.float32), coords, order=1, mode="nearest", prefilter=False)
    return np.round(warped).astype(np.int16), warp_labels(labels, coords), min_jacobian


def _plan(num_unlabeled: int) -> list[Subject]:
    """The real volume labelled, then ``num_unlabeled`` unlabelled, one validation and one test deformation."""
    if num_unlabeled < 1:
        raise ValueError(f"num_unlabeled must be at least 1, not {num_unlabeled}")
    groups = ["unlabeled"] * num_unlabeled + ["validation", "test"]
    return [Subject("real00", "labeled")] + [Subject(f"syn{k:02d}", g, k) for k, g in enumerate(groups, start=1)]


def _save(array: np.ndarray, like: nib.Nifti1Image, path: Path) -> None:
    """Write ``array`` with the header (affine, qform/sform codes) of ``like``, atomically."""
    header = like.header.copy()
    header.set_data_dtype(array.dtype)
    img = nib.Nifti1Image(array, like.affine, header=header)
    img.header.set_slope_inter(1.0, 0.0)
    with atomic_path(path) as tmp:
        nib.save(img, tmp)


def _row(subject: Subject, labels: np.ndarray, voxel_ml: float, min_jacobian: float) -> dict[str, Any]:
    counts = np.bincount(labels.ravel(), minlength=len(SYNAPSE_LABELS))
    row = {
        "case_id": subject.case_id,
        "group": subject.group,
        "source": "synthetic (deformed real00)" if subject.synthetic else "real",
        "min_jacobian": round(min_jacobian, 3) if subject.synthetic else np.nan,
    }
    row.update({f"{SYNAPSE_LABELS[str(c)]}_ml": round(counts[c] * voxel_ml, 1) for c in range(1, len(counts))})
    return row


def build_dataset(
    out_dir: str | os.PathLike,
    cache_dir: str | os.PathLike | None = None,
    seed: int = 0,
    num_unlabeled: int = 3,
) -> Path:
    """Build the dataset in ``out_dir`` (see the module docstring) and return the path of its datalist."""
    out_dir = Path(out_dir)
    subjects = _plan(num_unlabeled)
    archive = fetch_archive(cache_dir)
    members = read_members(archive, [CT_MEMBER, SEG_MEMBER, LICENSE_MEMBER])
    ct = _nifti(members[CT_MEMBER], CT_MEMBER)
    seg = _nifti(members[SEG_MEMBER], SEG_MEMBER)
    if ct.shape != seg.shape or not np.allclose(ct.affine, seg.affine, atol=1e-4):
        raise SourceDataError(f"{archive}: {SEG_MEMBER} is not on the voxel grid of {CT_MEMBER}")
    zooms = np.asarray(ct.header.get_zooms()[:3], dtype=float)

    # the real case: the CT bytes as shipped, the labels remapped on the same header
    with tempfile.TemporaryDirectory() as tmp:
        source_seg = Path(tmp) / "totalseg.nii.gz"
        source_seg.write_bytes(members[SEG_MEMBER])
        label_path = remap_label_file(source_seg, out_dir / "labels" / "real00.nii.gz", synapse_remap())
    with atomic_path(out_dir / "images" / "real00.nii.gz") as tmp:
        tmp.write_bytes(members[CT_MEMBER])
    label_img = nib.load(label_path)
    image, labels = np.asarray(ct.dataobj), np.asarray(label_img.dataobj)

    datalist: dict[str, Any] = {g: [] for g in ("labeled", "unlabeled", "validation", "test")}
    rows = []
    for subject in tqdm(subjects, desc="abdomen CT subjects", unit="subject"):
        image_rel, label_rel = f"images/{subject.case_id}.nii.gz", f"labels/{subject.case_id}.nii.gz"
        case: dict[str, Any] = {"case_id": subject.case_id, "image": image_rel, "label": label_rel}
        min_jacobian = np.nan
        if subject.synthetic:
            rng = np.random.default_rng([int(seed), subject.index])
            warped, warped_labels, min_jacobian = deform_ct(image, labels, float(zooms.min()), rng)
            _save(warped, ct, out_dir / image_rel)
            _save(warped_labels, label_img, out_dir / label_rel)
            case.update({"patient_id": subject.case_id, "synthetic": True, "source_patient": REAL_PATIENT})
            if subject.group == "unlabeled":
                case["unlabeled_only"] = True  # label kept only to measure pseudo-label quality
            rows.append(_row(subject, warped_labels, float(np.prod(zooms)) / 1000.0, min_jacobian))
        else:
            case["patient_id"] = REAL_PATIENT
            rows.append(_row(subject, labels, float(np.prod(zooms)) / 1000.0, min_jacobian))
        datalist[subject.group].append(case)
        logger.info("%s (%s) written", subject.case_id, subject.group)

    summary = pd.DataFrame(rows)
    with atomic_path(out_dir / "summary.csv") as tmp:
        summary.to_csv(tmp, index=False)
    atomic_write_text(out_dir / "LICENSE-totalsegmentator.txt", members[LICENSE_MEMBER].decode("utf-8"))
    atomic_write_text(out_dir / "README.md", _readme(summary, seed, zooms))
    path = write_datalist({**_metadata(seed, num_unlabeled, zooms), **datalist}, out_dir / "datalist.json")
    logger.info("wrote %s", path)
    return path


def _metadata(seed: int, num_unlabeled: int, zooms: np.ndarray) -> dict[str, Any]:
    return {
        "name": "abdomen_ct",
        "modality": "CT",
        "labels": dict(SYNAPSE_LABELS),
        "description": (
            "One real abdominal CT (TotalSegmentator example, 3 mm) labelled with TotalSegmentator's predicted "
            "organs remapped to the 8 Synapse organs; unlabelled, validation and test subjects are smooth random "
            "deformations of it."
        ),
        "licence": f"Apache-2.0 (source archive {ARCHIVE}); see LICENSE-totalsegmentator.txt",
        "provenance": {
            "source": f"PyPI source archive {ARCHIVE}",
            "sha256": ARCHIVE_SHA256,
            "members": [CT_MEMBER, SEG_MEMBER],
            "label_remap": {str(k): v for k, v in TOTALSEG_TO_SYNAPSE.items()},
            "builder": "examples/abdomen_ct/build_dataset.py",
            "seed": int(seed),
            "num_unlabeled": int(num_unlabeled),
        },
        "spacing": [float(z) for z in zooms],
    }


def _remap_table() -> str:
    lines = ["| TotalSegmentator id | TotalSegmentator name | Synapse id | Synapse name |", "|---|---|---|---|"]
    for ts_id, syn_id in sorted(TOTALSEG_TO_SYNAPSE.items(), key=lambda kv: kv[1]):
        lines.append(f"| {ts_id} | {TOTALSEG_NAMES[ts_id]} | {syn_id} | {SYNAPSE_LABELS[str(syn_id)]} |")
    return "\n".join(lines)


def _readme(summary: pd.DataFrame, seed: int, zooms: np.ndarray) -> str:
    spacing = " x ".join(f"{z:g}" for z in zooms)
    sizes = ", ".join(f"{k.replace('_', ' ')} {v:g} mm" for k, v in DEFORMATION_MM.items())
    return f"""# abdomen_ct

Built by `examples/abdomen_ct/build_dataset.py` (seed {seed}) from `{ARCHIVE}` (sha256 `{ARCHIVE_SHA256}`),
the TotalSegmentator {TOTALSEG_VERSION} source archive on PyPI, downloaded with
`pip download --no-deps --no-binary :all:` and read as a tar archive; TotalSegmentator is not installed.

## What is real and what is synthetic

- **`real00` is real.** Image: `{CT_MEMBER}`, a real abdominal CT on a {spacing} mm grid (already
  resampled by its publishers), copied byte for byte: voxels, affine and header are unchanged.
- **Its labels are model predictions, not manual annotations.** `{SEG_MEMBER}` is the output of
  TotalSegmentator's fast model on that CT, as shipped for TotalSegmentator's own tests. Its 117-class
  "total" label map is remapped to the 8 Synapse organs below; every other structure becomes background.
- **All other cases (`syn*`) are synthetic**: smooth random deformations of `real00` (small rotation, scaling
  and translation composed with a smooth displacement field; {sizes}; positive Jacobian determinant
  everywhere), on the same voxel grid, image interpolated linearly, labels by nearest neighbour. They are one
  patient seen through different deformations, not other patients.
- Consequently validation and test scores on `syn*` measure whether the pipeline runs and learns, not how a
  model generalises to new patients: they are optimistic. Use Synapse (`examples/synapse.md`) for real results.

## Label remap

{_remap_table()}

## Cases

```
{summary.to_string(index=False)}
```

## Licence and attribution

The source archive is distributed under the Apache License 2.0 (full text in `LICENSE-totalsegmentator.txt`,
copied from the archive); the "total" task is listed as openly available under Apache-2.0. Changes made here:
labels remapped, synthetic subjects derived by deformation. If you use TotalSegmentator, cite
Wasserthal J. et al., TotalSegmentator: Robust Segmentation of 104 Anatomic Structures in CT Images,
Radiology: Artificial Intelligence 5(5) (2023) e230024.
"""


def build_parser() -> argparse.ArgumentParser:
    """Command line of the builder."""
    parser = argparse.ArgumentParser(
        prog="python examples/abdomen_ct/build_dataset.py", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--out", required=True, help="output folder (images/, labels/, datalist.json, README.md)")
    parser.add_argument(
        "--cache", default=None, help="archive cache folder (default $MONAI_SSL_CACHE or ~/.cache/monai_ssl)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the deformations (default 0)")
    parser.add_argument("--num-unlabeled", type=int, default=3, help="deformed unlabelled subjects (default 3)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Build the dataset; a source that cannot be obtained is reported on one line, exit code 1."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        path = build_dataset(args.out, args.cache, args.seed, args.num_unlabeled)
    except SourceDataError as e:
        logger.error("%s", e)
        return 1
    summary = pd.read_csv(Path(path).parent / "summary.csv")
    with pd.option_context("display.width", 200, "display.max_columns", 20):
        print(summary.to_string(index=False))
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
