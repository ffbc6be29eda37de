"""Prefect flow over the DVC pipeline: each task runs one `dvc repro --single-item <stage>`, so the flow adds
scheduling, retries on the fetches (the only steps that touch the network), per-stage logs and states in
the Prefect UI, while DVC stays the one record of what was built from what: `dvc.lock` is updated by every
stage the flow runs, a stage whose inputs did not change is skipped, and `dvc status` is clean afterwards.

Run once:        python -m pipelines.flows [--project .] [--models cnn lstm]
Schedule:        prefect deploy --all   (see prefect.yaml: nightly cron on a process work pool)
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from dlpipe.config import load_config

# Network fetches fail transiently (rate limits, flaky mirrors); training and evaluation do not, and
# retrying them would only repeat a deterministic error.
FETCH_RETRIES = 3
FETCH_RETRY_DELAYS = [10, 60, 300]
OUTPUT_TAIL_LINES = 40  # lines of a failed stage's output kept in the task's error message


def dvc_repro(project: str, stage: str) -> str:
    """`dvc repro --single-item <stage>` in `project`; its output goes to the task's log.

    DVC runs one stage at a time in a repository (it holds a lock), so the flow calls stages in sequence.
    """
    logger = get_run_logger()
    command = [sys.executable, "-m", "dvc", "repro", "--single-item", stage]
    process = subprocess.Popen(
        command, cwd=project, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1
    )
    lines = []
    for line in process.stdout:
        lines.append(line.rstrip())
        logger.info(line.rstrip())
    if process.wait() != 0:
        tail = "\n".join(lines[-OUTPUT_TAIL_LINES:])
        raise RuntimeError(f"dvc repro {stage} exited {process.returncode}:\n{tail}")
    return "skipped" if any("didn't change, skipping" in line for line in lines) else "ran"


@task(
    task_run_name="{stage}",
    retries=FETCH_RETRIES,
    retry_delay_seconds=FETCH_RETRY_DELAYS,
    cache_policy=NO_CACHE,
)
def fetch(project: str, stage: str) -> str:
    return dvc_repro(project, stage)


@task(task_run_name="{stage}", cache_policy=NO_CACHE)
def run_stage(project: str, stage: str) -> str:
    return dvc_repro(project, stage)


@flow(name="dlpipe", log_prints=True)
def dlpipe_pipeline(project: str = ".", models: list[str] | None = None) -> dict[str, Any]:
    """fetch -> augment -> (train -> export -> evaluate) per model -> cost -> distill -> transfer -> report: DVC stages.

    Returns the metrics of the models it ran (read from the files the evaluate stages wrote).
    """
    logger = get_run_logger()
    root = Path(project).resolve()
    config = load_config(root / "params.yaml")  # the params DVC will use: bad values fail before any stage
    selected = config.selected_models(models)
    datasets = {config.dataset_of(model) for model in selected}

    if "images" in datasets:
        fetch(str(root), "fetch_images")
        run_stage(str(root), "augment")
    if "stocks" in datasets:
        fetch(str(root), "fetch_stocks")
    # One model after another: on one machine they would only compete for the same cores/GPU. Generators
    # come last (all_models' order): their judge, a classifier, is trained first.
    for model in sorted(selected, key=config.all_models.index):
        for stage in ("train", "export", "evaluate"):
            run_stage(str(root), config.stage_name(stage, model))
    run_stage(str(root), "cost")  # reads neither data nor models: standard vs depthwise separable convolution
    if config.params.distill.teacher in selected:  # distillation needs the teacher trained above
        run_stage(str(root), "distill")
    if "images" in datasets:  # pretrains its own backbone on the fetched images: needs no trained model
        run_stage(str(root), "transfer")
    if set(selected) == set(config.all_models):
        run_stage(str(root), "report")
    else:
        logger.info("report skipped: it summarises every model in params `models`, and only %s ran", selected)
    metrics = {model: json.loads(config.paths.metrics(model).read_text()) for model in selected}
    for model, values in metrics.items():
        headline = {
            k: v for k, v in values.items() if any(w in k for w in ("accuracy", "rmse", "fid")) or k == "verdict"
        }
        logger.info("%s: %s", model, headline)
    return metrics


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pipelines.flows", description="Run the dlpipe Prefect flow once.")
    parser.add_argument("--project", default=".", help="directory holding dvc.yaml and params.yaml (default: .)")
    parser.add_argument("--models", nargs="*", help="subset of params `models` to run (default: all)")
    args = parser.parse_args(argv)
    dlpipe_pipeline(project=args.project, models=args.models)


if __name__ == "__main__":
    main()
