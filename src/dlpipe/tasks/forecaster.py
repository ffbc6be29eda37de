"""Next-day forecasting: a window of daily features -> the next day's close log return.

The loss is MSE on the standardised target; RMSE in log-return units is logged. The exported graph takes
raw features (B, T, F) and returns the log return (B, 1): feature standardisation and the target scale are
part of it. Judged against persistence (tomorrow's close = today's) on the same test days.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

import numpy as np
import pandas as pd
import torch
from pydantic import Field
from torch import nn

from dlpipe import plots
from dlpipe.config import Config, TrainParams
from dlpipe.data.stocks import FEATURE_FORMULAS, FEATURES, Windows, make_windows, read_prices, split_chronological
from dlpipe.io import read_json
from dlpipe.models import get_model
from dlpipe.models.layers import Standardize
from dlpipe.runtime import run_batched
from dlpipe.tasks.base import Task, register_task

if TYPE_CHECKING:
    import lightning as L


class ForecasterParams(TrainParams):
    task: Literal["forecaster"]
    window: Annotated[int, Field(ge=2)]  # trading days the model sees to predict the next one


class ScaledForecaster(nn.Module):
    """Raw features -> standardised -> network -> scaled back to log-return units.

    `forward_standardized` is what training fits (target in standard deviations, so the learning rate does
    not depend on the stock's volatility); `forward` is what is exported.
    """

    def __init__(self, net: nn.Module, n_features: int) -> None:
        super().__init__()
        self.standardize = Standardize((1, 1, n_features))
        self.net = net
        self.register_buffer("target_mean", torch.zeros(1))
        self.register_buffer("target_std", torch.ones(1))

    @torch.no_grad()
    def set_target_stats(self, mean: float, std: float) -> None:
        self.target_mean.fill_(mean)
        self.target_std.fill_(max(std, 1e-6))

    def forward_standardized(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.standardize(x))  # (B, T, F) -> (B, 1), in target standard deviations

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_standardized(x) * self.target_std + self.target_mean  # (B, 1) log return


# What the forecaster reads from fetch_stocks' meta.json.
STOCK_META_KEYS = ("sha256", "ticker", "origin")


@register_task
class ForecasterTask(Task):
    name = "forecaster"
    params_type = ForecasterParams
    dataset = "stocks"
    data_kwargs = ("n_features",)
    monitor = ("val/loss", "min")
    promotion = ("rmse_ratio_vs_persistence", False)
    metric_keys = ("rmse", "mae", "directional_accuracy", "persistence_rmse", "rmse_ratio_vs_persistence")

    # ------------------------------------------------------------------------------------------ training

    def data_fingerprint(self, config: Config) -> str:
        return read_json(config.paths.meta(config.paths.raw_stocks), required=STOCK_META_KEYS)["sha256"]

    def build(self, config: Config, model: str) -> tuple[L.LightningModule, L.LightningDataModule]:
        train = config.train_params(model)
        from dlpipe.data.datamodules import StockWindowDataModule

        datamodule = StockWindowDataModule(
            config.paths.prices, train.window, train.batch_size, config.params.trainer.num_workers
        )
        kwargs = {"n_features": len(FEATURES), **train.net}
        module = self.lightning_module(get_model(model, **kwargs), {"name": model, "kwargs": kwargs}, train)
        mean, std, target_mean, target_std = datamodule.feature_stats()
        module.model.standardize.set_stats(torch.from_numpy(mean), torch.from_numpy(std))
        module.model.set_target_stats(target_mean, target_std)
        return module, datamodule

    def lightning_module(self, net: nn.Module, net_spec: dict[str, Any], train: TrainParams) -> L.LightningModule:
        wrapped = self.wrap(net, net_spec["kwargs"])
        from dlpipe.tasks.forecaster_training import ForecasterModule

        return ForecasterModule(
            wrapped, net_spec, train.window, train.optimizer.model_dump(exclude_unset=True), train.epochs
        )

    def wrap(self, net: nn.Module, data_kwargs: dict[str, Any]) -> nn.Module:
        return ScaledForecaster(net, data_kwargs["n_features"])

    # -------------------------------------------------------------------------------------------- export

    def _test_windows(self, config: Config, model: str) -> Windows:
        return split_chronological(make_windows(read_prices(config.paths.prices), config.train_params(model).window))[
            "test"
        ]

    def reference_inputs(self, config: Config, model: str) -> np.ndarray:
        return self._test_windows(config, model).x[:256]

    def contract(self, config: Config, model: str) -> dict[str, str]:
        window = config.train_params(model).window
        return {
            "input": (
                f"float32 [batch, {window}, {len(FEATURES)}]: the last {window} trading days, oldest first, one row "
                "per day with the features of dlpipe.features in that order (not raw prices)"
            ),
            "output": (
                "float32 [batch, 1] predicted log return of the next close, log(close[t+1] / close[t]); "
                "predicted close = close[t] * exp(output)"
            ),
            "features": json.dumps([{"name": name, "formula": f} for name, f in FEATURE_FORMULAS.items()]),
            "window": str(window),
        }

    def evaluation_data(self, config: Config, model: str) -> dict[str, Any]:
        meta = read_json(config.paths.meta(config.paths.raw_stocks), required=STOCK_META_KEYS)
        # The test windows are the last days of the price file: its hash and the window fix them.
        return {
            "source": meta["origin"],
            "test_sha256": meta["sha256"],
            "input_shape": [config.train_params(model).window, len(FEATURES)],
        }

    # ------------------------------------------------------------------------------------------ evaluate

    def evaluate(
        self, config: Config, model: str, network: nn.Module, session: Any
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        from dlpipe.export import run_torch

        test = self._test_windows(config, model)
        torch_return = run_torch(network, test.x)[:, 0]
        onnx_return = run_batched(session, test.x)[:, 0]
        predicted_close = test.last_close * np.exp(onnx_return.astype(np.float64))
        errors = predicted_close - test.next_close
        persistence_errors = test.last_close - test.next_close  # tomorrow's close = today's close
        rmse = float(np.sqrt(np.mean(errors**2)))
        persistence_rmse = float(np.sqrt(np.mean(persistence_errors**2)))
        actual_return = test.y[:, 0]
        moved = actual_return != 0  # a flat day has no direction to get right
        metrics = {
            "rmse": rmse,
            "mae": float(np.mean(np.abs(errors))),
            "persistence_rmse": persistence_rmse,
            "rmse_ratio_vs_persistence": rmse / persistence_rmse,
            "directional_accuracy": float(np.mean(np.sign(onnx_return[moved]) == np.sign(actual_return[moved]))),
            "onnx_max_abs_diff": float(np.abs(torch_return - onnx_return).max()),
            "test_samples": int(len(actual_return)),
        }
        ticker = read_json(config.paths.meta(config.paths.raw_stocks), required=STOCK_META_KEYS)["ticker"]
        outputs = {
            "dates": test.dates,
            "actual": test.next_close,
            "predicted": predicted_close,
            "persistence": test.last_close,
            "ticker": ticker,
        }
        return metrics, outputs

    def plots(self, config: Config, model: str, outputs: dict[str, Any], directory: Path) -> None:
        plt = plots.pyplot()
        dates = pd.to_datetime(outputs["dates"])
        figure, (top, bottom) = plt.subplots(2, 1, figsize=(10, 6), sharex=True, height_ratios=(3, 1))
        top.plot(dates, outputs["actual"], label="actual close", color="black", linewidth=1)
        top.plot(dates, outputs["predicted"], label="model (ONNX Runtime)", linewidth=1)
        top.plot(
            dates,
            outputs["persistence"],
            label="persistence (yesterday's close)",
            linewidth=0.8,
            linestyle="--",
            alpha=0.7,
        )
        top.set_ylabel("price")
        top.legend(fontsize=8)
        top.set_title(f"{model}: next-day close of {outputs['ticker']}, test period")
        bottom.plot(dates, outputs["predicted"] - outputs["actual"], label="model error", linewidth=0.8)
        bottom.plot(
            dates, outputs["persistence"] - outputs["actual"], label="persistence error", linewidth=0.8, alpha=0.7
        )
        bottom.axhline(0, color="black", linewidth=0.5)
        bottom.set_ylabel("error")
        bottom.legend(fontsize=8)
        plots.save_figure(figure, directory / "forecast.png")
        columns = {
            "actual": outputs["actual"],
            "predicted": outputs["predicted"],
            "persistence": outputs["persistence"],
        }
        plots.save_csv(pd.DataFrame({"date": dates.strftime("%Y-%m-%d"), **columns}), directory / "forecast.csv")

    # ------------------------------------------------------------------- synthetic data (tests, benchmarks)

    def example_data_kwargs(self) -> dict[str, Any]:
        return {"n_features": len(FEATURES)}

    def synthetic_inputs(self, data_kwargs: dict[str, Any], batch: int, rng: np.random.Generator) -> np.ndarray:
        window = self.synthetic_train_params()["window"]
        return rng.standard_normal(size=(batch, window, data_kwargs["n_features"])).astype(np.float32)

    def synthetic_batch(
        self, data_kwargs: dict[str, Any], batch: int, rng: np.random.Generator
    ) -> tuple[torch.Tensor, ...]:
        windows = self.synthetic_inputs(data_kwargs, batch, rng)
        returns = rng.normal(0.0, 0.02, size=(batch, 1)).astype(np.float32)  # daily log returns are ~1-2%
        return torch.from_numpy(windows), torch.from_numpy(returns)

    def synthetic_train_params(self) -> dict[str, Any]:
        return {"window": 20}  # about one month of trading days, as the default params
