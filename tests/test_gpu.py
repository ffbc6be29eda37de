"""Checks that only mean something on a CUDA machine (skipped elsewhere): training steps on the GPU and
ONNX Runtime's CUDA provider actually being used rather than silently falling back to the CPU."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dlpipe.models import get_model

pytestmark = pytest.mark.gpu


def test_cnn_trains_a_step_on_cuda_in_bf16():
    net = get_model("cnn", in_channels=1, image_size=28, num_classes=10).cuda().to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-3)
    x = torch.rand(64, 1, 28, 28, device="cuda").to(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (64,), device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = torch.nn.functional.cross_entropy(net(x), y)
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss)


def test_onnxruntime_uses_cuda_provider(tmp_path):
    pytest.importorskip("onnxruntime")
    from dlpipe.export import export_onnx
    from dlpipe.runtime import create_session

    net = get_model("cnn", in_channels=1, image_size=28, num_classes=10).eval()
    export_onnx(net, torch.rand(2, 1, 28, 28), tmp_path / "m.onnx", opset=18)
    onnx_session = create_session(tmp_path / "m.onnx", ["cuda", "cpu"])
    assert onnx_session.get_providers()[0] == "CUDAExecutionProvider"
    out = onnx_session.run(None, {"input": np.zeros((4, 1, 28, 28), np.float32)})[0]
    assert out.shape == (4, 10)


def fit_the_gpu_recipe(accelerator: str) -> tuple[dict, float, object]:
    """The GPU profile's path through Lightning on `accelerator`: uint8 splits held on the device, shifted
    and put in NHWC there, bf16 autocast in the step, weights in channels_last. Returns what the first
    training batch looked like, the final val accuracy and the datamodule."""
    from pathlib import Path

    import lightning as L
    from torch.utils.data import TensorDataset

    from dlpipe.data.datamodules import ImageDataModule
    from dlpipe.models import get_spec
    from dlpipe.tasks import get_task
    from dlpipe.tasks.profiles import LoaderPlan
    from dlpipe.training_callbacks import ChannelsLast

    generator = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 10, (1024,), generator=generator)
    # Learnable images: the class is a bright 4x4 patch at a class-dependent place. Three channels, so that
    # NHWC and NCHW differ in memory (with one channel both layouts are the same).
    images = torch.randint(0, 40, (1024, 3, 28, 28), generator=generator, dtype=torch.uint8)
    for digit in range(10):
        row, col = divmod(digit, 5)
        images[labels == digit, :, 4 + 10 * row : 8 + 10 * row, 2 + 5 * col : 6 + 5 * col] = 255
    plan = LoaderPlan(batch_size=128, device_resident_mib=64, shift_px=2, channels_last=True, pin_memory=True)
    datamodule = ImageDataModule(Path("unused"), Path("unused"), 128, plan=plan)
    split = TensorDataset(images, labels)
    datamodule.datasets = {"train": split, "val": split, "test": split}
    kwargs = {"in_channels": 3, "image_size": 28, "num_classes": 10, "channels": [16, 32], "hidden": 64}
    task = get_task(get_spec("cnn").task)
    train = task.params_type.model_validate(
        {"task": task.name, "epochs": 3, "batch_size": 128, "optimizer": {"lr": 3e-3}}, strict=False
    )
    module = task.lightning_module(get_model("cnn", **kwargs), {"name": "cnn", "kwargs": kwargs}, train)
    seen = {}

    class Probe(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            images, _ = batch
            conv = next(m for m in pl_module.modules() if isinstance(m, torch.nn.Conv2d))
            seen.setdefault("device", images.device.type)
            seen.setdefault("nhwc", images.is_contiguous(memory_format=torch.channels_last))
            seen.setdefault("weights_nhwc", conv.weight.is_contiguous(memory_format=torch.channels_last))

    trainer = L.Trainer(
        accelerator=accelerator,
        devices=1,
        precision="bf16-mixed",
        benchmark=accelerator == "cuda",
        max_epochs=3,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[ChannelsLast(), Probe()],
    )
    trainer.fit(module, datamodule=datamodule)
    return seen, float(trainer.callback_metrics["val/acc"]), datamodule


def test_gpu_profile_serves_device_resident_channels_last_batches_under_bf16():
    from dlpipe.data.device_batches import DeviceBatches

    seen, accuracy, datamodule = fit_the_gpu_recipe("cuda")
    assert isinstance(datamodule.train_dataloader(), DeviceBatches)
    assert seen == {"device": "cuda", "nhwc": True, "weights_nhwc": True}
    assert accuracy > 0.5  # far above chance (0.1): the epochs trained
