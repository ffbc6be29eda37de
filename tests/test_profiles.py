"""Training profiles (`trainer.profile` cpu | gpu, per-model precision) and the device-resident batches of
the GPU recipe, run on the CPU: the plan each profile makes, the batched shifts, the epoch-seeded order,
and a real `dlpipe train` + export of the CNN under the GPU profile (device-resident set, channels_last,
bf16 autocast, scaled batch, torch.compile) whose checkpoint passes the export's parity gate."""

from __future__ import annotations

import json
import math

import pytest
import torch

from conftest import tiny_params, write_project
from dlpipe.config import load_config
from dlpipe.data.device_batches import DeviceBatches, random_shift
from dlpipe.tasks.profiles import PROFILE_PRECISION, lr_factor, physical_cores, shared_precision, training_plan


def config_with(tmp_path, **trainer):
    params = tiny_params()
    params["trainer"].update(trainer)
    return load_config(write_project(tmp_path / "project", params))


# ------------------------------------------------------------------------------------------------- plans
def test_cpu_profile_keeps_the_recipe_and_takes_each_models_precision(tmp_path):
    config = config_with(tmp_path)
    cnn, lstm = training_plan(config, "cnn"), training_plan(config, "lstm")
    assert cnn.profile == "cpu" and cnn.deterministic is True and not cnn.cudnn_benchmark and cnn.compile is None
    assert cnn.precision == config.params.train["cnn"].precision == "bf16-mixed"  # measured faster, params.yaml
    assert lstm.precision == "32-true"
    assert cnn.train == config.params.train["cnn"]  # batch size and learning rate untouched
    assert cnn.loader.device_resident_mib == 0 and cnn.loader.shift_px == 0 and not cnn.loader.channels_last
    assert cnn.threads == physical_cores()


def test_a_trainer_precision_applies_to_every_model(tmp_path):
    config = config_with(tmp_path, precision="32-true")
    assert {training_plan(config, m).precision for m in ("cnn", "lstm", "dcgan")} == {"32-true"}
    assert shared_precision(config.params.trainer) == "32-true"


def test_gpu_profile_scales_batch_and_learning_rate_and_turns_the_recipe_on(tmp_path):
    config = config_with(tmp_path, profile="gpu", gpu={"batch_scale": 4, "lr_scaling": "sqrt"})
    base = config.params.train["resnet"]
    plan = training_plan(config, "resnet")
    assert plan.train.batch_size == 4 * base.batch_size
    assert plan.train.optimizer.lr == pytest.approx(2 * base.optimizer.lr)
    assert plan.precision == "bf16-mixed" and plan.cudnn_benchmark and plan.deterministic is False
    assert plan.loader.channels_last and plan.loader.pin_memory and plan.loader.shift_px == 2
    assert plan.loader.device_resident_mib == 4096 and plan.loader.batch_size == plan.train.batch_size
    # A model without its own precision gets the profile's; the forecasters keep the fp32 they ask for.
    assert training_plan(config, "dcgan").precision == PROFILE_PRECISION["gpu"]
    assert training_plan(config, "lstm").precision == "32-true"
    assert shared_precision(config.params.trainer) == "bf16-mixed"


def test_gpu_profile_under_ddp_shares_cores_and_streams_data(tmp_path):
    config = config_with(tmp_path, profile="gpu", devices=2, gpu={"cudnn_benchmark": False})
    plan = training_plan(config, "cnn")
    assert plan.loader.device_resident_mib == 0  # DDP shards through a DistributedSampler
    assert plan.threads == max(1, physical_cores() // 2)
    assert plan.deterministic == "warn"  # without autotuning: deterministic kernels where CUDA has them


@pytest.mark.parametrize(("scaling", "factor"), [("linear", 8.0), ("sqrt", math.sqrt(8)), ("none", 1.0)])
def test_learning_rate_scaling_rules(scaling, factor):
    assert lr_factor(8, scaling) == pytest.approx(factor)


def test_unknown_profile_is_refused_by_name(tmp_path):
    params = tiny_params()
    params["trainer"]["profile"] = "tpu"
    with pytest.raises(Exception, match="trainer.profile"):
        load_config(write_project(tmp_path / "p", params))


# ------------------------------------------------------------------------------------------ device batches
def test_random_shift_translates_each_image_within_the_range_and_fills_zeros():
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(1, 256, (64, 3, 9, 7), dtype=torch.uint8, generator=generator)
    shifted = random_shift(images, 2, torch.Generator().manual_seed(1))
    assert shifted.shape == images.shape and shifted.dtype == torch.uint8
    assert shifted.is_contiguous(memory_format=torch.channels_last)
    seen = set()
    for original, moved in zip(images, shifted, strict=True):
        matches = []
        for dy in range(-2, 3):
            for dx in range(-2, 3):
                expected = torch.zeros_like(original)
                # out[y, x] = in[y + dy, x + dx] where that lies inside, else 0
                ys, xs = slice(max(0, -dy), min(9, 9 - dy)), slice(max(0, -dx), min(7, 7 - dx))
                src_y, src_x = slice(ys.start + dy, ys.stop + dy), slice(xs.start + dx, xs.stop + dx)
                expected[:, ys, xs] = original[:, src_y, src_x]
                if torch.equal(moved, expected):
                    matches.append((dy, dx))
        assert len(matches) == 1, "each image is one translation of its original"
        seen.add(matches[0])
    assert len(seen) > 10  # per-image offsets, not one for the batch
    assert torch.equal(shifted, random_shift(images, 2, torch.Generator().manual_seed(1)))  # seeded
    assert random_shift(images, 0, generator) is images


def test_device_batches_cover_the_split_once_per_epoch_in_an_epoch_seeded_order():
    images = torch.arange(10, dtype=torch.uint8).reshape(10, 1, 1, 1)
    labels = torch.arange(10)
    epoch = {"n": 0}
    batches = DeviceBatches(images, labels, batch_size=4, shuffle=True, seed=3, epoch=lambda: epoch["n"])
    assert len(batches) == 3

    def order():
        drawn = [(x.flatten().tolist(), y.tolist()) for x, y in batches]
        assert [len(y) for _, y in drawn] == [4, 4, 2]
        assert all(x == y for x, y in drawn)  # images stay with their labels
        return [i for _, y in drawn for i in y]

    first = order()
    assert sorted(first) == list(range(10))
    assert order() == first  # the same epoch draws the same order (a resumed epoch repeats it)
    epoch["n"] = 1
    assert order() != first
    plain = DeviceBatches(images, labels, batch_size=4, shuffle=False)
    assert [y.tolist() for _, y in plain] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]


def test_image_datamodule_serves_from_the_device_only_within_the_size_limit(built_project):
    from dlpipe.data.datamodules import ImageDataModule
    from dlpipe.tasks.profiles import LoaderPlan

    config = load_config(built_project / "params.yaml")
    resident = ImageDataModule(
        config.paths.raw_images, config.paths.augmented, 32, plan=LoaderPlan(32, device_resident_mib=16)
    )
    resident.setup()
    assert isinstance(resident.train_dataloader(), DeviceBatches)
    streamed = ImageDataModule(config.paths.raw_images, config.paths.augmented, 32, plan=LoaderPlan(32))
    streamed.setup()
    assert isinstance(streamed.train_dataloader(), torch.utils.data.DataLoader)
    # Both serve the same test split in the same order.
    resident_test = torch.cat([y for _, y in resident.test_dataloader()])
    streamed_test = torch.cat([y for _, y in streamed.test_dataloader()])
    assert torch.equal(resident_test, streamed_test)


# ------------------------------------------------------------------------------------------ end to end
@pytest.mark.slow
def test_gpu_profile_trains_and_exports_the_cnn_on_the_cpu(tmp_path):
    """The GPU recipe as code that runs anywhere: the CNN trained under profile gpu (on this CPU: device-
    resident batches, shifts, channels_last, bf16 autocast, a 4x batch, torch.compile with the eager
    backend) writes an ordinary checkpoint that the export loads and that passes the parity gate."""
    from dlpipe import stages

    params = tiny_params()
    params["models"] = {"cnn": "images"}
    params["generators"] = {}
    params["trainer"].update(profile="gpu", accelerator="cpu", gpu={"compile": "eager", "batch_scale": 2})
    config = load_config(write_project(tmp_path / "project", params))
    for stage in (stages.fetch_images, stages.augment):
        stage(config)
    stages.train(config, "cnn")
    info = json.loads(config.paths.train_info("cnn").read_text())
    assert info["precision"] == "bf16-mixed" and info["batch_size"] == 2 * params["train"]["cnn"]["batch_size"]
    assert info["device"] == "cpu" and info["epochs_trained"] >= 1
    state = torch.load(config.paths.checkpoint("cnn"), weights_only=True)["state_dict"]
    assert not any("_orig_mod" in key for key in state)  # the compiled wrapper is not in the checkpoint
    exported = stages.export(config, "cnn")
    assert exported["onnx_max_abs_diff"] <= params["export"]["parity_atol"]
    assert exported["top1_agreement"] >= params["export"]["min_top1_agreement"]


def test_batch_hook_keeps_extra_batch_members_and_leaves_cpu_batches_alone():
    """The distillation stage's batches carry the teacher's logits after the labels: the hook reorders the
    images only. Under the CPU profile (no shifts, NCHW) batches pass through untouched."""
    from pathlib import Path

    from dlpipe.data.datamodules import ImageDataModule
    from dlpipe.tasks.profiles import LoaderPlan

    images = torch.randint(0, 256, (4, 3, 6, 6), dtype=torch.uint8)
    labels, logits = torch.arange(4), torch.randn(4, 10)
    cpu = ImageDataModule(Path("u"), Path("u"), 4, plan=LoaderPlan(4))
    batch = [images, labels, logits]
    assert cpu.on_after_batch_transfer(batch, 0) is batch
    gpu = ImageDataModule(Path("u"), Path("u"), 4, plan=LoaderPlan(4, channels_last=True, shift_px=1))
    out = gpu.on_after_batch_transfer(batch, 0)  # no trainer: not training, so no shifts
    assert isinstance(out, list) and out[1] is labels and out[2] is logits
    assert torch.equal(out[0], images) and out[0].is_contiguous(memory_format=torch.channels_last)
    assert isinstance(gpu.on_after_batch_transfer((images, labels), 0), tuple)
