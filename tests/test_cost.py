"""Cost of a network (dlpipe.cost): FlopCounterMode's multiply-adds against hand counts, recurrent layers
included; the depthwise separable convolution against the textbook 1/N + 1/9; the `cost` stage's outputs."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from dlpipe.cost import compare_depthwise_separable, model_cost
from dlpipe.models import count_trainable_parameters, get_model, get_spec, list_models
from dlpipe.tasks import get_task


def test_conv_and_linear_net_is_the_hand_count():
    net = nn.Sequential(
        nn.Conv2d(2, 4, kernel_size=3, padding=1),  # 8x8 output
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.MaxPool2d(2),  # 4x4
        nn.Flatten(),
        nn.Dropout(0.5),
        nn.Linear(4 * 4 * 4, 5),
    )
    net[1].weight.requires_grad_(False)  # frozen: not trainable
    net.train()
    net[1].eval()  # as a fine-tuned network's frozen batch norm
    cost = model_cost(net, torch.randn(1, 2, 8, 8))
    conv_macs = 3 * 3 * 2 * 4 * 8 * 8  # K² · M · N · H · W
    linear_macs = 64 * 5
    assert cost == {
        "trainable_params": (2 * 4 * 9 + 4) + 4 + (64 * 5 + 5),  # conv, the BN bias, linear
        "multiply_adds": conv_macs + linear_macs,  # biases, BN, ReLU, pooling are not counted
    }
    assert [m.training for m in net] == [True, False, True, True, True, True, True]  # handed back as it came


def test_more_than_one_sample_is_refused():
    with pytest.raises(ValueError, match="batch 1"):
        model_cost(nn.Linear(3, 2), torch.zeros(2, 3))


def test_a_module_off_cpu_fp32_is_counted_on_a_copy():
    net = nn.Linear(6, 3).double()
    assert model_cost(net, torch.zeros(1, 6)) == {"trainable_params": 21, "multiply_adds": 18}
    assert net.weight.dtype == torch.float64


@pytest.mark.parametrize(("cell", "gates"), [("lstm", 4), ("gru", 3), ("rnn", 1)])
def test_recurrent_forecaster_is_the_hand_count(cell, gates):
    from dlpipe.models.rnn import RecurrentForecaster

    window, features, hidden = 7, 4, 8
    net = RecurrentForecaster(features, cell, hidden=hidden, layers=2, dropout=0.0)
    cost = model_cost(net, torch.zeros(1, window, features))
    # Per step: each gate is a (I + H) x H matrix product; the second layer's input is the first's H.
    per_step = gates * hidden * (features + hidden) + gates * hidden * (hidden + hidden)
    assert cost["multiply_adds"] == window * per_step + hidden * 1  # + the linear head on the last step
    assert cost["trainable_params"] == count_trainable_parameters(net)
    assert torch.backends.mkldnn.enabled == torch.backends.mkldnn.is_available()  # restored afterwards


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="needs oneDNN")
def test_flop_counter_alone_misses_the_fused_lstm_kernel():
    # Why model_cost disables oneDNN: this fails when PyTorch learns to count its LSTM kernel (then the
    # workaround and the module docstring can go).
    lstm = nn.LSTM(4, 8, batch_first=True).eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        lstm(torch.zeros(1, 5, 4))
    assert counter.get_total_flops() == 0
    assert model_cost(lstm, torch.zeros(1, 5, 4))["multiply_adds"] == 5 * 4 * 8 * (4 + 8)


def test_wrapped_cnn_is_the_hand_count():
    task = get_task("classifier")
    kwargs = {"in_channels": 1, "image_size": 28, "num_classes": 10}
    net = task.wrap(get_model("cnn", **kwargs, channels=(4, 8), hidden=16), kwargs)
    x = torch.from_numpy(task.synthetic_inputs(kwargs, 1, np.random.default_rng(0)))
    convs = 9 * 1 * 4 * 28 * 28 + 9 * 4 * 8 * 14 * 14  # 'same' convs; each block then halves H and W
    head = 8 * 7 * 7 * 16 + 16 * 10
    assert model_cost(net, x)["multiply_adds"] == convs + head  # input standardisation is element-wise


@pytest.mark.parametrize("name", list_models())
def test_every_registered_model_has_a_cost(name):
    task = get_task(get_spec(name).task)
    kwargs = task.example_data_kwargs()
    net = task.wrap(get_model(name, **kwargs), kwargs)
    x = torch.from_numpy(task.synthetic_inputs(kwargs, 1, np.random.default_rng(0)))
    cost = model_cost(net, x)
    assert cost["trainable_params"] == count_trainable_parameters(net) > 0
    assert cost["multiply_adds"] >= cost["trainable_params"] // 2  # every weight is used at least once (or shared)


def test_training_counts_one_sample_of_the_configured_shape(config):
    from dlpipe.train import _one_sample

    task = get_task("forecaster")
    train = config.train_params("lstm")  # window 10 in the tiny params, not the synthetic data's 20
    kwargs = {**task.example_data_kwargs(), **train.net}
    module = task.lightning_module(get_model("lstm", **kwargs), {"name": "lstm", "kwargs": kwargs}, train)
    assert tuple(_one_sample(task, module).shape) == (1, train.window, kwargs["n_features"])
    module.example_input_array = None  # a module without one: the task's synthetic input
    assert tuple(_one_sample(task, module).shape) == (1, 20, kwargs["n_features"])


@pytest.mark.parametrize(("m", "n", "size"), [(3, 5, 4), (8, 16, 6), (32, 64, 7)])
def test_depthwise_separable_ratio_is_the_textbook_one(m, n, size):
    row = compare_depthwise_separable(m, n, size, batch=2, repeats=3, warmup=0)
    hw = size * size
    assert row["standard_params"] == 9 * m * n
    assert row["separable_params"] == 9 * m + m * n
    assert row["standard_multiply_adds"] == 9 * m * n * hw
    assert row["separable_multiply_adds"] == 9 * m * hw + m * n * hw  # depthwise + pointwise
    assert row["multiply_adds_ratio"] == pytest.approx(1 / n + 1 / 9, rel=1e-12)
    assert row["params_ratio"] == pytest.approx(row["textbook_ratio"], rel=1e-12)
    assert row["standard_ms_p50"] > 0 and row["separable_ms_p50"] > 0
    assert 0 < row["time_ratio_q1"] <= row["time_ratio"] <= row["time_ratio_q3"]


def test_cost_stage_writes_table_and_figure(config):
    from dlpipe import stages

    threads = torch.get_num_threads()
    table = stages.cost(config)
    params = config.params.cost
    assert table["torch_threads"] == params.threads and torch.get_num_threads() == threads  # restored
    written = json.loads(config.paths.depthwise_json.read_text())
    assert written == json.loads(json.dumps(table))
    shapes = [(r["in_channels"], r["out_channels"], r["size"]) for r in written["rows"]]
    assert shapes == [(m, n, size) for m, n in params.channels for size in params.sizes]
    assert written["batch"] == params.batch and written["repeats"] == params.repeats
    for row in written["rows"]:
        assert row["multiply_adds_ratio"] == pytest.approx(row["textbook_ratio"])
    assert config.paths.depthwise_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in config.paths.cost.iterdir()) == ["depthwise.json", "depthwise.png"]  # no temps
    assert "cost" in stages.STAGES and "cost" not in stages.MODEL_STAGES


def test_cost_stage_failing_midway_keeps_the_previous_pair(config, monkeypatch):
    from dlpipe import cost, stages

    stages.cost(config)
    before = {path: path.read_bytes() for path in (config.paths.depthwise_json, config.paths.depthwise_png)}

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(cost, "plot_depthwise", disk_full)  # after the table is written into the temporary dir
    with pytest.raises(OSError, match="No space left"):
        stages.cost(config)
    assert {path: path.read_bytes() for path in before} == before
    assert sorted(p.name for p in config.paths.reports.iterdir()) == ["cost"]  # no temporary directories left
