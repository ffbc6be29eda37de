"""The image classifiers side by side: test accuracy (mean and spread over seeds), size, cost, speed.

Each seed is one project (params.yaml from the repository with that seed and every model listed): the
pipeline's own stages run in it, one process each as DVC runs them (fetch_images, augment, then train,
export and evaluate per model), and the numbers come from the metrics files they write. The seed moves
the split, the augmentation, the weight initialisation and the data order together.

    python benchmarks/bench_zoo.py [--models cnn resnet ...] [--seeds 42 43 44] [--out benchmarks/results/zoo.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
COLUMNS = (
    ("onnx_accuracy", "test accuracy (ONNX Runtime)"),
    ("trainable_params", "parameters"),
    ("multiply_adds", "multiply-adds / image"),
    ("latency_ms_onnx_b1_p50", "ORT ms b1 p50"),
    ("throughput_onnx_b32_per_s", "ORT images/s b32"),
    ("train_seconds", "train s"),
    ("epochs_trained", "epochs"),
)


def classifiers() -> list[str]:
    from dlpipe.models import get_spec, list_models
    from dlpipe.tasks.classifier import ClassifierTask

    return [name for name in list_models() if get_spec(name).task == ClassifierTask.name]


def project(root: Path, seed: int, models: list[str]) -> Path:
    """A project directory for one seed; the data stages run once in it."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["seed"] = seed
    # Every model trained here, plus what the params' other sections name (e.g. a distillation teacher).
    params["models"] = {**params["models"], **dict.fromkeys(models, "images")}
    root.mkdir(parents=True, exist_ok=True)
    shutil.copytree(REPO / "data" / "samples", root / "data" / "samples", dirs_exist_ok=True)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return root


def stage(root: Path, *args: str) -> float:
    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)  # each project keeps its own store
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "dlpipe", *args], cwd=root, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(args)} failed in {root}:\n{result.stderr[-2000:]}")
    return time.perf_counter() - started


def summarise(rows: list[dict]) -> dict[str, dict]:
    table: dict[str, dict] = {}
    for model in dict.fromkeys(row["model"] for row in rows):
        mine = [row for row in rows if row["model"] == model]
        accuracies = [row["onnx_accuracy"] for row in mine]
        table[model] = {
            "accuracy_mean": statistics.fmean(accuracies),
            "accuracy_std": statistics.stdev(accuracies) if len(accuracies) > 1 else 0.0,
            "accuracy_min": min(accuracies),
            "seeds": len(mine),
            **{key: statistics.median(row[key] for row in mine) for key, _ in COLUMNS[1:] if key in mine[0]},
            "stage_seconds": statistics.median(row["stage_seconds"] for row in mine),
        }
    return table


def markdown(table: dict[str, dict]) -> str:
    lines = [
        "| model | accuracy mean ± sd (min) | params | multiply-adds | ORT b1 ms | ORT img/s b32 | train s "
        "| train+export+evaluate s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for model, row in sorted(table.items(), key=lambda item: -item[1]["accuracy_mean"]):
        lines.append(
            f"| {model} | {row['accuracy_mean']:.4f} ± {row['accuracy_std']:.4f} ({row['accuracy_min']:.4f}) "
            f"| {row['trainable_params']:,.0f} | {row.get('multiply_adds', float('nan')):,.0f} "
            f"| {row['latency_ms_onnx_b1_p50']:.3f} | {row['throughput_onnx_b32_per_s']:,.0f} "
            f"| {row['train_seconds']:.1f} | {row['stage_seconds']:.1f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", help="classifiers to compare (default: every registered one)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[42, 43, 44])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/dlpipe-zoo"), help="scratch projects go here")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    args = parser.parse_args(argv)
    models = args.models or classifiers()

    rows = []
    for seed in args.seeds:
        root = project(args.workdir / f"seed{seed}", seed, models)
        stage(root, "fetch_images")
        stage(root, "augment")
        for model in models:
            seconds = sum(stage(root, name, model) for name in ("train", "export", "evaluate"))
            metrics = json.loads((root / "reports" / "metrics" / f"{model}.json").read_text())
            row = {"model": model, "seed": seed, "stage_seconds": seconds}
            row.update({key: metrics[key] for key, _ in COLUMNS if key in metrics})
            rows.append(row)
            print(f"seed {seed} {model}: accuracy {row['onnx_accuracy']:.4f} in {seconds:.0f} s", flush=True)
    table = summarise(rows)
    print(markdown(table))
    if args.out:
        result = {"python": platform.python_version(), "cpus": os.cpu_count(), "rows": rows, "table": table}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
