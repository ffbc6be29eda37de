"""VGG (Simonyan & Zisserman, 2015): stacks of 3x3 convolutions with a 2x2 max-pool after each stage.

Two stacked 3x3 convs see a 5x5 field and three see 7x7, with fewer parameters than one large kernel
(3 * 9 C^2 against 49 C^2) and a ReLU between each. A configuration lists the stages, each the widths of its
convs; the flattened last map feeds two hidden FC layers with dropout, then `fc`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Literal

import torch
from pydantic import Field
from torch import nn

from dlpipe.models.registry import DropoutRate, PositiveInt, register_model

# Named configurations: one list per stage, one width per 3x3 conv; a max-pool follows each stage. The two
# small ones fit 28-32 px images on a CPU; vgg11 (A) and vgg16 (D) are the paper's, for a GPU.
VGG_CONFIGS: dict[str, list[list[int]]] = {
    "vgg_tiny": [[16], [32], [64]],
    "vgg_small": [[16, 16], [32, 32], [64, 64]],
    "vgg11": [[64], [128], [256, 256], [512, 512], [512, 512]],
    "vgg16": [[64, 64], [128, 128], [256, 256, 256], [512, 512, 512], [512, 512, 512]],
}
VggConfig = Literal["vgg_tiny", "vgg_small", "vgg11", "vgg16"]  # the keys of VGG_CONFIGS
# A params override of the table: at least one stage, each with at least one conv.
Stages = Annotated[Sequence[Annotated[Sequence[PositiveInt], Field(min_length=1)]], Field(min_length=1)]


def vgg_stage(in_channels: int, widths: Sequence[int], batch_norm: bool) -> nn.Sequential:
    """3x3 'same' convs (BN optional: the paper's nets had none), each with a ReLU, then a 2x2 max-pool."""
    layers: list[nn.Module] = []
    for width in widths:
        layers.append(nn.Conv2d(in_channels, width, kernel_size=3, padding=1, bias=not batch_norm))
        if batch_norm:
            layers.append(nn.BatchNorm2d(width))
        layers.append(nn.ReLU(inplace=True))
        in_channels = width
    # ceil_mode: an odd map keeps its last row (7 -> 4, not 3), and a 1x1 map stays 1x1, so deep
    # configurations still fit small images (vgg16 at 28 px: 28 -> 14 -> 7 -> 4 -> 2 -> 1).
    layers.append(nn.MaxPool2d(kernel_size=2, stride=2, ceil_mode=True))
    return nn.Sequential(*layers)


class VGG(nn.Module):
    """VGG: stages of 3x3 conv-(BN)-ReLU with max-pools, then flatten, two hidden FC layers with dropout, fc."""

    def __init__(
        self,
        in_channels: int,
        image_size: int,
        num_classes: int,
        stages: Sequence[Sequence[int]],
        hidden: int,
        dropout: float,
        batch_norm: bool,
    ) -> None:
        super().__init__()
        layers, size, previous = [], image_size, in_channels
        for widths in stages:
            layers.append(vgg_stage(previous, widths, batch_norm))
            size, previous = -(-size // 2), widths[-1]  # ceil(size / 2): see vgg_stage
        self.features = nn.Sequential(*layers)
        # The head is sized from the last map (C x s x s), as VGG's FC-4096 is for its 7x7 map at 224 px.
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(previous * size * size, hidden),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(hidden, hidden),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
        )
        self.fc = nn.Linear(hidden, num_classes)

    def blocks(self) -> list[nn.Module]:
        """Each conv stage (with its pool), then the hidden FC layers."""
        return [*self.features, self.classifier]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)  # (B, C_last, ceil(H / 2^k), ceil(W / 2^k)) for k stages
        x = self.classifier(x)  # (B, hidden)
        return self.fc(x)  # (B, num_classes)


@register_model("vgg", task="classifier")
def vgg(
    in_channels: int,
    image_size: int,
    num_classes: int,
    config: VggConfig = "vgg_small",
    stages: Stages | None = None,
    hidden: PositiveInt = 256,
    dropout: DropoutRate = 0.5,
    batch_norm: bool = True,
) -> VGG:
    """VGG (Simonyan & Zisserman, 2015): stacked 3x3 conv-BN-ReLU stages with max-pools, dropout FC head, fc.

    `config` names a row of VGG_CONFIGS (vgg_tiny, vgg_small, vgg11, vgg16); `stages` (a list of conv widths
    per stage, e.g. [[32, 32], [64, 64]]) replaces it when given. `dropout` (0.5 in the paper) follows each
    hidden FC layer; `batch_norm: false` gives the paper's original nets.
    """
    chosen = VGG_CONFIGS[config] if stages is None else stages
    return VGG(in_channels, image_size, num_classes, chosen, hidden, dropout, batch_norm)
