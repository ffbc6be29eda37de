"""Train one registered model with Lightning: seeded, ModelCheckpoint on the task's monitored metric,
early stopping, one MLflow run per model. Returns the facts later stages need (run id, timing, sizes).

Under DDP (`trainer.devices` > 1) every process runs `fit`; what follows training (MLflow logging, the
checkpoint's move into place, the returned facts) happens on global rank 0 only.
"""

from __future__ import annotations

import os
import tempfile
import time
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import EarlyStopping, LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.loggers import MLFlowLogger

from dlpipe import tracking
from dlpipe.config import Config
from dlpipe.models import count_trainable_parameters
from dlpipe.tasks import task_of


def fit(config: Config, model: str) -> dict[str, Any] | None:
    """Train `model`; the facts for train.json on global rank 0, None on the other DDP ranks."""
    train = config.train_params(model)
    task = task_of(config, model)
    L.seed_everything(config.params.seed, workers=True, verbose=False)
    module, datamodule = task.build(config, model)
    monitor, mode = task.monitor
    data_sha256 = task.data_fingerprint(config)

    tracking.reroot_local_store(config)
    logger = MLFlowLogger(
        experiment_name=config.params.mlflow.experiment,
        run_name=model,
        tracking_uri=tracking.tracking_uri(config),
        tags=tracking.run_tags(config, model, "train", data_sha256),
        artifact_location=tracking.artifact_location(config),
        log_model=False,  # the best checkpoint is logged below, once, under a stable name
    )
    logger.log_hyperparams(
        {"seed": config.params.seed, "trainer": config.params.trainer.model_dump(), "train": train.model_dump()}
    )

    target = config.paths.checkpoint(model)
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".train-", dir=target.parent) as scratch:
        # Under DDP, ModelCheckpoint broadcasts rank 0's directory, so only rank 0's scratch is written.
        checkpoint = ModelCheckpoint(dirpath=scratch, filename="best", monitor=monitor, mode=mode, save_top_k=1)
        trainer = L.Trainer(
            max_epochs=train.epochs,
            accelerator=config.params.trainer.accelerator,
            devices=config.params.trainer.devices,
            precision=config.params.trainer.precision,
            logger=logger,
            callbacks=[
                checkpoint,
                EarlyStopping(monitor=monitor, mode=mode, patience=train.patience),
                LearningRateMonitor("epoch"),
            ],
            deterministic=True,
            default_root_dir=scratch,
            log_every_n_steps=1,  # metrics are logged per epoch; this only silences the small-data warning
        )
        started = time.perf_counter()
        trainer.fit(module, datamodule=datamodule)
        train_seconds = time.perf_counter() - started
        if not checkpoint.best_model_path:
            raise RuntimeError(f"{model}: training produced no checkpoint (no validation run?)")
        # Collective under DDP: every rank takes part in testing the best checkpoint.
        test_metrics = trainer.test(ckpt_path=checkpoint.best_model_path, datamodule=datamodule, verbose=False)[0]
        if not trainer.is_global_zero:
            return None
        os.replace(checkpoint.best_model_path, target)  # same directory tree: an atomic rename

    run_id = logger.run_id
    trainable_params = count_trainable_parameters(module.model)
    tracking.log_metrics(config, run_id, {"train_seconds": train_seconds, "trainable_params": trainable_params})
    tracking.log_artifact(config, run_id, target, "checkpoints")
    return {
        "model": model,
        "task": task.name,
        "run_id": run_id,
        "train_seconds": train_seconds,
        "trainable_params": trainable_params,
        "epochs_trained": trainer.current_epoch,
        "monitor": monitor,
        "best_score": float(checkpoint.best_model_score),
        "test": {k: float(v) for k, v in test_metrics.items()},
        "data_sha256": data_sha256,
    }
