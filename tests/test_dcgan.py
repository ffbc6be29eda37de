"""The DCGAN networks as the paper builds them, without training: the generator's output shape and tanh
range for every image size the pipeline meets, the refusal of sizes it cannot reach by doubling twice, a
discriminator of strided convolutions (no pooling) with LeakyReLU and one logit, a generator of transposed
convolutions with batch norm and ReLU, the N(0, 0.02) initialisation (checked statistically on wide
layers), and the generator task's map from tanh to pixels in [0, 1]."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from dlpipe.models import get_model
from dlpipe.models.dcgan import DCGAN, init_dcgan_weights
from dlpipe.tasks.generator import PixelGenerator

SIZES = [8, 28, 32]  # 8x8 digits, 28x28 MNIST, 32x32 CIFAR-10
CHANNELS = [1, 3]
INIT_STD = 0.02
SIGMAS = 6  # bounds on the sample statistics, in standard errors: a false alarm about once in 10^9 runs


def dcgan(in_channels: int, image_size: int, **kwargs) -> DCGAN:
    torch.manual_seed(0)
    return get_model("dcgan", in_channels=in_channels, image_size=image_size, **kwargs)


@pytest.mark.parametrize("channels", CHANNELS)
@pytest.mark.parametrize("size", SIZES)
def test_generator_output_shape_and_tanh_range(size, channels):
    net = dcgan(channels, size, latent_dim=16, width=8)
    assert net.latent_dim == 16
    for mode in (net.train, net.eval):
        mode()
        with torch.no_grad():
            out = net.generator(torch.randn(5, 16))
            wide = net(torch.randn(5, 16) * 100)  # saturates tanh
        assert out.shape == (5, channels, size, size)
        assert wide.shape == (5, channels, size, size)
        for images in (out, wide):
            assert torch.isfinite(images).all()
            assert images.min() >= -1.0 and images.max() <= 1.0
        assert out.min() < 0 < out.max()  # centred on 0, not already pixels in [0, 1]


@pytest.mark.parametrize("size", [6, 10, 30, 2, 0, -4])
def test_image_size_not_reachable_by_doubling_twice_is_refused(size):
    with pytest.raises(ValueError, match=rf"image_size {size} is not a positive multiple of 4"):
        get_model("dcgan", in_channels=1, image_size=size)


def test_smallest_image_size_is_accepted():
    net = dcgan(1, 4, latent_dim=8, width=4).eval()
    with torch.no_grad():
        assert net(torch.randn(2, 8)).shape == (2, 1, 4, 4)


@pytest.mark.parametrize("channels", CHANNELS)
@pytest.mark.parametrize("size", SIZES)
def test_discriminator_strided_convolutions_leaky_relu_one_logit(size, channels):
    net = dcgan(channels, size, latent_dim=16, width=8)
    discriminator = net.discriminator
    modules = list(discriminator.modules())
    pooling = [m for m in modules if type(m).__module__ == nn.modules.pooling.__name__]
    assert pooling == []
    convolutions = [m for m in modules if isinstance(m, nn.modules.conv._ConvNd)]
    assert len(convolutions) == 2
    for conv in convolutions:
        assert type(conv) is nn.Conv2d  # no transposed convolutions in the discriminator
        assert conv.stride == (2, 2)
    activations = [m for m in modules if isinstance(m, nn.ReLU | nn.LeakyReLU | nn.Tanh | nn.Sigmoid)]
    assert activations and all(isinstance(m, nn.LeakyReLU) for m in activations)
    assert all(m.negative_slope == pytest.approx(0.2) for m in activations)
    # The first layer sees the pixels without batch norm (the paper); the second is normalised.
    assert sum(isinstance(m, nn.BatchNorm2d) for m in modules) == 1
    pixels = torch.rand(6, channels, size, size)  # pixels in [0, 1], as the classifiers take
    for mode in (discriminator.train, discriminator.eval):
        mode()
        with torch.no_grad():
            logits = discriminator(pixels)
        assert logits.shape == (6, 1)
        assert torch.isfinite(logits).all()


def test_discriminator_takes_pixels_in_unit_range():
    """It centres [0, 1] pixels to the generator's [-1, 1] range itself: its first convolution sees 2x - 1."""
    net = dcgan(1, 8, latent_dim=8, width=4).eval()
    seen = []
    net.discriminator.features[0].register_forward_hook(lambda m, inputs, out: seen.append(inputs[0]))
    pixels = torch.rand(3, 1, 8, 8)
    with torch.no_grad():
        net.discriminator(pixels)
    torch.testing.assert_close(seen[0], pixels * 2 - 1)


@pytest.mark.parametrize("size", SIZES)
def test_generator_transposed_convolutions_batch_norm_relu(size):
    net = dcgan(3, size, latent_dim=16, width=8)
    modules = list(net.generator.modules())
    transposed = [m for m in modules if isinstance(m, nn.ConvTranspose2d)]
    assert len(transposed) == 2
    assert all(m.stride == (2, 2) for m in transposed)  # each doubles H and W
    assert not any(type(m) is nn.Conv2d for m in modules)
    assert any(isinstance(m, nn.BatchNorm2d) for m in modules)
    assert any(isinstance(m, nn.ReLU) for m in modules)
    assert not any(isinstance(m, nn.LeakyReLU) for m in modules)
    assert isinstance(modules[-1], nn.Tanh)  # the output layer
    # Batch norm then ReLU after every transposed convolution but the output one.
    upsample = list(net.generator.upsample)
    first = upsample.index(transposed[0])
    assert isinstance(upsample[first + 1], nn.BatchNorm2d) and isinstance(upsample[first + 2], nn.ReLU)
    assert isinstance(upsample[upsample.index(transposed[1]) + 1], nn.Tanh)


def _assert_normal(values: torch.Tensor, mean: float, std: float, name: str) -> None:
    """`values` look drawn from N(mean, std): sample mean and std within SIGMAS standard errors."""
    values = values.detach().double().flatten()
    n = values.numel()
    assert n >= 1000, f"{name}: {n} values is too few to judge"
    sample_mean, sample_std = float(values.mean()), float(values.std())
    assert abs(sample_mean - mean) < SIGMAS * std / math.sqrt(n), f"{name}: mean {sample_mean}"
    assert abs(sample_std - std) < SIGMAS * std / math.sqrt(2 * n), f"{name}: std {sample_std}"
    # Normal, not uniform with the same std: about 68.3% within one std (uniform: 57.7%).
    within = float(((values - mean).abs() < std).double().mean())
    assert abs(within - 0.6827) < SIGMAS * math.sqrt(0.6827 * 0.3173 / n), f"{name}: {within} within 1 std"


def test_dcgan_initialisation():
    net = dcgan(3, 32, latent_dim=64, width=32)  # wide layers: the statistics are sharp
    weighted = [
        (name, m) for name, m in net.named_modules() if isinstance(m, nn.Conv2d | nn.ConvTranspose2d | nn.Linear)
    ]
    assert len(weighted) == 6  # projection + 2 transposed convolutions; 2 convolutions + the logit
    checked = 0
    for name, module in weighted:
        if module.weight.numel() >= 1000:
            _assert_normal(module.weight, 0.0, INIT_STD, name)
            checked += 1
        if module.bias is not None:
            assert torch.count_nonzero(module.bias) == 0, name
    assert checked >= 5
    norms = [(name, m) for name, m in net.named_modules() if isinstance(m, nn.BatchNorm1d | nn.BatchNorm2d)]
    assert len(norms) == 3
    scales = torch.cat([m.weight.detach().flatten() for _, m in norms])
    _assert_normal(scales, 1.0, INIT_STD, "batch-norm scales")
    for name, module in norms:
        assert torch.count_nonzero(module.bias) == 0, name


def test_init_dcgan_weights_replaces_default_initialisation():
    torch.manual_seed(0)
    layer = nn.Linear(512, 512)
    norm = nn.BatchNorm2d(4096)
    before = float(layer.weight.detach().std())
    assert abs(before - INIT_STD) > 0.005  # PyTorch's default (Kaiming uniform) is not N(0, 0.02)
    for module in (layer, norm):
        init_dcgan_weights(module)
    _assert_normal(layer.weight, 0.0, INIT_STD, "linear")
    assert torch.count_nonzero(layer.bias) == 0
    _assert_normal(norm.weight, 1.0, INIT_STD, "batch norm")
    assert torch.count_nonzero(norm.bias) == 0


@pytest.mark.parametrize("channels", CHANNELS)
def test_pixel_generator_maps_tanh_to_unit_pixels(channels):
    net = dcgan(channels, 28, latent_dim=16, width=8).eval()
    pixels = PixelGenerator(net.generator).eval()
    assert pixels.latent_dim == 16
    z = torch.randn(7, 16)
    with torch.no_grad():
        out, raw = pixels(z), net.generator(z)
        saturated = pixels(z * 1000)
    assert out.shape == (7, channels, 28, 28)
    assert torch.equal(out, (raw + 1.0) / 2.0)  # exactly (tanh + 1) / 2
    for images in (out, saturated):
        assert images.min() >= 0.0 and images.max() <= 1.0
    assert saturated.min() < 0.01 and saturated.max() > 0.99  # the whole range is reachable
