"""Training that diverges or is stopped: a clear failure, a non-zero exit, the MLflow run ended FAILED or
KILLED (never left RUNNING), no checkpoint of bad weights, and no scratch directory left behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
from mlflow import MlflowClient

from conftest import tiny_params, write_project
from dlpipe import stages, tracking
from dlpipe.config import load_config
from dlpipe.train import SCRATCH_PREFIX, NonFiniteLoss, _clean_orphans

START_TIMEOUT_S = 120


def _project(tmp_path, optimizer: dict | None = None, **cnn):
    params = tiny_params()
    params["models"] = {"cnn": "images"}
    params["train"]["cnn"].update(cnn)
    params["train"]["cnn"]["optimizer"].update(optimizer or {})
    config = load_config(write_project(tmp_path / "project", params))
    stages.fetch_images(config)
    stages.augment(config)
    return config


def _runs(config) -> list:
    client = MlflowClient(tracking.tracking_uri(config))
    experiment = client.get_experiment_by_name(config.params.mlflow.experiment)
    return client.search_runs([experiment.experiment_id]) if experiment else []


def _scratch(config) -> list:
    return list(config.paths.model_dir("cnn").glob(f"{SCRATCH_PREFIX}*"))


def test_diverging_loss_stops_training_and_fails_the_run(tmp_path):
    config = _project(tmp_path, optimizer={"lr": 1e6}, epochs=3)
    with pytest.raises(NonFiniteLoss, match=r"train\.cnn: loss became (nan|inf|-inf) at epoch 0"):
        stages.train(config, "cnn")
    assert not config.paths.checkpoint("cnn").exists() and not config.paths.train_info("cnn").exists()
    assert _scratch(config) == []
    assert [r.info.status for r in _runs(config)] == ["FAILED"]


def _start_training(config) -> subprocess.Popen:
    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    process = subprocess.Popen(
        [sys.executable, "-m", "dlpipe", "--params", str(config.params_file), "train", "cnn"],
        cwd=config.paths.root,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + START_TIMEOUT_S
    # Training has begun once the scratch directory and the MLflow run exist.
    while not (_scratch(config) and _runs(config)):
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "training did not start"
        time.sleep(0.2)
    time.sleep(1.0)  # a few steps in
    return process


@pytest.mark.slow
@pytest.mark.parametrize(("signum", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_stops_training_with_non_zero_exit_and_killed_run(tmp_path, signum, code):
    config = _project(tmp_path, epochs=200, patience=200)
    process = _start_training(config)
    sent = time.monotonic()
    process.send_signal(signum)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == code, stderr[-2000:]
    assert time.monotonic() - sent < 30
    assert f"stopped by {signal.Signals(signum).name}" in stderr
    assert [r.info.status for r in _runs(config)] == ["KILLED"]
    assert _scratch(config) == [] and not config.paths.checkpoint("cnn").exists()


@pytest.mark.slow
def test_sigkill_leftovers_are_cleaned_up_next_time(tmp_path):
    config = _project(tmp_path, epochs=200, patience=200)
    process = _start_training(config)
    process.kill()
    process.wait(timeout=30)
    assert _scratch(config) and [r.info.status for r in _runs(config)] == ["RUNNING"]  # what SIGKILL leaves
    _clean_orphans(config, "cnn")  # the first thing the next training of this model does
    assert _scratch(config) == []
    assert [r.info.status for r in _runs(config)] == ["KILLED"]
