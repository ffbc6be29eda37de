"""Batches drawn from uint8 image tensors that already sit on the training device, and the batch's
augmentation done there (the cifar10-airbench recipe): no DataLoader workers, no per-sample indexing and
collation on the host, no host-to-device copy per step. A 5,000-image 28x28 set is 4 MB of uint8.

Shuffling and shifts are seeded by (seed, epoch), not by a running random state, so a training resumed at
epoch k draws what an uninterrupted one draws at epoch k.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F


def epoch_generator(device: torch.device, seed: int, epoch: int) -> torch.Generator:
    """A generator on `device` whose stream depends only on (seed, epoch)."""
    return torch.Generator(device=device).manual_seed(seed * 1_000_003 + epoch)


def random_shift(images: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """Translate each image of a (B, C, H, W) batch by its own random offset in [-max_shift, max_shift]
    pixels per axis, zero-filled: one padded copy and one gather for the whole batch. The result is in
    channels_last memory order (the gather yields NHWC); call `.contiguous()` for NCHW."""
    if max_shift == 0:
        return images
    batch, _, height, width = images.shape
    device = images.device
    padded = F.pad(images, (max_shift, max_shift, max_shift, max_shift))
    offsets = torch.randint(0, 2 * max_shift + 1, (2, batch), device=device, generator=generator)
    rows = offsets[0, :, None] + torch.arange(height, device=device)  # (B, H) rows of the padded image
    cols = offsets[1, :, None] + torch.arange(width, device=device)  # (B, W)
    index = torch.arange(batch, device=device)[:, None, None]
    shifted = padded[index, :, rows[:, :, None], cols[:, None, :]]  # advanced indices first: (B, H, W, C)
    return shifted.permute(0, 3, 1, 2)


class DeviceBatches:
    """One split's batches from tensors on one device; reshuffled each epoch when `shuffle`."""

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        batch_size: int,
        shuffle: bool,
        seed: int = 0,
        epoch: Callable[[], int] = lambda: 0,
    ) -> None:
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        self.images, self.labels = images, labels
        self.batch_size, self.shuffle, self.seed, self.epoch = batch_size, shuffle, seed, epoch

    def __len__(self) -> int:
        return math.ceil(len(self.labels) / self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        count, device = len(self.labels), self.images.device
        if self.shuffle:
            generator = epoch_generator(device, self.seed, self.epoch())
            order = torch.randperm(count, device=device, generator=generator)
            for index in order.split(self.batch_size):
                yield self.images[index], self.labels[index]
        else:
            for start in range(0, count, self.batch_size):
                yield self.images[start : start + self.batch_size], self.labels[start : start + self.batch_size]
