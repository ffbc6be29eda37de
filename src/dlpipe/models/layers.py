"""Small layers shared by several model families."""

from __future__ import annotations

import torch
from torch import nn


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
