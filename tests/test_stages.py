"""Each stage function on tiny data in tmp_path, chained as the pipeline chains them."""

from __future__ import annotations

import json

import numpy as np
import pytest

from dlpipe import stages, tracking
from dlpipe.errors import DlpipeError
from dlpipe.tasks import task_of

CLASSIFIER_KEYS = {"test_accuracy", "onnx_accuracy", "onnx_top1_agreement", "macro_f1"}
FORECASTER_KEYS = {"rmse_ratio_vs_persistence", "dm_pvalue", "skill", "verdict", "directional_accuracy", "tickers"}
COMMON_KEYS = {
    "trainable_params",
    "multiply_adds",
    "train_seconds",
    "onnx_max_abs_diff",
    "latency_ms_torch_b1_p50",
    "latency_ms_onnx_b1_p50",
    "latency_ms_onnx_b1_p99",
    "latency_ms_onnx_b32_p50",
    "throughput_onnx_b32_per_s",
}


@pytest.fixture(scope="module")
def pipeline_run(tmp_path_factory):
    """Run every stage once on a tiny project; tests below inspect what it left behind."""
    import os

    from conftest import tiny_params, write_project
    from dlpipe.config import load_config

    os.environ.pop("MLFLOW_TRACKING_URI", None)
    params = tiny_params()
    # The fp16 variant registered, evaluated and offered to the gate here too, as it is on a CUDA machine.
    params["export"]["fp16"] = "always"
    config = load_config(write_project(tmp_path_factory.mktemp("pipeline"), params))
    results = {
        "fetch_images": stages.fetch_images(config),
        "fetch_stocks": stages.fetch_stocks(config),
        "augment": stages.augment(config),
    }
    for model in config.all_models:
        for stage in ("train", "export", "evaluate"):
            results[f"{stage}@{model}"] = stages.STAGES[stage](config, model)
    results["report"] = stages.report(config)
    return config, results


def test_fetch_images_writes_stratified_splits(pipeline_run):
    config, results = pipeline_run
    meta = json.loads((config.paths.raw_images / "meta.json").read_text())
    assert meta["counts"] == {"train": 210, "val": 30, "test": 60}
    assert meta["class_counts"]["test"] == [6] * 10  # 300 images, 30 per class, 20% test
    assert meta["channels"] == 1 and meta["height"] == 28 and len(meta["sha256"]) == 64
    with np.load(config.paths.raw_images / "train.npz") as split:
        assert split["x"].dtype == np.uint8 and split["x"].shape == (210, 1, 28, 28)


def test_fetch_stocks_copies_validated_prices(pipeline_run):
    config, results = pipeline_run
    files = results["fetch_stocks"]["files"]
    assert results["fetch_stocks"]["tickers"] == ["GOOG", "MSFT"]
    # From 2008-01-01 (the tiny params' start) to the end of each committed file.
    assert {t: (f["rows"], f["first_date"], f["last_date"]) for t, f in files.items()} == {
        "GOOG": (1300, "2008-01-02", "2013-03-01"),
        "MSFT": (2485, "2008-01-02", "2017-11-10"),
    }
    for ticker in files:
        header = config.paths.prices(ticker).read_text().splitlines()[0]
        assert header == "Date,Open,High,Low,Close,Volume"


def test_augment_adds_copies_and_preview(pipeline_run):
    config, results = pipeline_run
    assert results["augment"] == {**results["augment"], "originals": 210, "total": 420}
    assert (config.paths.figures / "augment_preview.png").stat().st_size > 1000


@pytest.mark.parametrize("model", ["cnn", "lstm", "dcgan"])
def test_train_writes_checkpoint_and_one_tagged_run(pipeline_run, model):
    config, results = pipeline_run
    info = results[f"train@{model}"]
    assert config.paths.checkpoint(model).is_file()
    assert json.loads(config.paths.train_info(model).read_text())["run_id"] == info["run_id"]
    run = tracking.client(config).get_run(info["run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.tags["model"] == model
    assert run.data.tags["params_hash"] == config.params_hash
    assert run.data.tags["data_sha256"] == info["data_sha256"]
    assert "git_sha" in run.data.tags
    monitor = task_of(config, model).monitor[0]  # val/acc, val/loss, val/fid
    assert info["monitor"] == monitor and monitor in run.data.metrics and "train_seconds" in run.data.metrics
    history = tracking.client(config).get_metric_history(info["run_id"], monitor)
    assert len(history) >= 1
    artifacts = {a.path for a in tracking.client(config).list_artifacts(info["run_id"], "checkpoints")}
    assert artifacts == {"checkpoints/best.ckpt"}


@pytest.mark.parametrize(("model", "task_keys"), [("cnn", CLASSIFIER_KEYS), ("lstm", FORECASTER_KEYS)])
def test_evaluate_writes_contract_metrics(pipeline_run, model, task_keys):
    config, results = pipeline_run
    metrics = json.loads(config.paths.metrics(model).read_text())
    assert COMMON_KEYS | task_keys <= set(metrics)
    assert metrics["onnx_max_abs_diff"] <= config.params.export.parity_atol
    assert metrics["latency_ms_onnx_b1_p99"] >= metrics["latency_ms_onnx_b1_p50"] > 0
    assert metrics["trainable_params"] == results[f"train@{model}"]["trainable_params"]
    assert metrics["multiply_adds"] == results[f"train@{model}"]["multiply_adds"] >= metrics["trainable_params"] // 2


def test_classifier_metrics_are_consistent(pipeline_run):
    config, _ = pipeline_run
    metrics = json.loads(config.paths.metrics("cnn").read_text())
    assert metrics["onnx_top1_agreement"] == 1.0
    assert metrics["onnx_accuracy"] == metrics["test_accuracy"]
    assert metrics["onnx_accuracy"] > 0.3  # one epoch on 420 images is far above chance (0.1)
    predictions = (config.paths.plots("cnn") / "predictions.csv").read_text().splitlines()
    assert predictions[0] == "actual,predicted" and len(predictions) == 61


def test_forecaster_is_judged_per_ticker_on_the_plotted_days(pipeline_run):
    import pandas as pd

    config, _ = pipeline_run
    metrics = json.loads(config.paths.metrics("lstm").read_text())
    assert set(metrics["tickers"]) == {"GOOG", "MSFT"}
    for ticker, scores in metrics["tickers"].items():
        table = pd.read_csv(config.paths.plots("lstm") / f"forecast_{ticker}.csv")
        assert len(table) == scores["test_days"] and table["date"].iloc[-1] == scores["last_test_date"]

        def rmse(column: str, table: pd.DataFrame = table) -> float:
            return float(np.sqrt(np.mean((table[column] - table["actual"]) ** 2)))

        baselines = scores["baselines"]
        assert scores["rmse"] == pytest.approx(rmse("predicted"))
        assert baselines["persistence"]["rmse"] == pytest.approx(rmse("persistence"))
        assert baselines["moving_average"]["rmse"] == pytest.approx(rmse("moving_average"))
        assert baselines["arima"]["rmse"] == pytest.approx(rmse("arima"))
        assert scores["rmse_ratio_vs_persistence"] == pytest.approx(rmse("predicted") / rmse("persistence"))
        assert baselines["arima"]["order"] == [1, 0, 0] and baselines["arima"]["chosen_by"] == "params"
        assert scores["skill"] in ("yes", "no") and scores["verdict"].startswith(f"lstm on {ticker}: ")
        assert (scores["skill"] == "yes") == (scores["dm_pvalue"] < 0.05 and scores["rmse_ratio_vs_persistence"] < 1)
        assert 0.0 <= scores["directional_accuracy"] <= 1.0 and 0.0 < scores["directional_pvalue"] <= 1.0
        assert (config.paths.plots("lstm") / f"forecast_{ticker}.png").stat().st_size > 10_000
    assert metrics["test_samples"] == sum(s["test_days"] for s in metrics["tickers"].values())
    run_id = json.loads(config.paths.train_info("lstm").read_text())["run_id"]
    client = tracking.client(config)
    logged = {a.path for a in client.list_artifacts(run_id, "plots")} | {
        a.path for a in client.list_artifacts(run_id, "figures")
    }
    assert {f"figures/forecast_{t}.png" for t in ("GOOG", "MSFT")} <= logged
    assert {f"plots/forecast_{t}.csv" for t in ("GOOG", "MSFT")} <= logged
    run = client.get_run(run_id)
    assert run.data.tags["verdict"] == metrics["verdict"] and run.data.tags["tickers/MSFT/skill"] in ("yes", "no")
    assert run.data.metrics["tickers/GOOG/baselines/arima/rmse_price"] == pytest.approx(
        metrics["tickers"]["GOOG"]["baselines"]["arima"]["rmse"]
    )
    assert metrics["verdict"].startswith("lstm on GOOG + MSFT: ")


@pytest.mark.parametrize("model", ["cnn", "lstm", "dcgan"])
def test_export_registers_fp32_and_int8_and_the_gate_names_the_champion(pipeline_run, model):
    config, results = pipeline_run
    export_info, client = results[f"export@{model}"], tracking.client(config)
    name = f"dlpipe-{model}"
    assert export_info["registered_version"] == "1" and export_info["int8"]["registered_version"] == "2"
    int8 = client.get_model_version(name, "2")
    assert int8.tags["variant"] == "int8" and int8.tags["fp32_version"] == "1"
    assert client.get_model_version(name, "1").tags["variant"] == "fp32"
    decision = results[f"evaluate@{model}"]["promotion"]
    # The tiny params' thresholds are low and their latency budget wide: the first versions pass the gate.
    assert decision["champion"] is True and decision["refused"] == []
    champion = client.get_model_version_by_alias(name, "champion")
    assert str(champion.version) == decision["chosen_version"]
    assert champion.tags["variant"] == decision["chosen_variant"] and champion.tags["gate"] == "champion"
    assert champion.run_id == results[f"train@{model}"]["run_id"]


@pytest.mark.parametrize(
    ("model", "quantization", "metric"),
    [
        ("cnn", "int8-static", "int8_accuracy"),
        ("lstm", "int8-dynamic", "int8_rmse_ratio_vs_persistence"),
        ("dcgan", "int8-static", "int8_fid_cnn"),
    ],
)
def test_int8_variant_is_smaller_and_measured(pipeline_run, model, quantization, metric):
    import onnx

    config, results = pipeline_run
    assert results[f"export@{model}"]["int8"]["quantization"] == quantization
    int8_file = onnx.load(config.paths.onnx_int8(model))
    props = {p.key: p.value for p in int8_file.metadata_props}
    assert props["dlpipe.variant"] == quantization and props["dlpipe.model"] == model
    metrics = json.loads(config.paths.metrics(model).read_text())
    assert metrics["int8_size_bytes"] == config.paths.onnx_int8(model).stat().st_size
    assert metrics["int8_size_ratio"] == metrics["int8_size_bytes"] / metrics["onnx_size_bytes"] < 0.6
    for batch in (1, 32):
        speedup = metrics[f"latency_ms_onnx_b{batch}_p50"] / metrics[f"latency_ms_int8_b{batch}_p50"]
        assert metrics[f"int8_speedup_b{batch}"] == pytest.approx(speedup)
    assert metric in metrics


@pytest.mark.parametrize("model", ["cnn", "lstm", "dcgan"])
def test_fp16_variant_is_registered_measured_and_offered_to_the_gate(pipeline_run, model):
    import onnx

    from dlpipe.tasks.base import variant_metric_name

    config, results = pipeline_run
    info = results[f"export@{model}"]["fp16"]
    assert info["measured"] is True and info["registered_version"] is not None
    fp16_file = onnx.load(config.paths.onnx_fp16(model))
    props = {p.key: p.value for p in fp16_file.metadata_props}
    assert props["dlpipe.variant"] == "fp16" and props["dlpipe.model"] == model
    weight_types = {init.data_type for init in fp16_file.graph.initializer}
    assert onnx.TensorProto.FLOAT16 in weight_types and onnx.TensorProto.FLOAT not in weight_types
    assert fp16_file.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT  # callers feed float32
    version = tracking.client(config).get_model_version(tracking.registered_name(model), info["registered_version"])
    assert (
        version.tags["variant"] == "fp16"
        and version.tags["fp32_version"] == results[f"export@{model}"]["registered_version"]
    )
    metrics = json.loads(config.paths.metrics(model).read_text())
    metric = task_of(config, model).promotion[0]
    fp32_score, fp16_score = metrics[metric], metrics[variant_metric_name("fp16", metric)]
    assert fp16_score == pytest.approx(fp32_score, rel=0.02)  # half precision, same predictions within 2%
    # Half the weights' bytes; the graph's structure and metadata weigh the same (most of a tiny LSTM's file).
    assert metrics["fp16_size_ratio"] == metrics["fp16_size_bytes"] / metrics["onnx_size_bytes"] < 0.9
    for batch in (1, 32):
        speedup = metrics[f"latency_ms_onnx_b{batch}_p50"] / metrics[f"latency_ms_fp16_b{batch}_p50"]
        assert metrics[f"fp16_speedup_b{batch}"] == pytest.approx(speedup)
    rows = [row.split(",") for row in config.paths.latency_csv(model).read_text().splitlines()[1:]]
    assert [(batch, backend) for batch, backend, _ in rows[-2:]] == [("1", "fp16"), ("32", "fp16")]  # dvc plots' line
    # The gate weighed it: every registered variant carries its figure, whichever it chose.
    assert results[f"evaluate@{model}"]["promotion"]["chosen_variant"] in ("fp32", "int8", "fp16")
    assert float(version.tags[metric]) == pytest.approx(fp16_score)


def test_exported_classifier_agrees_with_torch_on_the_whole_test_split(pipeline_run):
    config, results = pipeline_run
    assert results["export@cnn"]["top1_agreement"] == 1.0
    assert results["export@lstm"]["top1_agreement"] is None  # a forecast has no class to agree on


def test_champion_loads_through_mlflow_pyfunc_and_predicts(pipeline_run):
    import mlflow

    config, _ = pipeline_run
    mlflow.set_tracking_uri(tracking.tracking_uri(config))
    model = mlflow.pyfunc.load_model("models:/dlpipe-cnn@champion")
    x = np.load(config.paths.raw_images / "test.npz")["x"][:5].astype(np.float32) / 255.0
    prediction = model.predict(x)
    logits = next(iter(prediction.values())) if isinstance(prediction, dict) else np.asarray(prediction)
    assert logits.shape == (5, 10) and np.isfinite(logits).all()


def test_contract_is_in_onnx_metadata_and_registered_model(pipeline_run):
    import mlflow
    import onnx

    from dlpipe.data.stocks import FEATURE_FORMULAS

    config, _ = pipeline_run
    images_meta = json.loads(config.paths.meta(config.paths.raw_images).read_text())
    metadata = {
        model: {p.key: p.value for p in onnx.load(config.paths.onnx(model)).metadata_props} for model in ("cnn", "lstm")
    }
    cnn, lstm = metadata["cnn"], metadata["lstm"]
    assert json.loads(cnn["dlpipe.classes"]) == images_meta["classes"]
    assert "divided by 255" in cnn["dlpipe.input"] and "[batch, 1, 28, 28]" in cnn["dlpipe.input"]
    assert "logits" in cnn["dlpipe.output"] and cnn["dlpipe.input_range"] == "0,1"
    features = json.loads(lstm["dlpipe.features"])
    assert [f["name"] for f in features] == list(FEATURE_FORMULAS)
    assert [f["formula"] for f in features] == list(FEATURE_FORMULAS.values())
    assert lstm["dlpipe.window"] == str(config.train_params("lstm").window)
    assert json.loads(lstm["dlpipe.tickers"]) == ["GOOG", "MSFT"]
    assert "log return" in lstm["dlpipe.output"] and "exp(output)" in lstm["dlpipe.output"]

    mlflow.set_tracking_uri(tracking.tracking_uri(config))
    # -1 where the graph takes any size: the batch, and the forecaster's window (4 features + 2 tickers).
    for model, shape in (("cnn", (-1, 1, 28, 28)), ("lstm", (-1, -1, 6))):
        info = mlflow.models.get_model_info(f"models:/dlpipe-{model}@champion")
        signature = info.signature.to_dict()
        assert json.loads(signature["inputs"])[0]["tensor-spec"] == {"dtype": "float32", "shape": list(shape)}
        assert json.loads(signature["outputs"])[0]["tensor-spec"]["dtype"] == "float32"
        # The same contract, word for word, whichever variant the gate made champion (int8 says so).
        variant = {"dlpipe.variant": info.metadata["dlpipe.variant"]} if "dlpipe.variant" in info.metadata else {}
        assert info.metadata == metadata[model] | variant
        assert info.saved_input_example_info is not None


def _readme_deployment_examples() -> list[str]:
    from conftest import REPO_ROOT

    readme = (REPO_ROOT / "README.md").read_text()
    section = readme.split("## Using the ONNX file directly", 1)[1].split("\n## ", 1)[0]
    return [block.split("```", 1)[0] for block in section.split("```python\n")[1:]]


def test_readme_deployment_examples_run_on_the_exported_models(pipeline_run, monkeypatch, capsys):
    """The README's onnxruntime examples, run as written in the project: same outputs as the pipeline's."""
    from dlpipe.data.stocks import make_features, read_prices
    from dlpipe.runtime import create_session, run_batched

    config, _ = pipeline_run
    classifier, forecaster = _readme_deployment_examples()
    monkeypatch.chdir(config.paths.root)

    namespace: dict = {}
    exec(compile(classifier, "README classifier example", "exec"), namespace)
    x = np.load(config.paths.raw_images / "test.npz")["x"][:8]
    expected = run_batched(create_session(config.paths.onnx("cnn"), ("cpu",)), x.astype(np.float32) / 255.0)
    np.testing.assert_array_equal(namespace["logits"], expected)
    printed = capsys.readouterr().out
    assert printed.strip() == str([namespace["classes"][i] for i in expected.argmax(1)])

    namespace = {}
    exec(compile(forecaster, "README forecaster example", "exec"), namespace)
    # The README's feature formulas are the pipeline's, and its window is what the model was trained on.
    prices = read_prices(config.paths.raw_stocks, "GOOG")
    np.testing.assert_allclose(namespace["features"], make_features(prices), rtol=1e-6)
    assert namespace["inputs"].shape == (1, config.train_params("lstm").window, 6)
    assert namespace["inputs"][0, :, 4:].tolist() == [[1.0, 0.0]] * config.train_params("lstm").window
    assert namespace["window"] == config.train_params("lstm").window
    assert "next close: " in capsys.readouterr().out


def test_onnx_model_runs_in_onnxruntime_with_dynamic_batch(pipeline_run):
    import onnxruntime as ort

    config, _ = pipeline_run
    session = ort.InferenceSession(str(config.paths.onnx("cnn")), providers=["CPUExecutionProvider"])
    for batch in (1, 7):
        assert session.run(None, {"input": np.zeros((batch, 1, 28, 28), np.float32)})[0].shape == (batch, 10)
    assert not config.paths.onnx("cnn").with_suffix(".onnx.data").exists()  # single file


def test_report_summarises_all_models(pipeline_run):
    config, results = pipeline_run
    summary = json.loads(config.paths.summary.read_text())
    assert set(summary) == {"cnn", "lstm", "dcgan"}
    page = config.paths.report_html.read_text()
    assert "<table>" in page and "plots/cnn/confusion.png" in page and "plots/lstm/forecast_GOOG.png" in page
    assert "figures/dcgan_samples.png" in page and "Generated images" in page
    lstm = summary["lstm"]
    assert "skill over persistence" in page and lstm["verdict"] in page and lstm["tickers"]["MSFT"]["verdict"] in page


def test_generator_is_trained_exported_and_judged(pipeline_run):
    config, results = pipeline_run
    train = results["train@dcgan"]
    assert train["monitor"] == "val/fid" and train["best_score"] > 0 and "test/fid" in train["test"]
    # The judge is the trained cnn: the generator's stages ran after it, and its FID is on that scale.
    parity = results["export@dcgan"]["parity"]
    assert set(parity) >= {"batch 1", "batch 7", "batch 64"} and max(parity.values()) <= 1e-4
    metrics = json.loads(config.paths.metrics("dcgan").read_text())
    assert metrics["features"] == "cnn" and metrics["fid_samples"] == 64
    assert metrics["fid_cnn"] > metrics["fid_cnn_real_floor"] > 0  # one epoch of a tiny GAN is far from real
    assert metrics["fid_cnn_over_floor"] == pytest.approx(metrics["fid_cnn"] / metrics["fid_cnn_real_floor"])
    assert metrics["diversity_ratio"] >= 0 and 0 <= metrics["classes_drawn"] <= 10
    assert list(metrics["class_counts"]) == [str(c) for c in range(10)] and sum(metrics["class_counts"].values()) == 64
    assert metrics["latency_ms_onnx_b64_p50"] > 0 and metrics["latency_ms_torch_b64_p50"] > 0
    assert metrics["warning"] == "none" and metrics["discriminator_longest_win_epochs"] == 0
    assert config.paths.samples_grid("dcgan").stat().st_size > 1000
    assert (config.paths.plots("dcgan") / "class_counts.png").is_file()
    # grid_every 1 in the tiny params: one grid per epoch in the MLflow run.
    artifacts = {a.path for a in tracking.client(config).list_artifacts(train["run_id"], "samples")}
    assert artifacts == {"samples/epoch_001.png"}


def test_parity_failure_keeps_previous_onnx(pipeline_run, monkeypatch):
    from dlpipe import export as export_module

    config, _ = pipeline_run
    target = config.paths.onnx("cnn")
    before = target.read_bytes()
    monkeypatch.setattr(export_module, "parity_diffs", lambda network, path, cases: dict.fromkeys(cases, 1.0))
    with pytest.raises(DlpipeError, match="parity_atol"):
        stages.export(config, "cnn")
    assert target.read_bytes() == before
    assert sorted(p.name for p in target.parent.iterdir() if p.name.startswith(".")) == []


def test_opset_the_exporter_cannot_write_is_refused(pipeline_run):
    import dataclasses

    from dlpipe.config import ExportParams

    config, _ = pipeline_run
    target = config.paths.onnx("cnn")
    before = target.read_bytes()
    unsupported = dataclasses.replace(
        config, params=config.params.model_copy(update={"export": ExportParams(opset=99)})
    )
    with pytest.raises(DlpipeError, match=r"export\.opset: 99 is not supported by this exporter \(it wrote opset 18\)"):
        stages.export(unsupported, "cnn")
    assert target.read_bytes() == before


def test_unknown_model_stage_raises(pipeline_run):
    config, _ = pipeline_run
    with pytest.raises(DlpipeError, match="unknown model 'vgg99'"):
        stages.train(config, "vgg99")


def test_report_says_which_recipes_have_not_run(pipeline_run):
    config, _ = pipeline_run
    page = config.paths.report_html.read_text()
    for stage in ("transfer", "distill", "cost"):
        assert f"Not run (<code>dlpipe {stage}</code>)" in page
