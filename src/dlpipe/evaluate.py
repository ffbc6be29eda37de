"""Evaluation driver: the task computes its metrics through onnxruntime on the held-out split and draws
its figures; this module adds what every model shares (a latency table, PyTorch vs ONNX Runtime at
batch 1 and 32, also written as reports/plots/<model>/latency.csv for `dvc plots`) and the facts recorded
by training."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from dlpipe.config import Config
from dlpipe.errors import DlpipeError
from dlpipe.plots import latency_rows, save_csv
from dlpipe.runtime import InputContract, create_session, latency_ms
from dlpipe.tasks import task_of
from dlpipe.tasks.base import VARIANTS, variant_metric_name


def latency_table(config: Config, network: nn.Module, sessions: dict[str, Any], sample: np.ndarray) -> dict[str, float]:
    """p50/p99 latencies in ms of PyTorch and of each ONNX Runtime session ("onnx" = fp32, "int8", "fp16"), at batch 1
    and 32; batches are built from real inputs (repeated if the split is small). The sessions are timed in
    alternating rounds, so a machine that slows down mid-measurement slows all of them alike."""
    warmup, runs = config.params.evaluate.latency_warmup, config.params.evaluate.latency_runs
    input_name = InputContract.of(sessions["onnx"]).input_name
    batches = {1: sample[:1], 32: np.resize(sample, (32, *sample.shape[1:])).astype(np.float32)}
    network = network.eval()
    with torch.inference_mode():
        torch_b1 = latency_ms(lambda: network(torch.from_numpy(batches[1])), warmup, runs)
    timings: dict[tuple[str, int], list[np.ndarray]] = {}
    rounds = 4
    for _ in range(rounds):
        for name, session in sessions.items():
            for size, batch in batches.items():
                call = lambda s=session, b=batch: s.run(None, {input_name: b})  # noqa: E731
                timings.setdefault((name, size), []).append(latency_ms(call, warmup // rounds, -(-runs // rounds)))
    p50 = {key: float(np.percentile(np.concatenate(t), 50)) for key, t in timings.items()}
    table = {
        "latency_ms_torch_b1_p50": float(np.percentile(torch_b1, 50)),
        "latency_ms_onnx_b1_p99": float(np.percentile(np.concatenate(timings[("onnx", 1)]), 99)),
        "throughput_onnx_b32_per_s": 32.0 / (p50[("onnx", 32)] / 1000.0),
    }
    for (name, size), value in p50.items():
        table[f"latency_ms_{name}_b{size}_p50"] = value
    for variant in VARIANTS:
        if variant in sessions:
            for size in batches:
                table[f"{variant}_speedup_b{size}"] = p50[("onnx", size)] / p50[(variant, size)]
    return table


BACKENDS = ("torch", "onnx", *VARIANTS)  # the CSV's row order: eager PyTorch, the fp32 graph, its variants


def write_latency_csv(metrics: dict[str, Any], target: Path) -> None:
    """Every p50 latency in `metrics` (`latency_ms_<backend>_b<batch>_p50`, the shared table's and any a task
    adds) as rows `batch, backend, p50_ms`: one line per backend when `dvc plots` draws p50_ms against batch."""
    rows = latency_rows(metrics)
    order = {name: index for index, name in enumerate(BACKENDS)}
    rows.sort(key=lambda row: (order.get(row["backend"], len(order)), row["backend"], row["batch"]))
    save_csv(pd.DataFrame(rows, columns=["batch", "backend", "p50_ms"]), target)


def evaluate_model(
    config: Config, model: str, train_info: dict[str, Any], export_info: dict[str, Any]
) -> dict[str, Any]:
    """Metrics of the exported `model` on its test split: the task's (fp32 graph), each measured variant's
    promotion metric (int8; fp16 where export.json says it is measured), the latency table, and the training
    facts from `train_info` (train.json)."""

    task = task_of(config, model)
    onnx_path = config.paths.onnx(model)
    if not onnx_path.is_file():
        raise DlpipeError(f"{onnx_path}: file not found (run export first)")
    network = task.load_exported(config.paths.checkpoint(model))
    providers = config.params.evaluate.providers
    # The GPU profile measures on the GPU or not at all: a CPU fallback there would be a wrong figure.
    sessions = {"onnx": create_session(onnx_path, providers, strict=config.params.trainer.profile == "gpu")}
    metrics, outputs = task.evaluate(config, model, network, sessions["onnx"])
    missing = [key for key in task.metric_keys if key not in metrics]
    if missing:  # a task that breaks its own promise would silently drop columns from reports and promotion
        raise RuntimeError(f"{task.name} task returned no {', '.join(missing)} for {model}")
    metrics["onnx_provider"] = sessions["onnx"].get_providers()[0]
    metrics["onnx_size_bytes"] = onnx_path.stat().st_size
    for variant in VARIANTS:
        path = config.paths.onnx_variant(model, variant)
        # export.json says which variants are measured here (fp16: where ONNX Runtime runs CUDA); int8 always is.
        if not path.is_file() or not (export_info.get(variant) or {}).get("measured", True):
            continue
        sessions[variant] = create_session(path, providers)
        metrics[variant_metric_name(variant, task.promotion[0])] = task.promotion_score(
            config, model, network, sessions[variant]
        )
        metrics[f"{variant}_size_bytes"] = path.stat().st_size
        metrics[f"{variant}_size_ratio"] = metrics[f"{variant}_size_bytes"] / metrics["onnx_size_bytes"]
    metrics.update(latency_table(config, network, sessions, task.reference_inputs(config, model)))
    metrics.update({key: train_info[key] for key in ("trainable_params", "train_seconds", "epochs_trained")})
    if "multiply_adds" in train_info:  # per sample; absent from a train.json written before it was counted
        metrics["multiply_adds"] = train_info["multiply_adds"]
    task.plots(config, model, outputs, config.paths.plots(model))
    write_latency_csv(metrics, config.paths.latency_csv(model))
    return metrics
