"""params.yaml validation: the shipped file is valid, and each kind of bad value names its key."""

from __future__ import annotations

import pytest
import yaml

from conftest import REPO_ROOT, tiny_params, write_project
from dlpipe.config import load_config
from dlpipe.errors import DlpipeError
from dlpipe import tracking


def test_repository_params_are_valid():
    config = load_config(REPO_ROOT / "params.yaml")
    assert config.params.models == ["cnn", "lstm"]
    assert config.params.data.images.source == "mnist_5k"
    assert config.params.data.stocks.source == "sample"
    assert config.paths.root == REPO_ROOT
    assert config.paths.metrics("cnn") == REPO_ROOT / "reports" / "metrics" / "cnn.json"


def _error_for(tmp_path, mutate) -> str:
    params = tiny_params()
    mutate(params)
    with pytest.raises(DlpipeError) as caught:
        load_config(write_project(tmp_path, params))
    message = str(caught.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (lambda p: p["train"]["cnn"].update(epochs=-1), "train.cnn.epochs"),
        (lambda p: p["train"]["cnn"].update(epochs=0), "train.cnn.epochs"),
        (lambda p: p["data"]["images"].update(source="imagenet"), "data.images.source"),
        (lambda p: p["data"]["stocks"].update(source="bloomberg"), "data.stocks.source"),
        (lambda p: p["train"]["cnn"].update(learning_rate=0.1), "train.cnn.learning_rate"),
        (lambda p: p["train"]["cnn"]["net"].update(widths=[8]), "train.cnn.net.widths"),
        (lambda p: p["augment"].update(scale_min=2.0, scale_max=1.0), "scale_min"),
        (lambda p: p["data"]["images"].update(val_fraction=0.7), "data.images.val_fraction"),
        (lambda p: p.update(models=["cnn", "resnet"]), "resnet"),
        (lambda p: p["train"].update(resnet=dict(p["train"]["cnn"])), "unknown model 'resnet'"),
        (lambda p: p["train"]["lstm"].update(task="classifier"), "train.lstm.task"),
        (lambda p: p["train"]["lstm"].pop("window"), "window"),
    ],
)
def test_bad_values_name_their_key(tmp_path, mutate, expected):
    assert expected in _error_for(tmp_path, mutate)


def test_missing_params_file_is_named(tmp_path):
    with pytest.raises(DlpipeError, match="params file not found: .*nope.yaml"):
        load_config(tmp_path / "nope.yaml")


def test_invalid_yaml_is_reported(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("seed: [1, 2\n")
    with pytest.raises(DlpipeError, match="not valid YAML"):
        load_config(path)


def test_folder_source_is_accepted(tmp_path):
    params = tiny_params()
    params["data"]["images"]["source"] = "folder:images"
    assert load_config(write_project(tmp_path, params)).params.data.images.source == "folder:images"


def test_params_hash_changes_with_params(tmp_path):
    first = load_config(write_project(tmp_path / "a", tiny_params()))
    params = tiny_params()
    params["train"]["cnn"]["optimizer"]["lr"] = 0.1
    second = load_config(write_project(tmp_path / "b", params))
    assert first.params_hash != second.params_hash
    assert first.params_hash == load_config(write_project(tmp_path / "c", tiny_params())).params_hash


def test_tracking_uri_defaults_to_absolute_sqlite_at_root(config, monkeypatch):
    assert tracking.tracking_uri(config) == f"sqlite:///{config.paths.root}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5999")
    assert tracking.tracking_uri(config) == "http://127.0.0.1:5999"


def test_relative_sqlite_uri_is_made_absolute(tmp_path):
    params = tiny_params()
    params["mlflow"]["tracking_uri"] = "sqlite:///runs/db.sqlite"
    config = load_config(write_project(tmp_path, params))
    assert tracking.tracking_uri(config) == f"sqlite:///{(tmp_path / 'runs' / 'db.sqlite').resolve()}"


def test_every_param_in_the_shipped_file_has_a_comment():
    """Each value line of params.yaml carries a `#` comment saying why (section headers excepted)."""
    lines = (REPO_ROOT / "params.yaml").read_text().splitlines()
    uncommented = [
        line
        for line in lines
        if line.strip() and not line.lstrip().startswith("#") and ":" in line and "#" not in line and not line.rstrip().endswith(":")
    ]
    assert uncommented == []
    assert yaml.safe_load("\n".join(lines))
