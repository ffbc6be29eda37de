"""The Prefect flow over the DVC pipeline. dvc.yaml's stage graph (read through DVC's API) becomes the
flow's task graph; each task runs its stage's command as `dvc repro` would, then `dvc commit`s it, so
`dvc.lock` and the DVC cache stay the one record of what was built from what: after a flow run `dvc status`
is clean, `dvc repro` runs nothing and `dvc push` has every output.

What the flow adds to `dvc repro`:
- Sub-flows: data (fetches, augmentation), train-evaluate (every model's train, export and evaluate, the
  generators, distillation, transfer, cost), report. Each shows as its own run in the Prefect UI.
- Fan-out: stages that do not depend on each other run at once on a Dask task runner (a local cluster of
  params `flow.workers`, or the cluster at `flow.dask_address`), each pinned to its share of the cores;
  stages that time things run alone (pipelines/slots.py); trainings on a GPU take a slot of the
  `dlpipe-gpu` concurrency limit and a device of their own.
- Caching keyed on DVC's inputs: a stage whose command, params section and dep hashes (code and data) are
  those of an earlier run, and whose outputs are the ones dvc.lock records, is `Cached` and does not run.
- Retries with exponential backoff and a timeout on the fetches, the only steps that touch the network.
- A Markdown artifact: every model's result, verdict, champion and a link to its MLflow run.

Run once:        python -m pipelines.flows [--project .] [--models cnn lstm] [--datasets stocks]
Schedule:        prefect deploy --all   (prefect.yaml: weekday stock refresh, weekly full retrain)
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import selectors
import signal
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE, CachePolicy
from prefect.client.orchestration import get_client
from prefect.concurrency.sync import concurrency
from prefect.futures import PrefectFuture
from prefect.task_runners import ThreadPoolTaskRunner
from prefect.tasks import exponential_backoff
from prefect_dask import DaskTaskRunner

from dlpipe.config import Config, load_config
from dlpipe.errors import DlpipeError
from dlpipe.io import read_json
from pipelines import dvc_stages
from pipelines.dvc_stages import Stage
from pipelines.slots import StageSlots, gpu_devices

OUTPUT_TAIL_LINES = 40  # lines of a failed stage's output kept in the task's error message
GPU_LIMIT = "dlpipe-gpu"  # the Prefect global concurrency limit trainings on a GPU take slots of
CACHE_DIR = Path(".prefect") / "cache"  # per project (git-ignored): cache records travel with the outputs
STOP_GRACE_SECONDS = 10  # a stopped stage's time to end cleanly before it is killed
READ_POLL_SECONDS = 1.0  # a silent stage's output is polled this often, so a timeout can stop it
DATA_KINDS = ("fetch_images", "fetch_stocks", "augment")

# The placement of this process's stages: set by the parent flow for a local cluster (its workers are
# threads of this process); None on a remote Dask worker, where the cluster's own sizing decides.
_slots: StageSlots | None = None


@dataclass
class DvcStageInputs(CachePolicy):
    """Prefect's cache key for a stage task: the digest of what DVC decides the stage's freshness on."""

    def compute_key(self, task_ctx, inputs: dict[str, Any], flow_parameters: dict[str, Any], **kwargs) -> str:
        root = Path(inputs["project"])
        return dvc_stages.inputs_key(root, inputs["stage"].name, load_config(root / "params.yaml"))


@task(task_run_name="{stage.name}", persist_result=True)
def run_stage(project: str, stage: Stage, gpus: int = 0, machine_gpus: int = 0) -> str:
    """Run one stage's command in the project (on `gpus` of the machine's GPUs), then record it in dvc.lock."""
    root = Path(project)
    with _placement(stage, gpus, machine_gpus) as (cpus, env):
        _run_command(root, stage, cpus, env)
    dvc_stages.commit(root, [stage.name])
    return "ran"


@contextlib.contextmanager
def _placement(stage: Stage, gpus: int, machine_gpus: int) -> Iterator[tuple[set[int] | None, dict[str, str]]]:
    """The cores (None: all) and extra environment the stage runs with; see pipelines/slots.py."""
    with contextlib.ExitStack() as stack:
        cpus = None
        if _slots is not None and stage.measures_time:
            stack.enter_context(_slots.alone())
        elif _slots is not None:
            cpus = stack.enter_context(_slots.shared())
        env: dict[str, str] = {}
        if gpus:
            stack.enter_context(concurrency(GPU_LIMIT, occupy=gpus, strict=False))
            devices = stack.enter_context(gpu_devices(gpus, machine_gpus))
            env["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, devices))
        yield cpus, env


def _run_command(root: Path, stage: Stage, cpus: set[int] | None, env: dict[str, str]) -> None:
    """The stage's command, its output line by line into the task's log; stopped if the task is."""
    logger = get_run_logger()
    process = subprocess.Popen(
        dvc_stages.stage_command(stage, cpus),
        cwd=root,
        env=dvc_stages.stage_environment(env),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        bufsize=1,
        start_new_session=True,  # its own process group: a timeout stops the stage and its children
    )
    if cpus:
        logger.info("%s on cpus %s", stage.name, ",".join(map(str, sorted(cpus))))
    lines: list[str] = []
    try:
        with selectors.DefaultSelector() as selector:
            selector.register(process.stdout, selectors.EVENT_READ)
            while True:
                # Waiting in short slices keeps this thread in Python, where Prefect's timeout reaches it.
                if not selector.select(timeout=READ_POLL_SECONDS):
                    continue
                line = process.stdout.readline()
                if not line:
                    break
                lines.append(line.rstrip())
                logger.info(line.rstrip())
        returncode = process.wait()
    finally:
        if process.poll() is None:  # the task was stopped (a timeout): so is the stage, children and all
            _stop(process)
    if returncode != 0:
        tail = "\n".join(lines[-OUTPUT_TAIL_LINES:])
        raise RuntimeError(f"{stage.name}: `{stage.cmd}` exited {returncode}:\n{tail}")


def _stop(process: subprocess.Popen) -> None:
    """SIGTERM first (a training marks its MLflow run KILLED and keeps its last checkpoint), then SIGKILL."""
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=STOP_GRACE_SECONDS)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def _gpus_of(config: Config, stage: Stage, machine_gpus: int) -> int:
    """GPUs a stage claims: a training's `trainer.devices` (1 for auto, which then sees only its own)."""
    if not machine_gpus or not stage.trains:
        return 0
    devices = config.params.trainer.devices
    return devices if isinstance(devices, int) else 1


def _stage_task(config: Config, stage: Stage):
    """`run_stage` with the stage's options: caching (refreshed when DVC says the stage is not up to
    date: outputs missing or changed since dvc.lock recorded them), and retries for the fetches."""
    root, flow_params = config.paths.root, config.params.flow
    if not flow_params.cache:
        options: dict[str, Any] = {"cache_policy": NO_CACHE}
    else:
        policy = DvcStageInputs().configure(key_storage=root / CACHE_DIR)
        options = {"cache_policy": policy, "refresh_cache": not dvc_stages.up_to_date(root, stage.name)}
    if stage.fetches:
        options.update(
            retries=flow_params.fetch_retries,
            retry_delay_seconds=exponential_backoff(backoff_factor=flow_params.fetch_retry_delay_s),
            retry_jitter_factor=0.5,
            timeout_seconds=flow_params.fetch_timeout_s,
        )
    return run_stage.with_options(**options)


def _run_graph(config: Config, stages: dict[str, Stage], machine_gpus: int = 0) -> dict[str, str]:
    """Submit every stage once its upstream stages are submitted (Prefect waits for them); wait for all.
    Returns each stage's outcome: `ran` or `cached`. Raises, naming them, when stages failed."""
    futures: dict[str, PrefectFuture] = {}
    for name, stage in stages.items():
        upstream = [futures[dep] for dep in stage.upstream if dep in futures]
        gpus = _gpus_of(config, stage, machine_gpus)
        futures[name] = _stage_task(config, stage).submit(
            str(config.paths.root), stage, gpus, machine_gpus, wait_for=upstream
        )
    outcomes, failed = {}, []
    for name, future in futures.items():
        future.wait()
        state = future.state
        if state.is_completed():
            outcomes[name] = "cached" if state.name == "Cached" else "ran"
        else:
            failed.append(f"{name} ({state.name})")
    if failed:
        raise RuntimeError(f"stages did not complete: {', '.join(failed)}")
    return outcomes


@flow(name="dlpipe-data", log_prints=True)
def data(project: str, stages: dict[str, Stage]) -> dict[str, str]:
    """Fetch the datasets and augment the images."""
    return _run_graph(load_config(Path(project) / "params.yaml"), stages)


@flow(name="dlpipe-train-evaluate", log_prints=True)
def train_evaluate(project: str, stages: dict[str, Stage], machine_gpus: int = 0) -> dict[str, str]:
    """Every model's train -> export -> evaluate (generators after their judge), distillation, transfer and
    the cost stage, fanned out on the Dask task runner."""
    return _run_graph(load_config(Path(project) / "params.yaml"), stages, machine_gpus)


@flow(name="dlpipe-report", log_prints=True)
def report(project: str, stages: dict[str, Stage]) -> dict[str, str]:
    """reports/index.html and reports/summary.json from every model's outputs."""
    return _run_graph(load_config(Path(project) / "params.yaml"), stages)


def _dask_runner(config: Config) -> DaskTaskRunner:
    flow_params = config.params.flow
    logging.getLogger("distributed").setLevel(logging.WARNING)  # not a line per worker start and stop
    if flow_params.dask_address:
        return DaskTaskRunner(address=flow_params.dask_address)
    # Threads of this process: a stage's work is its own process, and the core and GPU bookkeeping
    # (pipelines/slots.py) is shared between them. No dashboard: flow runs side by side would fight for its port.
    cluster = {"n_workers": flow_params.workers, "threads_per_worker": 1, "processes": False, "dashboard_address": None}
    return DaskTaskRunner(cluster_kwargs=cluster)


def visible_gpus(config: Config) -> int:
    """GPUs the trainings may use: params flow.gpu_limit, else the CUDA devices this machine has (none when
    the trainer is held to the CPU)."""
    if config.params.flow.gpu_limit is not None:
        return config.params.flow.gpu_limit
    if config.params.trainer.accelerator == "cpu":
        return 0
    import torch

    return torch.cuda.device_count()


def _ensure_gpu_limit(gpus: int) -> None:
    with get_client(sync_client=True) as client:
        client.upsert_global_concurrency_limit_by_name(GPU_LIMIT, gpus)


def models_of(config: Config, models: list[str] | None, datasets: list[str] | None) -> list[str] | None:
    """The models a run covers: `models`, else those training on one of `datasets`, else all (None)."""
    if models:
        return config.selected_models(models)
    if datasets:
        known = {config.dataset_of(model) for model in config.all_models}
        for dataset in datasets:
            if dataset not in known:
                raise DlpipeError(f"no model trains on dataset {dataset!r}: params models use {sorted(known)}")
        return [model for model in config.all_models if config.dataset_of(model) in datasets]
    return None


@flow(name="dlpipe", log_prints=True)
def dlpipe_pipeline(
    project: str = ".", models: list[str] | None = None, datasets: list[str] | None = None
) -> dict[str, Any]:
    """The DVC pipeline: data -> train-evaluate (fanned out) -> report. `models` or `datasets` narrow it to
    those models' stages and what they need (the report, distillation, transfer and cost only run with all).

    Returns each stage's outcome (`ran` or `cached`) and the metrics of the models covered.
    """
    global _slots
    logger = get_run_logger()
    root = Path(project).resolve()
    config = load_config(root / "params.yaml")  # the params DVC will use: bad values fail before any stage
    selected = models_of(config, models, datasets)
    stages = dvc_stages.stages_for(config, dvc_stages.read_stages(root), selected)
    covered = selected or config.all_models
    _slots = None if config.params.flow.dask_address else StageSlots(config.params.flow.workers)
    gpus = visible_gpus(config)
    if gpus:
        _ensure_gpu_limit(gpus)

    data_stages = {name: stage for name, stage in stages.items() if stage.kind in DATA_KINDS}
    model_stages = {name: stage for name, stage in stages.items() if stage.kind not in (*DATA_KINDS, "report")}
    report_stages = {name: stage for name, stage in stages.items() if stage.kind == "report"}
    outcomes: dict[str, str] = {}
    # A thread per stage: one waiting for its upstream holds a thread, and the core groups (not the
    # threads) bound how many run at once.
    threads = ThreadPoolTaskRunner(max_workers=max(1, len(data_stages)))
    outcomes |= data.with_options(task_runner=threads)(str(root), data_stages)
    outcomes |= train_evaluate.with_options(task_runner=_dask_runner(config))(str(root), model_stages, gpus)
    if report_stages:
        outcomes |= report(str(root), report_stages)
    cached = sorted(name for name, outcome in outcomes.items() if outcome == "cached")
    logger.info("%d stages ran, %d cached (inputs unchanged): %s", len(outcomes) - len(cached), len(cached), cached)

    from dlpipe.report import models_markdown

    create_markdown_artifact(
        key="dlpipe-models",
        markdown=models_markdown(config, covered),
        description=f"dlpipe: {len(covered)} models, {len(outcomes) - len(cached)} stages ran, {len(cached)} cached",
    )
    metrics = {model: read_json(config.paths.metrics(model)) for model in covered}
    return {"stages": outcomes, "metrics": metrics}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pipelines.flows", description="Run the dlpipe Prefect flow once.")
    parser.add_argument("--project", default=".", help="directory holding dvc.yaml and params.yaml (default: .)")
    parser.add_argument("--models", nargs="*", help="models of params `models`/`generators` to run (default: all)")
    parser.add_argument("--datasets", nargs="*", help="run the models training on these datasets (images, stocks)")
    args = parser.parse_args(argv)
    dlpipe_pipeline(project=args.project, models=args.models, datasets=args.datasets)


if __name__ == "__main__":
    # The functions of the importable module, not of `__main__`: Dask pickles tasks by reference to them.
    from pipelines.flows import main as flows_main

    flows_main()
