"""The forecaster task on the committed prices of both tickers: the network it builds (shared, or one per
ticker), the loss switch, and the real inputs it exports and checks parity with. No training: modules are
built and run on one batch."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.nn import functional

from conftest import tiny_params, write_project
from dlpipe.config import load_config
from dlpipe.data.stocks import FEATURES, load_stock_data, ticker_inputs
from dlpipe.errors import DlpipeError
from dlpipe.stages import fetch_stocks
from dlpipe.tasks import get_task
from dlpipe.tasks.forecaster import PerTickerNetworks, ScaledForecaster
from dlpipe.tasks.forecaster_training import ForecasterModule

WINDOW = 10  # train.lstm.window in the tiny project
N_TICKERS = 2  # GOOG and MSFT
N_INPUTS = len(FEATURES) + N_TICKERS
# self.log outside a Trainer only warns; the steps are called directly here.
no_trainer_warning = pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`")


@pytest.fixture
def task():
    return get_task("forecaster")


def fetched(config):
    fetch_stocks(config)
    return config


def project_with(tmp_path, **lstm):
    """The tiny project with train.lstm changed, its prices fetched."""
    params = tiny_params()
    params["train"]["lstm"].update(lstm)
    return fetched(load_config(write_project(tmp_path / "project", params)))


def real_batch(datamodule, per_ticker: int = 8) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """The first `per_ticker` validation windows of each ticker: inputs (with ticker columns), targets, tickers."""
    data = datamodule.setup()
    pooled = data.pooled("val")
    rows = np.concatenate([np.flatnonzero(pooled.ticker == i)[:per_ticker] for i in range(len(data.tickers))])
    inputs = ticker_inputs(pooled, len(data.tickers))[rows]
    return torch.from_numpy(np.ascontiguousarray(inputs)), torch.from_numpy(pooled.y[rows]), pooled.ticker[rows]


# ---------------------------------------------------------------- the network it builds


def test_build_shared_takes_features_and_ticker_columns(config, task):
    module, datamodule = task.build(fetched(config), "lstm")
    assert isinstance(module, ForecasterModule)
    assert isinstance(module.model, ScaledForecaster)
    assert not isinstance(module.model.net, PerTickerNetworks)
    assert module.model.net.recurrent.input_size == N_INPUTS
    assert tuple(module.example_input_array.shape) == (1, WINDOW, N_INPUTS)
    assert datamodule.setup().tickers == ["GOOG", "MSFT"]
    # The standardisation inside the graph is the training statistics, one per input column.
    mean, std, target_mean, target_std = datamodule.feature_stats()
    np.testing.assert_allclose(module.model.standardize.mean.reshape(-1).numpy(), mean)
    np.testing.assert_allclose(module.model.standardize.std.reshape(-1).numpy(), std, rtol=1e-6)
    assert module.model.target_mean.item() == pytest.approx(target_mean)
    assert module.model.target_std.item() == pytest.approx(target_std)

    x, _, tickers = real_batch(datamodule)
    module.eval()
    with torch.no_grad():
        out = module(x)
        assert out.shape == (len(x), 1)
        assert torch.isfinite(out).all()
        # One network for both: the ticker columns are an input that moves the forecast.
        swapped = x.clone()
        swapped[:, :, len(FEATURES) :] = swapped[:, :, len(FEATURES) :].flip(-1)
        assert not torch.allclose(module(swapped), out)
        with pytest.raises(RuntimeError):
            module(x[:, :, : len(FEATURES)])  # the features alone are not the model's input


def test_build_per_ticker_has_one_network_per_ticker(tmp_path, task):
    config = project_with(tmp_path, tickers="per_ticker")
    module, _ = task.build(config, "lstm")
    net = module.model.net
    assert isinstance(net, PerTickerNetworks)
    assert len(net.networks) == N_TICKERS
    for network in net.networks:
        assert network.recurrent.input_size == N_INPUTS
    # Separate weights, not one module listed twice.
    first, second = (dict(n.named_parameters()) for n in net.networks)
    assert all(first[name].data_ptr() != second[name].data_ptr() for name in first)
    assert module.hparams.net_spec["ticker_mode"] == "per_ticker"
    assert module.hparams.net_spec["tickers"] == ["GOOG", "MSFT"]


def perturb(network: torch.nn.Module, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in network.parameters():
            parameter.add_(0.5 * torch.randn(parameter.shape, generator=generator))


def test_per_ticker_forecast_comes_from_its_own_network_only(tmp_path, task):
    config = project_with(tmp_path, tickers="per_ticker")
    module, datamodule = task.build(config, "lstm")
    module.eval()
    x, _, tickers = real_batch(datamodule)
    goog, msft = tickers == 0, tickers == 1
    assert goog.sum() == msft.sum() == 8
    networks = module.model.net.networks
    with torch.no_grad():
        before = module(x)
        perturb(networks[1], seed=1)  # MSFT's network
        after_msft = module(x)
        perturb(networks[0], seed=2)  # GOOG's network
        after_goog = module(x)
    # Changing MSFT's network leaves every GOOG forecast exactly as it was and moves every MSFT one ...
    assert torch.equal(after_msft[goog], before[goog])
    assert (after_msft[msft] != before[msft]).all()
    # ... and the other way round.
    assert torch.equal(after_goog[msft], after_msft[msft])
    assert (after_goog[goog] != after_msft[goog]).all()


def test_network_builds_one_network_per_listed_ticker(task):
    spec = {
        "name": "lstm",
        "kwargs": {"n_features": len(FEATURES) + 3, "hidden": 4, "layers": 1, "dropout": 0.0},
        "tickers": ["A", "B", "C"],
        "ticker_mode": "per_ticker",
    }
    net = task.network(spec)
    assert isinstance(net, PerTickerNetworks) and len(net.networks) == 3
    x = torch.randn(3, 5, len(FEATURES) + 3)
    x[:, :, len(FEATURES) :] = torch.eye(3)[:, None, :]  # sample i belongs to ticker i
    with torch.no_grad():
        out = net(x)
        for i in range(3):
            assert out[i].item() == pytest.approx(net.networks[i](x[i : i + 1]).item(), abs=1e-6)
    shared = task.network({**spec, "ticker_mode": "shared"})
    assert not isinstance(shared, PerTickerNetworks)
    assert shared.recurrent.input_size == len(FEATURES) + 3


@pytest.mark.parametrize(
    "key,value",
    [("tickers", "both"), ("loss", "mae"), ("huber_delta", 0.0), ("window", 1)],
)
def test_forecaster_params_rejected(tmp_path, key, value):
    params = tiny_params()
    params["train"]["lstm"][key] = value
    with pytest.raises(DlpipeError) as info:
        load_config(write_project(tmp_path / "project", params))
    assert f"train.lstm.{key}" in str(info.value)


# ---------------------------------------------------------------- the loss switch


@no_trainer_warning
def test_huber_loss_on_the_standardised_target(tmp_path, task):
    config = project_with(tmp_path, loss="huber", huber_delta=0.5)
    module, datamodule = task.build(config, "lstm")
    assert (module.hparams.loss, module.hparams.huber_delta) == ("huber", 0.5)
    x, y, _ = real_batch(datamodule, per_ticker=32)
    model = module.model
    # The target is scaled by real training statistics, so standardising it is not a no-op.
    assert abs(model.target_std.item() - 1.0) > 0.5
    assert model.target_mean.item() != 0.0

    module.train()
    loss = module.training_step((x, y), 0)
    with torch.no_grad():
        standardized = model.forward_standardized(x)
        scaled_target = (y - model.target_mean) / model.target_std
        expected = functional.huber_loss(standardized, scaled_target, delta=0.5)
        mse = functional.mse_loss(standardized, scaled_target)
        unscaled = functional.huber_loss(standardized, y, delta=0.5)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    assert loss.requires_grad  # a loss that trains the network
    # Not the MSE of the same batch (Huber is at most half the squared error, and less past the delta) ...
    assert loss.item() < 0.5 * mse.item()
    assert loss.item() != pytest.approx(unscaled.item(), rel=1e-3)
    # ... which is what the same network trains on with loss: mse, and the delta is the configured one.
    spec, optimizer = module.hparams.net_spec, module.hparams.optimizer
    with_mse = ForecasterModule(model, spec, WINDOW, optimizer, 1, "mse", 0.5)
    assert with_mse.training_step((x, y), 0).item() == pytest.approx(mse.item(), rel=1e-6)
    wider = ForecasterModule(model, spec, WINDOW, optimizer, 1, "huber", 1.0)
    assert wider.training_step((x, y), 0).item() != pytest.approx(loss.item(), rel=1e-3)


@no_trainer_warning
def test_mse_is_the_default_loss(config, task):
    module, datamodule = task.build(fetched(config), "lstm")
    assert module.hparams.loss == "mse"
    x, y, _ = real_batch(datamodule)
    loss = module.training_step((x, y), 0)
    with torch.no_grad():
        scaled_target = (y - module.model.target_mean) / module.model.target_std
        expected = functional.mse_loss(module.model.forward_standardized(x), scaled_target)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)


# ---------------------------------------------------------------- the real inputs of export and parity


def test_parity_inputs_cover_batch_sizes_and_twice_the_window(config, task):
    cases = task.parity_inputs(fetched(config), "lstm")
    expected = {(b, w) for b in (1, 7, 64) for w in (WINDOW, 2 * WINDOW)}
    assert {(a.shape[0], a.shape[1]) for a in cases.values()} == expected
    assert len(cases) == len(expected)
    for name, inputs in cases.items():
        batch, window = inputs.shape[:2]
        assert name == f"batch {batch}, window {window}"
        assert inputs.shape == (batch, window, N_INPUTS)
        assert inputs.dtype == np.float32
        assert np.isfinite(inputs).all()
    # Real test windows at each length, not zeros or noise: the first rows are the first pooled test window.
    for window in (WINDOW, 2 * WINDOW):
        data = load_stock_data(config.paths.raw_stocks, window)
        first = ticker_inputs(data.pooled("test"), len(data.tickers))[0]
        np.testing.assert_array_equal(cases[f"batch 64, window {window}"][0], first)
        np.testing.assert_array_equal(cases[f"batch 1, window {window}"][0], first)


def test_reference_inputs_spread_over_both_tickers(config, task):
    reference = task.reference_inputs(fetched(config), "lstm")
    assert reference.shape == (256, WINDOW, N_INPUTS)
    one_hot = reference[:, :, len(FEATURES) :]
    # Every row is one ticker's window: exactly one ticker column set, the same on every day.
    assert set(np.unique(one_hot)) == {0.0, 1.0}
    np.testing.assert_array_equal(one_hot.sum(axis=2), np.ones((256, WINDOW)))
    np.testing.assert_array_equal(one_hot, np.broadcast_to(one_hot[:, :1, :], one_hot.shape))
    counts = one_hot[:, 0, :].sum(axis=0)
    assert (counts > 0).all()  # both tickers appear ...
    # ... in about their share of the test windows (GOOG: 185 of 548), not only the first ticker's.
    data = load_stock_data(config.paths.raw_stocks, WINDOW)
    share = len(data.splits["GOOG"]["test"]) / len(data.pooled("test"))
    assert counts[0] / 256 == pytest.approx(share, abs=0.02)
    # Each row is a real test window.
    test_inputs = ticker_inputs(data.pooled("test"), len(data.tickers)).reshape(-1, WINDOW * N_INPUTS)
    flat = reference.reshape(256, -1)
    assert all((test_inputs == row).all(axis=1).any() for row in flat)
