"""Evaluation through onnxruntime: accuracy or forecast error on the held-out split, parity with PyTorch,
and a latency table (PyTorch vs ONNX Runtime, batch 1 and 32)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn

from dlpipe.config import Config
from dlpipe.data.images import load_split
from dlpipe.data.stocks import Windows, make_windows, read_prices, split_chronological
from dlpipe.export import run_onnx, run_torch, session


def latency_ms(call: Callable[[], Any], warmup: int, runs: int) -> np.ndarray:
    for _ in range(warmup):
        call()
    timings = np.empty(runs)
    for i in range(runs):
        started = time.perf_counter()
        call()
        timings[i] = (time.perf_counter() - started) * 1000.0
    return timings


def latency_table(config: Config, network: nn.Module, onnx_session, sample: np.ndarray) -> dict[str, float]:
    """p50/p99 latencies in ms; batches are built from real inputs (repeated if the split is small)."""
    warmup, runs = config.params.evaluate.latency_warmup, config.params.evaluate.latency_runs
    batch1 = sample[:1]
    batch32 = np.resize(sample, (32, *sample.shape[1:])).astype(np.float32)
    network = network.eval()
    with torch.inference_mode():
        torch_b1 = latency_ms(lambda: network(torch.from_numpy(batch1)), warmup, runs)
    onnx_b1 = latency_ms(lambda: onnx_session.run(None, {"input": batch1}), warmup, runs)
    onnx_b32 = latency_ms(lambda: onnx_session.run(None, {"input": batch32}), warmup, runs)
    p50_b32 = float(np.percentile(onnx_b32, 50))
    return {
        "latency_ms_torch_b1_p50": float(np.percentile(torch_b1, 50)),
        "latency_ms_onnx_b1_p50": float(np.percentile(onnx_b1, 50)),
        "latency_ms_onnx_b1_p99": float(np.percentile(onnx_b1, 99)),
        "latency_ms_onnx_b32_p50": p50_b32,
        "throughput_onnx_b32_per_s": 32.0 / (p50_b32 / 1000.0),
    }


def classifier_test_inputs(config: Config) -> tuple[np.ndarray, np.ndarray]:
    x, y = load_split(config.paths.raw_images, "test")
    return x.astype(np.float32) / 255.0, y


def forecaster_test_windows(config: Config, window: int) -> Windows:
    return split_chronological(make_windows(read_prices(config.paths.raw_stocks / "prices.csv"), window))["test"]


def evaluate_classifier(config: Config, network: nn.Module, onnx_path, num_classes: int) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    from torchmetrics.functional.classification import multiclass_confusion_matrix, multiclass_f1_score

    x, y = classifier_test_inputs(config)
    onnx_session = session(onnx_path, config.params.evaluate.providers)
    torch_logits = run_torch(network, x)
    onnx_logits = run_onnx(onnx_session, x)
    torch_pred, onnx_pred = torch_logits.argmax(1), onnx_logits.argmax(1)
    target = torch.from_numpy(y)
    metrics = {
        "test_accuracy": float((torch_pred == y).mean()),
        "onnx_accuracy": float((onnx_pred == y).mean()),
        "onnx_top1_agreement": float((torch_pred == onnx_pred).mean()),
        "macro_f1": float(multiclass_f1_score(torch.from_numpy(onnx_pred), target, num_classes, average="macro")),
        "onnx_max_abs_diff": float(np.abs(torch_logits - onnx_logits).max()),
        "test_samples": int(len(y)),
        "onnx_provider": onnx_session.get_providers()[0],
    }
    metrics.update(latency_table(config, network, onnx_session, x))
    confusion = multiclass_confusion_matrix(torch.from_numpy(onnx_pred), target, num_classes).numpy()
    return metrics, {"confusion": confusion, "actual": y, "predicted": onnx_pred}


def evaluate_forecaster(config: Config, network: nn.Module, onnx_path, window: int) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    test = forecaster_test_windows(config, window)
    onnx_session = session(onnx_path, config.params.evaluate.providers)
    torch_return = run_torch(network, test.x)[:, 0]
    onnx_return = run_onnx(onnx_session, test.x)[:, 0]
    predicted_close = test.last_close * np.exp(onnx_return.astype(np.float64))
    errors = predicted_close - test.next_close
    persistence_errors = test.last_close - test.next_close  # tomorrow's close = today's close
    rmse = float(np.sqrt(np.mean(errors**2)))
    persistence_rmse = float(np.sqrt(np.mean(persistence_errors**2)))
    actual_return = test.y[:, 0]
    moved = actual_return != 0  # a flat day has no direction to get right
    metrics = {
        "rmse": rmse,
        "mae": float(np.mean(np.abs(errors))),
        "persistence_rmse": persistence_rmse,
        "rmse_ratio_vs_persistence": rmse / persistence_rmse,
        "directional_accuracy": float(np.mean(np.sign(onnx_return[moved]) == np.sign(actual_return[moved]))),
        "onnx_max_abs_diff": float(np.abs(torch_return - onnx_return).max()),
        "test_samples": int(len(actual_return)),
        "onnx_provider": onnx_session.get_providers()[0],
    }
    metrics.update(latency_table(config, network, onnx_session, test.x))
    return metrics, {"dates": test.dates, "actual": test.next_close, "predicted": predicted_close, "persistence": test.last_close}
