"""ResNet for small images: the CIFAR-10 networks of He et al. (2016), section 4.2.

A 3x3 stem, three stages of BasicBlocks (the first keeps the resolution, the others halve it and double the
width), global average pooling and one linear layer: depth = 6n + 2 for n blocks a stage (ResNet-20 is n = 3).
Attribute names follow torchvision's ResNet (conv1, bn1, layer1..3, fc; blocks with conv1, bn1, conv2, bn2,
downsample), so a state_dict of the same architecture saved in that layout loads by name.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated

import torch
from pydantic import AfterValidator, Field
from torch import nn

from dlpipe.models.registry import PositiveInt, register_model


def check_depth(depth: int) -> int:
    """`depth` if it is 6n + 2 with n >= 1: a stem conv, three stages of n two-conv blocks, and fc."""
    if depth < 8 or (depth - 2) % 6:
        raise ValueError("depth must be 6n + 2 with n >= 1 (8, 14, 20, 32, 44, 56, 110, ...)")
    return depth


# The hints are the params schema: `depth: 9` or two widths are refused with the key before anything is built.
Depth = Annotated[int, AfterValidator(check_depth)]
StageWidths = Annotated[Sequence[PositiveInt], Field(min_length=3, max_length=3)]  # one width per stage


def conv3x3(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    # No bias: the BatchNorm that follows every conv has its own shift.
    return nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=stride, padding=1, bias=False)


def conv1x1(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers and a shortcut added before the last ReLU.

    The shortcut is the identity unless the block changes the shape (stride 2 or a new width); then it is a
    1x1 conv + BN projection (the paper's option B), the only place a block has extra parameters.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = conv3x3(in_channels, out_channels, stride)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(out_channels, out_channels)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(conv1x1(in_channels, out_channels, stride), nn.BatchNorm2d(out_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x  # (B, C_in, H, W)
        out = self.conv1(x)  # (B, C, H / s, W / s)
        out = self.bn1(out)  # (B, C, H / s, W / s)
        out = self.relu(out)  # (B, C, H / s, W / s)
        out = self.conv2(out)  # (B, C, H / s, W / s)
        out = self.bn2(out)  # (B, C, H / s, W / s)
        if self.downsample is not None:  # shapes differ: project the input to (B, C, H / s, W / s)
            identity = self.downsample(x)  # (B, C, H / s, W / s)
        out = out + identity  # (B, C, H / s, W / s): the residual, a gradient path around both convs
        return self.relu(out)  # (B, C, H / s, W / s)


class ResNet(nn.Module):
    """CIFAR-style ResNet: 3x3 stem, stages of BasicBlocks (stride 2 from the second), GAP, fc."""

    def __init__(self, in_channels: int, num_classes: int, blocks_per_stage: int, widths: Sequence[int]) -> None:
        super().__init__()
        # The stem keeps the full resolution: at 28-32 px, ImageNet's 7x7/2 conv + max-pool would leave 7x7.
        self.conv1 = conv3x3(in_channels, widths[0])
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        previous = widths[0]
        for index, width in enumerate(widths):
            stride = 1 if index == 0 else 2
            layer = [
                BasicBlock(previous, width, stride),
                *(BasicBlock(width, width) for _ in range(blocks_per_stage - 1)),
            ]
            self.add_module(f"layer{index + 1}", nn.Sequential(*layer))
            previous = width
        self.num_stages = len(widths)
        # Global average pooling: any image size gives one vector per channel, so the head needs no image_size.
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(previous, num_classes)

        for module in self.modules():  # torchvision's initialisation (He et al., 2015, for ReLU networks)
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def layers(self) -> list[nn.Sequential]:
        return [getattr(self, f"layer{index + 1}") for index in range(self.num_stages)]

    def blocks(self) -> list[nn.Module]:
        """The stem (conv1, bn1, relu: kept as separate attributes for torchvision's names), then each stage."""
        return [nn.Sequential(self.conv1, self.bn1, self.relu), *self.layers()]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)  # (B, widths[0], H, W)
        x = self.bn1(x)  # (B, widths[0], H, W)
        x = self.relu(x)  # (B, widths[0], H, W)
        for layer in self.layers():  # stage k: (B, widths[k], H / 2^k, W / 2^k)
            x = layer(x)  # (B, widths[k], H / 2^k, W / 2^k)
        x = self.avgpool(x)  # (B, widths[-1], 1, 1)
        x = torch.flatten(x, 1)  # (B, widths[-1])
        return self.fc(x)  # (B, num_classes)


@register_model("resnet", task="classifier")
def resnet(
    in_channels: int,
    image_size: int,
    num_classes: int,
    depth: Depth = 8,
    widths: StageWidths = (16, 32, 64),
) -> ResNet:
    """ResNet (He et al., 2016), CIFAR-style: 3x3 stem, three stages of BasicBlocks, global average pool, fc.

    `depth` = 6n + 2 (ResNet-20: n = 3, 0.27M parameters with widths 16/32/64); the default ResNet-8 and the
    paper's widths train on MNIST-sized data on a CPU. `image_size` does not change the network (GAP head).
    """
    return ResNet(in_channels, num_classes, (check_depth(depth) - 2) // 6, widths)
