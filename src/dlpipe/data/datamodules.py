"""LightningDataModules over the stage outputs: images stay uint8 until a batch is drawn (4x less memory
than float32, as in airbench), forecasting windows are built once from the fetched prices."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

from dlpipe.data.images import load_split
from dlpipe.data.stocks import FEATURES, StockData, load_stock_data, ticker_inputs


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

    def __init__(self, raw_dir: Path, augmented_dir: Path, batch_size: int, num_workers: int = 0) -> None:
        super().__init__()
        self.raw_dir, self.augmented_dir = Path(raw_dir), Path(augmented_dir)
        self.batch_size, self.num_workers = batch_size, num_workers
        self.datasets: dict[str, TensorDataset] = {}

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

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        return DataLoader(
            self.datasets[split],
            batch_size=self.batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )


class StockWindowDataModule(_SplitLoaders):
    """Windows of daily features -> next-day log return, every fetched ticker pooled; each ticker split
    chronologically (dlpipe.data.stocks.split_windows). Inputs carry the ticker columns."""

    def __init__(self, raw_dir: Path, window: int, batch_size: int, num_workers: int = 0) -> None:
        super().__init__()
        self.raw_dir, self.window = Path(raw_dir), window
        self.batch_size, self.num_workers = batch_size, num_workers
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
        return DataLoader(dataset, batch_size=self.batch_size, shuffle=shuffle, num_workers=self.num_workers)

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
