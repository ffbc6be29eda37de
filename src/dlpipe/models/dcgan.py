"""DCGAN (Radford et al., 2016), as the course builds it on Fashion-MNIST: a generator that upsamples a
latent vector with transposed convolutions, and a discriminator that downsamples with strided
convolutions (no pooling), trained against each other by the generator task.

The generator's output is tanh, in [-1, 1]; the generator task maps it to pixels in [0, 1] (what the
classifiers take) for export. The discriminator takes pixels in [0, 1] as well and returns one logit.
Images of any size divisible by 4 (8x8 digits, 28x28 MNIST, 32x32 CIFAR-10), 1 or 3 channels.
"""

from __future__ import annotations

import torch
from torch import nn

from dlpipe.models.registry import PositiveInt, register_model

UPSAMPLINGS = 2  # the generator doubles the image size twice, so it starts at a quarter of it


def init_dcgan_weights(module: nn.Module) -> None:
    """The paper's initialisation: convolution weights from N(0, 0.02); batch-norm scales from N(1, 0.02)
    and shifts 0."""
    if isinstance(module, nn.Conv2d | nn.ConvTranspose2d | nn.Linear):
        nn.init.normal_(module.weight, 0.0, 0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.BatchNorm2d | nn.BatchNorm1d):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)


class Generator(nn.Module):
    """(B, latent_dim) -> (B, C, H, W) in [-1, 1]: a projection to a (4w, H/4, W/4) map, then transposed
    convolutions (stride 2) with batch norm and ReLU doubling the size twice, and tanh."""

    def __init__(self, latent_dim: int, channels: int, image_size: int, width: int) -> None:
        super().__init__()
        self.latent_dim, self.start = latent_dim, image_size // 2**UPSAMPLINGS
        self.project = nn.Sequential(
            nn.Linear(latent_dim, 4 * width * self.start * self.start, bias=False),
            nn.BatchNorm1d(4 * width * self.start * self.start),
            nn.ReLU(inplace=True),
        )
        self.upsample = nn.Sequential(
            # kernel 4, stride 2, padding 1: exactly doubles H and W
            nn.ConvTranspose2d(4 * width, 2 * width, kernel_size=4, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(2 * width),
            nn.ReLU(inplace=True),
            nn.ConvTranspose2d(2 * width, channels, kernel_size=4, stride=2, padding=1),
            nn.Tanh(),
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.project(z).view(z.shape[0], -1, self.start, self.start)  # (B, 4w, H/4, W/4)
        return self.upsample(x)  # (B, C, H, W)


class Discriminator(nn.Module):
    """(B, C, H, W) pixels in [0, 1] -> (B, 1) logit of "real": strided 4x4 convolutions (no pooling) with
    LeakyReLU(0.2), batch norm after the first, then one linear unit."""

    def __init__(self, channels: int, image_size: int, width: int) -> None:
        super().__init__()
        size = image_size // 2**UPSAMPLINGS
        self.features = nn.Sequential(
            nn.Conv2d(channels, 2 * width, kernel_size=4, stride=2, padding=1),  # H/2; no BN on the input layer
            nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(2 * width, 4 * width, kernel_size=4, stride=2, padding=1, bias=False),  # H/4
            nn.BatchNorm2d(4 * width),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Flatten(),
        )
        self.logit = nn.Linear(4 * width * size * size, 1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.logit(self.features(images * 2.0 - 1.0))  # the generator's [-1, 1] range, centred


@register_model("dcgan", task="generator")
class DCGAN(nn.Module):
    """DCGAN: transposed-convolution generator and strided-convolution discriminator (Radford et al., 2016)."""

    def __init__(
        self,
        in_channels: int,
        image_size: int,
        latent_dim: PositiveInt = 64,
        width: PositiveInt = 32,
    ) -> None:
        super().__init__()
        if image_size % 2**UPSAMPLINGS or image_size < 2**UPSAMPLINGS:
            raise ValueError(
                f"image_size {image_size} is not a positive multiple of {2**UPSAMPLINGS} (the generator doubles twice)"
            )
        self.latent_dim = latent_dim
        self.generator = Generator(latent_dim, in_channels, image_size, width)
        self.discriminator = Discriminator(in_channels, image_size, width)
        self.apply(init_dcgan_weights)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.generator(z)  # (B, latent_dim) -> (B, C, H, W) in [-1, 1]
