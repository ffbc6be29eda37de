"""Training curves: every per-epoch metric the LightningModule logs (train/loss, val/loss, val/acc, val/fid,
...), one row an epoch, written when `fit` ends as models/<model>/training_curves.csv, which `dvc plots`
draws against `epoch` and compares across revisions and experiments.

Lightning keeps only the latest value of each metric (`trainer.callback_metrics`), so the callback copies
them once an epoch is over. A module may log in its own `on_train_epoch_end` (the classifier's train/loss
and train/acc), which Lightning calls after the callbacks' hook of that name; an epoch's row is therefore
taken at the first point after it: a checkpoint written at the epoch's end, the next epoch's start, the end
of training.

The rows travel in every checkpoint, so a training resumed from `models/<model>/.resume/last.ckpt` (see
dlpipe.train) ends with the whole curve, the epochs before the crash included.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.pytorch.callbacks import Callback

from dlpipe.io import atomic_path

EPOCH = "epoch"
NARROW_FLOATS = (torch.float32, torch.float16, torch.bfloat16)


class TrainingCurves(Callback):
    """Collect the logged metrics of each epoch; on global rank 0, write them as a CSV at the end of `fit`."""

    KEY = "dlpipe_training_curves"  # in the checkpoint: the rows so far, as a list of {name: number}

    def __init__(self, target: Path) -> None:
        self.target = Path(target)
        self.rows: dict[int, dict[str, float]] = {}

    def _record(self, trainer, epoch: int) -> None:
        if epoch < 0 or trainer.sanity_checking:
            return
        values = {}
        for name, value in trainer.callback_metrics.items():
            if isinstance(value, torch.Tensor):
                if value.numel() != 1:
                    continue
                # A float32 metric as the shortest decimal that is that float32 (0.8, not 0.800000011920929).
                value = float(str(np.float32(value.item()))) if value.dtype in NARROW_FLOATS else value.item()
            if isinstance(value, int | float) and not isinstance(value, bool) and name != EPOCH:
                values[name] = float(value)
        if values:
            # Merged, not replaced: after a resume the new process has no metrics of the epoch before it.
            self.rows.setdefault(epoch, {}).update(values)

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._record(trainer, trainer.current_epoch - 1)

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        # The last checkpoint is written at the end of the epoch, after the module's own epoch-end logging:
        # the row is complete here. Lists, numbers and strings only (read back with weights_only=True).
        self._record(trainer, trainer.current_epoch)
        checkpoint[self.KEY] = [{EPOCH: epoch, **row} for epoch, row in sorted(self.rows.items())]

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        saved = checkpoint.get(self.KEY) or []
        self.rows = {int(row[EPOCH]): {k: float(v) for k, v in row.items() if k != EPOCH} for row in saved}

    def on_train_end(self, trainer, pl_module) -> None:
        # `current_epoch` counts the finished epochs here: the last one is current_epoch - 1.
        self._record(trainer, trainer.current_epoch - 1)

    def on_fit_end(self, trainer, pl_module) -> None:
        if trainer.is_global_zero:
            write_curves(self.rows, self.target)


def write_curves(rows: dict[int, dict[str, float]], target: Path) -> None:
    """`epoch` and every metric seen (sorted by name), one row an epoch; a metric missing from an epoch is an
    empty cell."""
    names = sorted({name for row in rows.values() for name in row})
    with atomic_path(target) as tmp, open(tmp, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow([EPOCH, *names])
        for epoch, row in sorted(rows.items()):
            writer.writerow([epoch, *(repr(row[name]) if name in row else "" for name in names)])
