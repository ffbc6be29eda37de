"""MobileNet v1 and v2: networks built from depthwise separable convolutions.

A standard k x k convolution from C to C' channels costs k^2 C C' multiply-adds per pixel; a depthwise k x k
(one filter per channel, groups = C) followed by a pointwise 1x1 costs k^2 C + C C', about 8-9 times less for
3x3 kernels (Howard et al., 2017). v2 (Sandler et al., 2018) wraps the depthwise conv in an inverted residual:
expand with a 1x1, filter depthwise, project back to a narrow linear bottleneck, add the input when shapes match.

Both settings tables are the ImageNet ones scaled for 8-32 px images. The stem keeps ImageNet's stride 2 but
only two table rows downsample after it (ImageNet's have four: 224 -> 7), so a 28x28 digit ends at 4x4
rather than vanishing; every depthwise conv then runs at 14x14 or less, which keeps them cheap on a CPU,
where depthwise kernels are slow per multiply-add. v1's widths are half ImageNet's, and both have fewer
repeated layers, so that the default (`width_mult: 1.0`) trains on MNIST-sized data on a CPU.
"""

from __future__ import annotations

import torch
from torch import nn

from dlpipe.models.layers import ConvBNAct, make_divisible
from dlpipe.models.registry import DropoutRate, PositiveFloat, register_model

# v1: the stem's (width, stride), then (output width, stride) of each depthwise separable layer. ImageNet's
# table at half width (16-256 here for 32-1024), its fifth stride-2 layer made stride 1, its five repeated
# 512-wide layers cut to one and its final 1024-wide pair dropped: 28 -> 14 (stem) -> 7 -> 4.
MOBILENET_V1_STEM = (16, 2)
MOBILENET_V1_SETTINGS: list[tuple[int, int]] = [
    (32, 1),
    (64, 2),
    (64, 1),
    (128, 2),
    (128, 1),
    (256, 1),
    (256, 1),
]

# v2: the stem's (width, stride), then (expansion t, output channels c, repeats n, stride s of the first
# repeat). ImageNet's first five rows (16-96 channels) with the 64-channel row at stride 1 and fewer repeats
# (2 instead of 4, 1 instead of 3); its 160- and 320-channel rows are dropped: 28 -> 14 (stem) -> 7 -> 4.
MOBILENET_V2_STEM = (32, 2)
MOBILENET_V2_SETTINGS: list[tuple[int, int, int, int]] = [
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 2, 1),
    (6, 96, 1, 1),
]
MOBILENET_V2_LAST = 320  # the final 1x1 conv's width (ImageNet: 1280, for 1,000 classes)


class DepthwiseSeparable(nn.Sequential):
    """Depthwise 3x3 conv-BN-ReLU (one filter per channel: groups = channels), then pointwise 1x1 conv-BN-ReLU."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__(
            ConvBNAct(in_channels, in_channels, 3, stride, groups=in_channels),  # filters space, per channel
            ConvBNAct(in_channels, out_channels, 1),  # mixes channels, per pixel
        )


class InvertedResidual(nn.Module):
    """1x1 expansion (ReLU6) -> depthwise 3x3 (ReLU6) -> 1x1 linear bottleneck, plus the input when shapes match.

    The projection has no activation: a ReLU in the narrow bottleneck would destroy information that the
    residual path carries (Sandler et al., section 3.2). The residual exists only for stride 1 and equal widths.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int, expansion: int) -> None:
        super().__init__()
        hidden = in_channels * expansion
        self.use_residual = stride == 1 and in_channels == out_channels
        layers: list[nn.Module] = []
        if expansion != 1:  # t = 1 (the first row) would be a 1x1 from C to C: skipped, as in the paper's code
            layers.append(ConvBNAct(in_channels, hidden, 1, activation=nn.ReLU6))
        layers += [
            ConvBNAct(hidden, hidden, 3, stride, groups=hidden, activation=nn.ReLU6),
            ConvBNAct(hidden, out_channels, 1, activation=None),  # linear bottleneck
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv(x)  # (B, C_out, H / s, W / s)
        if self.use_residual:  # stride 1 and C_out == C_in: (B, C_in, H, W)
            out = out + x  # (B, C_in, H, W): the residual between bottlenecks
        return out  # (B, C_out, H / s, W / s)


class _MobileNet(nn.Module):
    """What both MobileNets share: a `features` stack, global average pooling, dropout and `fc`."""

    def _add_head(self, layers: list[nn.Module], width: int, num_classes: int, dropout: float) -> None:
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(width, num_classes)
        _init_weights(self)

    def blocks(self) -> list[nn.Module]:
        return list(self.features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)  # (B, C_last, H / 8, W / 8) rounded up
        x = self.avgpool(x)  # (B, C_last, 1, 1)
        x = torch.flatten(x, 1)  # (B, C_last)
        x = self.dropout(x)  # (B, C_last)
        return self.fc(x)  # (B, num_classes)


class MobileNetV1(_MobileNet):
    """MobileNet v1: a 3x3 stem, depthwise separable layers from a (width, stride) table, GAP, fc."""

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        settings: list[tuple[int, int]],
        stem: tuple[int, int],
        width_mult: float,
        dropout: float,
    ) -> None:
        super().__init__()
        previous = make_divisible(stem[0] * width_mult)
        layers: list[nn.Module] = [ConvBNAct(in_channels, previous, 3, stem[1])]  # a standard conv: in_channels is 1-3
        for width, stride in settings:
            width = make_divisible(width * width_mult)
            layers.append(DepthwiseSeparable(previous, width, stride))
            previous = width
        self._add_head(layers, previous, num_classes, dropout)


class MobileNetV2(_MobileNet):
    """MobileNet v2: a 3x3 stem, inverted residual blocks from a (t, c, n, s) table, 1x1 conv, GAP, dropout, fc."""

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        settings: list[tuple[int, int, int, int]],
        stem: tuple[int, int],
        last: int,
        width_mult: float,
        dropout: float,
    ) -> None:
        super().__init__()
        previous = make_divisible(stem[0] * width_mult)
        layers: list[nn.Module] = [ConvBNAct(in_channels, previous, 3, stem[1], activation=nn.ReLU6)]
        for expansion, channels, repeats, stride in settings:
            width = make_divisible(channels * width_mult)
            for repeat in range(repeats):  # only the first repeat of a row changes the resolution
                layers.append(InvertedResidual(previous, width, stride if repeat == 0 else 1, expansion))
                previous = width
        last = make_divisible(last * width_mult)
        layers.append(ConvBNAct(previous, last, 1, activation=nn.ReLU6))
        self._add_head(layers, last, num_classes, dropout)


def _init_weights(net: nn.Module) -> None:
    # torchvision's MobileNet initialisation: He (fan-out) for convs, unit BN, small normal for the classifier.
    for module in net.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out")
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, 0.0, 0.01)
            nn.init.zeros_(module.bias)


@register_model("mobilenet_v1", task="classifier")
def mobilenet_v1(
    in_channels: int,
    image_size: int,
    num_classes: int,
    width_mult: PositiveFloat = 1.0,
    dropout: DropoutRate = 0.0,
) -> MobileNetV1:
    """MobileNet v1 (Howard et al., 2017): depthwise separable convs (depthwise 3x3 + pointwise 1x1), GAP, fc.

    `width_mult` scales every layer's channels (rounded to a multiple of 8); parameters and multiply-adds
    shrink roughly with its square. `dropout` before fc is off by default: the paper regularised its small
    models less, as they overfit less. `image_size` does not change the network (GAP head).
    """
    return MobileNetV1(in_channels, num_classes, MOBILENET_V1_SETTINGS, MOBILENET_V1_STEM, width_mult, dropout)


@register_model("mobilenet_v2", task="classifier")
def mobilenet_v2(
    in_channels: int,
    image_size: int,
    num_classes: int,
    width_mult: PositiveFloat = 1.0,
    dropout: DropoutRate = 0.2,
) -> MobileNetV2:
    """MobileNet v2 (Sandler et al., 2018): inverted residuals with linear bottlenecks, GAP, dropout, fc.

    `width_mult` scales every layer's channels (rounded to a multiple of 8, as in the paper); parameters and
    multiply-adds shrink roughly with its square. `dropout` (0.2 in the paper) acts before the classifier.
    """
    return MobileNetV2(
        in_channels,
        num_classes,
        MOBILENET_V2_SETTINGS,
        MOBILENET_V2_STEM,
        MOBILENET_V2_LAST,
        width_mult,
        dropout,
    )
