"""LightningDataModules over the stage outputs: images stay uint8 until a batch is drawn (4x less memory
than float32, as in airbench), forecasting windows are built once from the fetched prices.

How batches are served follows the training profile's `LoaderPlan` (dlpipe.tasks.profiles): DataLoaders over
host memory (pinned for a GPU), or, for an image set small enough, the whole set on the training device
(dlpipe.data.device_batches) with the training batches' shifts done there.
"""

from __future__ import annotations

import logging
from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

from dlpipe.data.device_batches import DeviceBatches, epoch_generator, random_shift
from dlpipe.data.images import load_split
from dlpipe.data.stocks import FEATURES, StockData, load_stock_data, ticker_inputs
from dlpipe.tasks.profiles import LoaderPlan

log = logging.getLogger("dlpipe")
MIB = 1024 * 1024


class _SplitLoaders(L.LightningDataModule):
    """train/val/test loaders from one `_loader(split, shuffle)`; only training data is shuffled."""

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        raise NotImplementedError

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)


class ImageDataModule(_SplitLoaders):
    """train from the augmented set, val/test from the raw split; batches are (uint8 images, labels)."""

    def __init__(
        self, raw_dir: Path, augmented_dir: Path, batch_size: int, num_workers: int = 0, plan: LoaderPlan | None = None
    ) -> None:
        super().__init__()
        self.raw_dir, self.augmented_dir = Path(raw_dir), Path(augmented_dir)
        self.plan = plan or LoaderPlan(batch_size=batch_size, num_workers=num_workers)
        self.batch_size, self.num_workers = self.plan.batch_size, self.plan.num_workers
        self.datasets: dict[str, TensorDataset] = {}
        self._on_device: dict[str, DeviceBatches] = {}
        self._shifts: tuple[int, torch.Generator] | None = None  # (epoch, generator) of the training shifts

    def setup(self, stage: str | None = None) -> None:
        if self.datasets:
            return
        sources = {"train": self.augmented_dir, "val": self.raw_dir, "test": self.raw_dir}
        for split, directory in sources.items():
            x, y = load_split(directory, split)
            self.datasets[split] = TensorDataset(torch.from_numpy(x), torch.from_numpy(y))

    def train_images(self) -> torch.Tensor:
        self.setup()
        return self.datasets["train"].tensors[0]

    def _device(self) -> torch.device:
        trainer = getattr(self, "trainer", None)
        return trainer.strategy.root_device if trainer is not None else torch.device("cpu")

    def device_resident(self) -> bool:
        """Whether the splits are served from the training device (set size within the plan's limit)."""
        self.setup()
        total = sum(t.numel() * t.element_size() for d in self.datasets.values() for t in d.tensors)
        return 0 < total <= self.plan.device_resident_mib * MIB

    def _epoch(self) -> int:
        trainer = getattr(self, "trainer", None)
        return trainer.current_epoch if trainer is not None else 0

    def _loader(self, split: str, shuffle: bool) -> DataLoader | DeviceBatches:
        if self.device_resident():
            if split not in self._on_device:
                images, labels = (t.to(self._device()) for t in self.datasets[split].tensors)
                self._on_device[split] = DeviceBatches(
                    images, labels, self.batch_size, shuffle, seed=self.plan.seed, epoch=self._epoch
                )
                log.debug("%s split on %s: %d images", split, self._device(), len(labels))
            return self._on_device[split]
        return self._host_loader(self.datasets[split], shuffle)

    def _host_loader(self, dataset: TensorDataset, shuffle: bool, drop_last: bool = False) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=shuffle,
            drop_last=drop_last,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=self.plan.pin_memory and self._device().type == "cuda",
        )

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        """On the device: the training batch's random shifts, then the plan's memory order. The images come
        first in a batch; whatever follows (labels, a teacher's logits) passes through unchanged."""
        if not (self.plan.shift_px or self.plan.channels_last) or not isinstance(batch, list | tuple):
            return batch  # the CPU profile's plain batches; or e.g. the model summary's example input
        images, *rest = batch
        trainer = getattr(self, "trainer", None)
        if self.plan.shift_px and trainer is not None and trainer.training:
            epoch = trainer.current_epoch
            if self._shifts is None or self._shifts[0] != epoch:
                self._shifts = (epoch, epoch_generator(images.device, self.plan.seed + 1, epoch))
            images = random_shift(images, self.plan.shift_px, self._shifts[1])
        memory_format = torch.channels_last if self.plan.channels_last else torch.contiguous_format
        return type(batch)([images.contiguous(memory_format=memory_format), *rest])


class StockWindowDataModule(_SplitLoaders):
    """Windows of daily features -> next-day log return, every fetched ticker pooled; each ticker split
    chronologically (dlpipe.data.stocks.split_windows). Inputs carry the ticker columns."""

    def __init__(
        self, raw_dir: Path, window: int, batch_size: int, num_workers: int = 0, pin_memory: bool = False
    ) -> None:
        super().__init__()
        self.raw_dir, self.window = Path(raw_dir), window
        self.batch_size, self.num_workers, self.pin_memory = batch_size, num_workers, pin_memory
        self.data: StockData | None = None

    def setup(self, stage: str | None = None) -> StockData:
        if self.data is None:
            self.data = load_stock_data(self.raw_dir, self.window)
        return self.data

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        data = self.setup()
        windows = data.pooled(split)
        inputs = ticker_inputs(windows, len(data.tickers))
        dataset = TensorDataset(torch.from_numpy(inputs), torch.from_numpy(windows.y))
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
        )

    def feature_stats(self) -> tuple[np.ndarray, np.ndarray, float, float]:
        """Mean/std of the inputs (per column) and of the target, from the training split only. The ticker
        columns keep mean 0 and std 1: a one-hot code is fed as it is."""
        data = self.setup()
        train = data.pooled("train")
        flat = train.x.reshape(-1, len(FEATURES))
        n_tickers = len(data.tickers)
        mean = np.concatenate([flat.mean(0), np.zeros(n_tickers, np.float32)])
        std = np.concatenate([flat.std(0), np.ones(n_tickers, np.float32)])
        return mean, std, float(train.y.mean()), float(train.y.std())
