"""Networks: registry, builder type hints as the net-params schema, output shapes, the conv output-size
formula, and the task wrappers' scaling buffers."""

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


@pytest.mark.parametrize(
    ("name", "channels", "size"), [("cnn", 1, 28), ("cnn", 3, 32), ("cnn", 1, 8), ("lenet5", 1, 28), ("lenet5", 3, 32)]
)
def test_classifiers_give_one_logit_per_class(name, channels, size):
    net = get_model(name, in_channels=channels, image_size=size, num_classes=7).eval()
    assert net(torch.rand(5, channels, size, size)).shape == (5, 7)


@pytest.mark.parametrize("name", ["lstm", "gru"])
def test_forecasters_give_one_value_per_window(name):
    net = get_model(name, n_features=4, hidden=8, layers=2).eval()
    assert net(torch.randn(3, 15, 4)).shape == (3, 1)
    assert net(torch.randn(2, 40, 4)).shape == (2, 1)  # any window length


def test_forecaster_wrapper_returns_target_units():
    from dlpipe.tasks import get_task

    wrapped = get_task("forecaster").wrap(get_model("lstm", n_features=4, hidden=8, layers=1), {"n_features": 4}).eval()
    x = torch.randn(4, 10, 4)
    wrapped.set_target_stats(mean=0.5, std=2.0)
    assert torch.allclose(wrapped(x), wrapped.forward_standardized(x) * 2.0 + 0.5)


def test_classifier_wrapper_standardises_before_the_network():
    from dlpipe.tasks import get_task

    net = get_model("cnn", in_channels=1, image_size=8, num_classes=3).eval()
    wrapped = get_task("classifier").wrap(net, {"in_channels": 1}).eval()
    wrapped.standardize.set_stats(torch.tensor([0.5]), torch.tensor([0.25]))
    x = torch.rand(2, 1, 8, 8)
    assert torch.allclose(wrapped(x), net((x - 0.5) / 0.25))


def test_networks_carry_no_scaling_state():
    """Pure architecture: the scaling lives in the task's wrapper, so no network has a `standardize` part."""
    for name in list_models():
        from dlpipe.tasks import get_task

        net = get_model(name, **get_task(get_spec(name).task).example_data_kwargs())
        assert not [key for key in net.state_dict() if "standardize" in key or "target_" in key], name


@pytest.mark.parametrize(
    ("name", "net", "key", "message"),
    [
        ("cnn", {"channels": "abc"}, "channels", "Sequence"),
        ("cnn", {"channels": []}, "channels", "at least 1"),
        ("cnn", {"channels": [32, -1]}, "channels.1", "greater than 0"),
        ("cnn", {"hidden": -5}, "hidden", "greater than 0"),
        ("cnn", {"dropout": 1.5}, "dropout", "less than 1"),
        ("cnn", {"widths": [8]}, "widths", "not a parameter of cnn"),
        ("cnn", {"num_classes": 3}, "num_classes", "not a parameter of cnn"),  # comes from the data
        ("lstm", {"layers": 0}, "layers", "greater than 0"),
        ("lstm", {"hidden": "big"}, "hidden", "valid integer"),
    ],
)
def test_net_values_are_checked_against_builder_type_hints(name, net, key, message):
    from dlpipe.tasks import get_task

    spec = get_spec(name)
    with pytest.raises(DlpipeError) as caught:
        spec.validate_net(net, get_task(spec.task).data_kwargs, where="train.x.net")
    assert str(caught.value).startswith(f"train.x.net.{key}: ") and message in str(caught.value)


def test_valid_net_values_are_coerced_to_the_hinted_types():
    from dlpipe.tasks import get_task

    checked = get_spec("cnn").validate_net(
        {"channels": [8, 16], "dropout": 0}, get_task("classifier").data_kwargs, "net"
    )
    assert checked == {"channels": [8, 16], "dropout": 0.0} and isinstance(checked["dropout"], float)


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
