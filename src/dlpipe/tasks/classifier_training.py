"""The classifier's LightningModule: training, validation and test steps, metrics and optimizers.

Kept apart from the task so that the stages that do not train (fetch, export, evaluate, report) never
import Lightning, which costs several seconds per process.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from torch import nn
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score

from dlpipe.config import OptimizerParams
from dlpipe.models.layers import AuxiliaryOutput
from dlpipe.tasks.classifier import to_unit_float
from dlpipe.tasks.optim import configure_optimizers


class ClassifierModule(L.LightningModule):
    def __init__(
        self, model: nn.Module, net_spec: dict[str, Any], num_classes: int, optimizer: dict[str, Any], epochs: int
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["model"])
        self.model = model
        self.loss = nn.CrossEntropyLoss()
        self.train_loss = MeanMetric()
        # Updated every step: no argument checks (argmax predictions and validated labels), which cost host
        # work and, on a GPU, a wait for the device at each step.
        self.train_acc = MulticlassAccuracy(num_classes, average="micro", validate_args=False)
        self.val_acc = MulticlassAccuracy(num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes, average="micro")
        self.test_f1 = MulticlassF1Score(num_classes, average="macro")
        kwargs = net_spec["kwargs"]
        self.example_input_array = torch.zeros(1, kwargs["in_channels"], kwargs["image_size"], kwargs["image_size"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def model_step(self, batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        images, labels = batch
        output = self.model(to_unit_float(images))
        if isinstance(output, AuxiliaryOutput):  # training mode of a network with side heads (Inception)
            aux_loss = sum(self.loss(aux, labels) for aux in output.aux_logits)
            return self.loss(output.logits, labels) + output.aux_weight * aux_loss, output.logits.argmax(1), labels
        return self.loss(output, labels), output.argmax(dim=1), labels

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        loss, preds, labels = self.model_step(batch)
        # Accumulated here and logged once an epoch (on_train_epoch_end): a `self.log` per step costs Lightning
        # ~0.05 s an epoch on the CNN (benchmarks/README.md, "Lightning against a plain PyTorch loop").
        self.train_loss.update(loss.detach(), weight=len(labels))
        self.train_acc.update(preds, labels)
        return loss

    def on_train_epoch_end(self) -> None:
        self.log("train/loss", self.train_loss.compute(), prog_bar=True)
        self.log("train/acc", self.train_acc.compute())
        self.train_loss.reset()
        self.train_acc.reset()

    def validation_step(self, batch, batch_idx: int) -> None:
        loss, preds, labels = self.model_step(batch)
        self.val_acc(preds, labels)
        self.log("val/loss", loss, on_epoch=True, prog_bar=True)
        self.log("val/acc", self.val_acc, on_epoch=True, prog_bar=True)

    def test_step(self, batch, batch_idx: int) -> None:
        loss, preds, labels = self.model_step(batch)
        self.test_acc(preds, labels)
        self.test_f1(preds, labels)
        self.log("test/loss", loss, on_epoch=True)
        self.log("test/acc", self.test_acc, on_epoch=True)
        self.log("test/macro_f1", self.test_f1, on_epoch=True)

    def configure_optimizers(self):
        return configure_optimizers(OptimizerParams(**self.hparams.optimizer), self.parameters(), self.hparams.epochs)
