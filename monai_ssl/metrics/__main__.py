"""``python -m monai_ssl.metrics score PREDICTIONS.csv OUT.csv --num-classes N [--class-names JSON]``.

Scores label-map files listed in a table (columns ``prediction``, ``reference``, others copied) with the
evaluation's metrics; used by ``python -m registration report``, which never imports torch itself. Exit 2 on bad
input, with the file and the problem on the last line.
"""

from __future__ import annotations

import argparse
import json
import sys

import pandas as pd

from monai_ssl.data.validation import InputError
from monai_ssl.metrics.files import score_table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m monai_ssl.metrics", description="Score label-map files.")
    sub = parser.add_subparsers(dest="command", required=True)
    score = sub.add_parser("score", help="score label files listed in a CSV table against their references")
    score.add_argument("predictions", help="CSV with columns prediction, reference (paths) and any others")
    score.add_argument("out", help="per-class metric table (CSV), written atomically")
    score.add_argument("--num-classes", type=int, required=True, help="classes including background")
    score.add_argument("--class-names", default=None, help='JSON object {"1": "liver", ...}')
    score.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    args = parser.parse_args(argv)
    try:
        table = pd.read_csv(args.predictions)
        names = json.loads(args.class_names) if args.class_names else None
        score_table(table, args.num_classes, names, args.out, progress=not args.no_progress)
    except (InputError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
