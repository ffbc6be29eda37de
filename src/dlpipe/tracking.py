"""MLflow: where runs go, how they are tagged, artifacts, and the model registry (`dlpipe-<model>`,
alias `champion` on the best evaluated version)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import subprocess
import time
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dlpipe.config import Config
from dlpipe.errors import DlpipeError

if TYPE_CHECKING:
    import numpy as np

CHAMPION = "champion"
TRACKING_URI_ENV = "MLFLOW_TRACKING_URI"
DATA_KEY_TAG = "data_key"  # version tag: data_key() of what it was evaluated on
DATA_TAG = "evaluation_data"  # version tag: that evaluation data as JSON (source, test hash, input shape)
VARIANT_TAG = "variant"  # version tag: fp32 or int8
DATA_SOURCE_TAG = "data_source"  # run tag: `<dataset>/<source>` of the data it was trained on (images/mnist_5k)
NOTE_TAG = "mlflow.note.content"  # run tag MLflow shows as the run's description
RESULT_MARK = "**Evaluated:**"  # starts the note's last paragraph: evaluate's headline, replaced at each evaluate
MLFLOW_UI = "http://127.0.0.1:5000"  # where `mlflow ui` serves a local store by default
log = logging.getLogger("dlpipe")


def tracking_uri(config: Config) -> str:
    """MLFLOW_TRACKING_URI, else params.mlflow.tracking_uri, else an absolute sqlite file at the root.

    The absolute path matters: DVC and Prefect may run stages from other working directories, and
    MLflow's own default (`sqlite:///mlflow.db`) is relative to whatever that directory is.
    """
    uri = os.environ.get(TRACKING_URI_ENV) or config.params.mlflow.tracking_uri
    if not uri:
        return f"sqlite:///{config.paths.mlflow_db}"
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return f"sqlite:///{(config.paths.root / uri.removeprefix('sqlite:///')).resolve()}"
    return uri


@contextmanager
def keep_tracking_env() -> Iterator[None]:
    """Undo the process-wide MLflow settings that `mlflow.set_tracking_uri`, `set_registry_uri` and
    `set_experiment` export as environment variables (Lightning's MLFlowLogger calls them too): otherwise
    a second project run in the same process (a notebook, a test), and every process it starts, would log
    into and register with the first one's store."""
    before = {key: value for key, value in os.environ.items() if key.lstrip("_").startswith("MLFLOW_")}
    try:
        yield
    finally:
        for key in [key for key in os.environ if key.lstrip("_").startswith("MLFLOW_")]:
            if key not in before:
                del os.environ[key]
        os.environ.update(before)


def registered_name(model: str) -> str:
    return f"dlpipe-{model}"


def client(config: Config):
    from mlflow import MlflowClient

    # Alembic logs every sqlite migration at INFO on first use; that is noise in a stage's output.
    logging.getLogger("alembic").setLevel(logging.WARNING)
    reroot_local_store(config)
    return MlflowClient(tracking_uri=tracking_uri(config), registry_uri=tracking_uri(config))


def _is_local_store(config: Config) -> bool:
    return tracking_uri(config) == f"sqlite:///{config.paths.mlflow_db}"


def ensure_experiment(config: Config) -> str:
    """The experiment's id, creating the store's tables and the experiment if need be.

    Two first runs on a fresh `mlflow.db` (two `dvc repro`s of different models, say) would otherwise race
    on MLflow's schema migration and on the experiment's row; for the local store the creation happens
    under a file lock, once. After that, writers only insert rows, which sqlite serialises (MLflow sets a
    busy timeout on every session).
    """
    from filelock import FileLock
    from mlflow.exceptions import MlflowException

    lock = FileLock(config.paths.mlflow_lock) if _is_local_store(config) else contextlib.nullcontext()
    with lock:
        mlflow_client = client(config)
        name = config.params.mlflow.experiment
        experiment = mlflow_client.get_experiment_by_name(name)
        if experiment is not None:
            return experiment.experiment_id
        try:
            return mlflow_client.create_experiment(name, artifact_location=artifact_location(config))
        except MlflowException:  # created meanwhile by another client of the same server
            return mlflow_client.get_experiment_by_name(name).experiment_id


def artifact_location(config: Config) -> str | None:
    """Artifacts beside the sqlite file (absolute); a remote server decides its own location."""
    return config.paths.mlflow_artifacts.as_uri() if tracking_uri(config).startswith("sqlite:") else None


# Columns of MLflow's schema that hold a local artifact path (as a path or a file: URI).
_ARTIFACT_COLUMNS = (
    ("experiments", "artifact_location"),
    ("runs", "artifact_uri"),
    ("logged_models", "artifact_location"),
    ("model_versions", "storage_location"),
    ("model_versions", "source"),
)


_CHECKED_STORES: set[Path] = set()  # local stores this process has re-rooted (or found in place)


def reroot_local_store(config: Config) -> Path | None:
    """Keep a copied or moved project's artifacts to itself. Returns the old location if it moved them.

    MLflow stores the experiment's artifact location, and every run's and model's, as absolute paths, fixed
    when they are created: without this, every run of a copied project would log into the original
    checkout's `mlartifacts/` (and a moved one into a folder that no longer exists). The copy's
    `mlartifacts/` holds the same files, so the stored paths are re-rooted at this project, old runs
    included. Only the default store (`mlflow.db` at the root) is touched; a server owns its own paths.
    Stored paths stay absolute, so `mlflow ui` and registry loads work from any directory.
    """
    import sqlite3
    from contextlib import closing
    from urllib.parse import urlparse

    if not _is_local_store(config) or config.paths.mlflow_db in _CHECKED_STORES or not config.paths.mlflow_db.is_file():
        return None
    _CHECKED_STORES.add(config.paths.mlflow_db)  # once per process: every MLflow call goes through here
    expected = config.paths.mlflow_artifacts
    with closing(sqlite3.connect(config.paths.mlflow_db, timeout=60)) as db:
        tables = {name for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if "experiments" not in tables:
            return None
        row = db.execute(
            "SELECT artifact_location FROM experiments WHERE name = ?", (config.params.mlflow.experiment,)
        ).fetchone()
        stored = Path(urlparse(row[0]).path if row and row[0].startswith("file:") else (row or [""])[0])
        if not row or stored == expected or stored.name != expected.name:
            return None
        with db:  # one transaction: all paths move, or none
            for table, column in _ARTIFACT_COLUMNS:
                if table not in tables or column not in {c[1] for c in db.execute(f"PRAGMA table_info({table})")}:
                    continue  # another MLflow schema version
                for old, new in ((stored.as_uri(), expected.as_uri()), (str(stored), str(expected))):
                    # Exact prefix match (LIKE would treat `_` and `%` in a path as wildcards).
                    db.execute(
                        f"UPDATE {table} SET {column} = ? || substr({column}, ?) WHERE substr({column}, 1, ?) = ?"
                        f" AND (length({column}) = ? OR substr({column}, ?, 1) = '/')",
                        (new, len(old) + 1, len(old), old, len(old), len(old) + 1),
                    )
    log.info("mlflow.db: artifact paths moved from %s to %s (the project was copied or moved)", stored, expected)
    return stored


def git_sha(root: Path) -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10, check=True
        )
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def model_dataset(config: Config, model: str) -> str | None:
    """The dataset `model` trains on: its `models` (or `generators`) entry, else its task's; None if unknown."""
    if model in config.all_models:
        return config.dataset_of(model)
    if model in config.params.train:  # trained by a recipe (distill, transfer) without a `models` entry
        from dlpipe.tasks import task_of

        return task_of(config, model).dataset
    return None


def dataset_meta(config: Config, dataset: str) -> dict[str, Any]:
    """The meta.json the data stage wrote for `dataset` (empty if it has not run)."""
    path = config.paths.meta(config.paths.dataset(dataset) / "raw")
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def run_tags(config: Config, model: str, stage: str, data_sha256: str, dataset: str | None = None) -> dict[str, str]:
    """Tags of a run that trains `model` (`dataset`: the data it trains on; default: the model's)."""
    dataset = dataset or model_dataset(config, model)
    source = dataset_meta(config, dataset).get("source") if dataset else None
    return {
        "model": model,
        "stage": stage,
        "git_sha": git_sha(config.paths.root),
        "params_hash": config.params_hash,
        "data_sha256": data_sha256,
        DATA_SOURCE_TAG: f"{dataset}/{source or 'unknown'}" if dataset else "unknown",
    }


def _short_git(tags: Mapping[str, str]) -> str:
    sha = tags.get("git_sha", "unknown")
    return "no-git" if sha == "unknown" else sha[:7]  # a project outside a git repository


def run_name(tags: Mapping[str, str]) -> str:
    """`<model> <data source>@<data sha256, 7> <git sha, 7>` from `run_tags`: runs of one model on other data
    or other code are told apart in the MLflow UI's run list. Runs other than training name their stage first
    (`distill: cnn images/mnist_5k@1a2b3c4 9f8e7d6`)."""
    data = f"{tags.get(DATA_SOURCE_TAG, 'unknown')}@{tags.get('data_sha256', '')[:7]}"
    name = f"{tags['model']} {data} {_short_git(tags)}"
    return name if tags.get("stage") == "train" else f"{tags.get('stage')}: {name}"


def store_exists(config: Config) -> bool:
    """False for a sqlite store whose file is missing: reading must not create an empty mlflow.db."""
    uri = tracking_uri(config)
    return not uri.startswith("sqlite:///") or Path(uri.removeprefix("sqlite:///")).is_file()


def ui_base(config: Config) -> str | None:
    """Where the MLflow UI shows this store: the tracking server for an http(s) URI; for a local store (sqlite,
    file) the address `mlflow ui` serves by default. None for another store, or a sqlite file not yet made."""
    uri = tracking_uri(config)
    if uri.startswith(("http://", "https://")):
        return uri.rstrip("/")
    if uri.startswith(("sqlite:", "file:")) or (":" not in uri and not uri.startswith("databricks")):  # or a path
        return MLFLOW_UI if store_exists(config) else None
    return None


def run_page(base: str, experiment_id: str, run_id: str) -> str:
    """A run's page under the UI address `ui_base` gives."""
    return f"{base}/#/experiments/{experiment_id}/runs/{run_id}"


def run_url(config: Config, run_id: str) -> str | None:
    """The run's page in the MLflow UI (see `ui_base`); None for another store, or a run it does not hold."""
    from mlflow.exceptions import MlflowException

    base = ui_base(config)
    if base is None:
        return None
    try:
        experiment_id = client(config).get_run(run_id).info.experiment_id
    except MlflowException:
        return None
    return run_page(base, experiment_id, run_id)


def _epochs(count: Any) -> str:
    return f"{count} epoch" if count == 1 else f"{count} epochs"


def training_note(
    tags: Mapping[str, str],
    task: str,
    train: Mapping[str, Any],
    monitor: tuple[str, str],
    facts: Mapping[str, Any] | None = None,
) -> str:
    """The run's description while and after it trains: the model, its data, code and settings (`train`:
    the train.<model> params it ran with); with `facts` (train.json's), what training did."""
    optimizer = train.get("optimizer") or {}
    text = (
        f"**{tags['model']}** ({task}) trained on {tags.get(DATA_SOURCE_TAG, 'unknown')} "
        f"(data sha256 `{tags.get('data_sha256', '')[:12]}`), git `{_short_git(tags)}`, "
        f"params hash `{tags.get('params_hash')}`: at most {_epochs(train.get('epochs'))} of batch "
        f"{train.get('batch_size')}, {optimizer.get('name', '?')} lr {optimizer.get('lr', float('nan')):g}, "
        f"the checkpoint kept at the best {monitor[0]} ({monitor[1]})."
    )
    if facts:
        text += (
            f" Trained {_epochs(facts['epochs_trained'])} in {facts['train_seconds']:.1f} s "
            f"({facts['precision']} on {facts['device']}): best {facts['monitor']} {facts['best_score']:.4g}."
        )
    return text


def set_note(config: Config, run_id: str, text: str) -> None:
    client(config).set_tag(run_id, NOTE_TAG, text)


def note_result(config: Config, run_id: str, result: str) -> None:
    """Put `result` (evaluate's headline) at the end of the run's description, in place of an earlier one;
    the rest of the note, edits made in the UI included, is kept."""
    mlflow_client = client(config)
    note = mlflow_client.get_run(run_id).data.tags.get(NOTE_TAG, "")
    kept = note.split(RESULT_MARK)[0].rstrip()
    mlflow_client.set_tag(run_id, NOTE_TAG, f"{kept}\n\n{RESULT_MARK} {result}".lstrip())


def set_run_status(config: Config, run_id: str, status: str) -> None:
    """Set a run's status: FINISHED, FAILED or KILLED, or RUNNING again for a resumed training."""
    mlflow_client = client(config)
    if status == "RUNNING":
        mlflow_client.update_run(run_id, status=status)
    else:
        mlflow_client.set_terminated(run_id, status=status)


def end_run_if_running(config: Config, run_id: str, status: str) -> None:
    """End a run left RUNNING (by a process that was killed); a finished or missing run is left alone."""
    from mlflow.exceptions import MlflowException

    mlflow_client = client(config)
    try:
        if mlflow_client.get_run(run_id).info.status == "RUNNING":
            mlflow_client.set_terminated(run_id, status=status)
    except MlflowException:
        pass


def log_artifact(config: Config, run_id: str, path: Path, artifact_path: str) -> None:
    client(config).log_artifact(run_id, str(path), artifact_path=artifact_path)


def log_artifacts(config: Config, run_id: str, directory: Path, artifact_path: str) -> None:
    """Every file in `directory`, under `artifact_path` of the run."""
    client(config).log_artifacts(run_id, str(directory), artifact_path=artifact_path)


def log_files(config: Config, run_id: str, paths: Iterable[Path], artifact_path: str) -> None:
    """Each of `paths` under `artifact_path` of the run, by its file name."""
    mlflow_client = client(config)
    for path in paths:
        mlflow_client.log_artifact(run_id, str(path), artifact_path=artifact_path)


def flatten(metrics: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested metrics as one level, keys joined by "/" (tickers/GOOG/rmse): MLflow's names for groups."""
    flat = {}
    for key, value in metrics.items():
        if isinstance(value, dict):
            flat |= flatten(value, f"{prefix}{key}/")
        else:
            flat[f"{prefix}{key}"] = value
    return flat


# ------------------------------------------------------------------------------------------ metric names
# Every metric a run shows goes through `metric_name`: Lightning's (train.py's logger), export's and
# evaluate's (`log_metrics`). A key not named below keeps its name: the keys of reports/metrics/<model>.json
# and Lightning's `<split>/<name>`. So the run holds one name per quantity, the same name for every model of
# a task, and the unit in the name where one statistic comes in two units.

# Lightning's test pass of the best checkpoint (train.json keeps it) measures what evaluate measures again on
# the exported model: the run keeps evaluate's number, the one the metrics file, the report and `dlpipe
# compare` show. Lightning's name -> the name of the same quantity in the run.
MEASURED_BY_EVALUATE = {
    "test/acc": "test_accuracy",
    "test/macro_f1": "macro_f1",
    "test/fid": "fid_cnn",
    "test/d_longest_wins_streak": "discriminator_longest_win_epochs",
}
# A forecaster's per-ticker errors are in the ticker's price units, where its pooled figures and Lightning's
# `rmse_log_return` are in log returns.
_PRICE_ERRORS = re.compile(r"^tickers/[^/]+/(?:baselines/[^/]+/)?(?:rmse|mae)$")
PRICE_SUFFIX = "_price"
# LearningRateMonitor names a learning rate after the optimizer's class (`lr-AdamW`, `lr-SGD`): the optimizer
# is a setting of the run, not part of the quantity.
_LEARNING_RATE = re.compile(r"^lr-[A-Za-z]\w*")
LEARNING_RATE = "train/lr"


def metric_name(key: str) -> str | None:
    """The MLflow name of the metric a stage computes as `key` (flattened, "/"-joined); None: not logged,
    the run has the same quantity under another name."""
    if key in MEASURED_BY_EVALUATE:
        return None
    if _PRICE_ERRORS.match(key):
        return key + PRICE_SUFFIX
    return _LEARNING_RATE.sub(LEARNING_RATE, key, count=1)


def mlflow_metrics(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """`metrics` (flat) under their MLflow names, those measured under another name left out."""
    named = {key: metric_name(key) for key in metrics}
    return {name: metrics[key] for key, name in named.items() if name is not None}


def log_metrics(config: Config, run_id: str, metrics: dict[str, Any]) -> None:
    """Numbers as MLflow metrics; short strings (a verdict, `skill: yes|no`, the provider) as run tags. Both
    under their MLflow names (`metric_name`)."""
    from mlflow.entities import Metric, RunTag

    stamp = int(time.time() * 1000)
    flat = mlflow_metrics(flatten(metrics))
    numeric = [
        Metric(k, float(v), stamp, 0) for k, v in flat.items() if isinstance(v, int | float) and not isinstance(v, bool)
    ]
    tags = [RunTag(k, v) for k, v in flat.items() if isinstance(v, str) and len(v) <= 5000]
    client(config).log_batch(run_id, metrics=numeric, tags=tags)


def register_onnx(
    config: Config,
    model: str,
    run_id: str,
    onnx_path: Path,
    example: np.ndarray,
    metadata: dict[str, str],
    variant: str = "fp32",
    fp32_version: str | None = None,
) -> str:
    """Log the ONNX file as an MLflow model in the run and register it as a new version.

    The model carries a signature (input and output dtype and shape, -1 where the graph's axis is dynamic:
    the batch, a forecaster's window), `example` as its input example, and `metadata` (the task's contract:
    scaling, classes or features, what the output means).
    """
    import mlflow
    import onnx
    from mlflow.models import ModelSignature
    from mlflow.types.schema import Schema, TensorSpec

    from dlpipe.runtime import create_session, run_batched

    session = create_session(onnx_path, ("cpu",))
    outputs = run_batched(session, example)

    def spec(node, values: np.ndarray) -> Schema:
        return Schema([TensorSpec(values.dtype, tuple(d if isinstance(d, int) else -1 for d in node.shape))])

    signature = ModelSignature(spec(session.get_inputs()[0], example), spec(session.get_outputs()[0], outputs))
    reroot_local_store(config)
    with keep_tracking_env():
        mlflow.set_tracking_uri(tracking_uri(config))
        mlflow.set_registry_uri(tracking_uri(config))
        with mlflow.start_run(run_id=run_id):
            info = mlflow.onnx.log_model(
                onnx.load(onnx_path),
                name="onnx" if variant == "fp32" else f"onnx_{variant}",
                registered_model_name=registered_name(model),
                signature=signature,
                input_example=example,
                metadata=metadata,
                pip_requirements=["onnxruntime"],  # skips slow requirement inference
            )
    version = str(info.registered_model_version)
    mlflow_client = client(config)
    mlflow_client.set_model_version_tag(registered_name(model), version, VARIANT_TAG, variant)
    if fp32_version is not None:  # the graph it was quantized from
        mlflow_client.set_model_version_tag(registered_name(model), version, "fp32_version", fp32_version)
    return version


def data_key(evaluation_data: dict[str, Any]) -> str:
    """A short stable id of what a version was evaluated on (the task's `evaluation_data`)."""
    return hashlib.sha256(json.dumps(evaluation_data, sort_keys=True).encode()).hexdigest()[:12]


def best_alias(key: str) -> str:
    """Alias of the best version evaluated on the data with this key."""
    return f"best-{key}"


def _version_at(mlflow_client, name: str, alias: str):
    from mlflow.exceptions import MlflowException

    try:
        return mlflow_client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def _beats(value: float, holder, metric: str, higher_is_better: bool) -> bool:
    """`value` is better than the `metric` tag of the version `holder` (or there is no comparable holder)."""
    other = float(holder.tags.get(metric, "nan")) if holder is not None else float("nan")
    return other != other or (value > other if higher_is_better else value < other)


def tag_evaluation(
    config: Config, model: str, version: str, metrics: dict[str, Any], metric: str, evaluation_data: dict[str, Any]
) -> str:
    """Tag `version` with its `metric` and what it was evaluated on; returns the data key."""
    key = data_key(evaluation_data)
    tags = ((metric, str(float(metrics[metric]))), (DATA_KEY_TAG, key), (DATA_TAG, json.dumps(evaluation_data)))
    for tag, value in tags:
        client(config).set_model_version_tag(registered_name(model), version, tag, value)
    return key


def promote_if_better(
    config: Config,
    model: str,
    version: str,
    metrics: dict[str, Any],
    promotion: tuple[str, bool],
    evaluation_data: dict[str, Any],
) -> bool:
    """Tag `version` with its promotion metric and evaluation data, and point aliases at it where it wins.

    Numbers measured on different test sets do not compare: `version` takes the alias `best-<data key>` when
    it beats the best version on the same data, and `champion` only when the champion was evaluated on the
    same data too (or there is none yet). A model trained on other data (say 8x8 digits instead of MNIST)
    is registered beside the champion, never over it. `promotion` is the task's (metric, higher is better).
    """
    metric, higher_is_better = promotion
    mlflow_client = client(config)
    name = registered_name(model)
    key = tag_evaluation(config, model, version, metrics, metric, evaluation_data)
    value = float(metrics[metric])
    if _beats(value, _version_at(mlflow_client, name, best_alias(key)), metric, higher_is_better):
        mlflow_client.set_registered_model_alias(name, best_alias(key), version)
    champion = _version_at(mlflow_client, name, CHAMPION)
    if champion is not None and champion.tags.get(DATA_KEY_TAG) != key:
        log.info(
            "%s v%s: evaluated on other data (%s) than champion v%s; champion kept",
            name,
            version,
            key,
            champion.version,
        )
        return False
    if champion is None or _beats(value, champion, metric, higher_is_better):
        set_champion(config, model, version)
        return True
    return False


HISTORY_TAG = "champion_history"  # registered-model tag: earlier champion versions, oldest first (JSON list)


def champion_version(config: Config, model: str) -> str | None:
    holder = _version_at(client(config), registered_name(model), CHAMPION)
    return None if holder is None else str(holder.version)


def _history(mlflow_client, name: str) -> list[str]:
    return json.loads(mlflow_client.get_registered_model(name).tags.get(HISTORY_TAG, "[]"))


def set_champion(config: Config, model: str, version: str) -> str | None:
    """Point `champion` at `version`; the version it leaves is pushed on the history `rollback` pops.
    Returns that previous champion (None if there was none)."""
    mlflow_client, name = client(config), registered_name(model)
    previous = champion_version(config, model)
    if previous == str(version):
        return previous
    if previous is not None:
        history = [*_history(mlflow_client, name), previous]
        mlflow_client.set_registered_model_tag(name, HISTORY_TAG, json.dumps(history))
    mlflow_client.set_registered_model_alias(name, CHAMPION, str(version))
    return previous


def rollback_champion(config: Config, model: str) -> tuple[str | None, str]:
    """Move `champion` back to the version it held before; returns (from, to). The history shrinks by one, so
    repeated rollbacks walk further back."""
    mlflow_client, name = client(config), registered_name(model)
    history = _history(mlflow_client, name)
    if not history:
        raise DlpipeError(f"{model}: no earlier champion to roll back to (registry tag {HISTORY_TAG} is empty)")
    current, target = champion_version(config, model), history[-1]
    mlflow_client.set_registered_model_alias(name, CHAMPION, target)
    mlflow_client.set_registered_model_tag(name, HISTORY_TAG, json.dumps(history[:-1]))
    return current, target
