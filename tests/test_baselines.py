"""The forecasting baselines (dlpipe.tasks.forecast_baselines): hand-computed persistence and moving averages,
no look-ahead for any of them (ARIMA with a fixed order and with the order chosen by AIC), ARIMA recovering a
simulated AR(1), ARIMA against persistence on the committed GOOG prices, and one-line errors for bad input."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from conftest import REPO_ROOT
from dlpipe.errors import DlpipeError
from dlpipe.tasks.forecast_baselines import ArimaFit, arima_forecasts, moving_average, persistence

CLOSES = np.array([10.0, 12.0, 11.0, 15.0, 14.0, 13.0])


def simulated_closes(days: int, phi: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Closes whose log returns follow an AR(1) around a small drift, and those returns (r[0] = 0: no day before)."""
    rng = np.random.default_rng(seed)
    drift, noise = 0.0005, 0.01  # a daily drift and volatility of the order of a large stock's
    returns = np.zeros(days)
    for day in range(1, days):
        returns[day] = drift + phi * (returns[day - 1] - drift) + noise * rng.standard_normal()
    return 100.0 * np.exp(np.cumsum(returns)), returns


def test_persistence_is_the_previous_close():
    # Day 6 is the day after the data: its forecast is the last close.
    assert persistence(CLOSES, np.array([1, 3, 6])).tolist() == [10.0, 11.0, 13.0]


def test_moving_average_is_the_mean_of_the_closes_before_the_day():
    forecasts = moving_average(CLOSES, np.array([3, 4, 6]), days=3)
    # (10 + 12 + 11) / 3, (12 + 11 + 15) / 3, (15 + 14 + 13) / 3
    assert forecasts == pytest.approx([11.0, 38.0 / 3.0, 14.0], rel=1e-15)
    assert moving_average(CLOSES, np.array([1, 5]), days=1).tolist() == [10.0, 14.0]  # one day: persistence


def _forecasters(train_days: int):
    """Each baseline as close, target days -> forecasts; the ARIMA ones with the training part fixed."""
    return {
        "persistence": persistence,
        "moving_average": lambda close, days: moving_average(close, days, days=5),
        "arima_fixed_order": lambda close, days: arima_forecasts(close, days, train_days, order=(1, 0, 1))[0],
        "arima_aic_order": lambda close, days: arima_forecasts(close, days, train_days, order=None)[0],
    }


@pytest.mark.parametrize("name", ["persistence", "moving_average", "arima_fixed_order", "arima_aic_order"])
def test_no_forecast_sees_its_own_day_or_later(name):
    close, _ = simulated_closes(400, phi=0.3, seed=1)
    train_days = 300
    targets = np.arange(train_days, 400)
    forecast = _forecasters(train_days)[name]
    original = forecast(close, targets)
    assert np.all(np.isfinite(original))
    for day in (train_days, 350, 399):
        changed = close.copy()
        changed[day:] *= 3.0  # every close on and after `day`
        after_change = forecast(changed, targets)
        seen = targets <= day
        # Bit for bit: the forecasts up to `day` are computed from closes before `day` only ...
        assert np.array_equal(after_change[seen], original[seen]), day
        # ... while every later forecast does see the change (the comparison above is not vacuous).
        assert np.all(after_change[~seen] != original[~seen]), day
        # Nothing after `day` needed at all: the closes cut at `day` give the same forecasts.
        assert np.array_equal(forecast(close[:day], targets[seen]), original[seen]), day


def test_arima_order_chosen_by_aic_depends_on_the_training_part_only():
    close, _ = simulated_closes(400, phi=0.3, seed=1)
    train_days = 300
    targets = np.arange(train_days, 400)
    _, fit = arima_forecasts(close, targets, train_days, order=None)
    changed = close.copy()
    changed[train_days:] *= 3.0  # the first return outside the training part, r[train_days], jumps by log 3
    changed[train_days + 50 :] /= 7.0
    _, fit_after_change = arima_forecasts(changed, targets, train_days, order=None)
    assert fit_after_change == fit  # order, AIC and every candidate's AIC
    # A change inside the training part does move the AICs: the record is not constant.
    inside = close.copy()
    inside[train_days - 1 :] *= 1.05
    assert arima_forecasts(inside, targets, train_days, order=None)[1].candidates != fit.candidates


def test_arima_recovers_a_simulated_ar1_of_log_returns():
    phi = 0.6
    close, returns = simulated_closes(1500, phi=phi, seed=7)
    train_days = 1000
    targets = np.arange(train_days, 1500)
    actual = returns[targets]
    mse_of_zero_return = np.mean(actual**2)  # persistence of the close = a predicted return of 0

    forecasts, fit = arima_forecasts(close, targets, train_days, order=None)
    predicted = np.log(forecasts / close[targets - 1])
    assert fit.chosen_by == "aic"
    assert set(fit.candidates) == {f"{p},0,{q}" for p in range(3) for q in range(3)}
    assert fit.aic == min(fit.candidates.values())
    assert fit.order != (0, 0, 0)  # some dependence on yesterday's return was found
    # With phi = 0.6 an ideal forecast explains phi² = 36% of the variance: MSE ratio ~0.64, here 0.8 at most.
    assert np.mean((predicted - actual) ** 2) < 0.8 * mse_of_zero_return

    forecasts_ar1, fit_ar1 = arima_forecasts(close, targets, train_days, order=(1, 0, 0))
    assert fit_ar1 == ArimaFit(order=(1, 0, 0), aic=fit_ar1.aic, chosen_by="params", candidates={})
    assert np.isfinite(fit_ar1.aic)
    assert fit.aic <= fit_ar1.aic + 1e-6  # the grid holds (1, 0, 0): its winner is at least as good
    predicted_ar1 = np.log(forecasts_ar1 / close[targets - 1])
    # The estimated AR(1) forecasts close to the true one: drift + phi · (yesterday's return - drift).
    true_model = 0.0005 + phi * (returns[targets - 1] - 0.0005)
    assert np.max(np.abs(predicted_ar1 - true_model)) < 0.002  # a fifth of the daily noise (0.01)
    assert np.mean((predicted_ar1 - actual) ** 2) < 0.8 * mse_of_zero_return


def test_arima_on_goog_is_as_good_as_persistence():
    close = pd.read_csv(REPO_ROOT / "data" / "samples" / "stocks" / "GOOG.csv")["Close"].to_numpy(np.float64)
    train_days = int(0.85 * close.size)  # the pipeline's train + validation share (SPLIT_FRACTIONS)
    targets = np.arange(train_days, close.size)
    forecasts, fit = arima_forecasts(close, targets, train_days, order=None)
    assert np.all(np.isfinite(forecasts))
    actual = close[targets]
    rmse_arima = np.sqrt(np.mean((forecasts - actual) ** 2))
    rmse_persistence = np.sqrt(np.mean((persistence(close, targets) - actual) ** 2))
    # Measured (2,148 days, 1,825 training, 323 test days): the AIC picks (0, 0, 0), the mean return, and the RMSE
    # is 9.373 against persistence's 9.391 (ratio 0.998): daily returns are close to unpredictable.
    assert rmse_arima == pytest.approx(rmse_persistence, rel=0.05)


@pytest.mark.parametrize(
    ("call", "names"),
    [
        (lambda close: moving_average(close, np.array([40]), days=0), "moving_average_days"),
        (lambda close: moving_average(close, np.array([3, 40]), days=5), "moving_average_days"),
        (lambda close: persistence(close, np.array([0, 40])), "target_days"),
        (lambda close: arima_forecasts(close, np.array([40]), train_days=29, order=None), "train_days"),
        (lambda close: arima_forecasts(close, np.array([20, 40]), train_days=30, order=None), "target_days"),
        (lambda close: arima_forecasts(close, np.array([40]), 30, order=(1, -1, 0)), "arima_order"),
        (lambda close: arima_forecasts(close, np.array([40]), 30, order=(1, 0)), "arima_order"),
        (lambda close: arima_forecasts(close, np.array([40]), 30, order=None, max_order=-1), "arima_max_order"),
    ],
)
def test_bad_input_is_a_one_line_dlpipe_error(call, names):
    close, _ = simulated_closes(50, phi=0.0, seed=3)
    with pytest.raises(DlpipeError) as raised:
        call(close)
    message = str(raised.value)
    assert "\n" not in message
    assert names in message
