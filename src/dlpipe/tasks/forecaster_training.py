"""The forecaster's LightningModule: training, validation and test steps, metrics and optimizers.

Kept apart from the task so that the stages that do not train (fetch, export, evaluate, report) never
import Lightning, which costs several seconds per process.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import lightning as L
import torch
from torch import nn

from dlpipe.config import OptimizerParams
from dlpipe.tasks.optim import configure_optimizers

if TYPE_CHECKING:
    from dlpipe.tasks.forecaster import ScaledForecaster


class ForecasterModule(L.LightningModule):
    def __init__(
        self,
        model: ScaledForecaster,
        net_spec: dict[str, Any],
        window: int,
        optimizer: dict[str, Any],
        epochs: int,
        loss: str = "mse",
        huber_delta: float = 1.0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["model"])
        self.model = model
        self.example_input_array = torch.zeros(1, window, net_spec["kwargs"]["n_features"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def model_step(self, batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        windows, target = batch
        standardized = self.model.forward_standardized(windows)  # (B, 1)
        scaled_target = (target - self.model.target_mean) / self.model.target_std
        if self.hparams.loss == "huber":
            loss = nn.functional.huber_loss(standardized, scaled_target, delta=self.hparams.huber_delta)
        else:
            loss = nn.functional.mse_loss(standardized, scaled_target)
        # RMSE in natural log-return units, whatever the loss: comparable across runs and losses.
        rmse = (
            torch.sqrt(nn.functional.mse_loss(standardized, scaled_target).detach()) * self.model.target_std.squeeze()
        )
        return loss, rmse

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        loss, _ = self.model_step(batch)
        self.log("train/loss", loss, on_step=False, on_epoch=True, prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx: int) -> None:
        loss, rmse = self.model_step(batch)
        self.log("val/loss", loss, on_epoch=True, prog_bar=True)
        self.log("val/rmse_log_return", rmse, on_epoch=True)

    def test_step(self, batch, batch_idx: int) -> None:
        loss, rmse = self.model_step(batch)
        self.log("test/loss", loss, on_epoch=True)
        self.log("test/rmse_log_return", rmse, on_epoch=True)

    def configure_optimizers(self):
        return configure_optimizers(OptimizerParams(**self.hparams.optimizer), self.parameters(), self.hparams.epochs)
