"""int8 benchmark on a pipeline run's real exported models: fp32 vs int8 accuracy, latency and size.

    python benchmarks/bench_int8.py --project /tmp/reprofull [--out benchmarks/results/int8.json] [--sweep]

The project is a directory where the pipeline has run (params.yaml, data/images/raw, models/<name>/model.onnx);
nothing in it is written. For each image classifier the fp32 graph is quantized with
`dlpipe.quantize.quantize_static_int8` (static QDQ, calibrated on 256 seeded training images, as the export
stage does) and both graphs are judged on the 1,000-image test split (top-1 accuracy) and timed at batch 1
and 32. For each forecaster the graph is quantized with `quantize_dynamic_int8` and its outputs compared with
fp32 on the real test windows. `--sweep` also quantizes each classifier with the alternative static settings
(`dlpipe.quantize.StaticSettings`) and records their accuracy and speed-up: the evidence for the defaults.

Timing: both graphs run in this process on `dlpipe.runtime.create_session` CPU sessions (same options,
default threads), in interleaved rounds: each round times a block of calls of one graph then of the other
(order alternating between rounds), after a few untimed calls that let the previous session's spinning
threads go idle. The speed-up is the median over rounds of fp32 p50 / int8 p50 within the round, so load
that changes between rounds cancels; the load average is recorded before and after each model.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import platform
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO_ROOT / "benchmarks" / "results" / "int8.json"
CLASSIFIERS = ("cnn", "resnet", "mobilenet_v2")
FORECASTERS = ("lstm", "gru", "rnn")
BATCH_SIZES = (1, 32)
GOAL = {"min_speedup_b32": 1.5, "max_accuracy_drop_points": 0.5}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python benchmarks/bench_int8.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--project", type=Path, default=REPO_ROOT, help="a directory where the pipeline has run")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON results (written atomically)")
    p.add_argument("--classifiers", nargs="*", default=list(CLASSIFIERS))
    p.add_argument("--forecasters", nargs="*", default=list(FORECASTERS))
    p.add_argument("--calibration", type=int, default=256, help="training images to calibrate on (default 256)")
    p.add_argument("--seed", type=int, default=None, help="calibration choice seed (default: the project's seed)")
    p.add_argument("--rounds", type=int, default=21, help="interleaved timing rounds per batch size")
    p.add_argument("--runs", type=int, default=20, help="timed calls per graph per round")
    p.add_argument("--warmup", type=int, default=3, help="untimed calls before each block")
    p.add_argument("--profile-runs", type=int, default=200, help="calls profiled per graph at batch 32 (0: none)")
    p.add_argument("--sweep", action="store_true", help="also time the alternative static settings")
    return p.parse_args(argv)


# ------------------------------------------------------------------------------------------------ timing


def interleaved(sessions: dict[str, Any], inputs: np.ndarray, rounds: int, runs: int, warmup: int) -> dict[str, Any]:
    """fp32 and int8 timed in alternating blocks; per-graph p50 over all calls and the per-round speed-up."""
    from dlpipe.runtime import latency_ms

    timings: dict[str, list[np.ndarray]] = {key: [] for key in sessions}
    ratios = []
    for round_index in range(rounds):
        order = list(sessions) if round_index % 2 == 0 else list(reversed(sessions))
        medians = {}
        for key in order:
            session = sessions[key]
            feed = {session.get_inputs()[0].name: inputs}
            block = latency_ms(lambda session=session, feed=feed: session.run(None, feed), warmup, runs)
            timings[key].append(block)
            medians[key] = float(np.median(block))
        ratios.append(medians["fp32"] / medians["int8"])
    result: dict[str, Any] = {f"{key}_p50_ms": float(np.median(np.concatenate(t))) for key, t in timings.items()}
    result["speedup"] = float(np.median(ratios))
    result["speedup_quartiles"] = [float(q) for q in np.percentile(ratios, [25, 75])]
    return result


def latency_table(sessions: dict[str, Any], inputs: np.ndarray, args: argparse.Namespace) -> dict[str, Any]:
    return {
        f"batch_{b}": interleaved(
            sessions, np.resize(inputs, (b, *inputs.shape[1:])), args.rounds, args.runs, args.warmup
        )
        for b in BATCH_SIZES
    }


# ------------------------------------------------------------------------------------------------ profile


def profile(path: Path, inputs: np.ndarray, runs: int, scratch: Path) -> dict[str, Any]:
    """onnxruntime's own per-node timings: microseconds per call by op type, and the kernels it chose."""
    import onnx
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.enable_profiling = True
    options.profile_file_prefix = str(scratch / f"profile-{path.stem}")
    options.optimized_model_filepath = str(scratch / f"optimized-{path.stem}.onnx")
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    feed = {session.get_inputs()[0].name: inputs}
    for _ in range(runs):
        session.run(None, feed)
    events = json.loads(Path(session.end_profiling()).read_text())
    per_op: Counter[str] = Counter()
    for event in events:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            per_op[event["args"]["op_name"]] += event["dur"]
    total = sum(per_op.values())
    kernels = Counter(node.op_type for node in onnx.load(options.optimized_model_filepath).graph.node)
    return {
        "kernel_us_per_call": round(total / runs, 1),
        "by_op_us_per_call": {op: round(us / runs, 1) for op, us in per_op.most_common()},
        "quantize_dequantize_share": round(
            sum(us for op, us in per_op.items() if op in ("QuantizeLinear", "DequantizeLinear")) / max(total, 1), 4
        ),
        "optimized_graph_ops": dict(kernels),
    }


# ------------------------------------------------------------------------------------------------ models


def predictions(session, x: np.ndarray) -> np.ndarray:
    from dlpipe.runtime import run_batched

    return run_batched(session, x, 250).argmax(axis=1)


def accuracy(session, x: np.ndarray, y: np.ndarray) -> float:
    return float((predictions(session, x) == y).mean())


def quantize_classifier(source: Path, target: Path, calibration: np.ndarray, settings) -> float:
    from dlpipe.quantize import quantize_static_with

    started = time.perf_counter()
    quantize_static_with(source, target, calibration, settings)
    return time.perf_counter() - started


def bench_classifier(model: str, data: dict[str, np.ndarray], args, scratch: Path) -> dict[str, Any]:
    from dlpipe.quantize import StaticSettings, int8_op_counts
    from dlpipe.runtime import create_session

    source, target = args.project / "models" / model / "model.onnx", scratch / f"{model}.int8.onnx"
    load_before = os.getloadavg()
    seconds = quantize_classifier(source, target, data["calibration"], StaticSettings())
    sessions = {"fp32": create_session(source, ["cpu"]), "int8": create_session(target, ["cpu"])}
    predicted = {key: predictions(s, data["x_test"]) for key, s in sessions.items()}
    acc = {key: float((p == data["y_test"]).mean()) for key, p in predicted.items()}
    result: dict[str, Any] = {
        "accuracy_fp32": acc["fp32"],
        "accuracy_int8": acc["int8"],
        "accuracy_drop_points": round(100 * (acc["fp32"] - acc["int8"]), 2),
        "top1_agreement": float((predicted["fp32"] == predicted["int8"]).mean()),
        "latency": latency_table(sessions, data["x_test"], args),
        "size_bytes": {"fp32": source.stat().st_size, "int8": target.stat().st_size},
        "size_ratio": target.stat().st_size / source.stat().st_size,
        "quantize_seconds": round(seconds, 2),
        "int8_ops": int8_op_counts(target),
    }
    if args.profile_runs:
        batch = data["x_test"][:32]
        result["profile_batch_32"] = {
            "fp32": profile(source, batch, args.profile_runs, scratch),
            "int8": profile(target, batch, args.profile_runs, scratch),
        }
    result["loadavg_before_after"] = [load_before, os.getloadavg()]
    return result


def sweep_classifier(model: str, data: dict[str, np.ndarray], args, scratch: Path) -> dict[str, Any]:
    """Accuracy and speed-up of each alternative static setting (fewer timing rounds than the main figures)."""
    from dlpipe.runtime import create_session

    source = args.project / "models" / model / "model.onnx"
    fp32 = create_session(source, ["cpu"])
    acc_fp32 = accuracy(fp32, data["x_test"], data["y_test"])
    quick = argparse.Namespace(**{**vars(args), "rounds": max(5, args.rounds // 2)})
    results = {}
    for name, settings in sweep_settings().items():
        target = scratch / f"{model}.sweep.onnx"
        try:
            seconds = quantize_classifier(source, target, data["calibration"], settings)
            sessions = {"fp32": fp32, "int8": create_session(target, ["cpu"])}
            acc = accuracy(sessions["int8"], data["x_test"], data["y_test"])
        except Exception as exc:  # a setting onnxruntime cannot run is a result too
            results[name] = {"settings": dataclasses.asdict(settings), "error": str(exc).splitlines()[0]}
            continue
        latency = latency_table(sessions, data["x_test"], quick)
        results[name] = {
            "settings": dataclasses.asdict(settings),
            "accuracy_drop_points": round(100 * (acc_fp32 - acc), 2),
            "speedup_b1": latency["batch_1"]["speedup"],
            "speedup_b32": latency["batch_32"]["speedup"],
            "quantize_seconds": round(seconds, 2),
            "loadavg": os.getloadavg()[0],
        }
        print(
            f"  sweep {model:13s} {name:38s} {results[name]['accuracy_drop_points']:+.1f} pt  "
            f"b1 {results[name]['speedup_b1']:.2f}x  b32 {results[name]['speedup_b32']:.2f}x",
            flush=True,
        )
    return results


def sweep_settings() -> dict[str, Any]:
    from dlpipe.quantize import StaticSettings

    chosen = StaticSettings()
    return {
        "chosen": chosen,
        "no float stem": dataclasses.replace(chosen, float_stem=False),
        "ReduceMean kept (no GlobalAveragePool)": dataclasses.replace(chosen, global_average_pool=False),
        "NCHW flatten": dataclasses.replace(chosen, channels_last_flatten=False),
        "no graph rewrites": dataclasses.replace(
            chosen, float_stem=False, global_average_pool=False, channels_last_flatten=False
        ),
        "s8 activations": dataclasses.replace(chosen, activation_type="s8"),
        "s8 activations, no float stem (ORT default)": dataclasses.replace(
            chosen, activation_type="s8", float_stem=False
        ),
        "u8 weights": dataclasses.replace(chosen, weight_type="u8"),
        "per-tensor weights": dataclasses.replace(chosen, per_channel=False),
        "asymmetric weights (per-tensor)": dataclasses.replace(chosen, per_channel=False, weight_symmetric=False),
        "symmetric activations": dataclasses.replace(chosen, activation_symmetric=True),
        "keep Relu/Clip": dataclasses.replace(chosen, keep_removable_activations=True),
        "8-bit weights (reduce_range off)": dataclasses.replace(chosen, reduce_range=False),
        "entropy calibration": dataclasses.replace(chosen, method="entropy"),
        "percentile calibration": dataclasses.replace(chosen, method="percentile"),
    }


def bench_forecaster(model: str, inputs: np.ndarray, args, scratch: Path) -> dict[str, Any]:
    from dlpipe.quantize import int8_op_counts, quantize_dynamic_int8
    from dlpipe.runtime import create_session, run_batched

    source, target = args.project / "models" / model / "model.onnx", scratch / f"{model}.int8.onnx"
    load_before = os.getloadavg()
    quantize_dynamic_int8(source, target)
    sessions = {"fp32": create_session(source, ["cpu"]), "int8": create_session(target, ["cpu"])}
    fp32, int8 = (run_batched(s, inputs) for s in sessions.values())
    return {
        "windows": list(inputs.shape),
        "max_abs_diff": float(np.max(np.abs(int8 - fp32))),
        "max_abs_fp32": float(np.max(np.abs(fp32))),
        "std_fp32": float(np.std(fp32)),
        "latency": latency_table(sessions, inputs, args),
        "size_ratio": target.stat().st_size / source.stat().st_size,
        "int8_ops": int8_op_counts(target),
        "loadavg_before_after": [load_before, os.getloadavg()],
    }


# ------------------------------------------------------------------------------------------------ main


def classifier_data(config, seed: int, count: int) -> dict[str, np.ndarray]:
    """Calibration images exactly as the export stage picks them; the test split the pipeline evaluates on."""
    from dlpipe.data.images import load_split
    from dlpipe.tasks import task_of

    x_test, y_test = load_split(config.paths.raw_images, "test")
    calibration = task_of(config, CLASSIFIERS[0]).calibration_inputs(config, CLASSIFIERS[0], count, seed)
    return {"calibration": calibration, "x_test": x_test.astype(np.float32) / 255.0, "y_test": y_test}


def environment() -> dict[str, Any]:
    import onnxruntime as ort

    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if "model name" in line
        ),
        platform.processor(),
    )
    flags = next((line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")), "")
    return {
        "onnxruntime": ort.__version__,
        "python": platform.python_version(),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "int8_units": sorted({f for f in flags.split() if "vnni" in f or f.startswith("amx")}),
    }


def print_table(results: dict[str, Any]) -> None:
    print("\nmodel          acc fp32  acc int8  drop pt  b1 fp32/int8 ms      b1 x   b32 fp32/int8 ms     b32 x  size")
    for model, r in results["classifiers"].items():
        b1, b32 = r["latency"]["batch_1"], r["latency"]["batch_32"]
        print(
            f"{model:13s}  {r['accuracy_fp32']:.3f}     {r['accuracy_int8']:.3f}     {r['accuracy_drop_points']:+.1f}"
            f"     {b1['fp32_p50_ms']:.3f}/{b1['int8_p50_ms']:.3f}  {b1['speedup']:5.2f}   "
            f"{b32['fp32_p50_ms']:.3f}/{b32['int8_p50_ms']:.3f}   {b32['speedup']:5.2f}  {r['size_ratio']:.2f}"
        )
    print("\nmodel   max|int8-fp32|  max|fp32|   b1 fp32/int8 ms     b1 x   b32 fp32/int8 ms    b32 x  size")
    for model, r in results["forecasters"].items():
        b1, b32 = r["latency"]["batch_1"], r["latency"]["batch_32"]
        print(
            f"{model:6s}  {r['max_abs_diff']:.2e}       {r['max_abs_fp32']:.2e}   "
            f"{b1['fp32_p50_ms']:.3f}/{b1['int8_p50_ms']:.3f}    {b1['speedup']:5.2f}   "
            f"{b32['fp32_p50_ms']:.3f}/{b32['int8_p50_ms']:.3f}   {b32['speedup']:5.2f}  {r['size_ratio']:.2f}"
        )


def run_all(config, args: argparse.Namespace, seed: int, results: dict[str, Any]) -> None:
    """Every model's figures into `results`; quantized files live in a scratch directory, never the project."""
    from dlpipe.tasks import task_of

    with tempfile.TemporaryDirectory(prefix="bench-int8-") as scratch_dir:
        scratch = Path(scratch_dir)
        data = classifier_data(config, seed, args.calibration) if args.classifiers else {}
        for model in args.classifiers:
            print(f"classifier {model} ...", flush=True)
            results["classifiers"][model] = bench_classifier(model, data, args, scratch)
        for model in args.forecasters:
            print(f"forecaster {model} ...", flush=True)
            inputs = task_of(config, model).reference_inputs(config, model)
            results["forecasters"][model] = bench_forecaster(model, inputs, args, scratch)
        if args.sweep:
            results["sweep"] = {model: sweep_classifier(model, data, args, scratch) for model in args.classifiers}


def main(argv: list[str] | None = None) -> int:
    logging.getLogger().setLevel(logging.ERROR)  # onnxruntime.quantization logs advice at WARNING on the root
    from dlpipe.config import load_config
    from dlpipe.errors import DlpipeError
    from dlpipe.io import write_json
    from dlpipe.quantize import StaticSettings

    args = parse_args(argv)
    args.project = args.project.resolve()
    try:
        config = load_config(args.project / "params.yaml")
    except DlpipeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    seed = config.params.seed if args.seed is None else args.seed
    results: dict[str, Any] = {
        "project": str(args.project),
        "environment": environment(),
        "settings": {
            "static": dataclasses.asdict(StaticSettings()),
            "calibration_images": args.calibration,
            "seed": seed,
            "rounds": args.rounds,
            "runs": args.runs,
            "warmup": args.warmup,
        },
        "goal": GOAL,
        "loadavg_start": os.getloadavg(),
        "classifiers": {},
        "forecasters": {},
    }
    try:
        run_all(config, args, seed, results)
    except DlpipeError as exc:  # a project without the models or data this needs
        print(f"error: {exc}", file=sys.stderr)
        return 2
    results["loadavg_end"] = os.getloadavg()
    results["goal_met"] = {
        model: r["latency"]["batch_32"]["speedup"] >= GOAL["min_speedup_b32"]
        and r["accuracy_drop_points"] <= GOAL["max_accuracy_drop_points"]
        for model, r in results["classifiers"].items()
    }
    write_json(args.out, results)
    print_table(results)
    print(
        f"\ngoal (b32 >= {GOAL['min_speedup_b32']}x, <= {GOAL['max_accuracy_drop_points']} pt lost): "
        f"{results['goal_met']}; load average start/end {results['loadavg_start'][0]:.2f}/"
        f"{results['loadavg_end'][0]:.2f}; wrote {args.out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
