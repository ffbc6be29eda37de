"""Networks: registry, output shapes, the conv output-size formula, and standardisation buffers."""

from __future__ import annotations

import pytest
import torch

from dlpipe.errors import DlpipeError
from dlpipe.models import count_trainable_parameters, get_model, get_spec, list_models
from dlpipe.models.layers import Standardize, conv_out_size


def test_registry_lists_models_with_tasks():
    assert {"cnn", "lenet5", "lstm", "gru"} <= set(list_models())
    assert get_spec("cnn").task == "classifier"
    assert get_spec("lstm").task == "forecaster"
    with pytest.raises(DlpipeError, match="unknown model 'vgg99'"):
        get_spec("vgg99")


@pytest.mark.parametrize(("name", "channels", "size"), [("cnn", 1, 28), ("cnn", 3, 32), ("cnn", 1, 8), ("lenet5", 1, 28), ("lenet5", 3, 32)])
def test_classifiers_give_one_logit_per_class(name, channels, size):
    net = get_model(name, in_channels=channels, image_size=size, num_classes=7).eval()
    assert net(torch.rand(5, channels, size, size)).shape == (5, 7)


@pytest.mark.parametrize("name", ["lstm", "gru"])
def test_forecasters_give_one_value_per_window(name):
    net = get_model(name, n_features=4, hidden=8, layers=2).eval()
    assert net(torch.randn(3, 15, 4)).shape == (3, 1)
    assert net(torch.randn(2, 40, 4)).shape == (2, 1)  # any window length


def test_forecaster_output_is_in_target_units():
    net = get_model("lstm", n_features=4, hidden=8, layers=1).eval()
    x = torch.randn(4, 10, 4)
    net.set_target_stats(mean=0.5, std=2.0)
    assert torch.allclose(net(x), net.forward_standardized(x) * 2.0 + 0.5)


def test_conv_output_size_formula():
    assert conv_out_size(28, kernel=5) == 24  # (28 - 5 + 0) / 1 + 1
    assert conv_out_size(32, kernel=3, stride=1, padding=1) == 32  # 'same'
    assert conv_out_size(28, kernel=2, stride=2) == 14


def test_lenet5_matches_paper_parameter_count():
    # LeNet-5 on 32x32 with 10 classes: 61,706 weights (conv 156 + 2,416; FC 48,120 + 10,164 + 850).
    assert count_trainable_parameters(get_model("lenet5", in_channels=1, image_size=32, num_classes=10)) == 61_706


def test_standardize_uses_stats_and_floors_zero_std():
    layer = Standardize((1, 2, 1, 1))
    layer.set_stats(torch.tensor([1.0, 2.0]), torch.tensor([2.0, 0.0]))
    x = torch.ones(1, 2, 1, 1) * 3
    out = layer(x)
    assert out[0, 0, 0, 0].item() == pytest.approx(1.0)
    assert torch.isfinite(out).all()
    assert "mean" in dict(layer.named_buffers()) and count_trainable_parameters(layer) == 0


def test_too_small_image_is_rejected():
    with pytest.raises(ValueError, match="too small"):
        get_model("cnn", in_channels=1, image_size=2, num_classes=10, channels=(8, 8, 8))
