"""Optimizer and learning-rate schedule from a model's `optimizer:` block, shared by every task."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from dlpipe.config import OptimizerParams


def make_optimizer(params: OptimizerParams, parameters: Iterable[torch.nn.Parameter]) -> torch.optim.Optimizer:
    common = {"lr": params.lr, "weight_decay": params.weight_decay}
    if params.name == "adamw":
        return torch.optim.AdamW(parameters, betas=tuple(params.betas), **common)
    if params.name == "adam":
        return torch.optim.Adam(parameters, betas=tuple(params.betas), **common)
    if params.name == "sgd":
        return torch.optim.SGD(parameters, momentum=params.momentum, nesterov=params.nesterov, **common)
    return torch.optim.RMSprop(parameters, momentum=params.momentum, **common)


def make_schedule(
    params: OptimizerParams, optimizer: torch.optim.Optimizer, epochs: int
) -> torch.optim.lr_scheduler.LRScheduler:
    """Per-epoch schedule: optional linear warm-up, then cosine decay to zero, step decay, or constant."""
    decay_epochs = max(1, epochs - params.warmup_epochs)
    if params.schedule == "cosine":
        # Decays to zero over the planned epochs: early stopping may cut it short, no extra knob needed.
        decay = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=decay_epochs)
    elif params.schedule == "step":
        decay = torch.optim.lr_scheduler.StepLR(optimizer, step_size=params.step_size, gamma=params.gamma)
    else:
        decay = torch.optim.lr_scheduler.ConstantLR(optimizer, factor=1.0, total_iters=0)
    if params.warmup_epochs == 0:
        return decay
    # Warm-up from lr / (warmup + 1): large learning rates (SGD with momentum, big batches) start stable.
    warmup = torch.optim.lr_scheduler.LinearLR(
        optimizer, start_factor=1.0 / (params.warmup_epochs + 1), total_iters=params.warmup_epochs
    )
    return torch.optim.lr_scheduler.SequentialLR(optimizer, [warmup, decay], milestones=[params.warmup_epochs])


def configure_optimizers(
    params: OptimizerParams, parameters: Iterable[torch.nn.Parameter], epochs: int
) -> dict[str, Any]:
    """What a LightningModule's `configure_optimizers` returns."""
    optimizer = make_optimizer(params, parameters)
    return {"optimizer": optimizer, "lr_scheduler": make_schedule(params, optimizer, epochs)}
