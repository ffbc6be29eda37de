"""The MLflow UI a user compares models in: runs named by model, data and code; one metric name per
quantity, the same for every model of a task, units in the name where they differ; the evaluation figures
among a run's artifacts; a description on every run; links to a run's page."""

from __future__ import annotations

import re
from types import SimpleNamespace

import pytest
import yaml

from dlpipe import stages, tracking
from dlpipe.config import load_config
from dlpipe.io import read_json
from dlpipe.tasks import task_of
from serving import copy_project

# Names one quantity has had in a run, besides the one it keeps.
SYNONYMS = [
    {"test/acc", "test_accuracy"},
    {"test/macro_f1", "macro_f1"},
    {"test/fid", "fid_cnn"},
    {"test/d_longest_wins_streak", "discriminator_longest_win_epochs"},
    {"onnx_top1_agreement_export", "onnx_top1_agreement"},
    {"test/rmse_logret", "test/rmse_log_return"},
    {"val/rmse_logret", "val/rmse_log_return"},
]


def _runs(config) -> dict[str, object]:
    client = tracking.client(config)
    return {model: client.get_run(read_json(config.paths.train_info(model))["run_id"]) for model in config.all_models}


@pytest.fixture(scope="module")
def built(built_project):
    config = load_config(built_project / "params.yaml")
    return config, _runs(config)


def _spelling(name: str) -> str:
    """A name with the differences that do not change the quantity taken out (separator, abbreviation, the
    stage that logged it)."""
    return re.sub(r"\bacc\b", "accuracy", name.replace("/", "_").replace("_", " ")).removesuffix(" export")


# --------------------------------------------------------------------------------------------- run names


def test_run_names_tell_model_data_and_code_apart(built):
    config, runs = built
    for model, run in runs.items():
        tags, name = run.data.tags, run.info.run_name
        meta = tracking.dataset_meta(config, config.dataset_of(model))
        assert tags[tracking.DATA_SOURCE_TAG] == f"{config.dataset_of(model)}/{meta['source']}"
        assert name == tracking.run_name(tags) == f"{model} {tags['data_source']}@{tags['data_sha256'][:7]} no-git"
        assert tags["data_sha256"] == read_json(config.paths.train_info(model))["data_sha256"]
    assert len({run.info.run_name for run in runs.values()}) == len(runs)


def test_run_name_carries_the_short_git_sha_and_the_stage_of_other_runs():
    tags = {
        "model": "cnn",
        "stage": "train",
        "git_sha": "9f8e7d6c5b4a",
        "data_sha256": "1a2b3c4d5e",
        "data_source": "x",
    }
    assert tracking.run_name(tags) == "cnn x@1a2b3c4 9f8e7d6"
    assert tracking.run_name({**tags, "stage": "distill"}) == "distill: cnn x@1a2b3c4 9f8e7d6"


# ---------------------------------------------------------------------------------------------- metric names


def test_a_run_has_one_name_per_quantity(built):
    _, runs = built
    for model, run in runs.items():
        names = set(run.data.metrics)
        for group in SYNONYMS:
            assert len(group & names) <= 1, (model, group & names)
        spellings = [_spelling(name) for name in names]
        assert len(set(spellings)) == len(spellings), model
        assert not set(tracking.MEASURED_BY_EVALUATE) & names, model
        assert not [name for name in names if name.startswith("lr-")], model  # the optimizer class is not a quantity
    accuracies = {name for name in runs["cnn"].data.metrics if "acc" in name}
    # Per split, and the exported graph's apart from PyTorch's: each accuracy once.
    assert accuracies == {"train/acc", "val/acc", "test_accuracy", "onnx_accuracy", "int8_accuracy"}
    assert {"fid_cnn", "discriminator_longest_win_epochs"} <= set(runs["dcgan"].data.metrics)
    assert runs["cnn"].data.metrics["onnx_top1_agreement"] == 1.0  # logged by export and evaluate: one name


def test_units_are_in_the_names_where_they_differ(built):
    config, runs = built
    lstm = runs["lstm"].data.metrics
    assert {"val/rmse_log_return", "test/rmse_log_return"} <= set(lstm)
    assert not [name for name in lstm if "logret" in name]
    # Per ticker, errors are in price units; the metrics file keeps its keys.
    assert not [name for name in lstm if name.rsplit("/", 1)[-1] in ("rmse", "mae")]
    metrics = read_json(config.paths.metrics("lstm"))
    for ticker, scores in metrics["tickers"].items():
        assert lstm[f"tickers/{ticker}/rmse_price"] == pytest.approx(scores["rmse"])
        assert lstm[f"tickers/{ticker}/mae_price"] == pytest.approx(scores["mae"])
        persistence = scores["baselines"]["persistence"]["rmse"]
        assert lstm[f"tickers/{ticker}/baselines/persistence/rmse_price"] == pytest.approx(persistence)


def test_learning_rates_are_named_by_what_they_drive(built):
    _, runs = built
    assert "train/lr" in runs["cnn"].data.metrics and "train/lr" in runs["lstm"].data.metrics
    assert {"train/lr_generator", "train/lr_discriminator"} <= set(runs["dcgan"].data.metrics)
    assert tracking.metric_name("lr-AdamW") == tracking.metric_name("lr-SGD") == "train/lr"


def test_metric_names_depend_on_the_task_not_the_model(built_project, tmp_path):
    """Two more models of the built project's tasks, with other optimizers: each logs the names of its
    task's model in the built project, no more, no fewer."""
    root = copy_project(built_project, tmp_path / "project")
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["models"].update(resnet="images", gru="stocks")
    params["train"]["resnet"].update(epochs=1, net={"depth": 8, "widths": [4, 8, 8]}, precision="32-true")
    params["train"]["resnet"]["optimizer"] = {"name": "sgd", "lr": 0.05, "momentum": 0.9, "schedule": "none"}
    params["train"]["gru"].update(epochs=1, window=10, tickers="per_ticker")
    params["train"]["gru"]["optimizer"] = {"name": "rmsprop", "lr": 0.001, "schedule": "none"}
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    config = load_config(root / "params.yaml")
    for model in ("resnet", "gru"):
        for stage in ("train", "export", "evaluate"):
            stages.STAGES[stage](config, model)
    runs = _runs(config)
    for model, like in (("resnet", "cnn"), ("gru", "lstm")):
        assert task_of(config, model).name == task_of(config, like).name
        assert set(runs[model].data.metrics) == set(runs[like].data.metrics), model
        assert set(runs[model].data.tags) == set(runs[like].data.tags), model


def test_metric_name_maps_each_stage_key():
    assert tracking.metric_name("val/acc") == "val/acc"
    assert tracking.metric_name("test_accuracy") == "test_accuracy"
    assert tracking.metric_name("rmse_ratio_vs_persistence") == "rmse_ratio_vs_persistence"
    assert tracking.metric_name("tickers/MSFT/mape") == "tickers/MSFT/mape"  # a percentage either way
    assert tracking.metric_name("tickers/MSFT/baselines/arima/mae") == "tickers/MSFT/baselines/arima/mae_price"
    assert tracking.metric_name("lr-Adam/pg2") == "train/lr/pg2"
    assert all(tracking.metric_name(name) is None for name in tracking.MEASURED_BY_EVALUATE)
    assert tracking.mlflow_metrics({"test/acc": 0.5, "test/loss": 1.0, "lr-SGD": 0.1}) == {
        "test/loss": 1.0,
        "train/lr": 0.1,
    }


# ---------------------------------------------------------------------------------- figures, descriptions


def test_evaluation_figures_are_artifacts_of_the_run(built):
    config, runs = built
    client = tracking.client(config)
    for model, run in runs.items():
        figures = {a.path for a in client.list_artifacts(run.info.run_id, "figures")}
        expected = {f"figures/{path.name}" for path in config.paths.plots(model).glob("*.png")}
        assert expected and expected <= figures, model
        tables = {a.path for a in client.list_artifacts(run.info.run_id, "plots")}
        assert tables and not [path for path in tables if path.endswith(".png")], model
    cnn = {a.path for a in client.list_artifacts(runs["cnn"].info.run_id, "figures")}
    assert "figures/confusion.png" in cnn
    dcgan = {a.path for a in client.list_artifacts(runs["dcgan"].info.run_id, "figures")}
    assert f"figures/{config.paths.samples_grid('dcgan').name}" in dcgan


def test_every_run_is_described_with_its_result(built):
    config, runs = built
    for model, run in runs.items():
        note = run.data.tags[tracking.NOTE_TAG]
        task = task_of(config, model)
        assert note.startswith(f"**{model}** ({task.name}) trained on {run.data.tags['data_source']}"), note
        assert re.search(rf"Trained {read_json(config.paths.train_info(model))['epochs_trained']} epochs? in ", note)
        assert note.count(tracking.RESULT_MARK) == 1
        metrics = read_json(config.paths.metrics(model))
        context = {"threshold": config.params.promote.thresholds.get(task.promotion[0]), "classes": None}
        assert task.headline(metrics, context)["metric"] in note.split(tracking.RESULT_MARK)[1]
        assert "is champion" in note  # the tiny project's first versions pass the gate


def test_a_new_result_replaces_the_old_and_keeps_the_rest(config):
    client = tracking.client(config)
    run_id = client.create_run(tracking.ensure_experiment(config)).info.run_id
    tracking.note_result(config, run_id, "first")
    assert client.get_run(run_id).data.tags[tracking.NOTE_TAG] == f"{tracking.RESULT_MARK} first"
    tracking.set_note(config, run_id, "trained on x\n\nedited in the UI")
    tracking.note_result(config, run_id, "second")
    tracking.note_result(config, run_id, "third")
    note = client.get_run(run_id).data.tags[tracking.NOTE_TAG]
    assert note == f"trained on x\n\nedited in the UI\n\n{tracking.RESULT_MARK} third"


# ------------------------------------------------------------------------------------------------ run_url


def test_run_url_of_a_local_store_is_where_mlflow_ui_serves_it(built):
    config, runs = built
    run = runs["cnn"]
    expected = f"http://127.0.0.1:5000/#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}"
    assert tracking.run_url(config, run.info.run_id) == expected
    assert tracking.run_url(config, "0" * 32) is None  # a run the store does not hold


def test_run_url_without_a_store_creates_none(config):
    assert tracking.run_url(config, "0" * 32) is None
    assert not config.paths.mlflow_db.exists()


@pytest.mark.parametrize(
    ("uri", "base"),
    [
        ("https://mlflow.example.org/", "https://mlflow.example.org"),
        ("http://10.0.0.5:8080/mlflow", "http://10.0.0.5:8080/mlflow"),
        ("file:///srv/mlruns", "http://127.0.0.1:5000"),
        ("/srv/mlruns", "http://127.0.0.1:5000"),
        ("databricks", None),
        ("postgresql://user@db/mlflow", None),
    ],
)
def test_run_url_forms(config, monkeypatch, uri, base):
    monkeypatch.setenv(tracking.TRACKING_URI_ENV, uri)
    run = SimpleNamespace(info=SimpleNamespace(experiment_id="7"))
    monkeypatch.setattr(tracking, "client", lambda _config: SimpleNamespace(get_run=lambda run_id: run))
    expected = None if base is None else f"{base}/#/experiments/7/runs/abc123"
    assert tracking.run_url(config, "abc123") == expected


def test_run_url_keeps_its_signature():
    import inspect

    assert list(inspect.signature(tracking.run_url).parameters) == ["config", "run_id"]
