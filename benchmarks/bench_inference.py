"""Inference benchmark: PyTorch eager vs ONNX Runtime (fp32) vs ONNX Runtime dynamic int8, on the CPU.

Needs no trained pipeline: every registered model is built with `dlpipe.models.get_model` (seeded random
weights) and wrapped by its task as the pipeline exports it (input scaling included), exported with
`dlpipe.export.export_onnx` into a temporary directory, quantized with
`onnxruntime.quantization.quantize_dynamic` (int8 weights), and timed at batch 1 and batch 32 in one run.

    python benchmarks/bench_inference.py [--models cnn lstm] [--runs N] [--out benchmarks/results/inference.json]

Latency does not depend on the weight values, so random weights give the same timings as trained ones;
the int8-vs-fp32 output difference is indicative only (trained weights have other ranges).
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO_ROOT / "benchmarks" / "results" / "inference.json"
DEFAULT_PARAMS = REPO_ROOT / "params.yaml"
BATCH_SIZES = (1, 32)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    from dlpipe.models import list_models

    p = argparse.ArgumentParser(
        prog="python benchmarks/bench_inference.py",
        description="PyTorch eager vs ONNX Runtime fp32 vs ONNX Runtime dynamic int8 latency (CPU), per model.",
    )
    p.add_argument(
        "--models",
        nargs="+",
        default=list_models(),
        choices=list_models(),
        help="models to benchmark (default: all registered)",
    )
    p.add_argument(
        "--runs", type=int, default=200, help="timed calls per latency figure (default: 200; p99 needs ~100+)"
    )
    p.add_argument("--warmup", type=int, default=20, help="untimed calls before each measurement (default: 20)")
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="intra-op threads for onnxruntime and torch (default: onnxruntime's own default, the physical core count)",
    )
    p.add_argument("--opset", type=int, default=None, help="ONNX opset (default: export.opset of params.yaml, else 18)")
    p.add_argument(
        "--params",
        type=Path,
        default=DEFAULT_PARAMS,
        help="params.yaml whose train.<model>.net sections size the networks; "
        "models without one use the builder's defaults",
    )
    p.add_argument(
        "--builder-defaults",
        action="store_true",
        help="ignore params.yaml and build every model with the builder's defaults",
    )
    p.add_argument("--seed", type=int, default=42, help="seed for weights and inputs (default: 42)")
    p.add_argument(
        "--out", type=Path, default=DEFAULT_OUT, help=f"JSON output (default: {DEFAULT_OUT.relative_to(REPO_ROOT)})"
    )
    args = p.parse_args(argv)
    if args.runs < 1 or args.warmup < 0 or (args.threads is not None and args.threads < 1):
        p.error("--runs must be >= 1, --warmup >= 0, --threads >= 1")
    return args


# ----------------------------------------------------------------------------------------------- setup


def physical_cores() -> int:
    """onnxruntime's default intra-op pool size is the number of physical cores."""
    try:
        import psutil

        count = psutil.cpu_count(logical=False)
        if count:
            return int(count)
    except ImportError:
        pass
    return os.cpu_count() or 1


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def read_params(path: Path | None) -> dict[str, Any]:
    if path is None or not path.is_file():
        return {}
    import yaml

    return yaml.safe_load(path.read_text()) or {}


def build(name: str, params: dict[str, Any]) -> tuple[Any, Any, dict[str, Any], str]:
    """The task, the exported module (eval mode), its builder kwargs, and where the net kwargs came from.

    Data-supplied arguments (input shape, classes) are the task's example ones: MNIST-sized images,
    the stock features.
    """
    from dlpipe.models import get_model, get_spec
    from dlpipe.tasks import get_task

    task = get_task(get_spec(name).task)
    data_kwargs = task.example_data_kwargs()
    net = dict(((params.get("train") or {}).get(name) or {}).get("net") or {})
    source = f"params.yaml train.{name}.net" if net else "builder defaults"
    kwargs = {**data_kwargs, **net}
    return task, task.wrap(get_model(name, **kwargs), data_kwargs).eval(), kwargs, source


def cpu_session(path: Path, threads: int | None):
    """The pipeline's own CPU session (`dlpipe.runtime.create_session`), optionally with a thread count."""
    from dlpipe.runtime import create_session

    return create_session(path, ["cpu"], threads=threads)


def percentiles(timings: np.ndarray) -> dict[str, float]:
    return {"p50_ms": float(np.percentile(timings, 50)), "p99_ms": float(np.percentile(timings, 99))}


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or not denominator:
        return None
    return numerator / denominator


# ----------------------------------------------------------------------------------------------- measure


def latencies_ms(calls: dict[str, Callable[[], Any]], warmup: int, runs: int) -> dict[str, np.ndarray]:
    """Per-call latencies in ms, one backend after the other (`warmup` untimed calls, then `runs` timed).

    Deliberately not interleaved call by call: PyTorch's OpenMP threads and ONNX Runtime's intra-op threads
    both spin-wait for a while after each call, so alternating them makes each pool steal the cores from
    the other and measures that contention instead of the backends.
    """
    from dlpipe.runtime import latency_ms

    return {name: latency_ms(call, warmup, runs) for name, call in calls.items()}


def quantize(fp32_path: Path, int8_path: Path) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # "consider pre-processing" advice, logged on the root logger for every model
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            quantize_dynamic(fp32_path, int8_path, weight_type=QuantType.QInt8)
    finally:
        root.setLevel(level)


def op_counts(path: Path) -> dict[str, int]:
    """Node count per op type of the main graph (shows what quantize_dynamic replaced)."""
    import onnx

    counts: dict[str, int] = {}
    for node in onnx.load(str(path), load_external_data=False).graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return dict(sorted(counts.items()))


def bench_model(
    name: str, args: argparse.Namespace, params: dict[str, Any], threads: int | None, workdir: Path
) -> dict[str, Any]:
    import torch

    from dlpipe.export import export_onnx
    from dlpipe.models import count_trainable_parameters
    from dlpipe.runtime import INPUT_NAME

    torch.manual_seed(args.seed)
    task, network, kwargs, source = build(name, params)
    rng = np.random.default_rng(args.seed)
    inputs = {batch: task.synthetic_inputs(kwargs, batch, rng) for batch in BATCH_SIZES}

    fp32_path, int8_path = workdir / f"{name}.fp32.onnx", workdir / f"{name}.int8.onnx"
    started = time.perf_counter()
    export_onnx(network, torch.from_numpy(inputs[BATCH_SIZES[-1]][:2]), fp32_path, args.opset)
    export_s = time.perf_counter() - started
    fp32 = cpu_session(fp32_path, threads)

    result: dict[str, Any] = {
        "task": task.name,
        "builder_kwargs": kwargs,
        "net_kwargs_source": source,
        "trainable_parameters": count_trainable_parameters(network),
        "input_shape_per_sample": list(inputs[1].shape[1:]),
        "export_seconds": export_s,
        "onnx_provider": fp32.get_providers()[0],
        "fp32_onnx_bytes": fp32_path.stat().st_size,
        "int8_onnx_bytes": None,
        "fp32_op_counts": op_counts(fp32_path),
        "int8_op_counts": None,
        "int8_error": None,
        "batches": {},
    }

    int8 = None
    try:
        quantize(fp32_path, int8_path)
        int8 = cpu_session(int8_path, threads)
        int8.run(None, {INPUT_NAME: inputs[1]})  # some unsupported int8 kernels only fail on the first run
        result["int8_onnx_bytes"] = int8_path.stat().st_size
        result["int8_op_counts"] = op_counts(int8_path)
    except Exception as exc:  # noqa: BLE001 - any quantization failure is a result to record, not a crash
        int8 = None
        result["int8_error"] = f"{type(exc).__name__}: {str(exc).strip()}"[:2000]

    for batch in BATCH_SIZES:
        x = inputs[batch]
        feed = {INPUT_NAME: x}
        tensor = torch.from_numpy(x)
        with torch.inference_mode():  # the ONNX Runtime calls are unaffected by it
            torch_out = network(tensor).numpy()
            fp32_out = fp32.run(None, feed)[0]
            int8_out = int8.run(None, feed)[0] if int8 is not None else None
            calls = {"torch": lambda x=tensor: network(x), "onnx_fp32": lambda f=feed: fp32.run(None, f)}
            if int8 is not None:
                calls["onnx_int8"] = lambda f=feed: int8.run(None, f)
            timings = latencies_ms(calls, args.warmup, args.runs)
        torch_t, fp32_t = timings["torch"], timings["onnx_fp32"]
        row: dict[str, Any] = {
            "torch": percentiles(torch_t),
            "onnx_fp32": percentiles(fp32_t),
            "onnx_int8": None,
            "fp32_vs_torch_max_abs_diff": float(np.max(np.abs(fp32_out - torch_out))),
            "fp32_output_max_abs": float(np.max(np.abs(fp32_out))),
            "int8_vs_fp32_max_abs_diff": None,
        }
        if int8_out is not None:
            row["onnx_int8"] = percentiles(timings["onnx_int8"])
            row["int8_vs_fp32_max_abs_diff"] = float(np.max(np.abs(int8_out - fp32_out)))
        row["torch_p50_over_onnx_fp32_p50"] = ratio(row["torch"]["p50_ms"], row["onnx_fp32"]["p50_ms"])
        row["onnx_fp32_p50_over_onnx_int8_p50"] = ratio(
            row["onnx_fp32"]["p50_ms"], row["onnx_int8"]["p50_ms"] if row["onnx_int8"] else None
        )
        result["batches"][str(batch)] = row
    diffs = [
        r["int8_vs_fp32_max_abs_diff"] for r in result["batches"].values() if r["int8_vs_fp32_max_abs_diff"] is not None
    ]
    result["int8_vs_fp32_max_abs_diff"] = max(diffs) if diffs else None
    return result


# ----------------------------------------------------------------------------------------------- report


def _f(value: float | None, spec: str = ".3f") -> str:
    return "-" if value is None else format(value, spec)


def first_line(text: str | None, width: int = 100) -> str:
    if not text:
        return "-"
    line = text.splitlines()[0]
    return line if len(line) <= width else line[: width - 3] + "..."


def format_table(payload: dict[str, Any]) -> str:
    env = payload["environment"]
    head = (
        f"{'model':<8} {'batch':>5} | {'torch p50':>9} {'p99':>8} | {'ort fp32 p50':>12} {'p99':>8} |"
        f" {'ort int8 p50':>12} {'p99':>8} |"
        f" {'torch/fp32':>10} {'fp32/int8':>9}"
    )
    lines = [
        f"latency in ms (p50/p99 of {payload['settings']['runs']} runs, {payload['settings']['warmup']} warm-up); "
        f"{env['ort_intra_op_threads']} intra-op thread(s) for torch and onnxruntime; "
        f"torch {env['torch_version']}, onnxruntime {env['onnxruntime_version']}, "
        f"{env['cpu_count']} CPUs ({env['cpu_model']}); "
        f"1-min load average {env['loadavg_1m_before']:.2f} before, {env['loadavg_1m_after']:.2f} after",
        head,
        "-" * len(head),
    ]
    for name, result in payload["models"].items():
        for batch, row in result["batches"].items():
            int8 = row["onnx_int8"] or {}
            lines.append(
                f"{name:<8} {batch:>5} | {_f(row['torch']['p50_ms']):>9} {_f(row['torch']['p99_ms']):>8} |"
                f" {_f(row['onnx_fp32']['p50_ms']):>12} {_f(row['onnx_fp32']['p99_ms']):>8} |"
                f" {_f(int8.get('p50_ms')):>12} {_f(int8.get('p99_ms')):>8} |"
                f" {_f(row['torch_p50_over_onnx_fp32_p50'], '.2f'):>10}"
                f" {_f(row['onnx_fp32_p50_over_onnx_int8_p50'], '.2f'):>9}"
            )
    lines += [
        "",
        f"{'model':<8} | {'fp32 .onnx KiB':>14} {'int8 .onnx KiB':>14} {'size ratio':>10} |"
        f" {'max|int8-fp32|':>14} {'max|fp32|':>10} | int8 error",
    ]
    lines.append("-" * len(lines[-1]))
    for name, result in payload["models"].items():
        fp32_kib = result["fp32_onnx_bytes"] / 1024
        int8_kib = result["int8_onnx_bytes"] / 1024 if result["int8_onnx_bytes"] else None
        scale = max(r["fp32_output_max_abs"] for r in result["batches"].values())
        lines.append(
            f"{name:<8} | {fp32_kib:>14.1f} {_f(int8_kib, '.1f'):>14} {_f(ratio(fp32_kib, int8_kib), '.2f'):>10} |"
            f" {_f(result['int8_vs_fp32_max_abs_diff'], '.2e'):>14} {scale:>10.3g} | {first_line(result['int8_error'])}"
        )
    lines.append(
        "torch/fp32 > 1: ONNX Runtime fp32 is faster than PyTorch eager; fp32/int8 > 1: int8 is faster than fp32."
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)  # exporter notes (e.g. torchvision ops not installed)
    import onnxruntime as ort
    import torch

    from dlpipe.io import write_json

    params = {} if args.builder_defaults else read_params(args.params)
    if args.opset is None:
        args.opset = int(((params.get("export") or {}).get("opset")) or 18)
    threads_used = args.threads if args.threads is not None else physical_cores()
    torch.set_num_threads(threads_used)  # same intra-op parallelism as onnxruntime: a fair comparison

    load_before = os.getloadavg()  # other work on the machine shows up as noise, mostly in p99
    started = time.perf_counter()
    models: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="dlpipe-bench-") as tmp:
        for name in args.models:
            print(f"[bench] {name}: export, quantize, time ...", file=sys.stderr, flush=True)
            models[name] = bench_model(name, args, params, args.threads, Path(tmp))

    payload = {
        "generated_unix": int(time.time()),
        "total_seconds": time.perf_counter() - started,
        "command": " ".join(["python", *sys.argv])
        if argv is None
        else " ".join(["python", "benchmarks/bench_inference.py", *argv]),
        "settings": {
            "models": args.models,
            "batch_sizes": list(BATCH_SIZES),
            "runs": args.runs,
            "warmup": args.warmup,
            "seed": args.seed,
            "opset": args.opset,
            "params_file": None if args.builder_defaults or not params else str(args.params),
            "quantization": "onnxruntime.quantization.quantize_dynamic, weight_type=QInt8 (all supported op types)",
            "timing": "per backend in turn (torch, onnx_fp32, onnx_int8): warmup untimed calls, then runs timed calls",
            "inputs": "each task's synthetic_inputs: images uniform [0, 1], shape (B, 1, 28, 28); "
            "windows standard normal, shape (B, 20, n_features)",
        },
        "environment": {
            "torch_version": torch.__version__,
            "onnxruntime_version": ort.__version__,
            "python_version": platform.python_version(),
            "platform": platform.platform(),
            "cpu_model": cpu_name(),
            "cpu_count": os.cpu_count(),
            "physical_cores": physical_cores(),
            "ort_intra_op_threads": threads_used,
            "ort_intra_op_threads_source": "--threads"
            if args.threads is not None
            else "onnxruntime default (physical cores; session from dlpipe.runtime.create_session)",
            "torch_num_threads": torch.get_num_threads(),
            "torch_num_interop_threads": torch.get_num_interop_threads(),
            "loadavg_1m_before": load_before[0],
            "loadavg_1m_after": os.getloadavg()[0],
        },
        "models": models,
    }
    print(format_table(payload))
    write_json(args.out, payload)  # temporary file beside the target, then os.replace
    print(f"\nwrote {args.out} ({payload['total_seconds']:.0f} s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(REPO_ROOT / "src"))  # also runs from a checkout without `pip install -e .`
    raise SystemExit(main())
