"""Next-day forecasting: a window of daily features of one ticker -> the next day's close log return.

Every fetched ticker trains one model (`train.<model>.tickers`: one shared network with the ticker as an
input, or one network per ticker inside the same graph). The loss is MSE or Huber on the standardised
target; RMSE in log-return units is logged. The exported graph takes raw features plus the ticker columns
(B, T, F + K) and returns the log return (B, 1): feature standardisation and the target scale are part of
it, and the window length T is dynamic. Judged on each ticker's test days against persistence, a moving
average and ARIMA (dlpipe.tasks.forecaster_judgement).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

import numpy as np
import torch
from pydantic import Field, PositiveFloat
from torch import nn

from dlpipe.config import Config, TrainParams
from dlpipe.data.stocks import FEATURE_FORMULAS, FEATURES, StockData, load_stock_data, read_stock_meta, ticker_inputs
from dlpipe.errors import DlpipeError
from dlpipe.models import get_model
from dlpipe.models.layers import Standardize
from dlpipe.runtime import run_batched
from dlpipe.tasks.base import Task, register_task
from dlpipe.tasks.profiles import training_plan

if TYPE_CHECKING:
    import lightning as L

REFERENCE_ROWS = 256  # real test windows kept for the parity check and latency (spread over the tickers)


class ForecasterParams(TrainParams):
    task: Literal["forecaster"]
    window: Annotated[int, Field(ge=2)]  # trading days the model sees to predict the next one
    tickers: Literal["shared", "per_ticker"] = "shared"  # one network for all tickers, or one per ticker
    loss: Literal["mse", "huber"] = "mse"
    huber_delta: PositiveFloat = 1.0  # in standard deviations of the training target


class PerTickerNetworks(nn.Module):
    """One network per ticker in one graph: each sample's forecast comes from its own ticker's network,
    selected by the one-hot ticker columns at the end of the input (B, T, F + K) -> (B, 1)."""

    def __init__(self, networks: list[nn.Module]) -> None:
        super().__init__()
        self.networks = nn.ModuleList(networks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        forecasts = torch.cat([network(x) for network in self.networks], dim=1)  # (B, K)
        own = x[:, -1, -len(self.networks) :].argmax(dim=1, keepdim=True)  # (B, 1) the sample's ticker
        # Picked, not multiplied by the one-hot code: another ticker's inf or NaN must not leak in (inf * 0).
        return forecasts.gather(1, own)


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
        return self.net(self.standardize(x))  # (B, T, F + K) -> (B, 1), in target standard deviations

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_standardized(x) * self.target_std + self.target_mean  # (B, 1) log return


@register_task
class ForecasterTask(Task):
    name = "forecaster"
    params_type = ForecasterParams
    dataset = "stocks"
    data_kwargs = ("n_features",)
    dynamic_axes = {0: "batch", 1: "window"}
    quantization = "dynamic"  # the work is in LSTM/GRU/RNN and Gemm nodes
    monitor = ("val/loss", "min")
    # Pooled over the tickers, in log-return units (scale-free): below 1 beats tomorrow = today.
    promotion = ("rmse_ratio_vs_persistence", False)
    # Measured on the ONNX Runtime forecasts only (torch differs by onnx_max_abs_diff): the same number twice.
    compare_metrics = ("rmse_ratio_vs_persistence", "rmse_ratio_vs_persistence")
    metric_keys = ("rmse_ratio_vs_persistence", "dm_pvalue", "skill", "verdict", "directional_accuracy", "tickers")

    # ------------------------------------------------------------------------------------------ training

    def data_fingerprint(self, config: Config) -> str:
        return read_stock_meta(config.paths.raw_stocks)["sha256"]

    def network(self, net_spec: dict[str, Any]) -> nn.Module:
        if net_spec.get("ticker_mode") == "per_ticker":
            return PerTickerNetworks([get_model(net_spec["name"], **net_spec["kwargs"]) for _ in net_spec["tickers"]])
        return get_model(net_spec["name"], **net_spec["kwargs"])

    def build(self, config: Config, model: str) -> tuple[L.LightningModule, L.LightningDataModule]:
        plan = training_plan(config, model)
        train = plan.train  # the profile's batch size and learning rate
        from dlpipe.data.datamodules import StockWindowDataModule

        datamodule = StockWindowDataModule(
            config.paths.raw_stocks, train.window, train.batch_size, plan.loader.num_workers, plan.loader.pin_memory
        )
        tickers = datamodule.setup().tickers
        spec = {
            "name": model,
            "kwargs": {"n_features": len(FEATURES) + len(tickers), **train.net},
            "tickers": tickers,
            "ticker_mode": train.tickers,
        }
        module = self.lightning_module(self.network(spec), spec, train)
        mean, std, target_mean, target_std = datamodule.feature_stats()
        module.model.standardize.set_stats(torch.from_numpy(mean), torch.from_numpy(std))
        module.model.set_target_stats(target_mean, target_std)
        return module, datamodule

    def lightning_module(self, net: nn.Module, net_spec: dict[str, Any], train: TrainParams) -> L.LightningModule:
        wrapped = self.wrap(net, net_spec["kwargs"])
        from dlpipe.tasks.forecaster_training import ForecasterModule

        return ForecasterModule(
            wrapped,
            net_spec,
            train.window,
            train.optimizer.model_dump(exclude_unset=True),
            train.epochs,
            getattr(train, "loss", "mse"),
            getattr(train, "huber_delta", 1.0),
        )

    def wrap(self, net: nn.Module, data_kwargs: dict[str, Any]) -> nn.Module:
        return ScaledForecaster(net, data_kwargs["n_features"])

    # -------------------------------------------------------------------------------------------- export

    def stock_data(self, config: Config, model: str, window: int | None = None) -> StockData:
        return load_stock_data(config.paths.raw_stocks, window or config.train_params(model).window)

    @staticmethod
    def _spread(inputs: np.ndarray, rows: int = REFERENCE_ROWS) -> np.ndarray:
        """`rows` inputs evenly spaced over the test period of every ticker (not only the first one's)."""
        return inputs[np.linspace(0, len(inputs) - 1, min(rows, len(inputs))).astype(int)]

    def reference_inputs(self, config: Config, model: str) -> np.ndarray:
        data = self.stock_data(config, model)
        return self._spread(ticker_inputs(data.pooled("test"), len(data.tickers)))

    def parity_inputs(self, config: Config, model: str) -> dict[str, np.ndarray]:
        """Every batch size at the trained window and at twice it: the graph's sequence axis is dynamic, and
        a longer sequence is where a recurrent graph's rounding accumulates."""
        from dlpipe.export import batch_cases

        window, batches = config.train_params(model).window, config.params.export.parity_batches
        cases = batch_cases(self.reference_inputs(config, model), batches, f", window {window}")
        try:
            longer = self.stock_data(config, model, 2 * window)
        except DlpipeError as exc:  # a test split too short for the long windows: say so, do not skip silently
            raise DlpipeError(f"export parity at window {2 * window}: {exc}") from None
        inputs = self._spread(ticker_inputs(longer.pooled("test"), len(longer.tickers)))
        return cases | batch_cases(inputs, batches, f", window {2 * window}")

    def contract(self, config: Config, model: str) -> dict[str, str]:
        window = config.train_params(model).window
        tickers = read_stock_meta(config.paths.raw_stocks)["tickers"]
        n_inputs = len(FEATURES) + len(tickers)
        return {
            "input": (
                f"float32 [batch, window, {n_inputs}] (trained with window {window}; any length works): the last "
                f"trading days of one ticker, oldest first, one row per day with the features of dlpipe.features "
                f"in that order (not raw prices), then one column per ticker of dlpipe.tickers, 1 for the "
                f"window's ticker and 0 for the others"
            ),
            "output": (
                "float32 [batch, 1] predicted log return of the next close, log(close[t+1] / close[t]); "
                "predicted close = close[t] * exp(output)"
            ),
            "features": json.dumps([{"name": name, "formula": f} for name, f in FEATURE_FORMULAS.items()]),
            "tickers": json.dumps(tickers),
            "window": str(window),
        }

    def evaluation_data(self, config: Config, model: str) -> dict[str, Any]:
        meta = read_stock_meta(config.paths.raw_stocks)
        # The test windows are the last days of each price file: the files' hash and the window fix them.
        return {
            "source": meta["source"],
            "tickers": meta["tickers"],
            "test_sha256": meta["sha256"],
            "input_shape": [config.train_params(model).window, len(FEATURES) + len(meta["tickers"])],
        }

    # ------------------------------------------------------------------------------------------ evaluate

    @staticmethod
    def _test_inputs(data: StockData) -> dict[str, np.ndarray]:
        """Each ticker's test windows as the graph takes them (features and ticker columns), in order."""
        return {ticker: ticker_inputs(data.splits[ticker]["test"], len(data.tickers)) for ticker in data.tickers}

    @staticmethod
    def _predicted_returns(inputs: dict[str, np.ndarray], session: Any) -> dict[str, np.ndarray]:
        return {ticker: run_batched(session, x)[:, 0].astype(np.float64) for ticker, x in inputs.items()}

    def evaluate(
        self, config: Config, model: str, network: nn.Module, session: Any
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        from dlpipe.export import run_torch
        from dlpipe.tasks.forecaster_judgement import judge

        data = self.stock_data(config, model)
        inputs = self._test_inputs(data)
        predicted_returns = self._predicted_returns(inputs, session)
        max_diff = max(
            float(np.abs(run_torch(network, x)[:, 0] - predicted_returns[ticker]).max()) for ticker, x in inputs.items()
        )
        metrics, outputs = judge(model, data, predicted_returns, config.params.evaluate)
        metrics["onnx_max_abs_diff"] = max_diff
        return metrics, outputs

    def promotion_score(self, config: Config, model: str, network: nn.Module, session: Any) -> float:
        # The pooled ratio alone: no baselines (ARIMA fits), tests or plots for a second graph.
        from dlpipe.tasks.forecaster_judgement import pooled_rmse_ratio

        data = self.stock_data(config, model)
        return pooled_rmse_ratio(data, self._predicted_returns(self._test_inputs(data), session))

    def headline(self, metrics: dict[str, Any], context: dict[str, Any]) -> dict[str, str]:
        """RMSE over persistence's, pooled over the tickers; the baselines on the same days; the skill verdict."""
        ratio, baselines = metrics.get("rmse_ratio_vs_persistence"), metrics.get("baselines") or {}
        others = ", ".join(
            f"{name.replace('_', ' ')} {scores['rmse_ratio_vs_persistence']:.4f}"
            for name, scores in baselines.items()
            if isinstance(scores, dict) and scores.get("rmse_ratio_vs_persistence") is not None
        )
        return {
            "metric": "-" if ratio is None else f"RMSE / persistence {ratio:.4f}",
            "baseline": "persistence 1" + (f"; {others}" if others else ""),
            "verdict": str(metrics.get("verdict", "-")),
        }

    def plots(self, config: Config, model: str, outputs: dict[str, Any], directory: Path) -> None:
        from dlpipe.tasks.forecaster_judgement import plot_forecasts

        plot_forecasts(model, outputs, directory)

    # ------------------------------------------------------------------- synthetic data (tests, benchmarks)

    def example_data_kwargs(self) -> dict[str, Any]:
        return {"n_features": len(FEATURES) + 2}  # two tickers, as the offline default

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
