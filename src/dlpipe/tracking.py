"""MLflow: where runs go, how they are tagged, artifacts, and the model registry (`dlpipe-<model>`,
alias `champion` on the best evaluated version)."""

from __future__ import annotations

import logging
import os
import subprocess
import time
from pathlib import Path
from typing import Any

from dlpipe.config import Config

CHAMPION = "champion"


def tracking_uri(config: Config) -> str:
    """MLFLOW_TRACKING_URI, else params.mlflow.tracking_uri, else an absolute sqlite file at the root.

    The absolute path matters: DVC and Prefect may run stages from other working directories, and
    MLflow's own default (`sqlite:///mlflow.db`) is relative to whatever that directory is.
    """
    uri = os.environ.get("MLFLOW_TRACKING_URI") or config.params.mlflow.tracking_uri
    if not uri:
        return f"sqlite:///{config.paths.mlflow_db}"
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return f"sqlite:///{(config.paths.root / uri.removeprefix('sqlite:///')).resolve()}"
    return uri


def registered_name(model: str) -> str:
    return f"dlpipe-{model}"


def client(config: Config):
    from mlflow import MlflowClient

    # Alembic logs every sqlite migration at INFO on first use; that is noise in a stage's output.
    logging.getLogger("alembic").setLevel(logging.WARNING)
    return MlflowClient(tracking_uri=tracking_uri(config), registry_uri=tracking_uri(config))


def artifact_location(config: Config) -> str | None:
    """Artifacts beside the sqlite file (absolute); a remote server decides its own location."""
    return config.paths.mlflow_artifacts.as_uri() if tracking_uri(config).startswith("sqlite:") else None


def git_sha(root: Path) -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10, check=True
        )
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def run_tags(config: Config, model: str, stage: str, data_sha256: str) -> dict[str, str]:
    return {
        "model": model,
        "stage": stage,
        "git_sha": git_sha(config.paths.root),
        "params_hash": config.params_hash,
        "data_sha256": data_sha256,
    }


def log_artifact(config: Config, run_id: str, path: Path, artifact_path: str) -> None:
    client(config).log_artifact(run_id, str(path), artifact_path=artifact_path)


def log_metrics(config: Config, run_id: str, metrics: dict[str, Any]) -> None:
    from mlflow.entities import Metric

    stamp = int(time.time() * 1000)
    numeric = [
        Metric(k, float(v), stamp, 0)
        for k, v in metrics.items()
        if isinstance(v, int | float) and not isinstance(v, bool)
    ]
    client(config).log_batch(run_id, metrics=numeric)


def register_onnx(config: Config, model: str, run_id: str, onnx_path: Path) -> str:
    """Log the ONNX file as an MLflow model in the run and register it as a new version."""
    import mlflow
    import onnx

    mlflow.set_tracking_uri(tracking_uri(config))
    mlflow.set_registry_uri(tracking_uri(config))
    with mlflow.start_run(run_id=run_id):
        info = mlflow.onnx.log_model(
            onnx.load(onnx_path),
            name="onnx",
            registered_model_name=registered_name(model),
            pip_requirements=["onnxruntime"],  # skips slow requirement inference
        )
    return str(info.registered_model_version)


def promote_if_better(
    config: Config, model: str, version: str, metrics: dict[str, Any], promotion: tuple[str, bool]
) -> bool:
    """Point alias `champion` at `version` when its promotion metric beats the current champion's.

    `promotion` is the task's (metric key, higher is better).
    """
    from mlflow.exceptions import MlflowException

    key, higher_is_better = promotion
    mlflow_client = client(config)
    name = registered_name(model)
    try:
        champion = mlflow_client.get_model_version_by_alias(name, CHAMPION)
        champion_value = float(champion.tags.get(key, "nan"))
    except MlflowException:
        champion, champion_value = None, float("nan")
    value = float(metrics[key])
    mlflow_client.set_model_version_tag(name, version, key, str(value))
    better = (
        champion is None
        or champion_value != champion_value
        or (value > champion_value if higher_is_better else value < champion_value)
    )
    if better:
        mlflow_client.set_registered_model_alias(name, CHAMPION, version)
    return better
