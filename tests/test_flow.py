"""The Prefect flow runs the DVC stages under a real (temporary) Prefect API, logging to a real MLflow
tracking server on loopback, and leaves `dvc status` clean."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

import pytest
from projects import git_dvc_project, run

from conftest import tiny_params

# Prefect reads its settings at import: point it at a throwaway home before anything imports it.
os.environ.setdefault("PREFECT_HOME", tempfile.mkdtemp(prefix="dlpipe-prefect-"))
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    root = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    command = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    command += [
        "--backend-store-uri",
        f"sqlite:///{root / 'mlflow.db'}",
        "--artifacts-destination",
        str(root / "artifacts"),
    ]
    log_file = open(root / "server.log", "w")  # noqa: SIM115 - the server writes to it until the fixture ends
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=log_file)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    log = (root / "server.log").read_text()[-2000:]
                    raise RuntimeError(f"mlflow server did not start:\n{log}") from None
                time.sleep(0.5)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)
        log_file.close()


@pytest.fixture(scope="module")
def prefect_api():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="module")
def flow_project(tmp_path_factory):
    return git_dvc_project(tmp_path_factory.mktemp("flow") / "dlpipe", tiny_params())


def test_flow_runs_dvc_stages_and_tracks_on_server(flow_project, mlflow_server, prefect_api, monkeypatch):
    from mlflow import MlflowClient

    from pipelines.flows import dlpipe_pipeline

    root, env = flow_project
    for name in ("PATH", "PYTHONPATH"):  # the stages DVC starts run the copy's code with this venv
        monkeypatch.setenv(name, env[name])
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    state = dlpipe_pipeline(project=str(root), return_state=True)
    assert state.is_completed(), state.message
    metrics = state.result()
    assert set(metrics) == {"cnn", "lstm"}
    assert metrics["cnn"]["onnx_max_abs_diff"] <= 1e-4 and metrics["lstm"]["persistence_rmse"] > 0
    assert (root / "reports" / "index.html").is_file()
    assert not (root / "mlflow.db").exists()  # everything went to the server

    # DVC ran every stage, so its lock file is true: nothing to do, and a second flow run skips them all.
    status = run(["dvc", "status"], root, env).stdout
    assert "Data and pipelines are up to date" in status, status
    again = dlpipe_pipeline(project=str(root), return_state=True)
    assert again.is_completed() and again.result() == metrics

    client = MlflowClient(mlflow_server)
    experiment = client.get_experiment_by_name("dlpipe")
    runs = client.search_runs([experiment.experiment_id])
    assert sorted(r.data.tags["model"] for r in runs) == ["cnn", "lstm"]
    assert all(r.info.status == "FINISHED" for r in runs)
    cnn_run = next(r for r in runs if r.data.tags["model"] == "cnn")
    assert {a.path for a in client.list_artifacts(cnn_run.info.run_id, "checkpoints")} == {"checkpoints/best.ckpt"}
    assert client.get_model_version_by_alias("dlpipe-cnn", "champion").run_id == cnn_run.info.run_id


def test_flow_rejects_unknown_model_before_writing(project, prefect_api):
    from pipelines.flows import dlpipe_pipeline

    state = dlpipe_pipeline(project=str(project.parent), models=["resnet"], return_state=True)
    assert state.is_failed()
    assert "resnet" in str(state.message) or "resnet" in repr(state.result(raise_on_failure=False))
    assert not (project.parent / "data" / "images").exists()


def test_fetch_tasks_retry_and_other_stages_do_not():
    from pipelines import flows

    assert flows.fetch.retries == flows.FETCH_RETRIES > 0
    assert flows.run_stage.retries == 0
