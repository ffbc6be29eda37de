"""The fp32-vs-bf16 training benchmark (benchmarks/bench_precision.py) measures what it says: bf16 steps
really run in bfloat16, both precisions train, and the figures it writes are consistent. Behaviour only:
no wall-clock assertions."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import benchmark_module


@pytest.fixture(scope="module")
def bench():
    with benchmark_module("bench_precision") as module:
        yield module


def test_bf16_steps_compute_in_bfloat16_and_fp32_steps_do_not(bench):
    module = bench.build("cnn", bench.REPO_ROOT / "params.yaml")
    images = torch.zeros(2, 1, 28, 28, dtype=torch.uint8)
    for precision, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        with bench.autocast(precision):
            assert module(images.float() / 255.0).dtype == dtype


def test_both_precisions_learn(bench):
    module = bench.build("cnn", bench.REPO_ROOT / "params.yaml").train()
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (32, 1, 28, 28), generator=generator, dtype=torch.uint8)
    labels = torch.randint(0, 10, (32,), generator=generator)
    for precision in ("fp32", "bf16"):
        optimizer = torch.optim.AdamW(module.parameters(), lr=1e-3)
        losses = [bench.train_step(module, optimizer, images, labels, precision) for _ in range(15)]
        assert losses[-1] < losses[0], (precision, losses)  # one batch, fitted: the loss falls


def test_the_benchmark_writes_consistent_figures(bench, tmp_path):
    out = tmp_path / "precision.json"
    argv = ["--models", "cnn", "mlp", "--steps", "2", "--warmup", "1", "--matmul-size", "128"]
    result = bench.main([*argv, "--accuracy-models", "mlp", "--accuracy-epochs", "1", "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    assert set(result["speed"]) == {"cnn", "mlp"} and all(v > 0 for v in result["matmul_peak_tflops"].values())
    for row in result["speed"].values():
        assert row["multiply_adds"] > 0 and row["images_per_s_fp32"] > 0 and row["images_per_s_bf16"] > 0
        assert row["bf16_speedup"] == pytest.approx(row["images_per_s_bf16"] / row["images_per_s_fp32"])
        peak = result["matmul_peak_tflops"]
        expected = 6 * row["multiply_adds"] * row["images_per_s_fp32"] / (peak["fp32"] * 1e12)
        assert row["fraction_of_peak_fp32"] == pytest.approx(expected)
    mlp = result["accuracy"]["mlp"]
    assert 0.5 < mlp["fp32"]["test_accuracy"] <= 1 and 0.5 < mlp["bf16"]["test_accuracy"] <= 1  # 1 epoch on 4,000
