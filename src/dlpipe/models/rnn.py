"""Recurrent forecasters: a window of past daily features -> one value for the next day.

Pure architecture: inputs and outputs are in whatever units the task feeds (the forecaster task
standardises the features and the target around the network, inside the exported graph).
"""

from __future__ import annotations

import torch
from torch import nn

from dlpipe.models.registry import DropoutRate, PositiveInt, register_model

RECURRENT_CELLS = {"lstm": nn.LSTM, "gru": nn.GRU, "rnn": nn.RNN}
ELMAN_WEIGHTS = ("weight_ih", "weight_hh", "bias_ih", "bias_hh")


# ONNX has an RNN operator, and the exporter maps nn.LSTM and nn.GRU to theirs, but it unrolls nn.RNN step by
# step, which fixes the window length in the graph. Exported through this opaque op instead (the shape
# function below never looks at the length), one layer becomes one ONNX RNN node with a dynamic length
# (dlpipe.export translates it). Training and evaluation in PyTorch use nn.RNN itself.
@torch.library.custom_op("dlpipe::elman_rnn_layer", mutates_args=())
def elman_rnn_layer(
    x: torch.Tensor, weight_ih: torch.Tensor, weight_hh: torch.Tensor, bias_ih: torch.Tensor, bias_hh: torch.Tensor
) -> torch.Tensor:
    """One tanh recurrent layer over (B, T, in) from a zero state: the hidden states (B, T, hidden)."""
    h0 = x.new_zeros(1, x.shape[0], weight_hh.shape[0])
    weights = [weight_ih, weight_hh, bias_ih, bias_hh]
    # rnn_tanh(input, hx, params, has_biases, num_layers, dropout, train, bidirectional, batch_first)
    return torch.rnn_tanh(x, h0, weights, True, 1, 0.0, False, False, True)[0]


@elman_rnn_layer.register_fake
def _elman_rnn_layer_shape(x, weight_ih, weight_hh, bias_ih, bias_hh):
    return x.new_empty(x.shape[0], x.shape[1], weight_hh.shape[0])


class RecurrentForecaster(nn.Module):
    """Stacked recurrent layers read the window; a linear head maps the last hidden state to one value.

    Input (B, T, n_features); output (B, 1). Any window length T works (the ONNX graph keeps T dynamic).
    """

    def __init__(
        self, n_features: int, cell: str = "lstm", hidden: int = 64, layers: int = 2, dropout: float = 0.1
    ) -> None:
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
        if isinstance(self.recurrent, nn.RNN) and torch.compiler.is_exporting():
            sequence = x  # layer by layer through the exportable op (eval mode: no dropout between layers)
            for layer in range(self.recurrent.num_layers):
                weights = (getattr(self.recurrent, f"{name}_l{layer}") for name in ELMAN_WEIGHTS)
                sequence = elman_rnn_layer(sequence, *weights)
        else:
            sequence, _ = self.recurrent(x)  # (B, T, hidden)
        return self.head(sequence[:, -1])  # (B, 1) from the last step's hidden state


@register_model("lstm", task="forecaster")
def lstm(n_features: int, hidden: PositiveInt = 64, layers: PositiveInt = 2, dropout: DropoutRate = 0.1) -> nn.Module:
    """LSTM forecaster: stacked LSTM over the window, linear head on the last hidden state."""
    return RecurrentForecaster(n_features, "lstm", hidden, layers, dropout)


@register_model("rnn", task="forecaster")
def rnn(n_features: int, hidden: PositiveInt = 64, layers: PositiveInt = 2, dropout: DropoutRate = 0.1) -> nn.Module:
    """Simple (Elman) RNN forecaster, as in the course: one tanh recurrence per layer, no gates."""
    return RecurrentForecaster(n_features, "rnn", hidden, layers, dropout)


@register_model("gru", task="forecaster")
def gru(n_features: int, hidden: PositiveInt = 64, layers: PositiveInt = 2, dropout: DropoutRate = 0.1) -> nn.Module:
    """GRU forecaster: as the LSTM forecaster with gated recurrent units."""
    return RecurrentForecaster(n_features, "gru", hidden, layers, dropout)
