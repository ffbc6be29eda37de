"""Standard 3x3 convolution vs depthwise separable convolution (depthwise 3x3 + pointwise 1x1) of the same shape.

The same function as the pipeline's `cost` stage (`dlpipe.cost.depthwise_table`), with more repeats: parameters
and multiply-adds counted by FlopCounterMode beside the textbook ratio 1/N + 1/9, and the forward time of a batch,
the two layers timed side by side in one loop (alternating which runs first; the time ratio is the median of the
per-round ratios, with its quartiles). The default grid is the `cost` section's default.

    python benchmarks/bench_depthwise.py [--repeats 50] [--batch 32] [--threads 1] [--device cpu]
                                         [--out benchmarks/results/depthwise.json]
"""

from __future__ import annotations

import argparse
import os
import platform
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO_ROOT / "benchmarks" / "results" / "depthwise.json"


def channel_pair(text: str) -> tuple[int, int]:
    """`32x64` -> (32, 64)."""
    try:
        m, n = (int(part) for part in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected MxN channels, e.g. 32x64, got {text!r}") from None
    if m < 1 or n < 1:
        raise argparse.ArgumentTypeError(f"channel counts must be positive, got {text!r}")
    return m, n


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    from dlpipe.config import CostParams

    defaults = CostParams()
    p = argparse.ArgumentParser(
        prog="python benchmarks/bench_depthwise.py",
        description="Standard 3x3 vs depthwise separable convolution: parameters, multiply-adds, forward time.",
    )
    p.add_argument(
        "--channels",
        nargs="+",
        type=channel_pair,
        default=[tuple(pair) for pair in defaults.channels],
        help="MxN input x output channel pairs (default: " + " ".join(f"{m}x{n}" for m, n in defaults.channels) + ")",
    )
    p.add_argument(
        "--sizes",
        nargs="+",
        type=int,
        default=list(defaults.sizes),
        help=f"feature map sizes (default: {defaults.sizes})",
    )
    p.add_argument("--batch", type=int, default=defaults.batch, help=f"images per forward (default: {defaults.batch})")
    p.add_argument("--repeats", type=int, default=50, help="timed rounds per shape (default: 50)")
    p.add_argument("--warmup", type=int, default=5, help="untimed rounds per shape first (default: 5)")
    p.add_argument(
        "--threads",
        type=int,
        default=defaults.threads or 0,
        help=f"torch threads while timing; 0 = torch's default, one per core (default: {defaults.threads or 0})",
    )
    p.add_argument("--device", default="cpu", help="cpu, or cuda to time on the GPU (default: cpu)")
    p.add_argument(
        "--out", type=Path, default=DEFAULT_OUT, help=f"JSON output (default: {DEFAULT_OUT.relative_to(REPO_ROOT)})"
    )
    args = p.parse_args(argv)
    if args.repeats < 1 or args.warmup < 0 or args.batch < 1 or min(args.sizes) < 1:
        p.error("--repeats, --batch and --sizes must be >= 1, --warmup >= 0")
    if args.threads < 0:
        p.error("--threads must be >= 0")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    from dlpipe.cost import depthwise_table
    from dlpipe.io import write_json

    threads = args.threads or None
    table = depthwise_table(args.channels, args.sizes, args.batch, args.repeats, args.warmup, args.device, threads)
    table.update(python=platform.python_version(), cpu=platform.processor() or platform.machine())
    write_json(args.out, table)

    print(f"{table['device']}, {table['torch_threads']} threads, batch {table['batch']}, {table['repeats']} rounds")
    header = f"{'M->N':>9} {'HxW':>6} {'params':>7} {'MACs':>7} {'1/N+1/9':>8} {'time':>6} {'(q1-q3)':>12}"
    print(header + f" {'standard ms':>11} {'separable ms':>12}")
    for r in table["rows"]:
        print(
            f"{r['in_channels']:>4}->{r['out_channels']:<4} {r['size']:>3}x{r['size']:<2} {r['params_ratio']:>7.4f} "
            f"{r['multiply_adds_ratio']:>7.4f} {r['textbook_ratio']:>8.4f} {r['time_ratio']:>6.2f} "
            f"({r['time_ratio_q1']:.2f}-{r['time_ratio_q3']:.2f}) {r['standard_ms_p50']:>11.3f} "
            f"{r['separable_ms_p50']:>12.3f}"
        )
    print(f"load average (1 min) before/after: {table['load_average_1min']}; written to {args.out}")


if __name__ == "__main__":
    main()
