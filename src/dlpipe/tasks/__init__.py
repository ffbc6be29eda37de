"""LightningModules (training logic). Each takes the network as an argument and records how to rebuild
it (`net_spec`: registered name + builder kwargs) in its hyperparameters, so a checkpoint alone is enough
to recreate the plain nn.Module for export and evaluation."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from dlpipe.errors import DlpipeError
from dlpipe.models import get_model


def load_network(checkpoint: Path) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the trained network (eval mode) and return it with the checkpoint's hyperparameters."""
    checkpoint = Path(checkpoint)
    if not checkpoint.is_file():
        raise DlpipeError(f"{checkpoint}: file not found (run train first)")
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)
    hparams = state["hyper_parameters"]
    spec = hparams["net_spec"]
    network = get_model(spec["name"], **spec["kwargs"])
    weights = {k.removeprefix("net."): v for k, v in state["state_dict"].items() if k.startswith("net.")}
    network.load_state_dict(weights)
    return network.eval(), hparams
