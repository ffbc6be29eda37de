"""Fixtures: every test works in its own tmp_path project with tiny parameters (a few hundred images,
one epoch), so nothing touches the repository's data/, models/, reports/ or mlflow.db."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")


def tiny_params() -> dict:
    """The repository's params.yaml, shrunk so a full pipeline run takes seconds on two cores."""
    params = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())
    # The pipeline's shape (images and stocks, every stage) with its two quickest models; every other
    # registered model goes through its task in tests/test_registry.py.
    params["models"] = {"cnn": "images", "lstm": "stocks"}
    params["data"]["images"]["limit"] = 300
    params["augment"]["preview_count"] = 4
    params["train"]["cnn"].update(epochs=1, batch_size=64)
    params["train"]["lstm"].update(epochs=1, window=10)
    # Both committed tickers from 2008: 1,300 days of GOOG, 2,485 of MSFT; ARIMA's order fixed (no AIC search).
    params["data"]["stocks"].update(start="2008-01-01")
    params["evaluate"]["baselines"].update(arima_order=[1, 0, 0])
    # One epoch on 210 images is far from the production floor; the gate's logic is tested in test_promotion.py.
    params["promote"].update(
        thresholds={"onnx_accuracy": 0.2, "rmse_ratio_vs_persistence": 1.5, "fid_cnn": 1e6}, max_latency_ms=1000
    )
    params["export"].update(calibration_samples=32)
    params["evaluate"].update(latency_warmup=1, latency_runs=5)
    # 21 training images a class at this limit; a tiny ResNet trains ten times in seconds.
    transfer = {"net": {"depth": 8, "widths": [4, 8, 8]}, "shots": [2, 5], "pretrain_epochs": 1, "epochs": 2}
    params["transfer"].update(transfer, head_epochs=1)
    # The teacher must be one of the models above; tests/test_distill.py trains it and sets the student.
    params["distill"].update(teacher="cnn", epochs=1)
    params["cost"].update(channels=[[8, 16], [16, 32]], sizes=[8], batch=4, repeats=3, warmup=1)
    # The DCGAN's stages run too, judged by the tiny cnn: one epoch of a narrow GAN, FID on 64 samples.
    params["train"]["dcgan"].update(epochs=1, fid_samples=64, grid_every=1)
    params["train"]["dcgan"]["net"].update(width=8)
    return params


def write_project(root: Path, params: dict) -> Path:
    """A project directory: params.yaml plus the committed samples. Returns the params file."""
    root.mkdir(parents=True, exist_ok=True)
    shutil.copytree(REPO_ROOT / "data" / "samples", root / "data" / "samples", dirs_exist_ok=True)
    params_file = root / "params.yaml"
    params_file.write_text(yaml.safe_dump(params, sort_keys=False))
    return params_file


@contextlib.contextmanager
def benchmark_module(name: str) -> Iterator[ModuleType]:
    """benchmarks/<name>.py imported as a module (benchmarks/ is not a package), forgotten afterwards."""
    spec = importlib.util.spec_from_file_location(name, REPO_ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name, None)


@pytest.fixture(scope="session")
def built_project(tmp_path_factory) -> Path:
    """A tiny project after a complete run (cnn, lstm and dcgan trained, exported, evaluated; champions in
    its registry), built once a session. Read-only: take a `serving.copy_project` to change anything."""
    from serving import build_project

    return build_project(tmp_path_factory.mktemp("built-once") / "project")


@pytest.fixture(autouse=True)
def _isolated_mlflow(monkeypatch):
    # A developer's MLFLOW_TRACKING_URI must not receive test runs.
    for key in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "MLFLOW_EXPERIMENT_ID", "MLFLOW_RUN_ID"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.delenv("DLPIPE_PARAMS", raising=False)


@pytest.fixture
def project(tmp_path) -> Path:
    """Params file of a tiny project in tmp_path."""
    return write_project(tmp_path / "project", tiny_params())


@pytest.fixture
def config(project):
    from dlpipe.config import load_config

    return load_config(project)


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
