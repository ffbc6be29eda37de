"""The promotion gate, `dlpipe promote` and `dlpipe rollback` against a real local MLflow registry."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest

from dlpipe import promotion, tracking
from dlpipe.config import PromoteParams
from dlpipe.errors import DlpipeError
from dlpipe.promotion import Candidate
from dlpipe.tasks.base import int8_metric_name
from registry import new_version, registry

MNIST = {"source": "mnist_5k", "test_sha256": "a" * 64, "input_shape": [1, 28, 28]}
ACCURACY = ("onnx_accuracy", True)
RATIO = ("rmse_ratio_vs_persistence", False)
SETTINGS = PromoteParams()  # thresholds onnx_accuracy >= 0.95, ratio <= 1.05; 50 ms at batch 1; int8 loss 0.005
LOSSES = promotion.allowed_losses(SETTINGS)  # int8 and fp16: 0.005 each


@pytest.fixture
def config(config):
    """The project's config with the repository's promotion settings (the tiny params loosen them)."""
    return dataclasses.replace(config, params=config.params.model_copy(update={"promote": SETTINGS}))


def _champion(config, model: str = "cnn") -> str | None:
    return tracking.champion_version(config, model)


def _pair(config, fp32: float, int8: float, fp32_ms: float = 5.0, int8_ms: float = 2.0) -> list[Candidate]:
    return [
        Candidate("fp32", new_version(config), fp32, fp32_ms),
        Candidate("int8", new_version(config), int8, int8_ms),
    ]


# ------------------------------------------------------------------------------------ choice of the variant


def test_fastest_variant_within_the_allowed_loss_is_chosen():
    fp32, int8 = Candidate("fp32", "1", 0.980, 5.0), Candidate("int8", "2", 0.977, 2.0)
    assert promotion.choose([fp32, int8], higher_is_better=True, max_loss=LOSSES) is int8
    # 0.6 points lost: over the 0.5 allowed, so the slower fp32 graph is offered.
    lossy = Candidate("int8", "2", 0.974, 2.0)
    assert promotion.choose([fp32, lossy], higher_is_better=True, max_loss=LOSSES) is fp32
    # An int8 graph that is slower is never chosen, however accurate.
    slow = Candidate("int8", "2", 0.981, 6.0)
    assert promotion.choose([fp32, slow], higher_is_better=True, max_loss=LOSSES) is fp32


def test_each_variant_is_held_to_its_own_allowed_loss():
    fp32 = Candidate("fp32", "1", 0.980, 5.0)
    int8, fp16 = Candidate("int8", "2", 0.977, 2.0), Candidate("fp16", "3", 0.980, 1.0)
    # On a GPU the fp16 graph is the fastest and loses nothing: it is offered over int8.
    assert promotion.choose([fp32, int8, fp16], True, LOSSES) is fp16
    # Allowed no loss at all, int8 drops out while fp16 (equal to fp32) stays eligible.
    strict_int8 = {"int8": 0.0, "fp16": 0.005}
    assert promotion.choose([fp32, int8, Candidate("fp16", "3", 0.980, 3.0)], True, strict_int8).variant == "fp16"
    assert promotion.choose([fp32, int8], True, strict_int8) is fp32
    # An fp16 graph that lost more than max_fp16_loss is passed over, however fast.
    assert promotion.choose([fp32, int8, Candidate("fp16", "3", 0.970, 0.5)], True, LOSSES) is int8
    assert SETTINGS.max_fp16_loss == 0.005


def test_loss_is_measured_in_the_metrics_direction():
    fp32 = Candidate("fp32", "1", 0.995, 1.0)  # a ratio: lower is better
    assert promotion.choose([fp32, Candidate("int8", "2", 0.999, 0.5)], False, LOSSES).variant == "int8"
    assert promotion.choose([fp32, Candidate("int8", "2", 1.001, 0.5)], False, LOSSES).variant == "fp32"


def test_refusals_name_the_threshold_and_the_budget():
    assert promotion.refusals(Candidate("fp32", "1", 0.97, 10.0), "onnx_accuracy", True, SETTINGS) == []
    low = promotion.refusals(Candidate("fp32", "1", 0.90, 10.0), "onnx_accuracy", True, SETTINGS)
    assert low == ["onnx_accuracy 0.9000 is not at least promote.thresholds.onnx_accuracy=0.95"]
    slow = promotion.refusals(Candidate("fp32", "1", 0.99, 80.0), "onnx_accuracy", True, SETTINGS)
    assert slow == ["p50 latency 80.00 ms at batch 1 is over promote.max_latency_ms=50"]
    worse_than_persistence = promotion.refusals(Candidate("fp32", "1", 1.2, 1.0), *RATIO, SETTINGS)
    assert "is not at most promote.thresholds.rmse_ratio_vs_persistence=1.05" in worse_than_persistence[0]


def test_candidates_read_the_metrics_and_export_record():
    metrics = {
        "onnx_accuracy": 0.98,
        "int8_accuracy": 0.979,
        "latency_ms_onnx_b1_p50": 0.5,
        "latency_ms_int8_b1_p50": 0.3,
        "latency_ms_onnx_b32_p50": 5.0,
        "latency_ms_int8_b32_p50": 2.0,
    }
    export_info = {"registered_version": "3", "int8": {"registered_version": "4"}}
    found = promotion.candidates(metrics, export_info, "onnx_accuracy", 32)
    assert found == [Candidate("fp32", "3", 0.98, 5.0), Candidate("int8", "4", 0.979, 2.0)]
    # An fp16 variant joins only where evaluate measured it (its metric is in the file).
    measured = metrics | {"fp16_accuracy": 0.98, "latency_ms_fp16_b1_p50": 0.2, "latency_ms_fp16_b32_p50": 1.0}
    export_info["fp16"] = {"registered_version": "5", "measured": True}
    found = promotion.candidates(measured, export_info, "onnx_accuracy", 32)
    assert found[-1] == Candidate("fp16", "5", 0.98, 1.0) and len(found) == 3
    assert int8_metric_name("rmse_ratio_vs_persistence") == "int8_rmse_ratio_vs_persistence"


# ---------------------------------------------------------------------------------- the registry, for real


def test_gate_promotes_the_better_refuses_worse_slow_and_weak_versions_and_rollback_restores(config):
    first = _pair(config, fp32=0.970, int8=0.968)
    decision = promotion.gate(config, "cnn", first, ACCURACY, MNIST)
    assert decision == {"chosen_variant": "int8", "chosen_version": first[1].version, "refused": [], "champion": True}
    assert _champion(config) == first[1].version
    name = tracking.registered_name("cnn")
    tags = registry(config).get_model_version(name, first[0].version).tags
    assert tags["onnx_accuracy"] == "0.97"  # the variant not chosen carries its figures too

    worse = _pair(config, fp32=0.960, int8=0.958)
    decision = promotion.gate(config, "cnn", worse, ACCURACY, MNIST)
    assert decision["champion"] is False and decision["refused"] == []
    gate_tag = registry(config).get_model_version(name, worse[1].version).tags[promotion.GATE_TAG]
    assert gate_tag == "passed, but does not beat the champion"

    too_slow = _pair(config, fp32=0.990, int8=0.989, fp32_ms=90.0, int8_ms=70.0)
    decision = promotion.gate(config, "cnn", too_slow, ACCURACY, MNIST)
    assert decision["champion"] is False and "promote.max_latency_ms=50" in decision["refused"][0]
    assert (
        registry(config)
        .get_model_version(name, too_slow[1].version)
        .tags[promotion.GATE_TAG]
        .startswith("refused: p50 latency 70.00 ms")
    )

    weak = [Candidate("fp32", new_version(config), 0.940, 1.0)]  # over nothing yet, but under the floor
    assert promotion.gate(config, "cnn", weak, ACCURACY, MNIST)["champion"] is False
    assert _champion(config) == first[1].version  # none of the three moved it

    better = _pair(config, fp32=0.985, int8=0.970)  # int8 loses 1.5 points: fp32 is offered
    decision = promotion.gate(config, "cnn", better, ACCURACY, MNIST)
    assert decision["chosen_variant"] == "fp32" and decision["champion"] is True
    assert _champion(config) == better[0].version

    assert (
        promotion.rollback(config, "cnn")
        == f"dlpipe-cnn: champion v{first[1].version} (rolled back from v{better[0].version})"
    )
    assert _champion(config) == first[1].version
    with pytest.raises(DlpipeError, match="no earlier champion to roll back to"):
        promotion.rollback(config, "cnn")


def test_manual_promote_is_recorded_for_rollback_and_refuses_unknown_names(config):
    one, two = new_version(config), new_version(config)
    assert promotion.promote(config, "cnn", one) == f"dlpipe-cnn: champion v{one} (was none)"
    assert promotion.promote(config, "cnn", two) == f"dlpipe-cnn: champion v{two} (was v{one})"
    assert promotion.rollback(config, "cnn").startswith(f"dlpipe-cnn: champion v{one}")
    with pytest.raises(DlpipeError, match=r"dlpipe-cnn: no version '99' \(registered: 1, 2\)"):
        promotion.promote(config, "cnn", "99")
    with pytest.raises(DlpipeError, match="unknown model 'nosuch': no registered model 'dlpipe-nosuch'"):
        promotion.promote(config, "nosuch", "1")
    with pytest.raises(DlpipeError, match="unknown model 'nosuch'"):
        promotion.rollback(config, "nosuch")
    assert _champion(config) == one


def test_cli_promote_and_rollback_fail_in_one_line_with_exit_2(config):
    env_params = ["--params", str(config.params_file)]

    def dlpipe(*args: str) -> subprocess.CompletedProcess:
        command = [sys.executable, "-m", "dlpipe", *args, *env_params]
        return subprocess.run(command, capture_output=True, text=True, cwd=config.paths.root, timeout=120)

    version = new_version(config)
    ok = dlpipe("promote", "cnn", version)
    assert ok.returncode == 0 and ok.stdout.strip() == f"dlpipe-cnn: champion v{version} (was none)"
    for args, message in (
        (("promote", "cnn", "42"), "dlpipe-cnn: no version '42'"),
        (("promote", "cnn"), "usage: dlpipe promote MODEL VERSION"),
        (("rollback", "cnn"), "no earlier champion"),
        (("rollback", "ghost"), "unknown model 'ghost'"),
    ):
        failed = dlpipe(*args)
        assert failed.returncode == 2, failed.stderr
        assert failed.stderr.count("\n") == 1 and message in failed.stderr, failed.stderr
