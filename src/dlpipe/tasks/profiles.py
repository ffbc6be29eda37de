"""Training profiles: what `trainer.profile` (cpu | gpu) and a model's own `precision` become for one
training run. Plain data, no torch: `train.py`, the tasks and the datamodules act on the plan.

- `cpu` (the default) keeps runs exact and resumable: deterministic algorithms, the model's measured
  precision (bf16 autocast only where benchmarks/bench_precision.py found it faster at equal accuracy),
  torch threads on the physical cores.
- `gpu` follows the fast single-GPU recipes (cifar10-airbench): bf16 autocast, channels_last, cuDNN
  autotuning, optionally torch.compile, larger batches with a scaled learning rate, and small image sets
  held on the device as uint8 with the batch's augmentation done there. It gives up bitwise
  reproducibility (cuDNN picks algorithms by timing).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

from dlpipe.config import Config, TrainerParams, TrainParams

# The precision a model trains in when neither trainer.precision nor train.<model>.precision names one.
PROFILE_PRECISION = {"cpu": "32-true", "gpu": "bf16-mixed"}


@dataclass(frozen=True)
class LoaderPlan:
    """How a datamodule serves batches."""

    batch_size: int
    num_workers: int = 0
    pin_memory: bool = False  # page-locked host batches: asynchronous host-to-GPU copies
    device_resident_mib: int = 0  # image sets up to this size move to the training device whole; 0 = never
    shift_px: int = 0  # training batches: random translation by up to this many pixels, on the device
    channels_last: bool = False  # image batches in NHWC memory order (the model is converted to match)
    seed: int = 0  # seeds the device-side shuffling and shifts, together with the epoch


@dataclass(frozen=True)
class TrainingPlan:
    profile: str
    precision: str  # a Lightning precision name
    train: TrainParams  # train.<model> with the profile's batch size and learning rate
    loader: LoaderPlan
    cudnn_benchmark: bool
    deterministic: bool | str  # Lightning's `deterministic`: True, False or "warn"
    compile: str | None  # torch.compile backend, or None
    threads: int  # torch intra-op threads


def physical_cores() -> int:
    """Physical cores among the CPUs this process may run on: hyper-threads share one core's vector units,
    so more threads than cores only adds contention to convolution and matmul kernels."""
    cpus = os.sched_getaffinity(0)
    cores = set()
    for cpu in cpus:
        topology = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology")
        try:
            cores.add(((topology / "physical_package_id").read_text(), (topology / "core_id").read_text()))
        except OSError:  # no sysfs topology (containers, other systems): count the CPU as a core
            cores.add((str(cpu), ""))
    return max(1, len(cores))


def lr_factor(batch_scale: int, scaling: str) -> float:
    """Learning-rate multiplier for batches `batch_scale` times larger: linear (Goyal et al., 2017, for
    SGD), square root (the usual rule for Adam-type optimizers), or none."""
    if scaling == "linear":
        return float(batch_scale)
    if scaling == "sqrt":
        return math.sqrt(batch_scale)
    return 1.0


def shared_precision(trainer: TrainerParams) -> str:
    """The precision of trainings that are not one model's (distillation, transfer): trainer.precision,
    else the profile's."""
    return trainer.precision or PROFILE_PRECISION[trainer.profile]


def _processes(trainer: TrainerParams) -> int:
    return trainer.devices if isinstance(trainer.devices, int) else 1


def training_plan(config: Config, model: str) -> TrainingPlan:
    trainer = config.params.trainer
    train = config.train_params(model)
    precision = trainer.precision or train.precision or shared_precision(trainer)
    threads = trainer.threads or max(1, physical_cores() // _processes(trainer))  # DDP on CPU: cores shared
    if trainer.profile == "cpu":
        loader = LoaderPlan(batch_size=train.batch_size, num_workers=trainer.num_workers, seed=config.params.seed)
        return TrainingPlan("cpu", precision, train, loader, False, True, None, threads)

    gpu = trainer.gpu
    optimizer = train.optimizer.model_copy(
        update={"lr": train.optimizer.lr * lr_factor(gpu.batch_scale, gpu.lr_scaling)}
    )
    scaled = train.model_copy(update={"batch_size": train.batch_size * gpu.batch_scale, "optimizer": optimizer})
    loader = LoaderPlan(
        batch_size=scaled.batch_size,
        num_workers=trainer.num_workers,
        pin_memory=gpu.pin_memory,
        # DDP shards data through a DistributedSampler, which a device-resident set does not have.
        device_resident_mib=gpu.device_resident_mib if _processes(trainer) == 1 else 0,
        shift_px=gpu.shift_px,
        channels_last=gpu.channels_last,
        seed=config.params.seed,
    )
    # Without autotuning, deterministic algorithms where CUDA has them; "warn" rather than fail on the few
    # it has not (e.g. adaptive average pooling's backward).
    deterministic = False if gpu.cudnn_benchmark else "warn"
    return TrainingPlan("gpu", precision, scaled, loader, gpu.cudnn_benchmark, deterministic, gpu.compile, threads)
