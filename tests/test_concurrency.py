"""Several processes at once on one project: the local MLflow store loses nothing and never reports a
locked database, a fresh store is created once, and one stage started twice leaves one whole output."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow import MlflowClient

from conftest import tiny_params, write_project
from dlpipe import stages, tracking
from dlpipe.config import load_config
from dlpipe.io import sha256_file

pytestmark = pytest.mark.slow

METRICS_PER_PROCESS = 1000
PROCESSES = 4

# One process of the store tests: create the store if need be, start a run and log metrics one by one.
LOGGER = """
import sys
from mlflow import MlflowClient
from dlpipe import tracking
from dlpipe.config import load_config

config = load_config(sys.argv[1])
experiment_id = tracking.ensure_experiment(config)
client = MlflowClient(tracking.tracking_uri(config))
run = client.create_run(experiment_id, tags={"writer": sys.argv[2]})
for step in range(int(sys.argv[3])):
    client.log_metric(run.info.run_id, "value", float(step), step=step)
client.set_terminated(run.info.run_id)
"""


def _env() -> dict[str, str]:
    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


def _run_together(commands: list[list[str]], cwd: Path) -> list[subprocess.CompletedProcess]:
    processes = [
        subprocess.Popen(c, cwd=cwd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for c in commands
    ]
    results = []
    for command, process in zip(commands, processes, strict=True):
        stdout, stderr = process.communicate(timeout=600)
        results.append(subprocess.CompletedProcess(command, process.returncode, stdout, stderr))
    return results


def _writers(config, count: int, metrics: int) -> list[subprocess.CompletedProcess]:
    commands = [[sys.executable, "-c", LOGGER, str(config.params_file), str(i), str(metrics)] for i in range(count)]
    return _run_together(commands, config.paths.root)


def _runs(config) -> list:
    client = MlflowClient(tracking.tracking_uri(config))
    return client.search_runs([client.get_experiment_by_name(config.params.mlflow.experiment).experiment_id])


def test_first_runs_on_a_fresh_store_do_not_race(tmp_path):
    config = load_config(write_project(tmp_path / "project", tiny_params()))
    assert not config.paths.mlflow_db.exists()
    results = _writers(config, count=3, metrics=1)
    for result in results:
        assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(r.data.tags["writer"] for r in _runs(config)) == ["0", "1", "2"]


def test_parallel_writers_lose_no_metric(tmp_path):
    config = load_config(write_project(tmp_path / "project", tiny_params()))
    tracking.ensure_experiment(config)
    results = _writers(config, count=PROCESSES, metrics=METRICS_PER_PROCESS)
    for result in results:
        assert result.returncode == 0 and "database is locked" not in result.stderr, result.stderr[-3000:]
    client = MlflowClient(tracking.tracking_uri(config))
    runs = _runs(config)
    assert len(runs) == PROCESSES
    for run in runs:
        history = client.get_metric_history(run.info.run_id, "value")
        assert sorted(m.step for m in history) == list(range(METRICS_PER_PROCESS))


def test_same_export_started_twice_leaves_one_whole_output(tmp_path):
    params = tiny_params()
    params["models"] = {"cnn": "images"}
    config = load_config(write_project(tmp_path / "project", params))
    for stage in (stages.fetch_images, stages.augment):
        stage(config)
    stages.train(config, "cnn")

    command = [sys.executable, "-m", "dlpipe", "export", "cnn"]
    results = _run_together([command, command], config.paths.root)
    for result in results:
        assert result.returncode == 0, result.stderr[-3000:]
    info = json.loads(config.paths.export_info("cnn").read_text())
    assert sha256_file(config.paths.onnx("cnn")) == info["onnx_sha256"]  # the file and its record agree
    assert not [p.name for p in config.paths.model_dir("cnn").iterdir() if p.name.startswith(".")]
    metrics = stages.evaluate(config, "cnn")  # and the pair is usable as is
    assert metrics["onnx_max_abs_diff"] <= 1e-4
