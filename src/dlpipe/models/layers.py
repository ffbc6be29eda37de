"""Small layers shared by several model families."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn


class AuxiliaryOutput(NamedTuple):
    """Training-mode output of a network with auxiliary classifiers (GoogLeNet's side heads).

    In eval mode such a network returns `logits` alone, so the exported graph has one output. The
    classifier's loss is CE(logits) + aux_weight * sum(CE(a) for a in aux_logits).
    """

    logits: torch.Tensor  # (B, num_classes)
    aux_logits: tuple[torch.Tensor, ...]  # each (B, num_classes)
    aux_weight: float


class Standardize(nn.Module):
    """(x - mean) / std with statistics stored as buffers, so the exported ONNX graph takes raw inputs.

    The statistics are set from the training split by the task before training (`set_stats`) and travel
    inside the checkpoint and the ONNX file: a deployed model needs no separate scaler file.
    """

    def __init__(self, shape: tuple[int, ...]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(shape))
        self.register_buffer("std", torch.ones(shape))

    @torch.no_grad()
    def set_stats(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        self.mean.copy_(mean.reshape(self.mean.shape))
        # A constant feature has std 0; dividing by it would make NaNs, so floor it.
        self.std.copy_(std.reshape(self.std.shape).clamp_min(1e-6))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


def conv_out_size(size: int, kernel: int, stride: int = 1, padding: int = 0) -> int:
    """(W - F + 2P) / S + 1: the output size of a convolution or pooling window."""
    return (size - kernel + 2 * padding) // stride + 1


def make_divisible(value: float, divisor: int = 8) -> int:
    """`value` rounded to the nearest multiple of `divisor`, never below `divisor` nor 10% below `value`.

    MobileNet's width multiplier uses it (Sandler et al., 2018, after the TensorFlow reference code):
    channel counts that are multiples of 8 keep vectorised kernels efficient.
    """
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    # Rounding down by more than 10% would shrink the layer more than the multiplier asked for.
    return rounded + divisor if rounded < 0.9 * value else rounded


class ConvBNAct(nn.Sequential):
    """Conv (no bias: BN's shift replaces it) -> BatchNorm -> activation, with 'same' padding for odd kernels."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        stride: int = 1,
        groups: int = 1,
        activation: type[nn.Module] | None = nn.ReLU,
    ) -> None:
        layers: list[nn.Module] = [
            nn.Conv2d(
                in_channels, out_channels, kernel_size, stride, (kernel_size - 1) // 2, groups=groups, bias=False
            ),
            nn.BatchNorm2d(out_channels),
        ]
        if activation is not None:
            layers.append(activation(inplace=True))
        super().__init__(*layers)
