"""The comparison table, read from a real local MLflow store: the champion's numbers, the fallbacks when
there is no champion, and the CSV, text and HTML renderings."""

from __future__ import annotations

import csv
import dataclasses
from pathlib import Path

from dlpipe import tracking
from dlpipe.compare import (
    FROM_CHAMPION,
    FROM_LATEST_VERSION,
    FROM_METRICS_FILE,
    FROM_TRAIN_RUN,
    CompareRow,
    compare,
    format_table,
    render_html,
    rows_from_metrics,
    rows_from_mlflow,
    write_csv,
)

# What evaluate writes for each kind of model (reports/metrics/<model>.json), int8 variant included.
CLASSIFIER = {
    "trainable_params": 12_345,
    "multiply_adds": 678_901,
    "train_seconds": 4.5,
    "test_accuracy": 0.9125,
    "onnx_accuracy": 0.9120,
    "int8_accuracy": 0.9010,
    "latency_ms_torch_b1_p50": 0.412,
    "latency_ms_onnx_b1_p50": 0.101,
    "latency_ms_onnx_b32_p50": 1.234,
    "latency_ms_int8_b1_p50": 0.077,
    "latency_ms_int8_b32_p50": 0.812,
    "int8_speedup_b1": 1.31,
    "int8_speedup_b32": 1.52,
    "onnx_size_bytes": 52_000,
    "int8_size_bytes": 16_500,
    "int8_size_ratio": 0.317,
}
FORECASTER = {
    "trainable_params": 3_201,
    "multiply_adds": 61_000,
    "rmse_ratio_vs_persistence": 0.9981,
    "int8_rmse_ratio_vs_persistence": 1.0023,
    "skill": "no",  # a run tag in MLflow
    "tickers": {"GOOG": {"rmse_ratio_vs_persistence": 0.99}},  # flattened to tickers/GOOG/... in MLflow
    "latency_ms_torch_b1_p50": 0.9,
    "latency_ms_onnx_b1_p50": 0.2,
    "latency_ms_onnx_b32_p50": 2.5,
    "onnx_size_bytes": 14_000,
}
FIELDS = [f.name for f in dataclasses.fields(CompareRow)]
NUMBER_FIELDS = FIELDS[2 : FIELDS.index("champion_version")] + [
    name for name in FIELDS if name.startswith(("fp16", "latency_ms_fp16"))
]


def _train_run(config, model: str, metrics: dict, start: int, status: str = "FINISHED") -> str:
    """A train run of `model` holding `metrics` the way evaluate logs them; `start` orders the runs."""
    client = tracking.client(config)
    run = client.create_run(
        tracking.ensure_experiment(config), start_time=start, tags={"model": model, "stage": "train"}
    )
    tracking.log_metrics(config, run.info.run_id, metrics)
    if status != "RUNNING":
        client.set_terminated(run.info.run_id, status=status)
    return run.info.run_id


def _register(config, model: str, run_id: str, variant: str | None = None, champion: bool = False) -> str:
    """A new version of `model` from a file the run logged; the registry only needs its source and run."""
    client = tracking.client(config)
    name = tracking.registered_name(model)
    if not client.search_registered_models(f"name = '{name}'"):
        client.create_registered_model(name)
    client.log_text(run_id, "stands for model.onnx", "onnx/model.txt")
    tags = {"variant": variant} if variant else None
    version = client.create_model_version(name, source=f"runs:/{run_id}/onnx", run_id=run_id, tags=tags).version
    if champion:
        client.set_registered_model_alias(name, tracking.CHAMPION, version)
    return str(version)


def _with(metrics: dict, **changes) -> dict:
    return metrics | changes


def test_champion_run_fills_the_row_not_the_latest_version(config):
    older = _train_run(config, "cnn", _with(CLASSIFIER, onnx_accuracy=0.80), start=1_000)
    best = _train_run(config, "cnn", CLASSIFIER, start=2_000)
    newest = _train_run(config, "cnn", _with(CLASSIFIER, onnx_accuracy=0.85, trainable_params=99), start=3_000)
    _register(config, "cnn", older, "fp32")
    champion = _register(config, "cnn", best, "int8", champion=True)
    _register(config, "cnn", newest, "fp32")  # newer, but promotion kept the champion

    (row,) = rows_from_mlflow(config, ["cnn"])

    assert (row.champion_version, row.champion_variant, row.run_id) == (champion, "int8", best)
    assert row.source == FROM_CHAMPION
    assert row.task_metric == "accuracy"
    assert (row.test_metric, row.onnx_metric, row.int8_metric) == (0.9125, 0.9120, 0.9010)
    assert (row.trainable_params, row.multiply_adds) == (12_345, 678_901)
    assert isinstance(row.trainable_params, int) and isinstance(row.onnx_size_bytes, int)  # not MLflow's floats
    assert (row.latency_ms_torch_b1, row.latency_ms_onnx_b1, row.latency_ms_int8_b1) == (0.412, 0.101, 0.077)
    assert (row.latency_ms_onnx_b32, row.latency_ms_int8_b32) == (1.234, 0.812)
    assert (row.onnx_size_bytes, row.int8_size_bytes) == (52_000, 16_500)


def test_without_champion_falls_back_to_latest_version_then_train_run_then_dashes(config):
    first = _train_run(config, "lstm", FORECASTER, start=1_000)
    second = _train_run(config, "lstm", _with(FORECASTER, rmse_ratio_vs_persistence=0.97), start=2_000)
    _register(config, "lstm", first, "fp32")
    latest = _register(config, "lstm", second)  # registered before variants were tagged
    # Never registered: the newest FINISHED train run counts; a later failed or running one does not.
    _train_run(config, "gru", _with(FORECASTER, rmse_ratio_vs_persistence=1.5), start=1_000)
    finished = _train_run(config, "gru", _with(FORECASTER, rmse_ratio_vs_persistence=1.1), start=2_000)
    _train_run(config, "gru", _with(FORECASTER, rmse_ratio_vs_persistence=9.0), start=3_000, status="FAILED")
    _train_run(config, "gru", _with(FORECASTER, rmse_ratio_vs_persistence=9.0), start=4_000, status="RUNNING")

    lstm, gru, ghost = rows_from_mlflow(config, ["lstm", "gru", "ghost"])

    assert (lstm.source, lstm.champion_version, lstm.champion_variant, lstm.run_id) == (
        FROM_LATEST_VERSION,
        latest,
        None,
        second,
    )
    assert lstm.task_metric == "rmse_ratio_vs_persistence"
    assert (lstm.test_metric, lstm.onnx_metric, lstm.int8_metric) == (0.97, 0.97, 1.0023)
    assert (lstm.latency_ms_int8_b1, lstm.int8_size_bytes) == (None, None)  # not measured: a dash, not a zero
    assert (gru.source, gru.champion_version, gru.run_id, gru.test_metric) == (FROM_TRAIN_RUN, None, finished, 1.1)
    assert ghost == CompareRow("ghost", "", *[None] * (len(dataclasses.fields(CompareRow)) - 2))
    table = format_table([lstm, gru, ghost])
    assert f"no alias: v{latest}" in table and "not registered" in table


def test_a_project_without_an_mlflow_store_gives_dashes_and_creates_none(config, capsys):
    rows = compare(config)

    assert [row.model for row in rows] == config.all_models == ["cnn", "lstm", "dcgan"]
    assert [row.task_metric for row in rows] == ["accuracy", "rmse_ratio_vs_persistence", "fid_cnn"]  # from params
    assert all(getattr(row, name) is None for row in rows for name in NUMBER_FIELDS)
    assert not config.paths.mlflow_db.exists()
    assert (config.paths.reports / "compare.csv").is_file()
    assert capsys.readouterr().out == ""


def test_compare_writes_the_configured_models_to_reports(config, capsys):
    run_id = _train_run(config, "cnn", CLASSIFIER, start=1_000)
    _register(config, "cnn", run_id, "fp32", champion=True)

    rows = compare(config)

    assert [(row.model, row.source) for row in rows] == [("cnn", FROM_CHAMPION), ("lstm", None), ("dcgan", None)]
    with open(config.paths.reports / "compare.csv", newline="") as handle:
        assert [line["model"] for line in csv.DictReader(handle)] == ["cnn", "lstm", "dcgan"]
    assert capsys.readouterr().out == ""


def _sample_rows() -> list[CompareRow]:
    return rows_from_metrics(
        {"cnn": CLASSIFIER, "lstm": FORECASTER, "ghost": {}}, champions={"cnn": ("3", "int8"), "lstm": ("1", "fp32")}
    )


def test_write_csv_replaces_the_file_atomically_with_one_line_a_model(tmp_path: Path):
    path = tmp_path / "reports" / "compare.csv"
    path.parent.mkdir()
    path.write_text("model\nold-a\nold-b\nold-c\nold-d\n")
    rows = _sample_rows()

    write_csv(rows, path)

    with open(path, newline="") as handle:
        lines = list(csv.reader(handle))
    fields = [f.name for f in dataclasses.fields(CompareRow)]
    assert lines[0] == fields
    expected = [["" if getattr(row, name) is None else str(getattr(row, name)) for name in fields] for row in rows]
    assert lines[1:] == expected
    assert lines[1][fields.index("onnx_metric")] == "0.912"
    assert lines[3][fields.index("trainable_params")] == ""  # missing: empty, which pandas reads as NaN
    assert [p.name for p in path.parent.iterdir()] == ["compare.csv"]  # no temporary file left


def test_format_table_aligns_every_model_with_units_in_the_headers():
    table = format_table(_sample_rows())
    lines = table.splitlines()

    for label in ("test metric", "p50 ms, batch 1", "p50 ms, batch 32", "size MB", "champion (variant)"):
        assert label in table
    assert "ORT fp32" in lines[1] and "ORT int8" in lines[1] and "torch" in lines[1]
    assert [line.split()[0] for line in lines[3:]] == ["cnn", "lstm", "ghost"]
    column = lines[1].index("champion (variant)")
    assert lines[3][column:].startswith("v3 (int8)")
    assert lines[4][column:].startswith("v1 (fp32)")
    assert "0.052" in lines[3] and "0.017" in lines[3]  # sizes in MB
    assert "12,345" in lines[3]
    assert lines[5].split()[1:] == ["-"] * 15  # ghost: every column a dash (no run column content either)


def test_fp16_columns_appear_only_where_some_model_measured_its_fp16_variant():
    fp16 = {"fp16_accuracy": 0.9118, "latency_ms_fp16_b1_p50": 0.055, "latency_ms_fp16_b32_p50": 0.4321}
    assert "fp16" not in format_table(rows_from_metrics({"cnn": CLASSIFIER}))
    rows = rows_from_metrics({"cnn": CLASSIFIER | fp16 | {"fp16_size_bytes": 26_000}, "lstm": FORECASTER})
    assert (rows[0].fp16_metric, rows[0].latency_ms_fp16_b32, rows[0].fp16_size_bytes) == (0.9118, 0.4321, 26_000)
    lines = format_table(rows).splitlines()
    assert lines[1].count("ORT fp16") == 3 and lines[1].split().count("fp16") == 4  # metric, 2 latencies; size
    assert "0.9118" in lines[3] and "0.432" in lines[3] and "0.026" in lines[3]
    assert '<th colspan="4">test metric</th>' in render_html(rows)


def test_render_html_escapes_names_and_groups_the_headers():
    rows = rows_from_metrics({"<b>x</b>": CLASSIFIER})

    page = render_html(rows)

    assert "&lt;b&gt;x&lt;/b&gt;" in page and "<b>" not in page
    assert page.startswith('<table class="compare">') and page.endswith("</table>")
    assert '<th colspan="3">test metric</th>' in page and '<th colspan="2">size MB</th>' in page
    assert '<th rowspan="2">champion (variant)</th>' in page
    assert "&ndash;" in page  # the champion it was not given


def test_rows_from_metrics_match_rows_from_mlflow_for_the_same_numbers(config):
    cnn_run = _train_run(config, "cnn", CLASSIFIER, start=1_000)
    lstm_run = _train_run(config, "lstm", FORECASTER, start=2_000)
    cnn_version = _register(config, "cnn", cnn_run, "int8", champion=True)
    lstm_version = _register(config, "lstm", lstm_run, "fp32", champion=True)

    from_mlflow = rows_from_mlflow(config, ["cnn", "lstm"])
    from_files = rows_from_metrics(
        {"cnn": CLASSIFIER, "lstm": FORECASTER},
        champions={"cnn": (cnn_version, "int8"), "lstm": (lstm_version, "fp32")},
    )

    assert [row.source for row in from_files] == [FROM_METRICS_FILE] * 2
    assert [row.run_id for row in from_mlflow] == [cnn_run, lstm_run]
    # The same numbers, the same champion; only where they were read from differs.
    assert [dataclasses.replace(row, run_id=None, source=None) for row in from_mlflow] == [
        dataclasses.replace(row, source=None) for row in from_files
    ]
