"""Multilayer perceptron: the baseline every convolutional network has to beat.

It sees the image as a flat vector, so it knows nothing of neighbouring pixels; on MNIST it still reaches
about 98%, which is the bar a CNN's extra machinery must clear.
"""

from __future__ import annotations

import torch
from torch import nn

from dlpipe.models.registry import DropoutRate, Widths, register_model


@register_model("mlp", task="classifier")
class MLP(nn.Module):
    """MLP baseline: flatten, hidden Linear-ReLU-Dropout layers, fc."""

    def __init__(
        self,
        in_channels: int,
        image_size: int,
        num_classes: int,
        hidden: Widths = (256, 128),
        dropout: DropoutRate = 0.2,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        previous = in_channels * image_size * image_size
        for index, width in enumerate(hidden):
            # The first layer flattens, so that each element of blocks() takes the previous one's output.
            flatten = [nn.Flatten()] if index == 0 else []
            layers.append(
                nn.Sequential(*flatten, nn.Linear(previous, width), nn.ReLU(inplace=True), nn.Dropout(dropout))
            )
            previous = width
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(previous, num_classes)

    def blocks(self) -> list[nn.Module]:
        return list(self.layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layers(x)  # (B, hidden[-1]) from (B, C * H * W)
        return self.fc(x)  # (B, num_classes)
