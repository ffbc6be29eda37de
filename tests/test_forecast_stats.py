"""Forecast statistics (dlpipe.tasks.forecast_stats): the Diebold-Mariano test against hand arithmetic, its symmetry,
degenerate cases and calibration under the null; the directional binomial test; price-unit error metrics;
the skill judgement and its one-line verdict; bad input."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from dlpipe.errors import DlpipeError
from dlpipe.tasks.forecast_stats import (
    SIGNIFICANCE,
    DMResult,
    diebold_mariano,
    directional_test,
    error_metrics,
    has_skill,
    verdict,
)

# Hand example shared by the horizon-1 and horizon-2 checks (power 2, n = 6):
#   model errors      [ 1, -1,  0,  0,  1, -1]  -> losses [1, 1, 0, 0, 1, 1]
#   reference errors  [ 2,  1,  1, -2,  0,  0]  -> losses [4, 1, 1, 4, 0, 0]
#   d = loss_model - loss_reference = [-3, 0, -1, -4, 1, 1];  sum -6,  mean dbar = -1
#   d - dbar = [-2, 1, 0, -3, 2, 2];  squares [4, 1, 0, 9, 4, 4], sum 22
MODEL_ERRORS = [1.0, -1.0, 0.0, 0.0, 1.0, -1.0]
REFERENCE_ERRORS = [2.0, 1.0, 1.0, -2.0, 0.0, 0.0]


def test_dm_horizon_1_matches_hand_arithmetic():
    # gamma_0 = 22 / 6 = 11/3;  var(dbar) = gamma_0 / n = (11/3) / 6 = 11/18
    # DM = -1 / sqrt(11/18) = -sqrt(18/11)
    # HLN factor^2 = (n + 1 - 2h + h(h-1)/n) / n = (6 + 1 - 2 + 0) / 6 = 5/6
    # statistic = -sqrt(18/11 * 5/6) = -sqrt(15/11) = -1.1677484162...
    expected = -math.sqrt(15 / 11)
    assert expected == pytest.approx(-1.1677484162422844, abs=1e-12)

    result = diebold_mariano(MODEL_ERRORS, REFERENCE_ERRORS)

    assert result.n == 6
    assert result.mean_loss_difference == pytest.approx(-1.0, abs=1e-12)
    assert result.statistic == pytest.approx(expected, abs=1e-9)
    # Two-sided, t with n - 1 = 5 degrees of freedom.
    assert result.pvalue == pytest.approx(2 * stats.t.sf(math.sqrt(15 / 11), df=5), abs=1e-9)
    assert 0.2 < result.pvalue < 0.4  # |t| = 1.17 on 5 df: nowhere near significant


def test_dm_horizon_2_adds_the_lag_1_autocovariance():
    # gamma_1 = (1/n) sum_{t=2..6} (d_t - dbar)(d_{t-1} - dbar)
    #         = (1*-2 + 0*1 + -3*0 + 2*-3 + 2*2) / 6 = (-2 + 0 + 0 - 6 + 4) / 6 = -4/6 = -2/3
    # long-run variance = gamma_0 + 2 gamma_1 = 11/3 - 4/3 = 7/3;  / n = 7/18
    # DM = -1 / sqrt(7/18) = -sqrt(18/7)
    # HLN factor^2 = (6 + 1 - 4 + 2*1/6) / 6 = (10/3) / 6 = 5/9
    # statistic = -sqrt(18/7 * 5/9) = -sqrt(10/7) = -1.1952286093...
    expected = -math.sqrt(10 / 7)

    result = diebold_mariano(MODEL_ERRORS, REFERENCE_ERRORS, horizon=2)

    assert result.statistic == pytest.approx(expected, abs=1e-9)
    assert result.pvalue == pytest.approx(2 * stats.t.sf(math.sqrt(10 / 7), df=5), abs=1e-9)
    assert result.statistic != pytest.approx(diebold_mariano(MODEL_ERRORS, REFERENCE_ERRORS).statistic)


def test_dm_falls_back_to_gamma_0_when_the_long_run_variance_is_not_positive():
    # power 1: d = |model| - |reference| = [3-1, 1-1, 3-1, 1-1, 3-1, 1-1] = [2, 0, 2, 0, 2, 0], dbar = 1
    # d - dbar = [1, -1, 1, -1, 1, -1];  gamma_0 = 6/6 = 1;  gamma_1 = 5 * (-1) / 6 = -5/6
    # gamma_0 + 2 gamma_1 = 1 - 5/3 < 0  -> fall back to gamma_0 = 1;  / n = 1/6
    # DM = 1 / sqrt(1/6) = sqrt(6);  HLN factor^2 (h = 2) = 5/9;  statistic = sqrt(6 * 5/9) = sqrt(10/3)
    result = diebold_mariano([3, 1, 3, 1, 3, 1], [-1, 1, 1, -1, 1, -1], horizon=2, power=1)

    assert result.mean_loss_difference == pytest.approx(1.0)
    assert result.statistic == pytest.approx(math.sqrt(10 / 3), abs=1e-9)
    assert math.isfinite(result.pvalue)


def test_dm_swapping_model_and_reference_flips_the_sign_only():
    rng = np.random.default_rng(7)
    a, b = rng.normal(0, 1.0, 80), rng.normal(0, 1.3, 80)

    forward, backward = diebold_mariano(a, b, horizon=3), diebold_mariano(b, a, horizon=3)

    assert forward.statistic != 0.0
    assert backward.statistic == pytest.approx(-forward.statistic, rel=1e-12)
    assert backward.pvalue == pytest.approx(forward.pvalue, rel=1e-12)
    assert backward.mean_loss_difference == pytest.approx(-forward.mean_loss_difference, rel=1e-12)


def test_identical_errors_are_no_evidence_and_no_skill():
    errors = [0.5, -1.2, 0.3, 2.0, -0.7]

    result = diebold_mariano(errors, errors)
    # Same absolute errors with flipped signs: the same losses, so the same answer.
    flipped = diebold_mariano(errors, [-e for e in errors])

    assert result == DMResult(statistic=0.0, pvalue=1.0, n=5, mean_loss_difference=0.0)
    assert flipped.statistic == 0.0 and flipped.pvalue == 1.0
    assert not has_skill(result)
    line = verdict("lstm", 1.0, result)
    assert "no skill" in line and "equal to persistence" in line
    assert line == "lstm: no skill: RMSE equal to persistence (Diebold-Mariano p = 1)"


def test_constant_nonzero_loss_difference_is_infinitely_significant():
    better = diebold_mariano([1.0, -1.0, 1.0, 1.0], [2.0, 2.0, -2.0, 2.0])  # d = -3 every day
    worse = diebold_mariano([2.0, 2.0, -2.0, 2.0], [1.0, -1.0, 1.0, 1.0])

    assert better.statistic == -math.inf and better.pvalue == 0.0 and better.mean_loss_difference == -3.0
    assert worse.statistic == math.inf and worse.pvalue == 0.0
    assert has_skill(better) and not has_skill(worse)


def test_a_clearly_better_model_has_skill_and_a_clearly_worse_one_does_not():
    rng = np.random.default_rng(2024)
    reference = rng.normal(0.0, 2.0, 500)
    model = rng.normal(0.0, 1.0, 500)  # half the reference's error scale

    better = diebold_mariano(model, reference)
    worse = diebold_mariano(reference, model)

    assert better.statistic < 0 and better.pvalue < 1e-6
    assert has_skill(better)
    assert worse.statistic > 0 and worse.pvalue < 1e-6
    assert not has_skill(worse)  # significant, but in the wrong direction


def test_rejection_rate_under_the_null_is_close_to_the_level():
    rng = np.random.default_rng(12345)
    repetitions, n = 400, 250
    model = rng.normal(0.0, 1.0, (repetitions, n))
    reference = rng.normal(0.0, 1.0, (repetitions, n))

    rejections = sum(diebold_mariano(m, r).pvalue < SIGNIFICANCE for m, r in zip(model, reference, strict=True))

    assert 0.02 <= rejections / repetitions <= 0.09


def test_has_skill_needs_a_lower_loss_and_significance():
    def dm(pvalue: float, mean_loss_difference: float) -> DMResult:
        return DMResult(statistic=math.copysign(2.0, mean_loss_difference), pvalue=pvalue, n=100,
                        mean_loss_difference=mean_loss_difference)  # fmt: skip

    assert has_skill(dm(0.01, -0.5))
    assert not has_skill(dm(0.2, -0.5))  # lower but not significant
    assert not has_skill(dm(0.01, 0.5))  # significant but worse
    assert not has_skill(dm(0.05, -0.5))  # p must be strictly below alpha
    assert has_skill(dm(0.05, -0.5), alpha=0.1)


def test_verdict_lines():
    not_significant = DMResult(statistic=-0.8, pvalue=0.4123, n=250, mean_loss_difference=-0.01)
    significant = DMResult(statistic=-3.0, pvalue=0.00312, n=250, mean_loss_difference=-0.2)
    highly_significant = DMResult(statistic=-5.0, pvalue=2e-6, n=250, mean_loss_difference=-0.5)
    worse = DMResult(statistic=1.5, pvalue=0.1249, n=250, mean_loss_difference=0.05)

    assert verdict("lstm", 0.997, not_significant) == (
        "lstm: no skill: RMSE 0.3% lower than persistence, not significant (Diebold-Mariano p = 0.41)"
    )
    assert verdict("gru", 0.959, significant) == (
        "gru: skill: RMSE 4.1% lower than persistence (Diebold-Mariano p = 0.0031 < 0.05)"
    )
    assert verdict("gru", 0.9, highly_significant) == (
        "gru: skill: RMSE 10.0% lower than persistence (Diebold-Mariano p < 0.001)"
    )
    assert verdict("rnn", 1.02, worse) == "rnn: no skill: RMSE 2.0% higher than persistence (Diebold-Mariano p = 0.12)"
    # 2 significant digits would print 0.0496 as "0.05 < 0.05"; one more digit keeps the line truthful.
    borderline = DMResult(statistic=-2.0, pvalue=0.0496, n=250, mean_loss_difference=-0.1)
    assert verdict("lstm", 0.98, borderline).endswith("(Diebold-Mariano p = 0.0496 < 0.05)")


def test_verdict_rejects_a_meaningless_ratio():
    dm = DMResult(statistic=0.0, pvalue=1.0, n=10, mean_loss_difference=0.0)
    with pytest.raises(DlpipeError, match="ratio"):
        verdict("lstm", math.nan, dm)


def test_directional_test_hand_example():
    actual = [1.0, -2.0, 0.0, 0.5, -0.5, 0.0, 3.0]
    predicted = [0.2, -0.1, 0.3, 0.0, 0.4, -1.0, 1.0]
    # Days 2 and 5 did not move: left out -> 5 days.  Hits: day 0 (+,+), day 1 (-,-), day 6 (+,+).
    # Misses: day 3 (a flat forecast on a move), day 4 (+ against -).  3 of 5.
    # One-sided binomial P(X >= 3 | n=5, p=1/2) = (C(5,3) + C(5,4) + C(5,5)) / 32 = (10 + 5 + 1) / 32 = 0.5

    result = directional_test(predicted, actual)

    assert result["directional_hits"] == 3
    assert result["directional_days"] == 5
    assert result["directional_accuracy"] == pytest.approx(0.6)
    assert result["directional_pvalue"] == pytest.approx(0.5, abs=1e-12)
    assert result["directional_pvalue"] == pytest.approx(stats.binomtest(3, 5, 0.5, alternative="greater").pvalue)
    # Of the 5 days that moved, days 0, 3 and 6 went up: "always up" would score 3/5 as well.
    assert result["up_days_share"] == pytest.approx(0.6)


def test_directional_pvalue_is_scipys_exact_binomial():
    rng = np.random.default_rng(3)
    actual = rng.normal(size=200)
    predicted = np.where(rng.random(200) < 0.6, actual, -actual)  # right about 60% of the time

    result = directional_test(predicted, actual)

    k, n = result["directional_hits"], result["directional_days"]
    assert n == 200 and 100 < k < 140
    assert result["directional_pvalue"] == stats.binomtest(k, n, 0.5, alternative="greater").pvalue


def test_directional_test_without_a_move_has_nothing_to_judge():
    result = directional_test([0.5, -0.5, 0.0], [0.0, 0.0, 0.0])

    assert result == {
        "directional_accuracy": None,
        "directional_hits": 0,
        "directional_days": 0,
        "directional_pvalue": None,
        "up_days_share": None,
    }


def test_error_metrics_hand_example():
    actual = [10.0, 20.0, 40.0]
    predicted = [11.0, 18.0, 40.0]
    last = [10.5, 19.0, 41.0]
    # errors predicted - actual = [1, -2, 0]
    # rmse = sqrt((1 + 4 + 0) / 3) = sqrt(5/3) = 1.2909944487...
    # mae  = (1 + 2 + 0) / 3 = 1
    # mape = (1/10 + 2/20 + 0/40) / 3 * 100 = 0.2 / 3 * 100 = 6.666...%
    # direction: predicted - last = [0.5, -1, -1], actual - last = [-0.5, 1, -1] -> only day 2 right: 1 of 3
    # p = P(X >= 1 | n=3, p=1/2) = 1 - 1/8 = 0.875

    metrics = error_metrics(actual, predicted, last)

    assert metrics["rmse"] == pytest.approx(1.2909944487358056, abs=1e-12)
    assert metrics["mae"] == pytest.approx(1.0, abs=1e-12)
    assert metrics["mape"] == pytest.approx(20 / 3, abs=1e-12)
    assert metrics["directional_hits"] == 1
    assert metrics["directional_days"] == 3
    assert metrics["directional_accuracy"] == pytest.approx(1 / 3)
    assert metrics["directional_pvalue"] == pytest.approx(0.875, abs=1e-12)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: diebold_mariano([1.0, 2.0, 3.0], [1.0, 2.0]), "different lengths"),
        (lambda: diebold_mariano([1.0, math.nan, 3.0], [1.0, 2.0, 3.0]), "errors_model contains 1 NaN"),
        (lambda: diebold_mariano([1.0, 2.0, 3.0], [1.0, 2.0, math.inf]), "errors_reference contains 1 NaN/inf"),
        (lambda: diebold_mariano([1.0, 2.0], [2.0, 1.0]), "at least 3 observations, got 2"),
        (lambda: diebold_mariano([1.0, 2.0, 3.0], [2.0, 1.0, 1.0], horizon=3), "horizon"),
        (lambda: diebold_mariano([1.0, 2.0, 3.0], [2.0, 1.0, 1.0], horizon=0), "horizon"),
        (lambda: diebold_mariano([1.0, 2.0, 3.0], [2.0, 1.0, 1.0], power=0), "power"),
        (lambda: directional_test([1.0, 2.0], [1.0]), "different lengths"),
        (lambda: directional_test([1.0, math.nan], [1.0, 2.0]), "predicted_change contains"),
        (lambda: error_metrics([1.0, 2.0], [1.0, 2.0], [1.0]), "last has 1"),
        (lambda: error_metrics([1.0, math.nan], [1.0, 2.0], [1.0, 2.0]), "actual contains"),
        (lambda: error_metrics([], [], []), "at least one forecast"),
        (lambda: error_metrics([0.0, 2.0], [1.0, 2.0], [1.0, 2.0]), "close of 0"),
    ],
)
def test_bad_input_raises_a_one_line_dlpipe_error(call, message):
    with pytest.raises(DlpipeError, match=message) as raised:
        call()
    assert "\n" not in str(raised.value)
