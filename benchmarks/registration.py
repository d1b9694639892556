"""Speed and accuracy of the offline registration (registration/) on the demo dataset. Not a test.

1. Known transforms: pairs are made from demo volumes with a random affine (``affine``) or a random affine
   plus a smooth dense deformation (``bspline``: the demo's generator as an ITK displacement field,
   ``tests.synthetic.random_deformation``), at the demo size (96x112x24-30, 1.75x1.75x5 mm) and at an
   ACDC-like size (256x256x10, 1x1x10 mm, the demo volume resampled). Each pair is registered in this
   process with 1 ITK thread, as in the job, in both directions so that the cycle score can be timed.
   Reported per kind and size: wall and CPU seconds per pair (at 1 thread the CPU seconds approximate the
   wall seconds of an idle machine; the machine is shared, so the 1-minute load average is recorded too);
   the mean target registration error (mm, over the fixed foreground) against the known transform; the mean
   foreground Dice of the moving label warped onto the fixed volume (nearest neighbour) against the
   known-transform label; and the seconds per cycle score (both scores of one round trip).
2. The whole precompute job on the demo dataset (``python -m registration precompute``, 2 workers x 1
   thread, elastix import included), then ``select`` and ``report``.
3. BRS and fusion: with the pairs of (2) and every training volume's ground-truth label (read here, outside
   the package), each training volume in turn is a target and the others are atlases. Reported: how often each
   cycle score picks the atlas whose propagated label has the best Dice, the Dice of the pick, of the best and
   of an average atlas, and the Dice of the default label fusion of all of them (``dice_fusion``).

Writes ``benchmarks/results/registration.csv`` (kind, size, sec_per_pair, tre_mean_mm, dice_after,
cycle_score_sec, ...), ``registration_jobs.csv`` and ``registration_brs.csv``.

    .venv/bin/python benchmarks/registration.py [--quick] [--demo data/demo_brain] [--pairs N]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# this file is named like the package it measures: drop its own folder from the import path first; the repository
# root gives the known-pair fixtures of the tests (tests/synthetic.py), which are not part of the installed packages
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import SimpleITK as sitk  # noqa: E402

from monai_ssl.data.datalist import load_datalist  # noqa: E402
from monai_ssl.fileio import atomic_path  # noqa: E402
from monai_ssl.metrics import case_metrics  # noqa: E402
from registration.cycle import cycle_scores  # noqa: E402
from registration.elastix import register_pair, warm_up  # noqa: E402
from registration.fusion import Fusion, vote  # noqa: E402
from registration.geometry import array_xyz  # noqa: E402
from registration.layout import Layout  # noqa: E402
from registration.metrics import normalise_intensity  # noqa: E402
from registration.pairs import PairTask  # noqa: E402
from registration.params import RegistrationSettings  # noqa: E402
from registration.store import RegistrationStore  # noqa: E402
from tests.synthetic import known_pair, random_affine, random_deformation, resample_to_grid  # noqa: E402

log = logging.getLogger("benchmarks.registration")
ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).parent / "results"
SIZES = {"demo": None, "acdc": ((256, 256, 10), (1.0, 1.0, 10.0))}
THREADS = 1  # as in the job (2 workers x 1 thread); CPU seconds at 1 thread ~ wall seconds on an idle machine


def _write_csv(df: pd.DataFrame, path: Path) -> None:
    with atomic_path(path) as tmp:
        df.to_csv(tmp, index=False)


def _ras_free_tre(t: sitk.Transform, g: sitk.Transform, points: list) -> np.ndarray:
    """|T(x) - G(x)| in mm (a distance, so LPS vs RAS does not matter)."""
    return np.array([np.linalg.norm(np.subtract(t.TransformPoint(p), g.TransformPoint(p))) for p in points])


def _mean_dice(a: np.ndarray, b: np.ndarray) -> float:
    """Mean foreground Dice over the classes present in either map (the evaluation's implementation)."""
    rows = case_metrics(a, b, int(max(a.max(), b.max())) + 1, spacing=1.0)  # Dice does not depend on spacing
    return float(np.nanmean([r["dice"] for r in rows]))


def known_transform_pairs(demo: dict, kind: str, size: str, n: int, work: Path, rng: np.random.Generator) -> dict:
    """Register ``n`` known pairs of one kind and size; return the row of the results table."""
    cases = [c for g in ("labeled", "unlabeled", "validation", "test") for c in demo[g] if c.get("label")]
    settings = RegistrationSettings(kind=kind)
    rows, sizes, load = [], set(), os.getloadavg()[0]
    for i in range(n):
        case = cases[i % len(cases)]
        moving = sitk.ReadImage(case["image"], sitk.sitkFloat32)
        moving_label = sitk.ReadImage(case["label"])
        if SIZES[size]:
            grid, spacing = SIZES[size]
            moving = resample_to_grid(moving, grid, spacing)
            moving_label = resample_to_grid(moving_label, grid, spacing, sitk.sitkNearestNeighbor)
        g = random_affine(moving, rng)
        if kind == "bspline":
            g = sitk.CompositeTransform(
                [g, random_deformation(moving, rng, smoothing_mm=20.0, max_displacement_mm=5.0)]
            )
        fixed, fixed_label = known_pair(moving, g, moving_label)
        sizes.add("x".join(map(str, fixed.GetSize())))
        paths = {}
        for name, img in (("f", fixed), ("m", moving)):
            paths[name] = str(work / f"{kind}-{size}-{i}-{name}.nii.gz")
            sitk.WriteImage(img, paths[name])
        tasks = [
            PairTask("f", "m", paths["f"], paths["m"], str(work / f"{kind}-{size}-{i}"), settings),
            PairTask("m", "f", paths["m"], paths["f"], str(work / f"{kind}-{size}-{i}"), settings),
        ]
        records = [register_pair(t, THREADS) for t in tasks]
        t_fm, t_mf = (sitk.ReadTransform(str(t.transform_path)) for t in tasks)
        fg = np.argwhere(sitk.GetArrayViewFromImage(fixed_label) > 0)[:, ::-1]
        fg = fg[rng.choice(len(fg), min(4000, len(fg)), replace=False)]
        points = [fixed.TransformIndexToPhysicalPoint([int(v) for v in idx]) for idx in fg]
        tre = _ras_free_tre(t_fm, g, points)
        tre_before = _ras_free_tre(sitk.Transform(), g, points)
        warped = sitk.Resample(moving_label, fixed, t_fm, sitk.sitkNearestNeighbor, 0)
        truth = sitk.GetArrayFromImage(fixed_label)
        cyc = [cycle_scores(fixed, t_fm, t_mf) for _ in range(3)]
        rows.append(
            {
                "sec": np.mean([r["seconds"] for r in records]),
                "cpu": np.mean([r["cpu_seconds"] for r in records]),
                "tre": tre.mean(),
                "tre_max": tre.max(),
                "tre_before": tre_before.mean(),
                "dice_after": _mean_dice(sitk.GetArrayFromImage(warped), truth),
                "dice_before": _mean_dice(sitk.GetArrayFromImage(moving_label), truth),
                "cycle": float(np.median([c.seconds for c in cyc])),
                "cycle_cpu": float(np.median([c.cpu_seconds for c in cyc])),
            }
        )
        log.info("%s %s pair %d: %s", kind, size, i, rows[-1])
    df = pd.DataFrame(rows)
    return {
        "kind": kind,
        "size": f"{size} {'/'.join(sorted(sizes))}",
        "sec_per_pair": round(df["sec"].mean(), 3),
        "cpu_sec_per_pair": round(df["cpu"].mean(), 3),
        "tre_mean_mm": round(df["tre"].mean(), 3),
        "dice_after": round(df["dice_after"].mean(), 4),
        "cycle_score_sec": round(df["cycle"].mean(), 4),
        "cycle_score_cpu_sec": round(df["cycle_cpu"].mean(), 4),
        "pairs": n,
        "threads": THREADS,
        "tre_max_mm": round(df["tre_max"].max(), 3),
        "tre_before_mm": round(df["tre_before"].mean(), 3),
        "dice_before": round(df["dice_before"].mean(), 4),
        "load_avg": round(max(load, os.getloadavg()[0]), 2),  # 1-min load average on 2 cores: timings need ~<2
    }


def run_cli(*args: str) -> float:
    """Run ``python -m registration ARGS`` and return its wall-clock seconds (raises on exit code 2)."""
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "registration", *args, "--no-progress"], cwd=ROOT, text=True, capture_output=True
    )
    if proc.returncode not in (0, 1):
        raise RuntimeError(f"registration {args[0]} failed:\n{proc.stderr}")
    log.info("registration %s: rc %d\n%s", args[0], proc.returncode, proc.stdout[-2000:])
    return time.perf_counter() - start


def whole_job(datalist: Path, kind: str, out: Path) -> dict:
    """Time precompute (2 workers x 1 thread), select and report on the demo dataset."""
    common = ["--datalist", str(datalist), "--out", str(out), "--kind", kind]
    load = os.getloadavg()[0]
    pre = run_cli("precompute", *common, "--workers", "2", "--threads-per-worker", "1")
    sel = run_cli("select", *common)
    rep = run_cli("report", *common)
    layout = Layout(out, kind)
    manifest, summary = pd.read_csv(layout.manifest_path), pd.read_csv(layout.report_dir / "summary.csv")
    summary = summary[summary["strategy"] == "brs"]
    return {
        "kind": kind,
        "pairs": len(manifest),
        "failed": int((manifest["status"] != "ok").sum()),
        "precompute_sec": round(pre, 1),
        "throughput_sec_per_pair": round(pre / len(manifest), 3),
        "mean_pair_sec": round(manifest["seconds"].mean(), 3),
        "mean_pair_cpu_sec": round(manifest["cpu_seconds"].mean(), 3),
        "cpu_sec_total": round(manifest["cpu_seconds"].sum(), 1),
        "select_sec": round(sel, 1),
        "report_sec": round(rep, 1),
        "reg_only_dice": round(float(summary.iloc[-1]["dice_mean"]), 4),
        "reg_only_hd95_mm": round(float(summary.iloc[-1]["hd95_mm_mean"]), 2),
        "load_avg": round(max(load, os.getloadavg()[0]), 2),
    }


def _donor(case_id: str) -> str:
    """The demo's synthetic subjects are deformed donors (``s10021a`` from ``d10021``): the donor is the digits."""
    return "".join(ch for ch in case_id if ch.isdigit())


def _atlas_scores(store: RegistrationStore, labels: dict[str, str], target: str) -> dict[str, tuple]:
    """(published score, transform_mm, mean Dice of the propagated label) of every other training case."""
    truth = sitk.GetArrayFromImage(sitk.ReadImage(labels[target]))
    out = {}
    for atlas in labels:
        if atlas == target or not (store.has_pair(target, atlas) and store.has_pair(atlas, target)):
            continue
        score = store.cycle(target, atlas)
        moving = sitk.ReadImage(labels[atlas])
        warped = sitk.Resample(moving, store.image(target), store.transform(target, atlas), sitk.sitkNearestNeighbor)
        out[atlas] = (score.score, score.transform_mm, _mean_dice(sitk.GetArrayFromImage(warped), truth))
    return out


def _fusion_dice(store: RegistrationStore, labels: dict[str, str], target: str, atlases: list[str]) -> float:
    """Mean Dice of the default label fusion of ``atlases`` onto ``target`` (labels read here, outside the store,
    which never exposes unlabelled cases' labels)."""
    grid = store.image(target)
    images, warped = [], []
    for atlas in atlases:
        images.append(normalise_intensity(store.warp(atlas, onto=target), array_xyz(store.image(atlas))))
        moving = sitk.ReadImage(labels[atlas])
        warped.append(array_xyz(sitk.Resample(moving, grid, store.transform(target, atlas), sitk.sitkNearestNeighbor)))
    how = Fusion()
    target_image = normalise_intensity(array_xyz(grid))
    fused, _ = vote(target_image, images, warped, store.num_classes, how.sigma_voxels(grid.GetSpacing()), how.power)
    return _mean_dice(fused, array_xyz(sitk.ReadImage(labels[target])))


def brs_pick_rate(datalist: Path, kind: str, out: Path) -> list[dict]:
    """Leave-one-out over training volumes: does the lowest cycle score pick the best-Dice atlas?

    Two atlas sets: all other training volumes, and only those of other donors (a deformed copy of the target's
    own donor is an easy pick that real data rarely offers).
    """
    raw = json.loads(datalist.read_text())
    labels = {c["case_id"]: str(datalist.parent / c["label"]) for g in ("labeled", "unlabeled") for c in raw[g]}
    store = RegistrationStore(out, kind)
    scores = {t: _atlas_scores(store, labels, t) for t in labels}
    rows = []
    for atlas_set in ("all others", "other donors"):
        picks = []
        for target, per_atlas in scores.items():
            if atlas_set == "other donors":
                per_atlas = {a: v for a, v in per_atlas.items() if _donor(a) != _donor(target)}
            pick = {
                name: min(per_atlas, key=lambda a, k=k: per_atlas[a][k])
                for name, k in (("published", 0), ("transform", 1))
            }
            best = max(per_atlas, key=lambda a: per_atlas[a][2])
            fusion = _fusion_dice(store, labels, target, list(per_atlas))
            dice = {a: v[2] for a, v in per_atlas.items()}
            picks.append({"target": target, "best": best, **pick, "dice": dice, "fusion": fusion})
            log.info(
                "BRS %s (%s) target %s: best %s, published %s, transform %s",
                kind,
                atlas_set,
                target,
                best,
                pick["published"],
                pick["transform"],
            )
        for score in ("published", "transform"):
            rows.append(
                {
                    "kind": kind,
                    "atlases": atlas_set,
                    "score": score,
                    "targets": len(picks),
                    "atlases_per_target": round(float(np.mean([len(p["dice"]) for p in picks])), 2),
                    "pick_rate": round(float(np.mean([p[score] == p["best"] for p in picks])), 3),
                    "dice_picked": round(float(np.mean([p["dice"][p[score]] for p in picks])), 4),
                    "dice_best": round(float(np.mean([p["dice"][p["best"]] for p in picks])), 4),
                    "dice_mean_atlas": round(float(np.mean([np.mean(list(p["dice"].values())) for p in picks])), 4),
                    "dice_fusion": round(float(np.mean([p["fusion"] for p in picks])), 4),
                    "chance_pick_rate": round(float(np.mean([1.0 / len(p["dice"]) for p in picks])), 3),
                }
            )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="2 known pairs per row; affine job and BRS only")
    parser.add_argument("--demo", type=Path, default=ROOT / "data" / "demo_brain", help="demo dataset folder")
    parser.add_argument("--pairs", type=int, default=None, help="known pairs per kind and size (default 2/5)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--known-only", action="store_true", help="only part 1 (the known-transform pairs)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    logging.getLogger("registration").setLevel(logging.WARNING)
    datalist = args.demo / "datalist.json"
    if not datalist.exists():
        log.info("building the demo dataset in %s", args.demo)
        subprocess.run([sys.executable, "-m", "monai_ssl.demo", "--out", str(args.demo)], cwd=ROOT, check=True)
    demo = load_datalist(datalist)
    n = args.pairs or (2 if args.quick else 5)
    rng = np.random.default_rng(args.seed)
    RESULTS.mkdir(parents=True, exist_ok=True)
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(THREADS)
    start = time.perf_counter()
    warm_up(THREADS)
    log.info("elastix import: %.1f s (once per process)", time.perf_counter() - start)
    with tempfile.TemporaryDirectory(prefix="regbench-") as tmp:
        work = Path(tmp)
        rows = [known_transform_pairs(demo, k, s, n, work, rng) for k in ("affine", "bspline") for s in SIZES]
        table = pd.DataFrame(rows)
        _write_csv(table, RESULTS / "registration.csv")
        print(table.to_string(index=False))
        if args.known_only:
            return
        kinds = ("affine",) if args.quick else ("affine", "bspline")
        jobs = pd.DataFrame([whole_job(datalist, k, work / "job") for k in kinds])
        _write_csv(jobs, RESULTS / "registration_jobs.csv")
        print(jobs.to_string(index=False))
        brs = pd.DataFrame([r for k in kinds for r in brs_pick_rate(datalist, k, work / "job")])
        _write_csv(brs, RESULTS / "registration_brs.csv")
        print(brs.to_string(index=False))


if __name__ == "__main__":
    main()
