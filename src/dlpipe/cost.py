"""What a network costs: trainable parameters and multiply-adds for one sample, and the course's comparison of a
standard 3x3 convolution with a depthwise separable one (MobileNet, Howard et al. 2017, section 3.1).

Multiply-adds are counted by `torch.utils.flop_counter.FlopCounterMode`, not by hand. It counts the operations
that dominate a network's arithmetic: matrix products (`mm`, `addmm`, `bmm`: linear layers, recurrent gates),
convolutions (plain, grouped, transposed) and attention. Element-wise work (activations, normalisation, pooling,
bias additions, the recurrent cells' gate products) is not counted: the convention of the papers that quote
multiply-adds, and a small share of the total for the networks here.

Recurrent layers: FlopCounterMode has no formula for the fused kernels of `nn.LSTM` (oneDNN's `mkldnn_rnn_layer`
on CPU, cuDNN's `_cudnn_rnn` on GPU) and would count an LSTM as 0. With oneDNN disabled, PyTorch runs the LSTM
step by step through `addmm`, which it counts: 4·H·(I + H) multiply-adds per step and layer (I inputs, H hidden
units), the hand count (tests/test_cost.py checks it). `nn.GRU` and `nn.RNN` on CPU always take that path
(3·H·(I + H) and H·(I + H)). `model_cost` therefore counts on the CPU, with oneDNN disabled when the module
holds an LSTM (only then: without oneDNN some convolutions take a reference path that is many times slower).

Only torch here (no Lightning): training, the `cost` stage and benchmarks/bench_depthwise.py share it.
"""

from __future__ import annotations

import contextlib
import copy
import os
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from dlpipe.models.registry import count_trainable_parameters

KERNEL = 3  # the comparison's kernel size: 3x3, as MobileNet's depthwise layers


def _native_lstm() -> contextlib.AbstractContextManager:
    """oneDNN off, so that an LSTM runs through `addmm`, which FlopCounterMode counts (its fused kernel is
    invisible to it; see the module docstring). The None arguments leave oneDNN's other settings alone."""
    return torch.backends.mkldnn.flags(enabled=False, deterministic=None, allow_tf32=None, fp32_precision=None)


def model_cost(module: nn.Module, example_input: torch.Tensor) -> dict[str, int]:
    """Trainable parameters and multiply-adds of `module` for `example_input`, a batch of ONE sample.

    Counted in eval mode (dropout off, batch norm on running statistics) without gradients, on the CPU in
    float32; `module` itself is left as it was (a copy is counted when it lives elsewhere).
    """
    if example_input.shape[0] != 1:
        raise ValueError(f"example_input must hold one sample (batch 1), got shape {tuple(example_input.shape)}")
    trainable = count_trainable_parameters(module)
    tensors = [*module.parameters(), *module.buffers()]
    on_cpu_fp32 = all(
        t.device.type == "cpu" and (t.dtype == torch.float32 or not t.is_floating_point()) for t in tensors
    )
    counted = module if on_cpu_fp32 else copy.deepcopy(module).to("cpu", torch.float32)
    modes = [(m, m.training) for m in counted.modules()]  # a frozen part may sit in eval mode on its own
    counted.eval()
    try:
        with (
            _native_lstm() if any(isinstance(m, nn.LSTM) for m in counted.modules()) else contextlib.nullcontext(),
            torch.no_grad(),
            FlopCounterMode(display=False) as counter,
        ):
            counted(example_input.to("cpu", torch.float32))
    finally:
        for submodule, training in modes:
            submodule.training = training
    # FlopCounterMode counts a multiply-add as 2 FLOPs (one multiply, one add): multiply-adds = FLOPs / 2.
    return {"trainable_params": int(trainable), "multiply_adds": int(counter.get_total_flops() // 2)}


# ----------------------------------------------------------------- standard vs depthwise separable convolution


def standard_conv(in_channels: int, out_channels: int) -> nn.Module:
    """A 3x3 convolution, M -> N channels, 'same' padding; no bias, as the textbook count ignores biases."""
    return nn.Conv2d(in_channels, out_channels, KERNEL, padding=KERNEL // 2, bias=False)


def depthwise_separable_conv(in_channels: int, out_channels: int) -> nn.Module:
    """The same shape factorised: a depthwise 3x3 (one filter per input channel) then a pointwise 1x1."""
    return nn.Sequential(
        nn.Conv2d(in_channels, in_channels, KERNEL, padding=KERNEL // 2, groups=in_channels, bias=False),
        nn.Conv2d(in_channels, out_channels, 1, bias=False),
    )


def textbook_ratio(out_channels: int, kernel: int = KERNEL) -> float:
    """Depthwise separable / standard cost, the same for parameters and multiply-adds (biases ignored):

    (K²·M·H·W + M·N·H·W) / (K²·M·N·H·W) = 1/N + 1/K²   (MobileNet, equation 5)
    """
    return 1.0 / out_channels + 1.0 / kernel**2


def _forward_ms(layer: nn.Module, x: torch.Tensor) -> float:
    if x.is_cuda:
        torch.cuda.synchronize(x.device)
    started = time.perf_counter()
    layer(x)
    if x.is_cuda:
        torch.cuda.synchronize(x.device)
    return (time.perf_counter() - started) * 1000.0


def compare_depthwise_separable(
    in_channels: int, out_channels: int, size: int, batch: int, repeats: int, warmup: int = 2, device: str = "cpu"
) -> dict[str, Any]:
    """One shape (M -> N channels on a size x size map): parameters and multiply-adds of both layers (counted
    per sample), their ratios beside the textbook 1/N + 1/9, and the forward time of a batch.

    The two layers are timed side by side: each round runs both, one right after the other, first one then the
    other in turn (`warmup` untimed rounds, then `repeats` timed ones). The time ratio is the median over rounds
    of separable / standard within the round, so load from other processes, which changes between rounds more
    than within one, largely cancels; its quartiles show how much it varied.
    """
    if repeats < 1 or warmup < 0:
        raise ValueError(f"repeats must be >= 1 and warmup >= 0, got {repeats} and {warmup}")
    standard = standard_conv(in_channels, out_channels)
    separable = depthwise_separable_conv(in_channels, out_channels)
    one = torch.zeros(1, in_channels, size, size)
    cost_standard, cost_separable = model_cost(standard, one), model_cost(separable, one)

    generator = torch.Generator().manual_seed(0)
    x = torch.randn(batch, in_channels, size, size, generator=generator).to(device)
    standard, separable = standard.to(device).eval(), separable.to(device).eval()
    times: dict[str, list[float]] = {"standard": [], "separable": []}
    layers = [("standard", standard), ("separable", separable)]
    with torch.inference_mode():
        for round_ in range(warmup + repeats):
            for name, layer in layers if round_ % 2 == 0 else layers[::-1]:
                elapsed = _forward_ms(layer, x)
                if round_ >= warmup:
                    times[name].append(elapsed)
    ratios = np.asarray(times["separable"]) / np.asarray(times["standard"])  # per round
    q1, median, q3 = np.percentile(ratios, [25, 50, 75])
    return {
        "in_channels": in_channels,
        "out_channels": out_channels,
        "size": size,
        "standard_params": cost_standard["trainable_params"],
        "separable_params": cost_separable["trainable_params"],
        "standard_multiply_adds": cost_standard["multiply_adds"],
        "separable_multiply_adds": cost_separable["multiply_adds"],
        "params_ratio": cost_separable["trainable_params"] / cost_standard["trainable_params"],
        "multiply_adds_ratio": cost_separable["multiply_adds"] / cost_standard["multiply_adds"],
        "textbook_ratio": textbook_ratio(out_channels),
        "standard_ms_p50": statistics.median(times["standard"]),
        "separable_ms_p50": statistics.median(times["separable"]),
        "time_ratio": float(median),  # below 1: the separable layer is faster
        "time_ratio_q1": float(q1),
        "time_ratio_q3": float(q3),
    }


def depthwise_table(
    channels: Sequence[Sequence[int]],
    sizes: Sequence[int],
    batch: int,
    repeats: int,
    warmup: int = 2,
    device: str = "cpu",
    threads: int | None = None,
) -> dict[str, Any]:
    """`compare_depthwise_separable` for every (M, N) in `channels` at every size in `sizes`, with the settings
    and the environment the timings were taken in.

    `threads`: torch's intra-op threads while timing (restored afterwards); None keeps torch's setting (one per
    core). On a machine that other processes share, one thread gives the steadier ratio: with several, each
    operator waits for its slowest thread, and the separable layer, two operators, waits twice.
    """
    load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    previous_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        used_threads = torch.get_num_threads()
        rows = [
            compare_depthwise_separable(m, n, size, batch, repeats, warmup, device)
            for m, n in channels
            for size in sizes
        ]
    finally:
        torch.set_num_threads(previous_threads)
    return {
        "kernel": KERNEL,
        "batch": batch,
        "repeats": repeats,
        "warmup": warmup,
        "device": torch.cuda.get_device_name(device) if device.startswith("cuda") else "cpu",
        "torch": torch.__version__,
        "torch_threads": used_threads,
        "cpus": os.cpu_count(),
        "load_average_1min": {"before": load_before, "after": os.getloadavg()[0] if load_before is not None else None},
        "rows": rows,
    }


def plot_depthwise(table: dict[str, Any], target: Path) -> None:
    """Left, per shape: the multiply-add ratio (counted; the textbook's 1/N + 1/9 marked on it) beside the
    measured time ratio with its quartiles. Right: the forward times themselves. Written atomically."""
    from dlpipe.plots import pyplot, save_figure

    rows = table["rows"]
    labels = [f"{r['in_channels']}→{r['out_channels']}\n{r['size']}×{r['size']}" for r in rows]
    x = np.arange(len(rows))
    width = 0.38
    threads = f"{table['torch_threads']} thread{'s' if table['torch_threads'] != 1 else ''}"
    timing = f"{table['device']}, {threads}, batch {table['batch']}, {table['repeats']} rounds"
    plt = pyplot()
    figure, (left, right) = plt.subplots(1, 2, figsize=(max(9.0, 1.7 * len(rows) + 4), 4.8))

    counted = left.bar(x - width / 2, [r["multiply_adds_ratio"] for r in rows], width, label="multiply-adds (counted)")
    left.bar_label(counted, labels=[f"{r['multiply_adds_ratio']:.3f}" for r in rows], fontsize=7, padding=2)
    left.scatter(
        x - width / 2,
        [r["textbook_ratio"] for r in rows],
        marker="_",
        s=300,
        color="black",
        zorder=3,
        label="textbook 1/N + 1/9",
    )
    spread = [
        [r["time_ratio"] - r["time_ratio_q1"] for r in rows],
        [r["time_ratio_q3"] - r["time_ratio"] for r in rows],
    ]
    left.bar(
        x + width / 2,
        [r["time_ratio"] for r in rows],
        width,
        yerr=spread,
        capsize=3,
        label="forward time (measured: median, quartiles)",
    )
    for position, row in zip(x, rows, strict=True):  # above the upper quartile, clear of the error bar
        left.annotate(
            f"{row['time_ratio']:.2f}",
            (position + width / 2, row["time_ratio_q3"]),
            xytext=(0, 2),
            textcoords="offset points",
            ha="center",
            fontsize=7,
        )
    left.axhline(1.0, color="grey", linestyle="--", linewidth=1, label="1 = no saving")
    left.set_ylim(0, max(1.1, 1.12 * max(r["time_ratio_q3"] for r in rows)))
    left.set_xticks(x, labels, fontsize=8)
    left.set_ylabel("depthwise separable / standard")
    left.set_title("depthwise separable / standard 3×3 conv", fontsize=10)
    left.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2, frameon=False)

    right.bar(x - width / 2, [r["standard_ms_p50"] for r in rows], width, label="standard 3×3")
    right.bar(x + width / 2, [r["separable_ms_p50"] for r in rows], width, label="depthwise 3×3 + pointwise 1×1")
    right.set_xticks(x, labels, fontsize=8)
    right.set_yscale("log")
    right.set_ylabel("ms per forward pass (median)")
    right.set_title(timing, fontsize=10)
    right.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2, frameon=False)
    figure.suptitle("M→N channels on an H×W map", fontsize=9, y=0.99)
    figure.tight_layout()
    save_figure(figure, target)
