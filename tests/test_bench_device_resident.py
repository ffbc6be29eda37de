"""The device-resident vs DataLoader benchmark (benchmarks/bench_device_resident.py), run tiny on the CPU:
both variants train the pipeline's ResNet through Lightning, the resident one really serves batches from
tensors on the device, and the figures it writes follow from its per-epoch records. Behaviour only."""

from __future__ import annotations

import json

import pytest

from conftest import benchmark_module

pytest.importorskip("mlxtend")


@pytest.fixture(scope="module")
def bench():
    with benchmark_module("bench_device_resident") as module:
        yield module


def test_both_paths_train_and_the_figures_follow_from_the_epochs(bench, tmp_path):
    out = tmp_path / "device_resident.json"
    argv = ["--device", "cpu", "--epochs", "2", "--train-images", "256", "--test-images", "128", "--batch", "64"]
    result = bench.main([*argv, "--matmul-size", "128", "--targets", "0.05", "0.999", "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    resident, loader = result["variants"]["resident"], result["variants"]["loader"]
    assert resident["device_resident"] is True and loader["device_resident"] is False
    assert result["resident_speedup"] == pytest.approx(resident["images_per_s"] / loader["images_per_s"])
    for variant in (resident, loader):
        epochs = variant["epochs"]
        assert 1 <= len(epochs) <= 2 and all(e["train_s"] > 0 and 0 <= e["test_acc"] <= 1 for e in epochs)
        assert variant["best_test_acc"] == max(e["test_acc"] for e in epochs)
        # 5% is reached after the first epoch (10 classes); 99.9% on 256 images in 2 epochs is not.
        assert variant["time_to"]["0.05"] == {"train_s": epochs[0]["train_s"], "epochs": 1}
        assert variant["time_to"]["0.999"] is None
        expected = 6 * result["multiply_adds"] * variant["images_per_s"] / (result["matmul_peak_bf16_tflops"] * 1e12)
        assert variant["model_flop_utilisation"] == pytest.approx(expected)
    # The scaled learning rate: train.resnet's x sqrt(64 / its batch size).
    assert result["batch"] == 64 and result["lr"] > 0


def test_the_gpu_recipe_s_batches_are_shifted_and_channels_last(bench):
    import torch

    splits = bench.mnist_5k(64, 32)
    datamodule = bench.build_datamodule(splits, 32, resident=True)
    images, labels = next(iter(datamodule.train_dataloader()))
    assert images.dtype == torch.uint8 and len(labels) == 32

    class Training:  # what on_after_batch_transfer reads from a fitting Trainer
        training, current_epoch = True, 0

    datamodule.trainer = Training()
    shifted, same_labels = datamodule.on_after_batch_transfer((images, labels), 0)
    assert same_labels is labels and shifted.is_contiguous(memory_format=torch.channels_last)
    assert not torch.equal(shifted, images)  # 2-pixel shifts moved most digits
    assert torch.equal(shifted.sum(dim=(1, 2, 3)) <= images.sum(dim=(1, 2, 3)), torch.ones(32, dtype=torch.bool))
