"""Recurrent forecasters: a window of past daily features -> one value for the next day.

Pure architecture: inputs and outputs are in whatever units the task feeds (the forecaster task
standardises the features and the target around the network, inside the exported graph).
"""

from __future__ import annotations

import torch
from torch import nn

from dlpipe.models.registry import DropoutRate, PositiveInt, register_model

RECURRENT_CELLS = {"lstm": nn.LSTM, "gru": nn.GRU, "rnn": nn.RNN}


class RecurrentForecaster(nn.Module):
    """Stacked recurrent layers read the window; a linear head maps the last hidden state to one value.

    Input (B, T, n_features); output (B, 1). Any window length T works (the ONNX graph keeps T dynamic).
    """

    def __init__(self, n_features: int, cell: str = "lstm", hidden: int = 64, layers: int = 2, dropout: float = 0.1) -> None:
        super().__init__()
        if cell not in RECURRENT_CELLS:
            raise ValueError(f"cell must be one of {sorted(RECURRENT_CELLS)}, got {cell!r}")
        self.recurrent = RECURRENT_CELLS[cell](
            input_size=n_features,
            hidden_size=hidden,
            num_layers=layers,
            batch_first=True,
            dropout=dropout if layers > 1 else 0.0,  # PyTorch applies it between layers only
        )
        self.head = nn.Linear(hidden, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        sequence, _ = self.recurrent(x)  # (B, T, hidden)
        return self.head(sequence[:, -1])  # (B, 1) from the last step's hidden state


@register_model("lstm", task="forecaster")
def lstm(n_features: int, hidden: PositiveInt = 64, layers: PositiveInt = 2, dropout: DropoutRate = 0.1) -> nn.Module:
    """LSTM forecaster: stacked LSTM over the window, linear head on the last hidden state."""
    return RecurrentForecaster(n_features, "lstm", hidden, layers, dropout)


@register_model("gru", task="forecaster")
def gru(n_features: int, hidden: PositiveInt = 64, layers: PositiveInt = 2, dropout: DropoutRate = 0.1) -> nn.Module:
    """GRU forecaster: as the LSTM forecaster with gated recurrent units."""
    return RecurrentForecaster(n_features, "gru", hidden, layers, dropout)
