"""The serving tests' world: a tiny project after a complete pipeline run (so the registry holds a
champion cnn and lstm), and `dlpipe serve` started on it as a real process on a loopback port."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

from conftest import tiny_params, write_project
from servers import free_port, stop

READY_TIMEOUT_S = 120


def build_project(root: Path) -> Path:
    """A tiny project (cnn, lstm and the dcgan) trained, exported, evaluated and registered. Returns its root."""
    from dlpipe import stages
    from dlpipe.config import load_config

    # A module-scoped build runs before the per-test isolation fixture: an MLflow URI an earlier test left in
    # the environment would receive this project's runs and registry, and the server would find none.
    for key in [key for key in os.environ if key.lstrip("_").startswith("MLFLOW_")]:
        del os.environ[key]
    config = load_config(write_project(root, tiny_params()))
    stages.fetch_images(config)
    stages.fetch_stocks(config)
    stages.augment(config)
    for model in config.all_models:
        for stage in ("train", "export", "evaluate"):
            stages.STAGES[stage](config, model)
    return config.paths.root


def copy_project(template: Path, root: Path) -> Path:
    """A copy of a built project, its MLflow store re-rooted at the copy's own artifacts: a test may
    register versions, move aliases or edit params without touching the template or other modules' copies."""
    from dlpipe import tracking
    from dlpipe.config import load_config

    shutil.copytree(template, root, symlinks=True)
    tracking.reroot_local_store(load_config(root / "params.yaml"))
    return root


def serving_env() -> dict[str, str]:
    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1"}
    for key in [key for key in env if key.lstrip("_").startswith("MLFLOW_")] + ["DLPIPE_PARAMS"]:
        env.pop(key, None)
    return env


@contextlib.contextmanager
def running_server(root: Path, *args: str, env: dict[str, str] | None = None) -> Iterator[str]:
    """`dlpipe serve` on `root`'s params with `args`, on a free loopback port, until every model is ready.
    Yields the base URL; the process is stopped (and its log shown on a failure to start) afterwards."""
    port = free_port()
    command = [
        sys.executable,
        "-m",
        "dlpipe",
        "serve",
        "--params",
        str(root / "params.yaml"),
        "--port",
        str(port),
        *args,
    ]
    log_path = root / f"serve-{port}.log"
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, cwd=root, env=env or serving_env(), stdout=log, stderr=subprocess.STDOUT)
        url = f"http://127.0.0.1:{port}"
        try:
            deadline, waiting = time.monotonic() + READY_TIMEOUT_S, "no answer"
            while True:
                try:
                    ready = httpx.get(f"{url}/readyz", timeout=2)
                    if ready.status_code == 200:
                        break
                    waiting = ready.text  # which models are not loaded, and why
                except httpx.TransportError:
                    pass
                if process.poll() is not None or time.monotonic() > deadline:
                    log_text = log_path.read_text()
                    raise RuntimeError(
                        f"dlpipe serve did not become ready: {waiting}\n{log_text[:3000]}\n...\n{log_text[-1000:]}"
                    )
                time.sleep(0.2)
            yield url
        finally:
            stop(process)


def listing(url: str) -> dict[str, dict]:
    """`GET /v1/models` by model name."""
    response = httpx.get(f"{url}/v1/models", timeout=10)
    assert response.status_code == 200, response.text
    return {entry["name"]: entry for entry in response.json()["models"]}


def metric(url: str, name: str, **labels: str) -> float:
    """One sample of the service's Prometheus metrics (0 when it has not been counted yet)."""
    from prometheus_client.parser import text_string_to_metric_families

    response = httpx.get(f"{url}/metrics", timeout=10)
    assert response.status_code == 200
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return sample.value
    return 0.0
