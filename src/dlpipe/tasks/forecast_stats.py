"""Does a next-day close forecast beat persistence (tomorrow's close = today's close)? The statistics to say so
honestly: the Diebold-Mariano test of equal predictive accuracy with the Harvey-Leybourne-Newbold small-sample
correction, a directional-accuracy binomial test, and price-unit error metrics.

A lower RMSE on one test period is not skill: daily closes are close to a random walk, and a network can land a
fraction of a percent below persistence by chance. `has_skill` therefore asks for both a lower mean loss and a
significant Diebold-Mariano test, and `verdict` writes that judgement as one line for reports.

References: Diebold & Mariano (1995), "Comparing predictive accuracy", JBES 13(3); Harvey, Leybourne & Newbold
(1997), "Testing the equality of prediction mean squared errors", IJF 13(2).

numpy and scipy only: the evaluation stage and the tests share it without torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import stats

from dlpipe.errors import DlpipeError

SIGNIFICANCE = 0.05  # default level
MIN_DM_OBSERVATIONS = 3  # the HLN t distribution has n-1 degrees of freedom; below 3 the test says nothing


@dataclass(frozen=True)
class DMResult:
    """Outcome of `diebold_mariano`."""

    statistic: float  # HLN-corrected DM statistic (negative: the model's loss is lower)
    pvalue: float  # two-sided, Student t with n-1 degrees of freedom
    n: int
    mean_loss_difference: float  # mean(loss_model - loss_reference)


def _as_finite_vector(values, name: str) -> np.ndarray:
    """A 1-D float array, or a DlpipeError naming the argument: a NaN would silently turn every statistic to NaN."""
    array = np.asarray(values, dtype=float)
    if array.ndim != 1:
        raise DlpipeError(f"{name} must be a 1-D sequence, got shape {array.shape}")
    bad = ~np.isfinite(array)
    if bad.any():
        raise DlpipeError(f"{name} contains {int(bad.sum())} NaN/inf value(s), first at index {int(np.argmax(bad))}")
    return array


def _same_length(arrays: dict[str, np.ndarray]) -> None:
    lengths = {name: len(array) for name, array in arrays.items()}
    if len(set(lengths.values())) > 1:
        described = ", ".join(f"{name} has {length}" for name, length in lengths.items())
        raise DlpipeError(f"arrays of different lengths: {described}")


def _autocovariance(deviations: np.ndarray, lag: int) -> float:
    """gamma_k = (1/n) sum_t (d_t - dbar)(d_{t-k} - dbar): divided by n, not n-k, as Diebold-Mariano use."""
    n = len(deviations)
    return float(np.dot(deviations[lag:], deviations[: n - lag]) / n)


def _long_run_variance(differences: np.ndarray, horizon: int) -> float:
    """Variance of the loss differences allowing for the MA(h-1) dependence of h-step forecast errors:
    gamma_0 + 2 * sum_{k=1}^{h-1} gamma_k (rectangular window, as in DM 1995)."""
    deviations = differences - differences.mean()
    gamma_0 = _autocovariance(deviations, 0)
    variance = gamma_0 + 2.0 * sum(_autocovariance(deviations, lag) for lag in range(1, horizon))
    if variance <= 0.0 and horizon > 1:
        # The rectangular window does not guarantee a positive estimate; strong negative autocorrelation can
        # drive it to <= 0, where the statistic is undefined. Fall back to gamma_0, the h = 1 variance
        # (a common practical fix, conservative relative to an undefined or imaginary statistic).
        variance = gamma_0
    return variance


def _hln_factor(n: int, horizon: int) -> float:
    """Harvey-Leybourne-Newbold (1997) correction: the DM statistic over-rejects in small samples."""
    return math.sqrt((n + 1 - 2 * horizon + horizon * (horizon - 1) / n) / n)


def diebold_mariano(errors_model, errors_reference, horizon: int = 1, power: int = 2) -> DMResult:
    """Diebold-Mariano (1995) test of equal predictive accuracy with the Harvey-Leybourne-Newbold (1997)
    small-sample correction. Loss = |e|**power. d_t = loss_model - loss_reference. Long-run variance
    of d from autocovariances up to lag horizon-1 (gamma_0 + 2*sum gamma_k), divided by n; DM = mean(d)/sqrt(var/n);
    HLN: DM * sqrt((n + 1 - 2h + h(h-1)/n) / n); p-value from t(n-1), two-sided."""
    model = _as_finite_vector(errors_model, "errors_model")
    reference = _as_finite_vector(errors_reference, "errors_reference")
    _same_length({"errors_model": model, "errors_reference": reference})
    n = len(model)
    if n < MIN_DM_OBSERVATIONS:
        raise DlpipeError(f"Diebold-Mariano test needs at least {MIN_DM_OBSERVATIONS} observations, got {n}")
    if isinstance(horizon, bool) or not isinstance(horizon, int | np.integer) or not 1 <= horizon < n:
        raise DlpipeError(f"horizon must be an integer from 1 to {n - 1} (fewer than the {n} observations)")
    if not power > 0:
        raise DlpipeError(f"power must be positive, got {power}")

    with np.errstate(over="ignore"):
        differences = np.abs(model) ** power - np.abs(reference) ** power
    if not np.isfinite(differences).all():
        raise DlpipeError(f"losses |e|**{power} overflow; rescale the errors")
    mean_difference = float(differences.mean())

    if np.ptp(differences) == 0.0:
        # Constant loss difference: no sampling variability to test against. Zero everywhere means the two
        # forecasts are equally accurate (not NaN: "no evidence of a difference" is the honest answer);
        # a nonzero constant means one forecast is better on every single day.
        if mean_difference == 0.0:
            return DMResult(statistic=0.0, pvalue=1.0, n=n, mean_loss_difference=0.0)
        statistic = math.copysign(math.inf, mean_difference)
        return DMResult(statistic=statistic, pvalue=0.0, n=n, mean_loss_difference=mean_difference)

    variance = _long_run_variance(differences, horizon)
    dm = mean_difference / math.sqrt(variance / n)
    statistic = dm * _hln_factor(n, horizon)
    pvalue = float(2.0 * stats.t.sf(abs(statistic), df=n - 1))
    return DMResult(statistic=float(statistic), pvalue=min(pvalue, 1.0), n=n, mean_loss_difference=mean_difference)


def directional_test(predicted_change, actual_change) -> dict:
    """Directional accuracy: share of days the forecast called the sign of the actual move. Days the
    price did not move (actual_change == 0) are left out (no direction to get right); a forecast of no
    change (predicted_change == 0) on a day that moved counts as a miss. Returns
    {"directional_accuracy": float|None, "directional_hits": int, "directional_days": int,
     "directional_pvalue": float|None, "up_days_share": float|None}
    directional_pvalue: one-sided exact binomial test (scipy.stats.binomtest, alternative="greater") against 50%.
    up_days_share: the share of those days that went up, which is what "always up" scores: in a rising market
    a forecast that has learnt only the drift beats 50% by that much, so read the accuracy against it too.
    None values when there are no days with a move."""
    predicted = _as_finite_vector(predicted_change, "predicted_change")
    actual = _as_finite_vector(actual_change, "actual_change")
    _same_length({"predicted_change": predicted, "actual_change": actual})

    moved = actual != 0.0
    days = int(moved.sum())
    # np.sign(0) == 0 matches neither +1 nor -1: a flat forecast on a day that moved is a miss.
    hits = int((np.sign(predicted[moved]) == np.sign(actual[moved])).sum())
    if days == 0:
        return {
            "directional_accuracy": None,
            "directional_hits": 0,
            "directional_days": 0,
            "directional_pvalue": None,
            "up_days_share": None,
        }
    pvalue = float(stats.binomtest(hits, days, 0.5, alternative="greater").pvalue)
    return {
        "directional_accuracy": hits / days,
        "directional_hits": hits,
        "directional_days": days,
        "directional_pvalue": pvalue,
        "up_days_share": float((actual[moved] > 0).mean()),
    }


def error_metrics(actual, predicted, last) -> dict:
    """Price-unit errors of next-day close forecasts: {"rmse", "mae", "mape"} (mape in percent of the
    actual close) plus directional_test(predicted - last, actual - last) merged in. `last` is the close of the
    day the forecast is made (the persistence forecast)."""
    actual = _as_finite_vector(actual, "actual")
    predicted = _as_finite_vector(predicted, "predicted")
    last = _as_finite_vector(last, "last")
    _same_length({"actual": actual, "predicted": predicted, "last": last})
    if len(actual) == 0:
        raise DlpipeError("error_metrics needs at least one forecast, got none")
    if (actual == 0.0).any():
        # A close of exactly 0 is a data error for a stock, and MAPE would be infinite: say so rather than
        # report inf.
        raise DlpipeError(f"actual contains a close of 0 at index {int(np.argmax(actual == 0.0))}; MAPE is undefined")

    errors = predicted - actual
    metrics = {
        "rmse": float(np.sqrt(np.mean(errors**2))),
        "mae": float(np.mean(np.abs(errors))),
        "mape": float(np.mean(np.abs(errors) / np.abs(actual)) * 100.0),
    }
    metrics.update(directional_test(predicted - last, actual - last))
    return metrics


def has_skill(dm: DMResult, alpha: float = SIGNIFICANCE) -> bool:
    """True only when the model's mean loss is lower than the reference's AND the DM p-value < alpha.
    A model equal to the reference has no skill."""
    # The two-sided test alone would also reject for a significantly *worse* model; the sign check rules it out.
    return dm.mean_loss_difference < 0.0 and dm.pvalue < alpha


def _format_pvalue(pvalue: float, alpha: float) -> str:
    """'p = 0.041' with 2 significant digits, 'p < 0.001' below that; more digits when 2 would round onto alpha
    (p = 0.0496 shown as 'p = 0.05 < 0.05' would read as a contradiction)."""
    if pvalue < 0.001:
        return "p < 0.001"
    text = f"{pvalue:.2g}"
    if float(text) == alpha and pvalue != alpha:
        text = f"{pvalue:.3g}"
    return f"p = {text}"


def _format_change(ratio: float) -> str:
    """'RMSE 4.1% lower than persistence' from ratio = model RMSE / persistence RMSE."""
    if ratio == 1.0:
        return "RMSE equal to persistence"
    percent = abs(1.0 - ratio) * 100.0
    # One decimal, unless that would print a real difference as 0.0%.
    amount = f"{percent:.1f}" if percent >= 0.05 else f"{percent:.1g}"
    direction = "lower" if ratio < 1.0 else "higher"
    return f"RMSE {amount}% {direction} than persistence"


def verdict(name: str, ratio: float, dm: DMResult, alpha: float = SIGNIFICANCE) -> str:
    """One plain line for reports, e.g.
    'lstm: no skill: RMSE 0.3% lower than persistence, not significant (Diebold-Mariano p = 0.41)'
    'gru: skill: RMSE 4.1% lower than persistence (Diebold-Mariano p = 0.003 < 0.05)'
    'rnn: no skill: RMSE 2.0% higher than persistence (Diebold-Mariano p = 0.12)'
    `ratio` = model RMSE / persistence RMSE. Equal -> 'equal to persistence'. Format p with 2 significant
    digits (p < 0.001 shown as 'p < 0.001')."""
    if not (math.isfinite(ratio) and ratio >= 0.0):
        raise DlpipeError(f"RMSE ratio for {name} must be a finite non-negative number, got {ratio}")
    skilful = has_skill(dm, alpha)
    pvalue_text = _format_pvalue(dm.pvalue, alpha)
    if skilful and pvalue_text != "p < 0.001":
        pvalue_text += f" < {alpha:g}"

    qualifier = ""
    if ratio < 1.0 and not skilful:
        # Lower RMSE, yet no skill: usually chance; rarely the test's loss (e.g. power=1) disagrees with RMSE.
        qualifier = ", not significant" if dm.pvalue >= alpha else ", but its Diebold-Mariano loss is not lower"
    label = "skill" if skilful else "no skill"
    return f"{name}: {label}: {_format_change(ratio)}{qualifier} (Diebold-Mariano {pvalue_text})"
