"""Train one registered model with Lightning: seeded, ModelCheckpoint on the validation metric, early
stopping, one MLflow run per model. Returns the facts later stages need (run id, timing, sizes)."""

from __future__ import annotations

import hashlib
import os
import tempfile
import time
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import EarlyStopping, LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.loggers import MLFlowLogger

from dlpipe import tracking
from dlpipe.config import Config
from dlpipe.data.datamodules import ImageDataModule, StockWindowDataModule
from dlpipe.data.stocks import FEATURES
from dlpipe.io import read_json
from dlpipe.models import count_trainable_parameters, get_model, get_spec
from dlpipe.tasks.classifier import ClassifierTask
from dlpipe.tasks.forecaster import ForecasterTask

# What ModelCheckpoint and EarlyStopping watch, per task.
MONITOR = {"classifier": ("val/acc", "max"), "forecaster": ("val/loss", "min")}


def data_fingerprint(config: Config, task: str) -> str:
    """sha256 of the data a model trains on, as recorded by the fetch (and augment) stages."""
    if task == "classifier":
        raw = read_json(config.paths.raw_images / "meta.json")["sha256"]
        augmented = read_json(config.paths.augmented / "meta.json")["sha256"]
        return hashlib.sha256(f"{raw}:{augmented}".encode()).hexdigest()
    return read_json(config.paths.raw_stocks / "meta.json")["sha256"]


def build_classifier(config: Config, model: str) -> tuple[L.LightningModule, L.LightningDataModule]:
    train = config.train_params(model)
    meta = read_json(config.paths.raw_images / "meta.json")
    datamodule = ImageDataModule(config.paths.raw_images, config.paths.augmented, train.batch_size, config.params.trainer.num_workers)
    kwargs = {"in_channels": meta["channels"], "image_size": meta["height"], "num_classes": len(meta["classes"]), **train.net}
    net = get_model(model, **kwargs)
    # Per-channel pixel statistics of the training split, baked into the network as buffers.
    pixels = datamodule.train_images().float().div_(255.0)
    net.standardize.set_stats(pixels.mean(dim=(0, 2, 3)), pixels.std(dim=(0, 2, 3)))
    task = ClassifierTask(net, {"name": model, "kwargs": kwargs}, len(meta["classes"]), train.lr, train.weight_decay, train.epochs)
    return task, datamodule


def build_forecaster(config: Config, model: str) -> tuple[L.LightningModule, L.LightningDataModule]:
    train = config.train_params(model)
    datamodule = StockWindowDataModule(config.paths.raw_stocks / "prices.csv", train.window, train.batch_size, config.params.trainer.num_workers)
    kwargs = {"n_features": len(FEATURES), **train.net}
    net = get_model(model, **kwargs)
    mean, std, target_mean, target_std = datamodule.feature_stats()
    net.standardize.set_stats(torch.from_numpy(mean), torch.from_numpy(std))
    net.set_target_stats(target_mean, target_std)
    task = ForecasterTask(net, {"name": model, "kwargs": kwargs}, train.window, train.lr, train.weight_decay, train.epochs)
    return task, datamodule


BUILDERS = {"classifier": build_classifier, "forecaster": build_forecaster}


def fit(config: Config, model: str) -> dict[str, Any]:
    spec = get_spec(model)
    train = config.train_params(model)
    L.seed_everything(config.params.seed, workers=True, verbose=False)
    task, datamodule = BUILDERS[spec.task](config, model)
    monitor, mode = MONITOR[spec.task]
    data_sha256 = data_fingerprint(config, spec.task)

    logger = MLFlowLogger(
        experiment_name=config.params.mlflow.experiment,
        run_name=model,
        tracking_uri=tracking.tracking_uri(config),
        tags=tracking.run_tags(config, model, "train", data_sha256),
        artifact_location=tracking.artifact_location(config),
        log_model=False,  # the best checkpoint is logged below, once, under a stable name
    )
    logger.log_hyperparams({"seed": config.params.seed, "trainer": config.params.trainer.model_dump(), "train": train.model_dump()})

    target = config.paths.checkpoint(model)
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".train-", dir=target.parent) as scratch:
        checkpoint = ModelCheckpoint(dirpath=scratch, filename="best", monitor=monitor, mode=mode, save_top_k=1)
        trainer = L.Trainer(
            max_epochs=train.epochs,
            accelerator=config.params.trainer.accelerator,
            devices=config.params.trainer.devices,
            precision=config.params.trainer.precision,
            logger=logger,
            callbacks=[checkpoint, EarlyStopping(monitor=monitor, mode=mode, patience=train.patience), LearningRateMonitor("epoch")],
            deterministic=True,
            default_root_dir=scratch,
            log_every_n_steps=1,  # metrics are logged per epoch; this only silences the small-data warning
        )
        started = time.perf_counter()
        trainer.fit(task, datamodule=datamodule)
        train_seconds = time.perf_counter() - started
        if not checkpoint.best_model_path:
            raise RuntimeError(f"{model}: training produced no checkpoint (no validation run?)")
        test_metrics = trainer.test(ckpt_path=checkpoint.best_model_path, datamodule=datamodule, verbose=False)[0]
        os.replace(checkpoint.best_model_path, target)  # same directory tree: an atomic rename

    run_id = logger.run_id
    params_count = count_trainable_parameters(task.net)
    tracking.log_metrics(config, run_id, {"train_seconds": train_seconds, "params": params_count})
    tracking.log_artifact(config, run_id, target, "checkpoints")
    return {
        "model": model,
        "task": spec.task,
        "run_id": run_id,
        "train_seconds": train_seconds,
        "params": params_count,
        "epochs_trained": trainer.current_epoch,
        "monitor": monitor,
        "best_score": float(checkpoint.best_model_score),
        "test": {k: float(v) for k, v in test_metrics.items()},
        "data_sha256": data_sha256,
    }
