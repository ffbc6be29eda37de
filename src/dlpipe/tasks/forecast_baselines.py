"""The forecasts every forecaster is judged against, on exactly the same test days: persistence (tomorrow's close
= today's), a moving average of the last closes, and an ARIMA on log returns.

Indexing convention, shared with the evaluate stage: `close` is the 1-D array of daily closes of one ticker,
oldest first, so that row index = day index d. A forecast for target day d uses closes[:d] only (days strictly
before d); `target_days` holds the days to forecast (each >= 1, at most len(close): day len(close) is the day
after the data). The log return of day d is r[d] = log(close[d] / close[d-1]).

Pure numpy and statsmodels (plus threadpoolctl, which scikit-learn brings, to keep BLAS to one thread): no torch,
no prefect, so the baselines can be checked and reused on their own.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view
from statsmodels.tools.sm_exceptions import ConvergenceWarning, ValueWarning
from statsmodels.tsa.arima.model import ARIMA
from threadpoolctl import threadpool_limits

from dlpipe.errors import DlpipeError

PARAMS = "evaluate.baselines"  # the params.yaml section the user-facing settings come from (error messages)

# Fewer returns than this leave an ARMA(2, 2) with a constant (6 parameters with the variance) almost no
# degrees of freedom: its AIC, and the forecasts, would mean little.
MIN_ARIMA_TRAIN_DAYS = 30

# statsmodels' optimiser works on returns in percent: daily log returns have a variance of ~1e-4, and at that
# scale L-BFGS stops early or not at all (measured on 5,000 simulated days: ARIMA(1,0,0) did not converge and
# the 9-order grid took 5.2 s; in percent every order converged and the grid took 1.7 s). The model is the same
# up to the scale, so the forecasts are divided back and the AIC is moved back to log returns (see _aic_of_returns).
RETURN_SCALE = 100.0


@dataclass(frozen=True)
class ArimaFit:
    """How the ARIMA baseline was fitted: its order, its AIC on the training returns and how the order was found."""

    order: tuple[int, int, int]
    aic: float  # of the model of log returns (not of the percent returns the optimiser sees)
    chosen_by: str  # "params" (the order was given) or "aic" (the lowest AIC of the grid)
    candidates: dict[str, float]  # "p,d,q" -> AIC of every order tried; empty when chosen_by is "params"


def persistence(close: np.ndarray, target_days: np.ndarray) -> np.ndarray:
    """Tomorrow's close = today's: close[d-1] for each target day d."""
    close = _validated_close(close)
    days = _validated_target_days(target_days, close)
    return close[days - 1]


def moving_average(close: np.ndarray, target_days: np.ndarray, days: int) -> np.ndarray:
    """Mean of the last `days` closes before d: mean(close[d-days:d]). DlpipeError if days < 1 or any target
    day has fewer than `days` days before it."""
    close = _validated_close(close)
    targets = _validated_target_days(target_days, close)
    if isinstance(days, bool) or not isinstance(days, int | np.integer) or days < 1:
        raise DlpipeError(f"{PARAMS}.moving_average_days: must be an integer >= 1, got {days!r}")
    if targets.size and targets.min() < days:
        earliest = int(targets.min())
        raise DlpipeError(
            f"{PARAMS}.moving_average_days: {days} closes before each target day are needed, "
            f"but target day {earliest} has only {earliest} before it"
        )
    # Row i of the window view is close[i:i + days], so close[d-days:d] is row d - days. Averaging the windows
    # themselves (not differences of a running sum) keeps each mean exact to rounding and free of later days.
    windows = sliding_window_view(close, days)
    return windows[targets - days].mean(axis=1)


def arima_forecasts(
    close: np.ndarray,
    target_days: np.ndarray,
    train_days: int,
    order: tuple[int, int, int] | None,
    max_order: int = 2,
) -> tuple[np.ndarray, ArimaFit]:
    """ARIMA on log returns (statsmodels.tsa.arima.model.ARIMA, with a constant where d == 0). The parameters
    are estimated on the returns of the training part only (days 1..train_days-1). order None: the order with
    the lowest AIC among p, q in 0..max_order (d = 0) on the training part only. The test period is then
    filtered with those fixed parameters, and the forecast for day d is the one-step-ahead prediction given
    returns up to d-1 only: no look-ahead.
    Returns the predicted CLOSE for each target day: close[d-1] * exp(predicted r[d]), and the fit record.

    Every target day must be >= train_days: an earlier day would be forecast with parameters estimated on
    days after it.
    """
    close = _validated_close(close)
    targets = _validated_target_days(target_days, close)
    train_days = _validated_train_days(train_days, close, targets)
    log_returns = np.diff(np.log(close))  # log_returns[i] = r[i + 1]: the return of day i + 1
    train_returns = log_returns[: train_days - 1] * RETURN_SCALE  # r[1..train_days-1]: closes[:train_days] only

    # One BLAS thread: the state-space matrices are at most 3x3, too small for threads to help, and under load
    # the threads only wait for each other (measured on 2 cores with a second busy process: the 9-order grid on
    # 5,000 MSFT days took 6-9 s with OpenBLAS's default 2 threads, 2.2 s with 1; with no other load both ~2.3 s).
    with threadpool_limits(limits=1):
        if order is None:
            results, fit = _lowest_aic_fit(train_returns, _validated_max_order(max_order))
        else:
            order = _validated_order(order)
            results = _fit(train_returns, order)
            if results is None:
                raise DlpipeError(f"{PARAMS}.arima_order: ARIMA{order} could not be fitted to the training returns")
            fit = ArimaFit(order=order, aic=_aic_of_returns(results), chosen_by="params", candidates={})
        if targets.size == 0:
            return np.empty(0), fit
        predicted_returns = _one_step_predictions(results, log_returns, last_day=int(targets[-1]))
    return close[targets - 1] * np.exp(predicted_returns[targets - 1]), fit


def _one_step_predictions(results, log_returns: np.ndarray, last_day: int) -> np.ndarray:
    """Predicted r[d] for every day d = 1..last_day, element d - 1, each from the returns before d only.

    The Kalman filter is run with the training estimates held fixed (no refit) over the returns of days
    1..last_day-1, so it sees no return of last_day or later. Its one-step prediction for observation i is
    conditional on observations before i alone (the filter is causal); the prediction one step past the end
    is the forecast for last_day itself. The state's start is set by the parameters (the stationary
    distribution of the ARMA part; diffuse for differenced states), not by the data, so nothing after a day
    leaks into its forecast.
    """
    with _statsmodels_noise_silenced():
        filtered = results.model.clone(log_returns[: last_day - 1] * RETURN_SCALE).filter(results.params)
        scaled = filtered.predict(start=0, end=last_day - 1)
    return np.asarray(scaled, dtype=np.float64) / RETURN_SCALE


def _lowest_aic_fit(train_returns: np.ndarray, max_order: int):
    """The fit with the lowest AIC among ARIMA(p, 0, q), p, q in 0..max_order, and its record.

    An order whose fit raises (a singular start, a non-finite likelihood) is skipped: one degenerate candidate
    must not cost the other baselines. A fit that merely did not converge is kept: its AIC is that of real
    parameters, only possibly higher than the optimum, so it can lose the comparison but not win it wrongly.
    Ties go to the smaller order, the first in the grid.
    """
    candidates: dict[str, float] = {}
    best = None
    for p, q in itertools.product(range(max_order + 1), repeat=2):
        order = (p, 0, q)
        results = _fit(train_returns, order)
        if results is None:
            continue
        aic = _aic_of_returns(results)
        candidates[",".join(map(str, order))] = aic
        if best is None or aic < best[2]:
            best = (results, order, aic)
    if best is None:
        raise DlpipeError(
            f"{PARAMS}.arima_max_order: no ARIMA(p,0,q) with p, q <= {max_order} could be fitted "
            "to the training returns"
        )
    results, order, aic = best
    return results, ArimaFit(order=order, aic=aic, chosen_by="aic", candidates=candidates)


def _fit(train_returns: np.ndarray, order: tuple[int, int, int]):
    """Maximum-likelihood ARIMA fit of the (percent) training returns, or None when statsmodels fails.

    A constant only with d == 0: the mean daily return (drift) is small but real for a stock that rose for
    years; with d >= 1 the differencing removes it, and statsmodels refuses a constant there. The endog is a
    plain array, so the index is the date-free integer one and statsmodels has no frequency to warn about.
    cov_type "none": the parameter covariance (a numerical Hessian, a large share of a fit's time) is never used;
    low_memory: the training filter's per-day output is not needed either (the test days are filtered anew).
    """
    trend = "c" if order[1] == 0 else "n"
    try:
        with _statsmodels_noise_silenced():
            results = ARIMA(train_returns, order=order, trend=trend).fit(cov_type="none", low_memory=True)
    except (ValueError, np.linalg.LinAlgError):
        return None
    return results if math.isfinite(results.aic) else None


def _aic_of_returns(results) -> float:
    """The fit's AIC moved from percent returns back to log returns.

    The densities of x and of y = 100·x differ by the factor 1/100 per observation, so the log-likelihood of
    the log returns is that of the percent returns + n·log(100): the AIC (-2·loglik + 2k) falls by 2n·log(100).
    The same shift for every order, so the ranking of the candidates does not change.
    """
    return float(results.aic - 2 * results.nobs * math.log(RETURN_SCALE))


@contextlib.contextmanager
def _statsmodels_noise_silenced() -> Iterator[None]:
    """Warnings of statsmodels that say nothing to the user of the evaluate stage, once per order and ticker.

    ConvergenceWarning: a candidate whose optimiser stopped early is handled (kept, see _lowest_aic_fit) and
    the forecasts are judged by their test error anyway. ValueWarning: about the index (none is given here on
    purpose). UserWarning from statsmodels' start values ("non-stationary starting autoregressive parameters",
    "non-invertible starting MA parameters"): it then starts from zeros, which is fine. Scoped to the calls
    into statsmodels: every other warning, and these anywhere else, still reach the user.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        warnings.simplefilter("ignore", ValueWarning)
        warnings.filterwarnings("ignore", message=r"Non-(stationary|invertible) starting", category=UserWarning)
        yield


def _validated_close(close: np.ndarray) -> np.ndarray:
    values = np.asarray(close, dtype=np.float64)
    if values.ndim != 1:
        raise DlpipeError(f"close: expected a 1-D array of daily closes, got shape {values.shape}")
    if not np.all(np.isfinite(values)) or np.any(values <= 0):
        bad = int(np.flatnonzero(~np.isfinite(values) | (values <= 0))[0])
        raise DlpipeError(f"close: every close must be finite and > 0; day {bad} is {values[bad]!r}")
    return values


def _validated_target_days(target_days: np.ndarray, close: np.ndarray) -> np.ndarray:
    days = np.asarray(target_days)
    if days.ndim != 1:
        raise DlpipeError(f"target_days: expected a 1-D array of day indices, got shape {days.shape}")
    if days.size == 0:
        return days.astype(np.int64)
    if not np.issubdtype(days.dtype, np.integer):
        raise DlpipeError(f"target_days: expected integer day indices, got dtype {days.dtype}")
    days = days.astype(np.int64)
    # Day 0 has no day before it; day len(close) (the day after the data) is the last one closes can forecast.
    if days.min() < 1 or days.max() > close.size:
        raise DlpipeError(
            f"target_days: every day must be in 1..{close.size} (the closes before it are the input), "
            f"got {int(days.min())}..{int(days.max())}"
        )
    return days


def _validated_train_days(train_days: int, close: np.ndarray, targets: np.ndarray) -> int:
    if isinstance(train_days, bool) or not isinstance(train_days, int | np.integer):
        raise DlpipeError(f"train_days: expected an integer, got {train_days!r}")
    if train_days < MIN_ARIMA_TRAIN_DAYS or train_days > close.size:
        raise DlpipeError(
            f"train_days: the ARIMA baseline needs {MIN_ARIMA_TRAIN_DAYS}..{close.size} training days, got {train_days}"
        )
    if targets.size and targets.min() < train_days:
        raise DlpipeError(
            f"target_days: day {int(targets.min())} is in the training part (days 0..{train_days - 1}); "
            "its ARIMA forecast would use parameters estimated on later days"
        )
    return int(train_days)


def _validated_order(order) -> tuple[int, int, int]:
    values = tuple(order) if isinstance(order, list | tuple) else ()
    if (
        len(values) != 3
        or any(isinstance(v, bool) or not isinstance(v, int | np.integer) for v in values)
        or min(values) < 0
    ):
        raise DlpipeError(f"{PARAMS}.arima_order: expected [p, d, q], three integers >= 0, got {order!r}")
    return tuple(int(v) for v in values)  # type: ignore[return-value]


def _validated_max_order(max_order: int) -> int:
    if isinstance(max_order, bool) or not isinstance(max_order, int | np.integer) or max_order < 0:
        raise DlpipeError(f"{PARAMS}.arima_max_order: must be an integer >= 0, got {max_order!r}")
    return int(max_order)
