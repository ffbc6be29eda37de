"""Convolutional image classifiers: a simple two-block CNN and LeNet-5.

Inputs are float images, shape (B, C, H, W) (the classifier task standardises them before the network);
outputs are class logits (B, num_classes).
"""

from __future__ import annotations

import torch
from torch import nn

from dlpipe.models.layers import conv_out_size
from dlpipe.models.registry import DropoutRate, PositiveInt, Widths, register_model


def conv_bn_relu(in_channels: int, out_channels: int) -> nn.Sequential:
    # 'same' padding keeps H and W so that only the pooling layers shrink the image.
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


@register_model("cnn", task="classifier")
class SimpleCNN(nn.Module):
    """Simple CNN: conv blocks (conv3x3-BN-ReLU, max-pool 2) followed by a dropout-regularised two-layer head."""

    def __init__(
        self,
        in_channels: int,
        image_size: int,
        num_classes: int,
        channels: Widths = (32, 64),
        hidden: PositiveInt = 128,
        dropout: DropoutRate = 0.3,
    ) -> None:
        super().__init__()
        blocks: list[nn.Module] = []
        size, previous = image_size, in_channels
        for width in channels:
            blocks += [conv_bn_relu(previous, width), nn.MaxPool2d(2)]
            size, previous = conv_out_size(size, kernel=2, stride=2), width
        if size < 1:
            raise ValueError(f"image_size {image_size} is too small for {len(channels)} pooling stages")
        self.features = nn.Sequential(*blocks)
        self.head = nn.Sequential(
            nn.Flatten(),
            nn.Dropout(dropout),
            nn.Linear(previous * size * size, hidden),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
        )
        self.fc = nn.Linear(hidden, num_classes)

    def blocks(self) -> list[nn.Module]:
        """Each conv block with its pool, then the hidden layer of the head."""
        return [self.features[index : index + 2] for index in range(0, len(self.features), 2)] + [self.head]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)  # (B, channels[-1], H / 2^k, W / 2^k)
        x = self.head(x)  # (B, hidden)
        return self.fc(x)  # (B, num_classes)


@register_model("lenet5", task="classifier")
class LeNet5(nn.Module):
    """LeNet-5 (LeCun et al., 1998): conv5x5 -> pool -> conv5x5 -> pool -> FC 120 -> FC 84 -> classes.

    The original takes 32x32 inputs; smaller images are zero-padded up to 32 so that the second
    convolution still sees a 5x5 field, as the 28x28 MNIST digits were in the paper.
    """

    def __init__(self, in_channels: int, image_size: int, num_classes: int) -> None:
        super().__init__()
        self.pad = max(0, (32 - image_size + 1) // 2)
        size = image_size + 2 * self.pad
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 6, kernel_size=5),
            nn.Tanh(),
            nn.AvgPool2d(2),
            nn.Conv2d(6, 16, kernel_size=5),
            nn.Tanh(),
            nn.AvgPool2d(2),
        )
        size = conv_out_size(conv_out_size(conv_out_size(conv_out_size(size, 5), 2, 2), 5), 2, 2)
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(16 * size * size, 120),
            nn.Tanh(),
            nn.Linear(120, 84),
            nn.Tanh(),
        )
        self.fc = nn.Linear(84, num_classes)

    def blocks(self) -> list[nn.Module]:
        """C1-S2, C3-S4, then the F5 and F6 fully connected layers."""
        return [self.features[:3], self.features[3:], self.classifier]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.pad(x, (self.pad,) * 4)  # (B, C, 32, 32) for MNIST-sized inputs
        x = self.features(x)  # (B, 16, 5, 5)
        x = self.classifier(x)  # (B, 84)
        return self.fc(x)  # (B, num_classes)
