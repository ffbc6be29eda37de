"""Evaluation driver: the task computes its metrics through onnxruntime on the held-out split and draws
its figures; this module adds what every model shares (a latency table, PyTorch vs ONNX Runtime at
batch 1 and 32) and the facts recorded by training."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from dlpipe.config import Config
from dlpipe.errors import DlpipeError
from dlpipe.runtime import InputContract, create_session, latency_ms
from dlpipe.tasks import task_of


def latency_table(config: Config, network: nn.Module, onnx_session, sample: np.ndarray) -> dict[str, float]:
    """p50/p99 latencies in ms; batches are built from real inputs (repeated if the split is small)."""
    warmup, runs = config.params.evaluate.latency_warmup, config.params.evaluate.latency_runs
    input_name = InputContract.of(onnx_session).input_name
    batch1 = sample[:1]
    batch32 = np.resize(sample, (32, *sample.shape[1:])).astype(np.float32)
    network = network.eval()
    with torch.inference_mode():
        torch_b1 = latency_ms(lambda: network(torch.from_numpy(batch1)), warmup, runs)
    onnx_b1 = latency_ms(lambda: onnx_session.run(None, {input_name: batch1}), warmup, runs)
    onnx_b32 = latency_ms(lambda: onnx_session.run(None, {input_name: batch32}), warmup, runs)
    p50_b32 = float(np.percentile(onnx_b32, 50))
    return {
        "latency_ms_torch_b1_p50": float(np.percentile(torch_b1, 50)),
        "latency_ms_onnx_b1_p50": float(np.percentile(onnx_b1, 50)),
        "latency_ms_onnx_b1_p99": float(np.percentile(onnx_b1, 99)),
        "latency_ms_onnx_b32_p50": p50_b32,
        "throughput_onnx_b32_per_s": 32.0 / (p50_b32 / 1000.0),
    }


def evaluate_model(config: Config, model: str, train_info: dict[str, Any]) -> dict[str, Any]:
    """Metrics of the exported `model` on its test split: the task's, the latency table, and the training
    facts from `train_info` (the train stage's train.json)."""
    task = task_of(config, model)
    onnx_path = config.paths.onnx(model)
    if not onnx_path.is_file():
        raise DlpipeError(f"{onnx_path}: file not found (run export first)")
    network = task.load_exported(config.paths.checkpoint(model))
    session = create_session(onnx_path, config.params.evaluate.providers)
    metrics, outputs = task.evaluate(config, model, network, session)
    missing = [key for key in task.metric_keys if key not in metrics]
    if missing:  # a task that breaks its own promise would silently drop columns from reports and promotion
        raise RuntimeError(f"{task.name} task returned no {', '.join(missing)} for {model}")
    metrics["onnx_provider"] = session.get_providers()[0]
    metrics.update(latency_table(config, network, session, task.reference_inputs(config, model)))
    metrics.update({key: train_info[key] for key in ("trainable_params", "train_seconds", "epochs_trained")})
    if "multiply_adds" in train_info:  # per sample; absent from a train.json written before it was counted
        metrics["multiply_adds"] = train_info["multiply_adds"]
    task.plots(config, model, outputs, config.paths.plots(model))
    return metrics
