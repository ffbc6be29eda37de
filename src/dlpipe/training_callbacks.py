"""Lightning pieces the training stage adds: atomic checkpoint files, random-number states saved in each
checkpoint (so a resumed run continues exactly), and a stop at the first non-finite loss."""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.plugins.io import TorchCheckpointIO

from dlpipe.errors import DlpipeError
from dlpipe.io import atomic_path


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoints written to a temporary name and renamed: a crash mid-write leaves the previous one."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        target = Path(path)
        with atomic_path(target) as tmp:
            torch.save(checkpoint, tmp)
            with open(tmp, "rb") as handle:  # on disk before the rename, or a power loss keeps neither
                os.fsync(handle.fileno())


class RestoreRandomState(Callback):
    """Keep the random-number generators (torch, numpy, python) in every checkpoint and restore them on
    resume. Without them a resumed run shuffles and drops out differently from an uninterrupted one."""

    KEY = "dlpipe_rng_states"

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        # Tensors, lists and numbers only: checkpoints are read back with torch.load(weights_only=True).
        name, keys, position, has_gauss, cached = np.random.get_state()
        version, python_state, gauss = random.getstate()
        checkpoint[self.KEY] = {
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": [name, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, cached],
            "python": [version, list(python_state), gauss],
        }

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        states = checkpoint.get(self.KEY)
        if not states:
            return
        torch.set_rng_state(states["torch"])
        if states["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(states["cuda"])
        name, keys, position, has_gauss, cached = states["numpy"]
        np.random.set_state((name, keys.numpy().astype(np.uint32), position, has_gauss, cached))
        version, python_state, gauss = states["python"]
        random.setstate((version, tuple(python_state), gauss))


class NonFiniteLoss(DlpipeError):
    """Training diverged: the loss became NaN or infinite."""


class StopOnNonFiniteLoss(Callback):
    """Fail training at the first step whose loss is NaN or infinite.

    Without it a diverged run (say `lr: 1e6`) trains to the end on NaN weights, is marked FINISHED, and
    only export notices. Raising inside `fit` makes Lightning end the MLflow run as FAILED, and since
    checkpoints are written at validation time only, no checkpoint of the diverged weights is kept.
    """

    def __init__(self, model: str) -> None:
        self.model = model

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if isinstance(loss, torch.Tensor) and not torch.isfinite(loss).all():
            raise NonFiniteLoss(
                f"train.{self.model}: loss became {loss.item()} at epoch {trainer.current_epoch}, "
                f"step {trainer.global_step}; training stopped, nothing saved (lower optimizer.lr?)"
            )


def check_finite_weights(checkpoint_path: Path | str, model: str) -> None:
    """Refuse a checkpoint with NaN or infinite weights."""
    state = torch.load(checkpoint_path, map_location="cpu", weights_only=True)["state_dict"]  # written by us
    bad = [name for name, value in state.items() if value.is_floating_point() and not torch.isfinite(value).all()]
    if bad:
        raise NonFiniteLoss(f"train.{model}: the best checkpoint has non-finite weights ({bad[0]}); not kept")


class ChannelsLast(Callback):
    """Convolution weights in channels_last (NHWC) order, matching the batches the datamodule hands over
    (dlpipe.tasks.profiles' `channels_last`): tensor cores and oneDNN read NHWC without a transpose per layer.
    Checkpoints keep the values, so export and evaluation load them into an ordinary NCHW model."""

    def setup(self, trainer, pl_module, stage: str) -> None:
        pl_module.to(memory_format=torch.channels_last)
