"""The Lightning parts of the transfer stage: the training module, the freeze/unfreeze callback, and `fit`.

Kept apart from dlpipe.transfer (as dlpipe.tasks.classifier_training is from the task) so that importing
the library never imports Lightning.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
import warnings
from collections.abc import Iterator, Sequence

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import BaseFinetuning
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from dlpipe.config import OptimizerParams, TrainerParams
from dlpipe.tasks.classifier import StandardizedClassifier
from dlpipe.tasks.classifier_training import ClassifierModule
from dlpipe.tasks.optim import configure_optimizers
from dlpipe.tasks.profiles import shared_precision
from dlpipe.transfer import HEAD, Schedule


class TransferModule(ClassifierModule):
    """The classifier's LightningModule, whose optimizer holds only the parameters that train from the start:
    those unfrozen later join it as a new parameter group with their own learning rate."""

    def configure_optimizers(self):
        trainable = [parameter for parameter in self.parameters() if parameter.requires_grad]
        return configure_optimizers(OptimizerParams(**self.hparams.optimizer), trainable, self.hparams.epochs)


class FrozenBase(BaseFinetuning):
    """Feature extraction and fine-tuning: everything but the head (`fc`) frozen before training. With
    `unfreeze_at`, the top `top_blocks` of `blocks()` are unfrozen at that epoch and join the optimizer as a
    new group, and every learning rate becomes lr x `lr_factor` (the course recipe: head first, then the
    top of the base and the head together at a low learning rate).

    The pretrained base runs in inference mode throughout, its unfrozen blocks included: BatchNorm keeps
    the pretraining statistics (those of a 25-image batch would be noise, and would change the features
    the head learns on) and dropout stays off; only the base's parameters learn.
    """

    def __init__(self, unfreeze_at: int | None = None, top_blocks: int = 0, lr_factor: float = 1.0) -> None:
        super().__init__()
        self.unfreeze_at, self.top_blocks, self.lr_factor = unfreeze_at, top_blocks, lr_factor

    @staticmethod
    def network(pl_module: L.LightningModule) -> nn.Module:
        return pl_module.model.net

    def freeze_before_training(self, pl_module: L.LightningModule) -> None:
        net = self.network(pl_module)
        self.freeze(net, train_bn=False)
        self.make_trainable(getattr(net, HEAD))

    def finetune_function(self, pl_module: L.LightningModule, epoch: int, optimizer: torch.optim.Optimizer) -> None:
        if epoch != self.unfreeze_at:
            return
        blocks = self.network(pl_module).blocks()[-self.top_blocks :]
        self.make_trainable(blocks)
        lr = optimizer.param_groups[0]["lr"] * self.lr_factor
        for group in optimizer.param_groups:
            group["lr"] = lr
        # By identity: BaseFinetuning.filter_on_optimizer compares values, and two parameters can be equal.
        held = {id(parameter) for group in optimizer.param_groups for parameter in group["params"]}
        unfrozen = [parameter for parameter in self.filter_params(blocks) if id(parameter) not in held]
        optimizer.add_param_group({"params": unfrozen, "lr": lr})

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_epoch_start(trainer, pl_module)  # calls finetune_function
        net = self.network(pl_module)
        net.eval()
        getattr(net, HEAD).train()


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Without Lightning's per-fit notices (devices, empty folders, few DataLoader workers): a transfer run
    fits ten small networks, and the notices would bury the stage's own lines."""
    names = ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero")
    levels = {name: logging.getLogger(name).level for name in names}
    for name in names:
        logging.getLogger(name).setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*does not have many workers.*")
            warnings.filterwarnings("ignore", message=r".*number of training batches .* is smaller than the logging")
            warnings.filterwarnings("ignore", message=r".*`validation_step` but have no `val_dataloader`")
            warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)` is deprecated")
            yield
    finally:
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)


def fit(
    model: StandardizedClassifier,
    images: np.ndarray,
    labels: np.ndarray,
    schedule: Schedule,
    *,
    batch_size: int,
    seed: int,
    trainer: TrainerParams,
    callbacks: Sequence[L.Callback] = (),
) -> L.Trainer:
    """Train `model` (in place) on uint8 `images` for `schedule.epochs`, with no validation or checkpoints:
    the k-shot sets are too small to hold data out, so every run trains a fixed number of epochs."""
    L.seed_everything(seed, workers=True, verbose=False)
    _, channels, size, _ = images.shape
    num_classes = getattr(model.net, HEAD).out_features
    net_spec = {"name": "transfer", "kwargs": {"in_channels": channels, "image_size": size, "num_classes": num_classes}}
    # Adam at a constant rate: a schedule would not see the parameter group fine-tuning adds.
    optimizer = {"name": "adam", "lr": schedule.lr, "schedule": "none"}
    module = TransferModule(model, net_spec, num_classes, optimizer, schedule.epochs)
    dataset = TensorDataset(torch.from_numpy(images), torch.from_numpy(labels))
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=True,
        num_workers=trainer.num_workers,
        persistent_workers=trainer.num_workers > 0,
    )
    if schedule.frozen_base:
        callbacks = [FrozenBase(schedule.unfreeze_at, schedule.top_blocks, schedule.lr_factor), *callbacks]
    with tempfile.TemporaryDirectory(prefix="dlpipe-transfer-") as scratch, _quiet():
        fitted = L.Trainer(
            max_epochs=schedule.epochs,
            accelerator=trainer.accelerator,
            devices=1,  # ten small fits: one device each (trainer.devices > 1 would start DDP for every one)
            precision=shared_precision(trainer),
            logger=False,  # the stage logs one MLflow run with the results
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            callbacks=list(callbacks),
            # "warn": seeded and reproducible on CPU; on CUDA, average pooling's backward has no deterministic
            # kernel and would otherwise stop training.
            deterministic="warn",
            num_sanity_val_steps=0,
            default_root_dir=scratch,
            log_every_n_steps=1,
        )
        fitted.fit(module, train_dataloaders=loader)
    return fitted
