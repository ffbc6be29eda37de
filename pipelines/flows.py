"""Prefect flow over dlpipe's stages: the same functions `dvc repro` runs, with retries on the fetches
(the only steps that touch the network) and the two fetches running concurrently.

Run once:        python -m pipelines.flows [--params params.yaml] [--models cnn lstm]
Schedule:        prefect deploy --all   (see prefect.yaml: nightly cron on a process work pool)
"""

from __future__ import annotations

import argparse
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from dlpipe import stages
from dlpipe.config import load_config

# Network fetches fail transiently (rate limits, flaky mirrors); training and evaluation do not, and
# retrying them would only repeat a deterministic error.
FETCH_RETRIES = 3
FETCH_RETRY_DELAYS = [10, 60, 300]


def _config(params_file: str):
    return load_config(params_file)


@task(retries=FETCH_RETRIES, retry_delay_seconds=FETCH_RETRY_DELAYS, cache_policy=NO_CACHE)
def fetch_images(params_file: str) -> dict[str, Any]:
    return stages.fetch_images(_config(params_file))


@task(retries=FETCH_RETRIES, retry_delay_seconds=FETCH_RETRY_DELAYS, cache_policy=NO_CACHE)
def fetch_stocks(params_file: str) -> dict[str, Any]:
    return stages.fetch_stocks(_config(params_file))


@task(cache_policy=NO_CACHE)
def augment(params_file: str) -> dict[str, Any]:
    return stages.augment(_config(params_file))


@task(task_run_name="train-{model}", cache_policy=NO_CACHE)
def train(params_file: str, model: str) -> dict[str, Any]:
    return stages.train(_config(params_file), model)


@task(task_run_name="export-{model}", cache_policy=NO_CACHE)
def export(params_file: str, model: str) -> dict[str, Any]:
    return stages.export(_config(params_file), model)


@task(task_run_name="evaluate-{model}", cache_policy=NO_CACHE)
def evaluate(params_file: str, model: str) -> dict[str, Any]:
    return stages.evaluate(_config(params_file), model)


@task(cache_policy=NO_CACHE)
def report(params_file: str) -> dict[str, Any]:
    return stages.report(_config(params_file))


@flow(name="dlpipe", log_prints=True)
def dlpipe_pipeline(params_file: str = "params.yaml", models: list[str] | None = None) -> dict[str, Any]:
    """Fetch -> augment -> (train -> export -> evaluate) per model -> report. Returns the summary."""
    logger = get_run_logger()
    config = _config(params_file)  # validate params and the model names before any task writes anything
    selected = config.selected_models(models)

    images, stocks = fetch_images.submit(params_file), fetch_stocks.submit(params_file)
    augmented = augment.submit(params_file, wait_for=[images])
    stocks.result()
    augmented.result()
    # Models train one after another: on one machine they would only compete for the same cores/GPU.
    for model in selected:
        train(params_file, model)
        export(params_file, model)
        metrics = evaluate(params_file, model)
        logger.info("%s: %s", model, {k: v for k, v in metrics.items() if "accuracy" in k or "rmse" in k})
    return report(params_file)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pipelines.flows", description="Run the dlpipe Prefect flow once.")
    parser.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    parser.add_argument("--models", nargs="*", help="subset of params `models` to run (default: all)")
    args = parser.parse_args(argv)
    dlpipe_pipeline(params_file=args.params, models=args.models)


if __name__ == "__main__":
    main()
