"""Seconds per CCT-R training step in float32 and in bfloat16 autocast, measured in the same run.

Builds the ``cctr`` method of the ``cctr_brain_demo`` bundle on the demo dataset twice, once with ``amp=False``
and once with bfloat16 autocast forced (``amp="bf16"``: channels-last students, float32 loss terms), times
every step with the methods benchmark's ``StepTimer`` (median after warm-up, wall and CPU seconds) and prints

    cctr step: fp32 X s, bf16 Y s, speed-up R

It also says whether this CPU computes bfloat16 natively: only then does the bundle's ``amp=true`` use it
(:func:`monai_ssl.engines.trainer.autocast_mode`); elsewhere bfloat16 is emulated and slower, so training stays
in float32. Optionally (``--dice N``) trains ``unet_ls`` for N iterations in both precisions and compares
validation Dice.

    .venv/bin/python benchmarks/speed.py [--steps 8] [--warmup 2] [--method cctr] [--dice 300]
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch  # noqa: E402
from methods import (  # noqa: E402  (also removes this folder from sys.path: see methods.py)
    CONFIGS,
    DEFAULT_DATALIST,
    DEFAULT_REGISTRATION,
    REPO,
    BenchmarkSettings,
    StepTimer,
    _workflow,
    train_and_evaluate,
)

from monai_ssl.engines.trainer import cpu_supports_bf16  # noqa: E402

logger = logging.getLogger("benchmarks.speed")
PRECISIONS = {"fp32": False, "bf16": "bf16"}


def time_steps(method: str, amp: bool | str, steps: int, warmup: int, work_dir: Path, batch_size: int = 8) -> StepTimer:
    """Median seconds of ``steps`` training steps after ``warmup`` of ``method`` with ``amp``."""
    overrides = {
        "bundle_root": str(CONFIGS.parent),
        "datalist": str(DEFAULT_DATALIST),
        "registration_dir": str(DEFAULT_REGISTRATION),
        "output_root": str(work_dir),
        "max_iterations": warmup + steps,
        "val_interval": warmup + steps + 1,
        "batch_size": batch_size,
        "resume": False,
        "amp": amp,
    }
    wf = _workflow(method, ["train.json"], "training", CONFIGS, overrides)
    wf.initialize()
    trainer = wf.parser.get_parsed_content("train#trainer")
    timer = StepTimer(warmup=warmup).attach(trainer)
    wf.run()
    return timer


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", default="cctr", help="bundle method to time (cctr)")
    parser.add_argument("--steps", type=int, default=8, help="timed steps per precision (8)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed warm-up steps (2)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--dice", type=int, default=0, help="also train unet_ls N iterations per precision (0: no)")
    parser.add_argument("--work-dir", type=Path, default=REPO / "runs" / "benchmarks" / "speed")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    native = cpu_supports_bf16()
    kind = "native (AMX or AVX512-BF16)" if native else "not native (emulated)"
    used = "bf16" if native else "fp32"
    print(f"CPU bfloat16: {kind}; bundle amp=true trains in {used} here; {torch.get_num_threads()} threads")
    timers = {}
    for name, amp in PRECISIONS.items():
        timers[name] = time_steps(args.method, amp, args.steps, args.warmup, args.work_dir / name)
        t = timers[name]
        print(f"{args.method} {name}: median wall {t.sec_per_iter:.3f} s, CPU {t.cpu_sec_per_iter:.3f} s per step")
    if args.dice:
        settings = BenchmarkSettings("speed", iterations=args.dice, patch_size=(96, 96), batch_size=8)
        for name, amp in PRECISIONS.items():
            row = train_and_evaluate(
                "unet_ls", DEFAULT_DATALIST, args.work_dir / f"dice_{name}", settings, overrides={"amp": amp},
                progress=False,
            )  # fmt: skip
            print(f"unet_ls {name}, {args.dice} iterations: validation Dice {row['val_dice_mean']:.3f}, "
                  f"test Dice {row['dice_mean']:.3f}")  # fmt: skip
    fp32, bf16 = timers["fp32"].sec_per_iter, timers["bf16"].sec_per_iter
    print(f"{args.method} step: fp32 {fp32:.3f} s, bf16 {bf16:.3f} s, speed-up {fp32 / bf16:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
