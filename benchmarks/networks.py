"""Parameter counts and CPU forward / forward+backward seconds of the student networks at the demo input size.

The 2D students run on a batch of demo slices (in-plane size of the demo dataset, 96x112); the 3D
students on one small volume. Every repeat times all networks in turn, so background load hits them
alike; the median over repeats is reported with the ratio to the U-Net of the same dimensionality,
measured in the same run. Writes ``benchmarks/results/networks.csv``.

    .venv/bin/python benchmarks/networks.py [--repeats 5] [--batch 4] [--threads 2]
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time
from pathlib import Path

import pandas as pd
import torch
from tqdm import tqdm

from monai_ssl.fileio import atomic_path
from monai_ssl.networks import build_network

logger = logging.getLogger("benchmarks.networks")

# (name, spatial_dims, constructor overrides): the defaults are what the trainer gets
CASES = [
    ("unet", 2, {}),
    ("swin_unet", 2, {}),
    ("cs_unet", 2, {}),
    ("swin_unetr", 2, {"feature_size": 24}),
    ("unet", 3, {}),
    ("swin_unetr", 3, {"feature_size": 24}),
]
RESULT = Path(__file__).parent / "results" / "networks.csv"


def time_once(net: torch.nn.Module, x: torch.Tensor) -> tuple[float, float]:
    """Seconds of one forward pass without gradients, and of one forward+backward pass."""
    net.zero_grad(set_to_none=True)
    start = time.perf_counter()
    with torch.no_grad():
        net(x)
    forward = time.perf_counter() - start
    start = time.perf_counter()
    net(x).square().mean().backward()
    return forward, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats per network (after one warm-up)")
    parser.add_argument("--batch", type=int, default=4, help="2D batch size")
    parser.add_argument("--size2d", type=int, nargs=2, default=(96, 112), help="2D slice size (demo: 96 112)")
    parser.add_argument("--size3d", type=int, nargs=3, default=(64, 64, 64), help="3D volume size")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch CPU threads")
    parser.add_argument("--out", type=Path, default=RESULT, help="CSV to write")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    torch.set_num_threads(args.threads)

    nets, inputs = {}, {}
    for name, dims, kwargs in CASES:
        torch.manual_seed(0)
        nets[name, dims] = build_network(name, dims, 1, 4, **kwargs).train()
        shape = (args.batch, 1, *args.size2d) if dims == 2 else (1, 1, *args.size3d)
        inputs[name, dims] = torch.randn(shape)
    times: dict[tuple[str, int], list[tuple[float, float]]] = {key: [] for key in nets}
    for repeat in tqdm(range(args.repeats + 1), desc="repeats"):
        for key, net in nets.items():
            result = time_once(net, inputs[key])
            if repeat:  # the first round warms up allocators and kernels
                times[key].append(result)

    rows = []
    for (name, dims), net in nets.items():
        forward = statistics.median(t[0] for t in times[name, dims])
        train = statistics.median(t[1] for t in times[name, dims])
        rows.append(
            {
                "network": name,
                "spatial_dims": dims,
                "class": type(net).__name__,
                "input": "x".join(str(s) for s in inputs[name, dims].shape),
                "params": sum(p.numel() for p in net.parameters()),
                "feature_channels": "/".join(str(c) for c in net.feature_channels),
                "forward_s": round(forward, 4),
                "forward_backward_s": round(train, 4),
            }
        )
    table = pd.DataFrame(rows)
    for dims in (2, 3):
        same = table.spatial_dims == dims
        base = table[same & (table.network == "unet")].iloc[0]
        for column in ("forward_s", "forward_backward_s"):
            table.loc[same, column.replace("_s", "_vs_unet")] = (table.loc[same, column] / base[column]).round(2)
    with atomic_path(args.out) as tmp:
        table.to_csv(tmp, index=False)
    print(f"threads={args.threads} repeats={args.repeats} (median seconds)")
    print(table.to_string(index=False))
    logger.info("wrote %s", args.out)


if __name__ == "__main__":
    main()
