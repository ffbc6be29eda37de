"""Is a forecaster any good? Its test-day forecasts against persistence, a moving average and ARIMA on exactly
the same days of every ticker, with the tests that say whether a difference is more than luck.

Per ticker, errors are in price units (RMSE, MAE, MAPE) and the Diebold-Mariano test compares squared price
errors with persistence's. Pooled over the tickers, prices of different stocks cannot be added, so the pooled
figures use log returns (the model's output units): RMSE ratio and Diebold-Mariano on squared log-return
errors, directional accuracy on the sign of the return. `skill: yes` needs a lower loss than persistence AND
a Diebold-Mariano p-value below `evaluate.significance` (dlpipe.tasks.forecast_stats.has_skill).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from dlpipe import plots
from dlpipe.config import EvaluateParams
from dlpipe.data.stocks import StockData, part_bounds
from dlpipe.tasks.forecast_baselines import arima_forecasts, moving_average, persistence
from dlpipe.tasks.forecast_stats import diebold_mariano, directional_test, error_metrics, has_skill, verdict

ZOOM_DAYS = 60  # the forecast plot's upper panel: few enough days that the lines can be told apart


def rmse_ratio(errors: np.ndarray, persistence_errors: np.ndarray) -> float:
    return float(np.sqrt(np.mean(errors**2)) / np.sqrt(np.mean(persistence_errors**2)))


def pooled_rmse_ratio(data: StockData, predicted_returns: dict[str, np.ndarray]) -> float:
    """The pooled RMSE / persistence in log returns (the top-level `rmse_ratio_vs_persistence` of `judge`)."""
    actual = np.concatenate([data.splits[t]["test"].y[:, 0].astype(np.float64) for t in data.tickers])
    predicted = np.concatenate([predicted_returns[t] for t in data.tickers])
    return rmse_ratio(predicted - actual, -actual)  # persistence: a return of 0


def _against_persistence(name: str, errors: np.ndarray, persistence_errors: np.ndarray, alpha: float) -> dict:
    """RMSE ratio, Diebold-Mariano test and verdict of `errors` against persistence's on the same days."""
    ratio = rmse_ratio(errors, persistence_errors)
    dm = diebold_mariano(errors, persistence_errors)
    return {
        "rmse_ratio_vs_persistence": ratio,
        "dm_stat": dm.statistic,
        "dm_pvalue": dm.pvalue,
        "skill": "yes" if has_skill(dm, alpha) else "no",
        "verdict": verdict(name, ratio, dm, alpha),
    }


def _forecast_scores(name: str, actual: np.ndarray, predicted: np.ndarray, last: np.ndarray, alpha: float) -> dict:
    """Price-unit errors, directional accuracy and the comparison with persistence of one ticker's forecasts."""
    scores = error_metrics(actual, predicted, last)
    return scores | _against_persistence(name, predicted - actual, last - actual, alpha)


def _pooled_scores(name: str, returns: dict[str, tuple[np.ndarray, np.ndarray]], actual_close, predicted_close, alpha):
    """Scores over all tickers in log-return units; `returns` holds (predicted, actual) log returns per ticker."""
    predicted = np.concatenate([p for p, _ in returns.values()])
    actual = np.concatenate([a for _, a in returns.values()])
    scores = _against_persistence(name, predicted - actual, -actual, alpha)  # persistence: a return of 0
    scores["mape"] = float(np.mean(np.abs(predicted_close - actual_close) / actual_close) * 100.0)
    return scores | directional_test(predicted, actual)


def judge(
    model: str, data: StockData, predicted_returns: dict[str, np.ndarray], params: EvaluateParams
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Metrics (pooled at the top level, per ticker under `tickers`) and the series the plots draw.

    `predicted_returns[ticker]` are the model's log-return forecasts for that ticker's test windows, in order.
    """
    alpha, settings = params.significance, params.baselines
    per_ticker, series = {}, {}
    pooled_returns = {name: {} for name in ("model", "moving_average", "arima")}
    pooled_close = {name: [] for name in ("actual", "model", "moving_average", "arima")}
    for ticker in data.tickers:
        test = data.splits[ticker]["test"]
        close = data.prices[ticker]["Close"].to_numpy(np.float64)
        last, actual = test.last_close, test.next_close
        forecasts = {
            "model": last * np.exp(predicted_returns[ticker]),
            "persistence": persistence(close, test.target_days),
            "moving_average": moving_average(close, test.target_days, settings.moving_average_days),
        }
        order = tuple(settings.arima_order) if settings.arima_order is not None else None
        train_days = part_bounds(len(close))["train"][1]  # ARIMA's parameters: the training days only
        forecasts["arima"], fit = arima_forecasts(close, test.target_days, train_days, order, settings.arima_max_order)

        scores = _forecast_scores(f"{model} on {ticker}", actual, forecasts["model"], last, alpha)
        baselines = {
            "persistence": {
                k: v
                for k, v in error_metrics(actual, forecasts["persistence"], last).items()
                if not k.startswith("directional")
            }
        }  # it never calls a direction
        for name in ("moving_average", "arima"):
            baselines[name] = _forecast_scores(f"{name} on {ticker}", actual, forecasts[name], last, alpha)
        baselines["moving_average"]["days"] = settings.moving_average_days
        baselines["arima"] |= {"order": list(fit.order), "chosen_by": fit.chosen_by, "aic": fit.aic}
        per_ticker[ticker] = {
            "test_days": int(len(actual)),
            "first_test_date": str(pd.Timestamp(test.dates[0]).date()),
            "last_test_date": str(pd.Timestamp(test.dates[-1]).date()),
            **scores,
            "baselines": baselines,
        }
        series[ticker] = {"dates": test.dates, "actual": actual, **forecasts}
        for name in pooled_returns:
            pooled_returns[name][ticker] = (np.log(forecasts[name] / last), test.y[:, 0].astype(np.float64))
            pooled_close[name].append(forecasts[name])
        pooled_close["actual"].append(actual)

    actual_close = np.concatenate(pooled_close["actual"])
    scope = f"{model} on {' + '.join(data.tickers)}"
    metrics = _pooled_scores(scope, pooled_returns["model"], actual_close, np.concatenate(pooled_close["model"]), alpha)
    metrics["baselines"] = {
        name: _pooled_scores(
            f"{name} on {' + '.join(data.tickers)}",
            pooled_returns[name],
            actual_close,
            np.concatenate(pooled_close[name]),
            alpha,
        )
        for name in ("moving_average", "arima")
    }
    metrics["tickers"] = per_ticker
    metrics["test_samples"] = int(len(actual_close))
    return metrics, {"model": model, "tickers": series, "verdicts": {t: s["verdict"] for t, s in per_ticker.items()}}


def plot_forecasts(model: str, outputs: dict[str, Any], directory: Path) -> None:
    """Per ticker: forecast_<TICKER>.png (the last test days up close; the running squared-error difference
    against persistence over the whole test period) and forecast_<TICKER>.csv (the series, for `dvc plots`)."""
    plt = plots.pyplot()
    for ticker, series in outputs["tickers"].items():
        dates = pd.to_datetime(series["dates"])
        figure, (zoom, running) = plt.subplots(2, 1, figsize=(10, 7), height_ratios=(3, 2))
        recent = slice(-ZOOM_DAYS, None)
        for key, colour, marker, label in (
            ("actual", "black", "o", "actual close"),
            ("model", "tab:blue", "s", f"{model} (ONNX Runtime)"),
        ):
            line = {"color": colour, "marker": marker, "markersize": 3, "linewidth": 1.2}
            zoom.plot(dates[recent], series[key][recent], label=label, **line)
        zoom.step(
            dates[recent],
            series["persistence"][recent],
            where="post",
            color="tab:orange",
            linestyle="--",
            linewidth=1.2,
            label="persistence (previous close)",
        )
        zoom.set_ylabel("close")
        zoom.set_title(
            f"{model} on {ticker}: last {min(ZOOM_DAYS, len(dates))} test days\n{outputs['verdicts'][ticker]}",
            fontsize=9,
        )
        zoom.legend(fontsize=8)
        persistence_loss = (series["persistence"] - series["actual"]) ** 2
        # The moving average lags every trend and would dwarf the others on this scale; its figures are in
        # the metrics and the report's table.
        for name, colour in ((model, "tab:blue"), ("arima", "tab:red")):
            forecast = series["model" if name == model else name]
            running.plot(
                dates,
                np.cumsum((forecast - series["actual"]) ** 2 - persistence_loss),
                color=colour,
                linewidth=1,
                label=name,
            )
        running.axhline(0, color="tab:orange", linestyle="--", linewidth=1, label="persistence")
        running.set_ylabel("cumulative squared error\nminus persistence's")
        running.set_title("below 0: better than persistence so far over the test period", fontsize=9)
        running.legend(fontsize=8)
        plots.save_figure(figure, directory / f"forecast_{ticker}.png")
        table = {
            name: series[key]
            for name, key in (
                ("actual", "actual"),
                ("predicted", "model"),
                ("persistence", "persistence"),
                ("moving_average", "moving_average"),
                ("arima", "arima"),
            )
        }
        plots.save_csv(
            pd.DataFrame({"date": dates.strftime("%Y-%m-%d"), **table}), directory / f"forecast_{ticker}.csv"
        )
