"""Next-day return forecasting: MSE on the standardised target; RMSE in return units is logged."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from torch import nn


class ForecasterTask(L.LightningModule):
    def __init__(self, net: nn.Module, net_spec: dict[str, Any], window: int, lr: float, weight_decay: float, epochs: int) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["net"])
        self.net = net
        self.example_input_array = torch.zeros(1, window, net_spec["kwargs"]["n_features"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def model_step(self, batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        windows, target = batch
        standardized = self.net.forward_standardized(windows)  # (B, 1)
        # The loss is taken in target standard deviations so the learning rate does not depend on the
        # stock's volatility; the RMSE is reported in natural log-return units.
        scaled_target = (target - self.net.target_mean) / self.net.target_std
        loss = nn.functional.mse_loss(standardized, scaled_target)
        rmse = torch.sqrt(loss) * self.net.target_std.squeeze()
        return loss, rmse

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        loss, rmse = self.model_step(batch)
        self.log("train/loss", loss, on_step=False, on_epoch=True, prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx: int) -> None:
        loss, rmse = self.model_step(batch)
        self.log("val/loss", loss, on_epoch=True, prog_bar=True)
        self.log("val/rmse_logret", rmse, on_epoch=True)

    def test_step(self, batch, batch_idx: int) -> None:
        loss, rmse = self.model_step(batch)
        self.log("test/loss", loss, on_epoch=True)
        self.log("test/rmse_logret", rmse, on_epoch=True)

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, self.hparams.epochs))
        return {"optimizer": optimizer, "lr_scheduler": scheduler}
