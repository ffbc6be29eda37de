"""Recurrent forecasters: a window of past daily features -> the next day's log return."""

from __future__ import annotations

import torch
from torch import nn

from dlpipe.models import register_model
from dlpipe.models.layers import Standardize

RECURRENT_CELLS = {"lstm": nn.LSTM, "gru": nn.GRU, "rnn": nn.RNN}


class RecurrentForecaster(nn.Module):
    """Stacked recurrent layers read the window; a linear head maps the last hidden state to a return.

    Input (B, T, n_features) of raw features; output (B, 1), the predicted log return of the next day in
    natural units (the target scale is stored as buffers, like the input statistics).
    """

    def __init__(self, n_features: int, cell: str = "lstm", hidden: int = 64, layers: int = 2, dropout: float = 0.1) -> None:
        super().__init__()
        if cell not in RECURRENT_CELLS:
            raise ValueError(f"cell must be one of {sorted(RECURRENT_CELLS)}, got {cell!r}")
        self.standardize = Standardize((1, 1, n_features))
        self.recurrent = RECURRENT_CELLS[cell](
            input_size=n_features,
            hidden_size=hidden,
            num_layers=layers,
            batch_first=True,
            dropout=dropout if layers > 1 else 0.0,  # PyTorch applies it between layers only
        )
        self.head = nn.Linear(hidden, 1)
        self.register_buffer("target_mean", torch.zeros(1))
        self.register_buffer("target_std", torch.ones(1))

    @torch.no_grad()
    def set_target_stats(self, mean: float, std: float) -> None:
        self.target_mean.fill_(mean)
        self.target_std.fill_(max(std, 1e-6))

    def forward_standardized(self, x: torch.Tensor) -> torch.Tensor:
        x = self.standardize(x)  # (B, T, F)
        sequence, _ = self.recurrent(x)  # (B, T, hidden)
        return self.head(sequence[:, -1])  # (B, 1), in target standard deviations

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_standardized(x) * self.target_std + self.target_mean  # (B, 1) log return


@register_model("lstm", task="forecaster")
def lstm(n_features: int, hidden: int = 64, layers: int = 2, dropout: float = 0.1) -> nn.Module:
    """LSTM forecaster: stacked LSTM over the window, linear head on the last hidden state."""
    return RecurrentForecaster(n_features, "lstm", hidden, layers, dropout)


@register_model("gru", task="forecaster")
def gru(n_features: int, hidden: int = 64, layers: int = 2, dropout: float = 0.1) -> nn.Module:
    """GRU forecaster: as the LSTM forecaster with gated recurrent units."""
    return RecurrentForecaster(n_features, "gru", hidden, layers, dropout)
