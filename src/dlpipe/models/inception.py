"""GoogLeNet (Szegedy et al., 2015) for small images: Inception modules, global average pooling, side heads.

An Inception module runs four branches on the same input and concatenates them along channels: a 1x1 conv, a
1x1 reduction then a 3x3, a 1x1 reduction then a 5x5, and a 3x3 max-pool then a 1x1 projection. The 1x1
reductions are what make it affordable: a 5x5 applied to all input channels would cost (C_in / reduce) times
more. Two auxiliary classifiers on intermediate modules add gradient to the middle of the network while
training (their loss weighted 0.3) and are not part of the exported inference graph.

Scaled for 8-32 px images: the stem is one 3x3 conv and a max-pool (ImageNet's takes 224 to 28 before the
first module; here 28 -> 14), module widths are the paper's at a quarter, and five of its nine modules
are kept (3a; 4a, 4b, 4c; 5a): each module is some 25 small ops, and on a CPU their count, more than their
multiply-adds, sets the training time. Every conv is followed by BatchNorm (as in torchvision's GoogLeNet; the paper
predates it): it lets the network train from scratch in a few epochs.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from dlpipe.models.layers import AuxiliaryOutput, ConvBNAct
from dlpipe.models.registry import DropoutRate, NonNegativeFloat, register_model


class InceptionWidths(NamedTuple):
    """Widths of a module's convs (GoogLeNet's table 1 columns); it outputs the four branches' channels."""

    ch1x1: int
    ch3x3red: int
    ch3x3: int
    ch5x5red: int
    ch5x5: int
    pool_proj: int

    @property
    def out_channels(self) -> int:
        return self.ch1x1 + self.ch3x3 + self.ch5x5 + self.pool_proj


# GoogLeNet's table 1 at a quarter width (paper values / 4, rounded), without 3b, 4d, 4e and 5b. The comment
# after each row is the module's output width.
STEM_WIDTH = 32
INCEPTION_SETTINGS: dict[str, InceptionWidths] = {
    "3a": InceptionWidths(16, 24, 32, 4, 8, 8),  # 64
    "4a": InceptionWidths(48, 24, 52, 4, 12, 16),  # 128
    "4b": InceptionWidths(40, 28, 56, 6, 16, 16),  # 128
    "4c": InceptionWidths(32, 32, 64, 6, 16, 16),  # 128
    "5a": InceptionWidths(64, 40, 80, 8, 32, 32),  # 208
}
AUX_WIDTHS = (32, 256)  # side head's 1x1 conv and hidden FC (the paper's 128 and 1024, at a quarter)
AUX_DROPOUT = 0.7  # the paper's rate for the side heads


class Inception(nn.Module):
    """Four parallel branches (1x1; 1x1 -> 3x3; 1x1 -> 5x5; max-pool -> 1x1), concatenated along channels."""

    def __init__(self, in_channels: int, widths: InceptionWidths) -> None:
        super().__init__()
        self.branch1 = ConvBNAct(in_channels, widths.ch1x1, 1)
        self.branch2 = nn.Sequential(
            ConvBNAct(in_channels, widths.ch3x3red, 1), ConvBNAct(widths.ch3x3red, widths.ch3x3, 3)
        )
        self.branch3 = nn.Sequential(
            ConvBNAct(in_channels, widths.ch5x5red, 1), ConvBNAct(widths.ch5x5red, widths.ch5x5, 5)
        )
        self.branch4 = nn.Sequential(
            nn.MaxPool2d(kernel_size=3, stride=1, padding=1), ConvBNAct(in_channels, widths.pool_proj, 1)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branch1 = self.branch1(x)  # (B, ch1x1, H, W)
        branch2 = self.branch2(x)  # (B, ch3x3, H, W)
        branch3 = self.branch3(x)  # (B, ch5x5, H, W)
        branch4 = self.branch4(x)  # (B, pool_proj, H, W)
        return torch.cat([branch1, branch2, branch3, branch4], dim=1)  # (B, out_channels, H, W)


class InceptionAux(nn.Module):
    """Side classifier: average pool -> 1x1 conv -> FC -> ReLU -> dropout -> FC (GoogLeNet's auxiliary head)."""

    def __init__(self, in_channels: int, num_classes: int) -> None:
        super().__init__()
        conv_width, hidden = AUX_WIDTHS
        # The paper pools 14x14 to 4x4 (5x5, stride 3); small maps (2-7 px here) are pooled to 2x2.
        self.avgpool = nn.AdaptiveAvgPool2d((2, 2))
        self.conv = ConvBNAct(in_channels, conv_width, 1)
        self.fc1 = nn.Linear(conv_width * 2 * 2, hidden)
        self.relu = nn.ReLU(inplace=True)
        self.dropout = nn.Dropout(AUX_DROPOUT)
        self.fc2 = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.avgpool(x)  # (B, C, 2, 2)
        x = self.conv(x)  # (B, 32, 2, 2)
        x = torch.flatten(x, 1)  # (B, 128)
        x = self.fc1(x)  # (B, 256)
        x = self.relu(x)  # (B, 256)
        x = self.dropout(x)  # (B, 256)
        return self.fc2(x)  # (B, num_classes)


class GoogLeNet(nn.Module):
    """GoogLeNet: stem, Inception modules 3a, 4a-4c, 5a with max-pools between stages, GAP, dropout, fc; side heads."""

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        settings: dict[str, InceptionWidths],
        aux_weight: float,
        dropout: float,
    ) -> None:
        super().__init__()
        self.aux_weight = aux_weight
        # 3x3/2 max-pools with padding 1 halve any size, rounding up (28 -> 14 -> 7 -> 4; 8 -> 4 -> 2 -> 1).
        self.conv1 = ConvBNAct(in_channels, STEM_WIDTH, 3)
        self.maxpool1 = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.inception3a = Inception(STEM_WIDTH, settings["3a"])
        self.maxpool3 = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.inception4a = Inception(settings["3a"].out_channels, settings["4a"])
        self.inception4b = Inception(settings["4a"].out_channels, settings["4b"])
        self.inception4c = Inception(settings["4b"].out_channels, settings["4c"])
        self.maxpool4 = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.inception5a = Inception(settings["4c"].out_channels, settings["5a"])
        # Side heads on the first and the last module of stage 4 (the paper: 4a and 4d, the last but one of
        # its five); none at all when their loss weight is 0.
        self.aux1: InceptionAux | None = None
        self.aux2: InceptionAux | None = None
        if aux_weight > 0:
            self.aux1 = InceptionAux(settings["4a"].out_channels, num_classes)
            self.aux2 = InceptionAux(settings["4c"].out_channels, num_classes)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))  # global average pooling instead of FC layers (the paper's)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(settings["5a"].out_channels, num_classes)

    def blocks(self) -> list[nn.Module]:
        """The stem conv, then the Inception modules in order (the max-pools between them have no parameters)."""
        return [
            self.conv1,
            self.inception3a,
            self.inception4a,
            self.inception4b,
            self.inception4c,
            self.inception5a,
        ]

    def forward(self, x: torch.Tensor) -> torch.Tensor | AuxiliaryOutput:
        side_heads = self.training and self.aux1 is not None and self.aux2 is not None  # eval: one output
        x = self.conv1(x)  # (B, 32, H, W)
        x = self.maxpool1(x)  # (B, 32, H / 2, W / 2)
        x = self.inception3a(x)  # (B, 64, H / 2, W / 2)
        x = self.maxpool3(x)  # (B, 64, H / 4, W / 4)
        x = self.inception4a(x)  # (B, 128, H / 4, W / 4)
        aux1 = self.aux1(x) if side_heads else None  # (B, num_classes) while training
        x = self.inception4b(x)  # (B, 128, H / 4, W / 4)
        x = self.inception4c(x)  # (B, 128, H / 4, W / 4)
        aux2 = self.aux2(x) if side_heads else None  # (B, num_classes) while training
        x = self.maxpool4(x)  # (B, 128, H / 8, W / 8)
        x = self.inception5a(x)  # (B, 208, H / 8, W / 8)
        x = self.avgpool(x)  # (B, 208, 1, 1)
        x = torch.flatten(x, 1)  # (B, 208)
        x = self.dropout(x)  # (B, 208)
        logits = self.fc(x)  # (B, num_classes)
        if side_heads:  # training: the task adds aux_weight * CE of each side head to the loss
            return AuxiliaryOutput(logits, (aux1, aux2), self.aux_weight)  # (B, num_classes) x 3
        return logits  # (B, num_classes)


@register_model("inception", task="classifier")
def inception(
    in_channels: int,
    image_size: int,
    num_classes: int,
    aux_weight: NonNegativeFloat = 0.3,
    dropout: DropoutRate = 0.4,
) -> GoogLeNet:
    """GoogLeNet / Inception v1 (Szegedy et al., 2015): Inception modules, GAP, dropout, fc; two side classifiers.

    While training, the side heads' cross-entropy is added with weight `aux_weight` (0.3 in the paper; 0
    removes them). In eval mode, and so in the exported ONNX graph, only the main logits come out. `dropout`
    (0.4 in the paper) acts before fc. `image_size` does not change the network (GAP head).
    """
    return GoogLeNet(in_channels, num_classes, INCEPTION_SETTINGS, aux_weight, dropout)
