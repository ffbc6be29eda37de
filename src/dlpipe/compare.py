"""Every model side by side: the version that serves (the registry's `champion`), its test metric through
PyTorch, ONNX Runtime fp32 and int8, its latencies and its file sizes.

The numbers come from MLflow (`rows_from_mlflow`: the champion's run, which may be older than the last
`evaluate` in this workspace) or from reports/metrics/<model>.json (`rows_from_metrics`: what the report stage
has). A number a model never recorded (an older evaluate, no int8 variant) is None and shows as a dash.
"""

from __future__ import annotations

import csv
import dataclasses
import html
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dlpipe import tracking
from dlpipe.config import Config
from dlpipe.errors import DlpipeError
from dlpipe.io import atomic_path

CSV_NAME = "compare.csv"  # under config.paths.reports

# CompareRow.source: where a row's numbers come from.
FROM_CHAMPION = "champion"  # the run of the version the `champion` alias points at
FROM_LATEST_VERSION = "latest version"  # the run of the newest registered version (no champion alias yet)
FROM_TRAIN_RUN = "train run"  # the newest finished train run (the model was never registered)
FROM_METRICS_FILE = "metrics file"  # reports/metrics/<model>.json


@dataclass(frozen=True)
class CompareRow:
    """One model. Every number is None where it was not recorded."""

    model: str
    task_metric: str  # "accuracy" (higher is better), "rmse_ratio_vs_persistence" (lower), "" if unknown
    trainable_params: int | None
    multiply_adds: int | None  # per sample
    test_metric: float | None  # through PyTorch (forecasters: the pooled ratio, see TASK_KEYS)
    onnx_metric: float | None  # through ONNX Runtime, fp32
    int8_metric: float | None  # through ONNX Runtime, int8
    latency_ms_torch_b1: float | None  # p50
    latency_ms_onnx_b1: float | None
    latency_ms_int8_b1: float | None
    latency_ms_onnx_b32: float | None
    latency_ms_int8_b32: float | None
    onnx_size_bytes: int | None
    int8_size_bytes: int | None
    champion_version: str | None  # with source "latest version": that version, which holds no alias
    champion_variant: str | None
    run_id: str | None
    source: str | None = None  # one of the FROM_* values; None: nothing recorded
    # The fp16 variant's, where it was measured (export.fp16: on ONNX Runtime's CUDA provider by default).
    fp16_metric: float | None = None
    latency_ms_fp16_b1: float | None = None
    latency_ms_fp16_b32: float | None = None
    fp16_size_bytes: int | None = None


@dataclass(frozen=True)
class TaskKeys:
    """The metric keys that fill a row's three task-metric columns."""

    task_metric: str
    torch: str
    onnx: str
    int8: str
    fp16: str


def _task_keys() -> dict[str, TaskKeys]:
    """Each registered task's columns, from the task itself (Task.compare_metrics and its promotion metric)."""
    from dlpipe.tasks import get_task, list_tasks
    from dlpipe.tasks.base import variant_metric_name

    keys = {}
    for name in list_tasks():
        task = get_task(name)
        label, torch_key = task.compare_metrics
        onnx_key = task.promotion[0]
        keys[name] = TaskKeys(
            label, torch_key, onnx_key, variant_metric_name("int8", onnx_key), variant_metric_name("fp16", onnx_key)
        )
    return keys


TASK_KEYS = _task_keys()
TASK_METRIC_LABELS = {"accuracy": "accuracy", "rmse_ratio_vs_persistence": "RMSE/persistence"}


# ------------------------------------------------------------------------------------------------- rows


def _number(metrics: Mapping[str, Any], key: str) -> float | None:
    value = metrics.get(key)
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def _count(metrics: Mapping[str, Any], key: str) -> int | None:
    # MLflow stores every metric as a float; a count is whole.
    value = _number(metrics, key)
    return int(round(value)) if value is not None and math.isfinite(value) else None


def _task_of(metrics: Mapping[str, Any], task_hint: str | None) -> str | None:
    """The task whose metric keys `metrics` holds; else `task_hint` (the model's task in params)."""
    for task, keys in TASK_KEYS.items():
        if any(key in metrics for key in (keys.torch, keys.onnx, keys.int8)):
            return task
    return task_hint


def build_row(
    model: str,
    metrics: Mapping[str, Any],
    champion: tuple[str | None, str | None] = (None, None),
    run_id: str | None = None,
    source: str | None = None,
    task_hint: str | None = None,
) -> CompareRow:
    """One row from a model's metrics (a metrics file, or an MLflow run's flattened metrics)."""
    keys = TASK_KEYS.get(_task_of(metrics, task_hint) or "")
    version, variant = champion
    return CompareRow(
        model=model,
        task_metric=keys.task_metric if keys else "",
        trainable_params=_count(metrics, "trainable_params"),
        multiply_adds=_count(metrics, "multiply_adds"),
        test_metric=_number(metrics, keys.torch) if keys else None,
        onnx_metric=_number(metrics, keys.onnx) if keys else None,
        int8_metric=_number(metrics, keys.int8) if keys else None,
        latency_ms_torch_b1=_number(metrics, "latency_ms_torch_b1_p50"),
        latency_ms_onnx_b1=_number(metrics, "latency_ms_onnx_b1_p50"),
        latency_ms_int8_b1=_number(metrics, "latency_ms_int8_b1_p50"),
        latency_ms_onnx_b32=_number(metrics, "latency_ms_onnx_b32_p50"),
        latency_ms_int8_b32=_number(metrics, "latency_ms_int8_b32_p50"),
        onnx_size_bytes=_count(metrics, "onnx_size_bytes"),
        int8_size_bytes=_count(metrics, "int8_size_bytes"),
        champion_version=version,
        champion_variant=variant,
        run_id=run_id,
        source=source,
        fp16_metric=_number(metrics, keys.fp16) if keys else None,
        latency_ms_fp16_b1=_number(metrics, "latency_ms_fp16_b1_p50"),
        latency_ms_fp16_b32=_number(metrics, "latency_ms_fp16_b32_p50"),
        fp16_size_bytes=_count(metrics, "fp16_size_bytes"),
    )


def rows_from_metrics(
    metrics_by_model: Mapping[str, Mapping[str, Any]],
    champions: Mapping[str, tuple[str | None, str | None]] | None = None,
) -> list[CompareRow]:
    """Rows from reports/metrics/<model>.json documents; `champions`: model -> (version, variant) in the registry."""
    champions = champions or {}
    return [
        build_row(model, metrics, champions.get(model, (None, None)), source=FROM_METRICS_FILE)
        for model, metrics in metrics_by_model.items()
    ]


# ----------------------------------------------------------------------------------------------- MLflow


def _serving_version(mlflow_client, model: str):
    """(version, source): the champion, else the newest version (a registry whose promotion never ran)."""
    name = tracking.registered_name(model)
    # The alias is read off the registered model: asking for a missing alias is an error whose code differs
    # from that of a missing model.
    registered = mlflow_client.search_registered_models(f"name = '{name}'")
    if not registered:
        return None, None
    if tracking.CHAMPION in registered[0].aliases:
        return mlflow_client.get_model_version(name, str(registered[0].aliases[tracking.CHAMPION])), FROM_CHAMPION
    versions = mlflow_client.search_model_versions(f"name = '{name}'")
    if not versions:
        return None, None
    return max(versions, key=lambda version: int(version.version)), FROM_LATEST_VERSION


def _latest_train_run_id(config: Config, mlflow_client, model: str) -> str | None:
    experiment = mlflow_client.get_experiment_by_name(config.params.mlflow.experiment)
    if experiment is None:
        return None
    runs = mlflow_client.search_runs(
        [experiment.experiment_id],
        filter_string=f"tags.model = '{model}' and tags.stage = 'train' and attributes.status = 'FINISHED'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    return runs[0].info.run_id if runs else None


def _run_metrics(mlflow_client, run_id: str | None) -> dict[str, float]:
    from mlflow.exceptions import MlflowException

    if not run_id:
        return {}
    try:
        return dict(mlflow_client.get_run(run_id).data.metrics)
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        return {}  # a version whose run was purged still names its number and variant


def _mlflow_row(config: Config, mlflow_client, model: str) -> CompareRow:
    train = config.params.train.get(model)
    task_hint = train.task if train is not None else None
    version, source = _serving_version(mlflow_client, model)
    if version is not None:
        champion = (str(version.version), version.tags.get(tracking.VARIANT_TAG))
        run_id = version.run_id or None
    else:
        champion = (None, None)
        run_id = _latest_train_run_id(config, mlflow_client, model)
        source = FROM_TRAIN_RUN if run_id else None
    return build_row(model, _run_metrics(mlflow_client, run_id), champion, run_id, source, task_hint)


def _empty_row(config: Config, model: str) -> CompareRow:
    train = config.params.train.get(model)
    return build_row(model, {}, task_hint=train.task if train is not None else None)


def rows_from_mlflow(config: Config, models: Iterable[str]) -> list[CompareRow]:
    """One row per model from MLflow: the champion version's run (else the newest version's, else the newest
    finished train run's). A model MLflow knows nothing of gives a row of dashes."""
    models = list(models)
    if not tracking.store_exists(config):
        return [_empty_row(config, model) for model in models]
    from mlflow.exceptions import MlflowException

    mlflow_client = tracking.client(config)
    try:
        return [_mlflow_row(config, mlflow_client, model) for model in models]
    except MlflowException as exc:  # a server that refuses, a store of another schema: not a traceback
        message = " ".join(str(exc.message).split())
        raise DlpipeError(f"MLflow at {tracking.tracking_uri(config)}: {message}") from exc


# ------------------------------------------------------------------------------------------------ output


@dataclass(frozen=True)
class Column:
    group: str  # shared by neighbouring columns (drawn once above them); "" for a column of its own
    label: str
    cell: Callable[[CompareRow], str | None]  # None: not recorded (a dash)
    numeric: bool = True
    optional: bool = False  # shown only when some row has a value (the fp16 variant, measured on GPUs)


def _formatted(pattern: str, field: str) -> Callable[[CompareRow], str | None]:
    def cell(row: CompareRow) -> str | None:
        value = getattr(row, field)
        return None if value is None else pattern.format(value)

    return cell


def _megabytes(field: str) -> Callable[[CompareRow], str | None]:
    def cell(row: CompareRow) -> str | None:
        size = getattr(row, field)
        return None if size is None else f"{size / 1e6:,.3f}"

    return cell


def _task_metric_cell(row: CompareRow) -> str | None:
    return TASK_METRIC_LABELS.get(row.task_metric, row.task_metric) or None


def _champion_cell(row: CompareRow) -> str | None:
    if row.source == FROM_TRAIN_RUN:
        return "not registered"
    if row.champion_version is None:
        return None
    version = f"v{row.champion_version}" + (f" ({row.champion_variant})" if row.champion_variant else "")
    # The newest version, shown because no version holds the alias: say so rather than call it champion.
    return f"no alias: {version}" if row.source == FROM_LATEST_VERSION else version


def _run_cell(row: CompareRow) -> str | None:
    return row.run_id[:8] if row.run_id else None  # enough to find it in the MLflow UI; the CSV has it whole


COLUMNS = (
    Column("", "model", lambda row: row.model, numeric=False),
    Column("", "metric", _task_metric_cell, numeric=False),
    Column("", "params", _formatted("{:,}", "trainable_params")),
    Column("", "mult-adds/sample", _formatted("{:,}", "multiply_adds")),
    Column("test metric", "torch", _formatted("{:.4f}", "test_metric")),
    Column("test metric", "ORT fp32", _formatted("{:.4f}", "onnx_metric")),
    Column("test metric", "ORT int8", _formatted("{:.4f}", "int8_metric")),
    Column("test metric", "ORT fp16", _formatted("{:.4f}", "fp16_metric"), optional=True),
    Column("p50 ms, batch 1", "torch", _formatted("{:.3f}", "latency_ms_torch_b1")),
    Column("p50 ms, batch 1", "ORT fp32", _formatted("{:.3f}", "latency_ms_onnx_b1")),
    Column("p50 ms, batch 1", "ORT int8", _formatted("{:.3f}", "latency_ms_int8_b1")),
    Column("p50 ms, batch 1", "ORT fp16", _formatted("{:.3f}", "latency_ms_fp16_b1"), optional=True),
    Column("p50 ms, batch 32", "ORT fp32", _formatted("{:.3f}", "latency_ms_onnx_b32")),
    Column("p50 ms, batch 32", "ORT int8", _formatted("{:.3f}", "latency_ms_int8_b32")),
    Column("p50 ms, batch 32", "ORT fp16", _formatted("{:.3f}", "latency_ms_fp16_b32"), optional=True),
    Column("size MB", "fp32", _megabytes("onnx_size_bytes")),
    Column("size MB", "int8", _megabytes("int8_size_bytes")),
    Column("size MB", "fp16", _megabytes("fp16_size_bytes"), optional=True),
    Column("", "champion (variant)", _champion_cell, numeric=False),
    Column("", "run", _run_cell, numeric=False),
)
GAP = "  "  # between columns of the text table


def columns_for(rows: list[CompareRow]) -> list[Column]:
    """COLUMNS, less the optional ones no row has a value for."""
    return [column for column in COLUMNS if not column.optional or any(column.cell(row) for row in rows)]


def _groups(columns: list[Column]) -> list[tuple[str, list[int]]]:
    """Runs of neighbouring columns that share a group, as (group, column indices)."""
    runs: list[tuple[str, list[int]]] = []
    for index, column in enumerate(columns):
        if runs and column.group and runs[-1][0] == column.group:
            runs[-1][1].append(index)
        else:
            runs.append((column.group, [index]))
    return runs


def _column_widths(columns: list[Column], cells: list[list[str]]) -> list[int]:
    widths = [max(len(column.label), *(len(row[i]) for row in cells)) for i, column in enumerate(columns)]
    for group, indices in _groups(columns):
        span = sum(widths[i] for i in indices) + len(GAP) * (len(indices) - 1)
        missing = len(group) + 6 - span  # the title with at least "-- " either side, so its extent shows
        if group and missing > 0:
            for order, index in enumerate(indices):  # shared out, so the columns stay alike
                widths[index] += missing // len(indices) + (order < missing % len(indices))
    return widths


def _aligned(columns: list[Column], texts: list[str], widths: list[int]) -> str:
    parts = [
        text.rjust(width) if column.numeric else text.ljust(width)
        for text, width, column in zip(texts, widths, columns, strict=True)
    ]
    return GAP.join(parts).rstrip()


def format_table(rows: Iterable[CompareRow]) -> str:
    """A plain-text table for the terminal: a title line over each group of columns, then one line a model."""
    rows = list(rows)
    columns = columns_for(rows)
    cells = [[column.cell(row) or "-" for column in columns] for row in rows]
    widths = _column_widths(columns, cells)
    titles = []
    for group, indices in _groups(columns):
        span = sum(widths[i] for i in indices) + len(GAP) * (len(indices) - 1)
        titles.append(f" {group} ".center(span, "-") if group else " " * span)
    lines = [
        GAP.join(titles).rstrip(),
        _aligned(columns, [column.label for column in columns], widths),
        _aligned(columns, ["-" * width for width in widths], widths),
        *(_aligned(columns, row, widths) for row in cells),
    ]
    return "\n".join(lines)


def _html_header(columns: list[Column]) -> str:
    """Two header rows: a group's title spans its columns; a column of its own spans both rows."""
    top, bottom = [], []
    for group, indices in _groups(columns):
        if group:
            top.append(f'<th colspan="{len(indices)}">{html.escape(group)}</th>')
            bottom += [f"<th>{html.escape(columns[i].label)}</th>" for i in indices]
        else:
            top += [f'<th rowspan="2">{html.escape(columns[i].label)}</th>' for i in indices]
    return f"<thead><tr>{''.join(top)}</tr><tr>{''.join(bottom)}</tr></thead>"


def _html_row(columns: list[Column], row: CompareRow) -> str:
    cells = []
    for index, column in enumerate(columns):
        text = column.cell(row)
        tag = "th" if index == 0 else "td"
        cells.append(f"<{tag}>{'&ndash;' if text is None else html.escape(text)}</{tag}>")
    return f"<tr>{''.join(cells)}</tr>"


def render_html(rows: Iterable[CompareRow]) -> str:
    """The same table as `format_table` as an HTML <table> (every value escaped), for reports/index.html."""
    rows = list(rows)
    columns = columns_for(rows)
    body = "".join(_html_row(columns, row) for row in rows)
    return f'<table class="compare">{_html_header(columns)}<tbody>{body}</tbody></table>'


def _csv_value(value: Any) -> str:
    return "" if value is None else str(value)  # empty, not a dash: spreadsheets and pandas read it as missing


def write_csv(rows: Iterable[CompareRow], path: Path) -> None:
    """One line per model, the CompareRow field names as header, written atomically."""
    fields = [field.name for field in dataclasses.fields(CompareRow)]
    with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(fields)
        writer.writerows([_csv_value(getattr(row, name)) for name in fields] for row in rows)


def compare(config: Config) -> list[CompareRow]:
    """The configured models' rows from MLflow, written to reports/compare.csv (printing is the caller's)."""
    rows = rows_from_mlflow(config, config.all_models)
    write_csv(rows, config.paths.reports / CSV_NAME)
    return rows
