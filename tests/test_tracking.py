"""MLflow seams: promotion compares like with like, and a copied project keeps its artifacts to itself."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from conftest import tiny_params, write_project
from dlpipe import stages, tracking
from dlpipe.config import load_config
from dlpipe.io import read_json
from registry import new_version, registry

MNIST = {"source": "mnist_5k", "test_sha256": "a" * 64, "input_shape": [1, 28, 28]}
DIGITS = {"source": "digits", "test_sha256": "b" * 64, "input_shape": [1, 8, 8]}
ACCURACY = ("onnx_accuracy", True)


def _champion(config, model: str = "cnn") -> str:
    return tracking.champion_version(config, model)


def test_champion_moves_only_over_versions_evaluated_on_the_same_data(config):
    promote = tracking.promote_if_better
    first = new_version(config)
    assert promote(config, "cnn", first, {"onnx_accuracy": 0.95}, ACCURACY, MNIST)
    # Higher accuracy on 8x8 digits says nothing about MNIST: registered beside the champion, not over it.
    digits = new_version(config)
    assert not promote(config, "cnn", digits, {"onnx_accuracy": 0.99}, ACCURACY, DIGITS)
    assert _champion(config) == first
    client, name = registry(config), tracking.registered_name("cnn")
    digits_best = client.get_model_version_by_alias(name, tracking.best_alias(tracking.data_key(DIGITS)))
    assert str(digits_best.version) == digits
    assert digits_best.tags[tracking.DATA_KEY_TAG] == tracking.data_key(DIGITS)
    # Same data: the better one wins, the worse one does not.
    worse = new_version(config)
    assert not promote(config, "cnn", worse, {"onnx_accuracy": 0.90}, ACCURACY, MNIST)
    better = new_version(config)
    assert promote(config, "cnn", better, {"onnx_accuracy": 0.97}, ACCURACY, MNIST)
    assert _champion(config) == better
    mnist_best = client.get_model_version_by_alias(name, tracking.best_alias(tracking.data_key(MNIST)))
    assert str(mnist_best.version) == better
    assert tracking.data_key(MNIST) != tracking.data_key(DIGITS)
    assert tracking.data_key(dict(reversed(MNIST.items()))) == tracking.data_key(MNIST)  # order-free


@pytest.mark.slow
def test_digits_run_leaves_the_mnist_champion_in_place(tmp_path):
    """The reported case, through the stages: MNIST first, then an 8x8 digits run in the same project."""
    params = tiny_params()
    params["models"] = {"cnn": "images"}
    params_file = write_project(tmp_path / "project", params)

    def run_cnn() -> dict:
        config = load_config(params_file)
        stages.fetch_images(config)
        stages.augment(config)
        for stage in ("train", "export"):
            stages.STAGES[stage](config, "cnn")
        return stages.evaluate(config, "cnn")

    assert run_cnn()["champion"]
    config = load_config(params_file)
    mnist_champion = _champion(config)

    params["data"]["images"].update(source="digits")
    params_file.write_text(yaml.safe_dump(params, sort_keys=False))
    digits_metrics = run_cnn()
    assert not digits_metrics["champion"]
    assert _champion(config) == mnist_champion
    client, name = registry(config), tracking.registered_name("cnn")
    versions = {v.version: v for v in client.search_model_versions(f"name = '{name}'")}
    assert len(versions) == 4  # each run registers its fp32 graph and its int8 variant
    keys = {v.tags["data_key"] for v in versions.values()}
    assert len(keys) == 2  # each run is tagged with the data it was evaluated on
    first, second, third, fourth = (versions[v].tags["data_key"] for v in sorted(versions, key=int))
    assert first == second != third == fourth  # a run's two variants share its test data
    assert '"digits"' in versions[max(versions, key=int)].tags["evaluation_data"]


def _files(directory: Path) -> set[str]:
    return {str(p.relative_to(directory)) for p in directory.rglob("*") if p.is_file()}


@pytest.mark.slow
def test_copied_project_logs_artifacts_into_its_own_store(tmp_path):
    params = tiny_params()
    params["models"] = {"cnn": "images"}
    original = load_config(write_project(tmp_path / "original", params))
    stages.fetch_images(original)
    stages.augment(original)
    stages.train(original, "cnn")
    original_files = _files(original.paths.mlflow_artifacts)

    shutil.copytree(original.paths.root, tmp_path / "copy")
    copy = load_config(tmp_path / "copy" / "params.yaml")
    export_info = stages.export(copy, "cnn")  # logs and registers the ONNX model: new artifacts

    assert _files(original.paths.mlflow_artifacts) == original_files  # nothing landed in the original
    client = registry(copy)
    version = client.get_model_version(tracking.registered_name("cnn"), export_info["registered_version"])
    logged_model = client.get_logged_model(version.source.removeprefix("models:/"))
    assert logged_model.artifact_location.startswith(copy.paths.mlflow_artifacts.as_uri() + "/")
    assert any(name.endswith("model.onnx") for name in _files(copy.paths.mlflow_artifacts))
    # The copy's earlier run (its checkpoint) now resolves to the copy's own files too.
    run = client.get_run(read_json(copy.paths.train_info("cnn"))["run_id"])
    assert run.info.artifact_uri.startswith(copy.paths.mlflow_artifacts.as_uri() + "/")
    assert [a.path for a in client.list_artifacts(run.info.run_id, "checkpoints")] == ["checkpoints/best.ckpt"]
