"""Helpers for tests against a real local MLflow model registry."""

from __future__ import annotations

from mlflow import MlflowClient

from dlpipe import tracking


def registry(config) -> MlflowClient:
    return MlflowClient(tracking.tracking_uri(config), tracking.tracking_uri(config))


def new_version(config, model: str = "cnn") -> str:
    """A new version of `dlpipe-<model>` whose files stand for a logged model: only its tags matter."""
    client = registry(config)
    name = tracking.registered_name(model)
    if not client.search_registered_models(f"name = '{name}'"):
        client.create_registered_model(name)
    source = config.paths.root / "exported"
    source.mkdir(exist_ok=True)
    return str(client.create_model_version(name, source=source.as_uri()).version)
