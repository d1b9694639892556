"""Data command line: ``python -m monai_ssl.data <command>``; ``--help`` lists the commands.

Each subcommand is one :class:`Command` in :data:`COMMANDS` (name, help, argument setup, run function);
adding a subcommand is one more entry in that list.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from monai_ssl.data.converters import convert_acdc, convert_synapse, resplit_datalist
from monai_ssl.data.datalist import GROUPS, DatalistError, load_datalist
from monai_ssl.data.label_noise import NOISE_DEFAULTS, write_noisy_datalist
from monai_ssl.data.validation import main_validate

__all__ = ["Command", "COMMANDS", "build_parser", "main", "count_or_ids", "summary"]


@dataclass(frozen=True)
class Command:
    """One subcommand: ``add_arguments`` fills its parser, ``run`` executes the parsed arguments."""

    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int | None]


def count_or_ids(text: str) -> int | list[str]:
    """``"3"`` -> 3 patients; ``"patient001,patient007"`` -> those ids; ``"9861,"`` -> the one id 9861."""
    text = text.strip()
    if text.isdigit():
        return int(text)
    ids = [t.strip() for t in text.split(",") if t.strip()]
    if not ids:
        raise argparse.ArgumentTypeError(f"{text!r} is neither a count nor a comma-separated list of ids")
    return ids


def summary(datalist: dict[str, Any]) -> str:
    """A few lines: where the datalist is, and cases and patients per group."""
    lines = [f"{datalist['datalist_path']} ({datalist.get('name', '?')}, {datalist.get('modality', '?')})"]
    for group in GROUPS:
        cases = datalist.get(group, [])
        patients = {c.get("patient_id", c["case_id"]) for c in cases}
        lines.append(f"  {group:<11}{len(cases):>5} cases {len(patients):>5} patients")
    return "\n".join(lines)


def _add_split_arguments(parser: argparse.ArgumentParser) -> None:
    ids_help = "a number of patients, or comma-separated patient/case ids (a single numeric id: '9861,')"
    parser.add_argument("--labeled", type=count_or_ids, default=1, help=f"labelled group: {ids_help} (default 1)")
    parser.add_argument("--validation", type=count_or_ids, default=0, help="validation group, same forms (default 0)")
    parser.add_argument("--test", type=count_or_ids, default=0, help="test group, same forms (default 0)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the patient shuffle behind counts (default 0)")


def _split_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    return {"labeled": args.labeled, "validation": args.validation, "test": args.test, "seed": args.seed}


def _add_convert_acdc(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--root", required=True, help="ACDC folder (patientXXX folders, possibly under training/)")
    parser.add_argument("--out", required=True, help="datalist JSON to write")
    _add_split_arguments(parser)


def _run_convert_acdc(args: argparse.Namespace) -> None:
    print(summary(convert_acdc(args.root, args.out, **_split_kwargs(args))))


def _add_convert_synapse(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--root", required=True, help="Synapse folder with img/imgXXXX.nii.gz, label/labelXXXX.nii.gz")
    parser.add_argument("--out", required=True, help="datalist JSON to write")
    parser.add_argument(
        "--labels-dir", default=None, help="folder for the 8-organ labels (default: <datalist folder>/labels_8organ)"
    )
    parser.add_argument(
        "--allow-unlabeled", action="store_true", help="images without label become unlabelled cases (else an error)"
    )
    _add_split_arguments(parser)


def _run_convert_synapse(args: argparse.Namespace) -> None:
    datalist = convert_synapse(
        args.root, args.out, labels_dir=args.labels_dir, allow_unlabeled=args.allow_unlabeled, **_split_kwargs(args)
    )
    print(summary(datalist))


def _add_split(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--datalist", required=True, help="existing datalist JSON")
    parser.add_argument("--out", required=True, help="datalist JSON to write (may be the input)")
    _add_split_arguments(parser)


def _run_split(args: argparse.Namespace) -> None:
    print(summary(resplit_datalist(load_datalist(args.datalist), args.out, **_split_kwargs(args))))


def _add_scribbles(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--datalist", required=True, help="datalist JSON whose labelled cases get scribbles")
    parser.add_argument("--out", required=True, help="folder for scribbles/<case_id>.nii.gz and datalist.json")
    parser.add_argument("--seed", type=int, default=0, help="scribble seed (default 0)")


def _run_scribbles(args: argparse.Namespace) -> None:
    from monai_ssl.data.scribbles import scribble_datalist

    print(summary(load_datalist(scribble_datalist(args.datalist, args.out, seed=args.seed))))


def _add_validate(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("datalist", help="datalist JSON to check")
    parser.add_argument("--header-only", action="store_true", help="check headers and geometry, not voxel values")


def _run_validate(args: argparse.Namespace) -> int:
    return main_validate(args.datalist, header_only=args.header_only)


def _add_noisy_labels(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--datalist", required=True, help="datalist JSON whose labelled cases get noisy labels")
    parser.add_argument("--out", required=True, help="folder for labels/ and the new datalist.json")
    parser.add_argument("--seed", type=int, default=0, help="noise seed (default 0)")
    for key, value in NOISE_DEFAULTS.items():
        kind = int if key == "max_radius" else float
        parser.add_argument(f"--{key.replace('_', '-')}", type=kind, default=value, help=f"(default {value})")


def _run_noisy_labels(args: argparse.Namespace) -> None:
    noise = {key: getattr(args, key) for key in NOISE_DEFAULTS}
    print(summary(load_datalist(write_noisy_datalist(args.datalist, args.out, seed=args.seed, **noise))))


COMMANDS: list[Command] = [
    Command("convert-acdc", "write a datalist for an ACDC cardiac MR folder", _add_convert_acdc, _run_convert_acdc),
    Command(
        "convert-synapse",
        "remap Synapse (BTCV) labels to 8 organs and write a datalist",
        _add_convert_synapse,
        _run_convert_synapse,
    ),
    Command("split", "re-split an existing datalist's cases by patient", _add_split, _run_split),
    Command(
        "scribbles", "write scribbles of the labelled cases and a datalist using them", _add_scribbles, _run_scribbles
    ),
    Command(
        "validate-datalist",
        "open every file of a datalist and report every problem (exit 1 if any)",
        _add_validate,
        _run_validate,
    ),
    Command(
        "noisy-labels",
        "write noisy copies (erosion/dilation, boundary jitter) of the labelled cases and a datalist using them",
        _add_noisy_labels,
        _run_noisy_labels,
    ),
]


def build_parser(commands: Sequence[Command] = COMMANDS) -> argparse.ArgumentParser:
    """The top-level parser with one subparser per command."""
    parser = argparse.ArgumentParser(
        prog="python -m monai_ssl.data",
        description="Dataset tools: convert public datasets to datalists, split them by patient, validate them.",
        epilog="Example: python -m monai_ssl.data convert-acdc --root ACDC/database --out data/acdc.json "
        "--labeled 3 --validation 10 --test 20",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="command")
    for command in commands:
        sub_parser = sub.add_parser(command.name, help=command.help, description=command.help)
        command.add_arguments(sub_parser)
        sub_parser.set_defaults(run=command.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; bad input prints ``error: <path>: <problem>`` and returns 1."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.run(args) or 0
    except (DatalistError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
