"""The pipeline's stages: params in, files out, each output rewritten whole (temp name, then rename).

DVC (`python -m dlpipe <stage> [model]`) and Prefect (`pipelines/flows.py`) both call these functions.
"""

from __future__ import annotations

import hashlib
import logging
from typing import Any

import numpy as np

from dlpipe.config import Config
from dlpipe.errors import DlpipeError
from dlpipe.io import atomic_dir, read_json, sha256_file, write_json

log = logging.getLogger("dlpipe")
# What later stages read from train.json and export.json.
TRAIN_INFO_KEYS = ("run_id", "trainable_params", "train_seconds", "epochs_trained")
EXPORT_INFO_KEYS = ("registered_version", "onnx_sha256")
SKIPPED_LISTED = 100  # skipped files named in meta.json (all are counted)
EXAMPLE_ROWS = 2  # real inputs stored as the registered model's input example


def fetch_images(config: Config) -> dict[str, Any]:
    from dlpipe.data.images import SPLITS, arrays_sha256, load_images, save_split, split_stratified

    params = config.params.data.images
    images = load_images(params, config.paths.download_cache, config.paths.root)
    splits = split_stratified(images, params, config.params.seed)
    _, channels, height, width = images.x.shape
    meta = {
        "source": params.source,
        "provenance": images.provenance,
        "classes": images.classes,
        "channels": int(channels),
        "height": int(height),
        "width": int(width),
        "counts": {name: int(len(splits[name][1])) for name in SPLITS},
        "class_counts": {name: np.bincount(splits[name][1], minlength=len(images.classes)).tolist() for name in SPLITS},
        "split_sha256": {name: arrays_sha256(*splits[name]) for name in SPLITS},
        "seed": config.params.seed,
        # A folder source leaves out files it cannot use; the first ones are listed with the reason.
        "skipped": {
            "count": len(images.skipped),
            "files": [{"file": file, "reason": reason} for file, reason in images.skipped[:SKIPPED_LISTED]],
        },
    }
    meta["sha256"] = hashlib.sha256("".join(meta["split_sha256"][n] for n in SPLITS).encode()).hexdigest()
    with atomic_dir(config.paths.raw_images) as tmp:
        for name in SPLITS:
            save_split(tmp, name, *splits[name])
        write_json(config.paths.meta(tmp), meta)
    log.info("fetch_images: %s -> %s", params.source, meta["counts"])
    if images.skipped:
        log.warning(
            "fetch_images: %d files skipped (listed in %s)",
            len(images.skipped),
            config.paths.meta(config.paths.raw_images),
        )
    return meta


def fetch_stocks(config: Config) -> dict[str, Any]:
    from dlpipe.data.stocks import download_yfinance, read_sample, validate_prices

    params = config.params.data.stocks
    if params.source == "sample":
        frame, origin = read_sample(config.paths.samples, params), f"data/samples/stocks/{params.ticker.upper()}.csv"
    else:
        frame, origin = download_yfinance(params), f"yfinance:{params.ticker}"
    prices = validate_prices(frame, origin, params)
    with atomic_dir(config.paths.raw_stocks) as tmp:
        prices_csv = tmp / config.paths.prices.name
        prices.to_csv(prices_csv, index=False, date_format="%Y-%m-%d")
        meta = {
            "source": params.source,
            "origin": origin,
            "ticker": params.ticker.upper(),
            "rows": int(len(prices)),
            "first_date": str(prices["Date"].iloc[0].date()),
            "last_date": str(prices["Date"].iloc[-1].date()),
            "sha256": sha256_file(prices_csv),
        }
        write_json(config.paths.meta(tmp), meta)
    log.info("fetch_stocks: %s %s rows %s..%s", origin, meta["rows"], meta["first_date"], meta["last_date"])
    return meta


def augment(config: Config) -> dict[str, Any]:
    from dlpipe.augment import augment_images, save_preview
    from dlpipe.data.images import load_split, save_split

    params = config.params.augment
    x, y = load_split(config.paths.raw_images, "train")
    x_aug, y_aug = augment_images(x, y, params, config.params.seed)
    with atomic_dir(config.paths.augmented) as tmp:
        digest = save_split(tmp, "train", x_aug, y_aug)
        meta = {
            "originals": int(len(y)),
            "total": int(len(y_aug)),
            "copies": params.copies,
            "sha256": digest,
            "split_sha256": {"train": digest},
        }
        write_json(config.paths.meta(tmp), meta)
    save_preview(x, y, params, config.params.seed, config.paths.augment_preview)
    return meta


def train(config: Config, model: str) -> dict[str, Any] | None:
    from dlpipe import tracking
    from dlpipe.train import fit

    config.train_params(model)  # unknown model: fail before touching anything
    with tracking.keep_tracking_env():
        info = fit(config, model)
    if info is not None:  # None on the other ranks of a DDP run: rank 0 alone writes
        write_json(config.paths.train_info(model), info)
    return info


def export(config: Config, model: str) -> dict[str, Any]:
    from dlpipe import tracking
    from dlpipe.export import export_with_parity
    from dlpipe.tasks import task_of

    task = task_of(config, model)
    train_info = read_json(config.paths.train_info(model), required=TRAIN_INFO_KEYS)
    network = task.load_exported(config.paths.checkpoint(model))
    inputs = task.reference_inputs(config, model)
    target = config.paths.onnx(model)
    settings = config.params.export
    metadata = task.onnx_metadata(config, model)
    diff = export_with_parity(network, inputs, target, settings.opset, settings.parity_atol, metadata)
    tracking.log_metrics(config, train_info["run_id"], {"onnx_max_abs_diff_export": diff})
    version = (
        tracking.register_onnx(config, model, train_info["run_id"], target, inputs[:EXAMPLE_ROWS], metadata)
        if config.params.mlflow.register_model
        else None
    )
    info = {
        "onnx_sha256": sha256_file(target),  # evaluate refuses a file changed after export
        "onnx_max_abs_diff": diff,
        "parity_inputs": int(len(inputs)),
        "registered_version": version,
        "opset": settings.opset,
    }
    write_json(config.paths.export_info(model), info)
    return info


def evaluate(config: Config, model: str) -> dict[str, Any]:
    from dlpipe import tracking
    from dlpipe.evaluate import evaluate_model
    from dlpipe.tasks import task_of

    task = task_of(config, model)
    train_info = read_json(config.paths.train_info(model), required=TRAIN_INFO_KEYS)
    export_info = read_json(config.paths.export_info(model), required=EXPORT_INFO_KEYS)
    onnx_path = config.paths.onnx(model)
    if not onnx_path.is_file():
        raise DlpipeError(f"{onnx_path}: file not found (run export first)")
    if sha256_file(onnx_path) != export_info["onnx_sha256"]:
        # Its metrics would be tagged on the registered version, which holds the file export wrote.
        raise DlpipeError(f"{onnx_path}: changed since export wrote it (sha256 differs from export.json); rerun export")
    metrics = evaluate_model(config, model, train_info)
    write_json(config.paths.metrics(model), metrics)
    tracking.log_metrics(config, train_info["run_id"], metrics)
    if export_info.get("registered_version"):
        metrics["champion"] = tracking.promote_if_better(
            config,
            model,
            export_info["registered_version"],
            metrics,
            task.promotion,
            task.evaluation_data(config, model),
        )
    return metrics


def report(config: Config) -> dict[str, Any]:
    from dlpipe.report import write_report

    summary = {model: read_json(config.paths.metrics(model)) for model in config.params.models}
    write_report(summary, config.paths.reports, config.paths.summary, config.paths.report_html)
    return summary


STAGES = {
    "fetch_images": fetch_images,
    "fetch_stocks": fetch_stocks,
    "augment": augment,
    "train": train,
    "export": export,
    "evaluate": evaluate,
    "report": report,
}
MODEL_STAGES = ("train", "export", "evaluate")  # stages that take a model name
