"""params.yaml validation: the shipped file is valid, and each kind of bad value names its key."""

from __future__ import annotations

import pytest
import yaml

from conftest import REPO_ROOT, tiny_params, write_project
from dlpipe import tracking
from dlpipe.config import load_config
from dlpipe.errors import DlpipeError


def test_repository_params_are_valid():
    config = load_config(REPO_ROOT / "params.yaml")
    assert config.params.models == {
        "cnn": "images",
        "resnet": "images",
        "mobilenet_v2": "images",
        "rnn": "stocks",
        "gru": "stocks",
        "lstm": "stocks",
    }
    assert config.params.generators["dcgan"].model_dump() == {"data": "images", "features": "cnn"}
    assert config.all_models[-1] == "dcgan" and config.stage_name("train", "dcgan") == "train_generator@dcgan"
    assert config.params.data.stocks.tickers == ["GOOG", "MSFT"]
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
        (
            lambda p: (p["models"].update(vgg="images"), p["train"].pop("vgg")),
            "model 'vgg' is listed in models but has no train.vgg",
        ),
        (lambda p: p["models"].update(lstm="images"), "models.lstm: a forecaster trains on stocks, not images"),
        (lambda p: p["models"].update(cnn="audio"), "models.cnn"),
        (lambda p: p.update(models=["cnn", "lstm"]), "models"),
        (lambda p: p["train"].update(resnet9000=dict(p["train"]["cnn"])), "unknown model 'resnet9000'"),
        (lambda p: p["train"]["lstm"].update(task="classifier"), "train.lstm.task"),
        (lambda p: p["train"]["lstm"].pop("window"), "train.lstm.window"),
        (lambda p: p["train"]["lstm"].update(window=1), "train.lstm.window"),
        (lambda p: p["train"]["cnn"].update(window=20), "train.cnn.window"),  # classifiers have no window
        (lambda p: p["train"]["cnn"].update(task="regressor"), "train.cnn.task"),
        (lambda p: p["train"]["cnn"].pop("task"), "train.cnn.task"),
        (lambda p: p["train"]["cnn"]["net"].update(channels="abc"), "train.cnn.net.channels"),
        (lambda p: p["train"]["cnn"]["net"].update(hidden=-5), "train.cnn.net.hidden"),
        (lambda p: p["train"]["lstm"]["net"].update(layers=0), "train.lstm.net.layers"),
        (lambda p: p["train"]["cnn"].pop("optimizer"), "train.cnn.optimizer"),
        (lambda p: p["train"]["cnn"]["optimizer"].update(name="lion"), "train.cnn.optimizer.name"),
        (lambda p: p["train"]["cnn"]["optimizer"].update(lr=-1), "train.cnn.optimizer.lr"),
        (lambda p: p["train"]["cnn"]["optimizer"].update(beta1=0.9), "train.cnn.optimizer.beta1"),
        (lambda p: p["train"]["cnn"]["optimizer"].update(betas=[0.9, 1.5]), "train.cnn.optimizer.betas.1"),
        (lambda p: p["train"]["cnn"]["optimizer"].update(momentum=0.9), "momentum: adamw has no momentum"),
        (lambda p: p["train"]["cnn"]["optimizer"].update(name="adam", nesterov=True), "nesterov"),
        (lambda p: p["train"]["cnn"]["optimizer"].update(gamma=0.5), "step_size/gamma"),
        (lambda p: p["train"]["cnn"]["optimizer"].update(schedule="linear"), "train.cnn.optimizer.schedule"),
        (lambda p: p["train"]["cnn"]["optimizer"].update(warmup_epochs=1), "optimizer.warmup_epochs (1) must be less"),
    ],
)
def test_bad_values_name_their_key(tmp_path, mutate, expected):
    assert expected in _error_for(tmp_path, mutate)


@pytest.mark.parametrize(
    "optimizer",
    [
        {"name": "sgd", "lr": 0.1, "momentum": 0.9, "nesterov": True, "schedule": "step", "step_size": 5, "gamma": 0.5},
        {"name": "rmsprop", "lr": 0.001, "momentum": 0.5, "schedule": "none"},
        {"name": "adam", "lr": 0.001, "betas": [0.5, 0.999], "warmup_epochs": 0},
    ],
)
def test_every_optimizer_is_accepted_and_built(tmp_path, optimizer):
    import torch

    from dlpipe.tasks.optim import configure_optimizers

    params = tiny_params()
    params["train"]["cnn"].update(epochs=10, optimizer=optimizer)
    config = load_config(write_project(tmp_path, params))
    built = configure_optimizers(config.train_params("cnn").optimizer, [torch.nn.Parameter(torch.zeros(1))], epochs=10)
    assert type(built["optimizer"]).__name__.lower() == optimizer["name"]
    assert built["optimizer"].param_groups[0]["lr"] == pytest.approx(optimizer["lr"])


def test_warmup_then_cosine_schedule():
    import torch

    from dlpipe.config import OptimizerParams
    from dlpipe.tasks.optim import configure_optimizers

    built = configure_optimizers(
        OptimizerParams(lr=1.0, warmup_epochs=2), [torch.nn.Parameter(torch.zeros(1))], epochs=6
    )
    optimizer, schedule = built["optimizer"], built["lr_scheduler"]
    rates = []
    for _ in range(6):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    assert rates[0] == pytest.approx(1 / 3) and rates[1] == pytest.approx(2 / 3) and rates[2] == pytest.approx(1.0)
    assert rates[2] > rates[3] > rates[4] > rates[5] > 0  # cosine decay over the remaining 4 epochs


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
    params["data"]["images"].update(source="folder", folder="images")
    assert load_config(write_project(tmp_path, params)).params.data.images.folder == "images"


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
        if line.strip()
        and not line.lstrip().startswith("#")
        and ":" in line
        and "#" not in line
        and not line.rstrip().endswith(":")
    ]
    assert uncommented == []
    assert yaml.safe_load("\n".join(lines))
