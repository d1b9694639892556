"""``python -m registration {precompute,select,report}``: the offline registration batch job.

Exit codes: 0 everything finished; 1 some pairs/cases failed (listed in the summary); 2 bad input (every
problem is listed before any work starts).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from registration.fusion import Fusion
from registration.inputs import InputError, load_cases
from registration.jobs import exclusive, precompute, setup_logging
from registration.params import KINDS, RegistrationSettings
from registration.report import run_report
from registration.select import STRATEGIES, Selection, run_select
from registration.store import RegistrationStore

__all__ = ["main", "build_parser", "console_logging"]

log = logging.getLogger("registration")


def _common(p: argparse.ArgumentParser, need_datalist: bool) -> None:
    p.add_argument(
        "--datalist",
        required=need_datalist,
        help="monai-ssl JSON datalist"
        + ("" if need_datalist else " (default: the one precompute used, from OUT/KIND/cases.json)"),
    )
    p.add_argument("--out", required=True, type=Path, help="output folder; results go to OUT/KIND/")
    p.add_argument("--kind", required=True, choices=KINDS, help="affine, or affine followed by a B-spline")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")


def _selection(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--score",
        choices=("published", "transform"),
        default="published",
        help="cycle score used to choose the atlas: published S = w_rmse*RMSE - w_mi*MI (default) or "
        "transform-space mean |T_qj(T_jq(x)) - x| in mm",
    )
    p.add_argument("--w-rmse", type=float, default=1.0, help="weight of RMSE in S (default 1)")
    p.add_argument("--w-mi", type=float, default=1.0, help="weight of MI in S (default 1)")
    p.add_argument(
        "--label-interp",
        choices=("nearest", "label_gaussian"),
        default="nearest",
        help="interpolation of BRS's warped labels (default nearest)",
    )
    p.add_argument(
        "--strategy",
        choices=STRATEGIES,
        default="auto",
        help="registered labels: brs (the cycle score's atlas), fusion (locally weighted voting of all atlases) "
        "or auto (default: fusion with two or more atlases, else brs)",
    )
    p.add_argument(
        "--fusion-sigma-mm",
        type=float,
        default=None,
        help="Gaussian window of fusion's local similarity in mm (default: the target's smallest voxel spacing)",
    )
    p.add_argument(
        "--fusion-power", type=float, default=Fusion.power, help=f"fusion weight exponent (default {Fusion.power:g})"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m registration",
        description="Offline ITK/elastix registration for monai-ssl. Pair (fixed=F, moving=M) stores T_FM, "
        "which maps F's points to M's and resamples M onto F. See registration/README.md.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    pre = sub.add_parser(
        "precompute",
        help="register every ordered pair of training volumes (and eval<->labelled pairs)",
        description="Register every ordered pair (fixed, moving) of training volumes (labelled + unlabelled), "
        "both directions independently, plus both directions between each labelled validation/test case and "
        "each labelled case (for `report`). Finished pairs are skipped, so a killed run can simply be rerun.",
    )
    _common(pre, need_datalist=True)
    pre.add_argument("--workers", type=int, default=2, help="worker processes (default 2)")
    pre.add_argument("--threads-per-worker", type=int, default=1, help="ITK threads per worker (default 1)")
    pre.add_argument(
        "--timeout",
        type=float,
        default=None,
        help="per-pair timeout in seconds (default 300 affine, 1800 bspline; not enforced on Dask)",
    )
    pre.add_argument(
        "--grid-mm",
        type=float,
        default=None,
        help="B-spline final grid spacing in mm (default max(20, 2 x largest voxel spacing))",
    )
    d = RegistrationSettings()
    for option, what in (
        ("affine-levels", "affine pyramid levels"),
        ("affine-iterations", "affine iterations per level"),
        ("affine-samples", "affine random samples per iteration"),
        ("bspline-levels", "B-spline levels"),
        ("bspline-iterations", "B-spline iterations per level"),
        ("bspline-samples", "B-spline random samples per iteration"),
    ):
        default = getattr(d, option.replace("-", "_"))
        pre.add_argument(f"--{option}", type=int, default=default, help=f"{what} ({default})")
    pre.add_argument("--no-eval", action="store_true", help="skip the validation/test <-> labelled pairs")
    pre.add_argument(
        "--pairs",
        choices=("all", "atlas"),
        default="all",
        help="all ordered training pairs (default), or only those with a labelled case on one side: all that "
        "select and report need (e.g. B-spline labels while REPS reads the affine kind's pairs)",
    )
    pre.add_argument(
        "--fields",
        action="store_true",
        help="also write low-resolution RAS displacement fields OUT/KIND/fields/SRC__DST.nii.gz",
    )
    pre.add_argument("--field-factor", type=int, default=4, help="in-plane coarsening of the fields (default 4)")
    dask = pre.add_mutually_exclusive_group()
    dask.add_argument("--scheduler", default=None, help="Dask scheduler address: run the pairs on that cluster")
    dask.add_argument("--dask-local", type=int, default=None, metavar="N", help="run on a local Dask cluster of N")

    sel = sub.add_parser(
        "select",
        help="best registration selection (brs.json) and registered labels of unlabelled cases",
        description="For each unlabelled case pick the labelled case with the best cycle score, write every "
        "score and the choice to OUT/KIND/brs.json and the warped label to OUT/KIND/registered_labels/ID.nii.gz.",
    )
    _common(sel, need_datalist=False)
    _selection(sel)

    rep = sub.add_parser(
        "report",
        help="registration-only baseline: per-class Dice/HD95 on labelled validation/test cases",
        description="Propagate labels to each labelled validation/test case with the same selection and write "
        "per-class Dice and HD95 (mm) to OUT/KIND/reg_only/per_case.csv and summary.csv.",
    )
    _common(rep, need_datalist=False)
    _selection(rep)
    return parser


def _store(args) -> RegistrationStore:
    store = RegistrationStore(args.out, args.kind)
    if args.datalist and Path(args.datalist).resolve() != Path(store.datalist).resolve():
        raise InputError(f"{args.datalist}: OUT/{args.kind} was computed from {store.datalist}; rerun precompute")
    return store


def _how(args) -> Selection:
    fusion = Fusion(args.fusion_sigma_mm, args.fusion_power)
    return Selection(args.score, args.w_rmse, args.w_mi, args.label_interp, args.strategy, fusion)


def _select_or_report(store, args) -> int:
    """Run ``select`` or ``report``, logging to ``OUT/<kind>/<command>.log``; 1 if some case failed."""
    with exclusive(store):  # never select from the partial pairs of a running precompute
        return _run_locked(store, args)


def _run_locked(store, args) -> int:
    handler = setup_logging(store.root / f"{args.command}.log")
    try:
        if args.command == "select":
            result = run_select(store, _how(args), not args.no_progress)
            for case, entry in result["cases"].items():
                how = entry.get("strategy", "failed")
                print(f"{case}: {how} (BRS atlas {entry['choice']})")
        else:
            result = run_report(store, _how(args), not args.no_progress)
            columns = ["strategy", "class_name", "dice_mean", "hd95_mm_mean", "iou_mean", "bf1_mean"]
            print(result["summary"][columns].to_string(index=False))
            picks = [e["brs_is_oracle"] for e in result["selection"].values() if "brs_is_oracle" in e]
            if picks:
                print(f"BRS picked the oracle atlas in {sum(picks)} of {len(picks)} cases")
    finally:
        logging.getLogger("registration").removeHandler(handler)
        handler.close()
    for case, why in result["failed"].items():
        print(f"FAILED {case}: {why}")
    return 1 if result["failed"] else 0


def console_logging() -> None:
    """Command-line use: warnings go to the console, everything (INFO) to the log files of the job."""
    handler = logging.StreamHandler()
    handler.setLevel(logging.WARNING)
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    log.addHandler(handler)
    log.propagate = False


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "precompute":
            cases = load_cases(args.datalist, include_eval=not args.no_eval)
            names = (
                "grid_mm",
                "affine_levels",
                "affine_iterations",
                "affine_samples",
                "bspline_levels",
                "bspline_iterations",
                "bspline_samples",
            )
            settings = RegistrationSettings(kind=args.kind, **{n: getattr(args, n) for n in names})
            summary = precompute(
                cases,
                args.out,
                settings,
                workers=args.workers,
                threads=args.threads_per_worker,
                timeout_s=args.timeout,
                fields=args.fields,
                field_factor=args.field_factor,
                scheduler=args.scheduler,
                dask_local=args.dask_local,
                progress=not args.no_progress,
                atlas_only=args.pairs == "atlas",
            )
            print(summary)
            return 1 if summary.failed else 0
        store = _store(args)
        return _select_or_report(store, args)
    except (InputError, FileNotFoundError, ValueError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
