"""AlexNet (Krizhevsky et al., 2012) scaled to 8-32 px images.

Five convolutions with ReLU, overlapping 3x3/stride-2 max-pools after the first, second and fifth, then dropout
and two hidden FC layers before `fc`. What changed for small images, and why:
- conv1 is 5x5 with stride 1 instead of 11x11 with stride 4: on 224 px the 11x11 kernel spans 5% of the image
  and stride 4 leaves 55x55; on 28 px the same would leave 5x5 before the first pool.
- the pools pad by 1, so they halve any size (28 -> 14 -> 7 -> 4; 8 -> 4 -> 2 -> 1) instead of shrinking a
  small map to nothing; they still overlap (window 3 > stride 2), the paper's point.
- conv widths are the paper's (96, 256, 384, 384, 256) times `width_mult` (0.25: 24, 64, 96, 96, 64), and the
  hidden FC layers have `hidden` units instead of 4,096: 10 classes of 28 px digits need far less capacity than
  1,000 ImageNet classes, and the full widths would not train on a CPU.
- local response normalisation is left out: later work (VGG, section 4.1) found it does not help.
"""

from __future__ import annotations

import torch
from torch import nn

from dlpipe.models.layers import make_divisible
from dlpipe.models.registry import DropoutRate, PositiveFloat, PositiveInt, register_model

# (output width at width_mult 1, kernel size, max-pool after it) of the five conv layers, from the paper.
ALEXNET_SETTINGS: list[tuple[int, int, bool]] = [
    (96, 5, True),  # the paper's 11x11/4: see the module docstring
    (256, 5, True),
    (384, 3, False),
    (384, 3, False),
    (256, 3, True),
]


class AlexNet(nn.Module):
    """AlexNet: five conv-ReLU layers (max-pool after 1, 2 and 5), dropout, two hidden FC layers, fc."""

    def __init__(
        self,
        in_channels: int,
        image_size: int,
        num_classes: int,
        width_mult: float,
        hidden: int,
        dropout: float,
    ) -> None:
        super().__init__()
        layers, size, previous = [], image_size, in_channels
        for width, kernel, pool in ALEXNET_SETTINGS:
            width = make_divisible(width * width_mult)
            stage: list[nn.Module] = [nn.Conv2d(previous, width, kernel, padding=kernel // 2), nn.ReLU(inplace=True)]
            if pool:  # overlapping pooling (window 3, stride 2), padded to halve any size, rounding up
                stage.append(nn.MaxPool2d(kernel_size=3, stride=2, padding=1))
                size = (size - 1) // 2 + 1
            layers.append(nn.Sequential(*stage))
            previous = width
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Dropout(dropout),
            nn.Linear(previous * size * size, hidden),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(hidden, hidden),
            nn.ReLU(inplace=True),
        )
        self.fc = nn.Linear(hidden, num_classes)

    def blocks(self) -> list[nn.Module]:
        """conv1..conv5 (each with its ReLU and pool), then the hidden FC layers."""
        return [*self.features, self.classifier]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)  # (B, C5, ceil(H / 8), ceil(W / 8))
        x = self.classifier(x)  # (B, hidden)
        return self.fc(x)  # (B, num_classes)


@register_model("alexnet", task="classifier")
def alexnet(
    in_channels: int,
    image_size: int,
    num_classes: int,
    width_mult: PositiveFloat = 0.25,
    hidden: PositiveInt = 512,
    dropout: DropoutRate = 0.5,
) -> AlexNet:
    """AlexNet (Krizhevsky et al., 2012) for small images: five convs with ReLU, overlapping max-pools, dropout FC.

    Conv widths are the paper's times `width_mult` (rounded to a multiple of 8), the hidden FC layers have
    `hidden` units, and dropout (0.5, the paper's) precedes each of them.
    """
    return AlexNet(in_channels, image_size, num_classes, width_mult, hidden, dropout)
