"""The Lightning-vs-plain-loop parity harness (benchmarks/bench_lightning_overhead.py): one tiny epoch of each
loop on the same data and seed must give the same losses. Behaviour only: no wall-clock assertions."""

from __future__ import annotations

import os

import pytest

from conftest import benchmark_module

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

pytest.importorskip("lightning")
pytest.importorskip("mlxtend")


@pytest.fixture(scope="module")
def bench():
    with benchmark_module("bench_lightning_overhead") as module:
        yield module


def test_the_benchmark_trains_the_cnn_in_its_pipeline_precision(bench):
    assert bench.precision_of(bench.cnn_train_params()) == "bf16-mixed"  # params.yaml train.cnn.precision


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_lightning_and_plain_loop_give_the_same_losses(bench, monkeypatch, precision):
    import torch

    for name in ("PL_GLOBAL_SEED", "PL_SEED_WORKERS"):  # L.seed_everything sets them: restored after the test
        monkeypatch.setenv(name, "0")

    deterministic = torch.are_deterministic_algorithms_enabled()
    try:
        train = bench.cnn_train_params({"channels": [4, 8], "hidden": 16}).model_copy(update={"precision": precision})
        dataset = bench.load_mnist(250)  # a last batch of 58: the logged mean must weight it
        images, labels = dataset.tensors
        assert images.dtype == torch.uint8 and images.shape == (250, 1, 28, 28)
        assert labels.dtype == torch.int64

        lightning = bench.run_lightning(train, dataset, epochs=1, seed=7)
        plain = bench.run_plain(train, dataset, epochs=1, seed=7)
    finally:
        torch.use_deterministic_algorithms(deterministic)  # Trainer(deterministic=True) and run_plain switch it on

    steps = -(-250 // train.batch_size)
    assert len(lightning["step_losses"]) == len(plain["step_losses"]) == steps
    assert len(lightning["epoch_loss"]) == len(plain["epoch_loss"]) == 1
    parity = bench.compare_losses(lightning, plain)
    assert parity["equal_to_5_decimals"], parity
    assert parity["epoch_loss_max_abs_diff"] < 1e-5
    assert parity["logged_epoch_loss_max_abs_diff"] < 1e-5  # Lightning's own logged train/loss
    assert parity["step_loss_max_abs_diff"] < 1e-5
    assert parity["train_acc_max_abs_diff"] < 1e-6
    assert lightning["epoch_loss"][0] == pytest.approx(plain["epoch_loss"][0], abs=1e-5)

    # A different seed changes the initial weights and batch order: the harness is not comparing constants.
    other = bench.run_plain(train, dataset, epochs=1, seed=8)
    torch.use_deterministic_algorithms(deterministic)
    assert abs(other["epoch_loss"][0] - plain["epoch_loss"][0]) > 1e-5
