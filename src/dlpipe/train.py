"""Train one registered model with Lightning: seeded, ModelCheckpoint on the task's monitored metric,
early stopping, one MLflow run per model. Returns the facts later stages need (run id, timing, sizes).

Under DDP (`trainer.devices` > 1) every process runs `fit`; what follows training (MLflow logging, the
checkpoint's move into place, the returned facts) happens on global rank 0 only.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import tempfile
import time
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, EarlyStopping, LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.loggers import MLFlowLogger
from lightning.pytorch.utilities import rank_zero_only
from lightning.pytorch.utilities.exceptions import SIGTERMException

from dlpipe import tracking
from dlpipe.config import Config
from dlpipe.errors import DlpipeError, Interrupted
from dlpipe.models import count_trainable_parameters
from dlpipe.tasks import task_of

log = logging.getLogger("dlpipe")


SCRATCH_PREFIX = ".train-"  # + pid: the scratch directory of a training process, beside the checkpoint


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def _clean_orphans(config: Config, model: str) -> None:
    """Remove what a training process killed with SIGKILL left behind: its scratch directory, and its
    MLflow run, still RUNNING, which is ended as KILLED."""
    for scratch in config.paths.model_dir(model).glob(f"{SCRATCH_PREFIX}*"):
        pid = scratch.name.removeprefix(SCRATCH_PREFIX).split("-", 1)[0]
        if pid.isdigit() and not _pid_alive(int(pid)):
            shutil.rmtree(scratch, ignore_errors=True)
            log.info("removed %s, left by a killed training process", scratch)
    for run_id, pid in tracking.running_runs_on_this_host(config, model):
        if not _pid_alive(pid):
            tracking.end_run(config, run_id, "KILLED")
            log.info("MLflow run %s of a killed training process ended as KILLED", run_id)


def _interruption(exc: BaseException) -> Interrupted | None:
    """The signal that stopped training, if one did: Lightning turns SIGTERM into SIGTERMException (a
    SystemExit with code 0, which would report success) and Ctrl-C into SystemExit(1)."""
    if isinstance(exc, SIGTERMException):
        return Interrupted(signal.SIGTERM)
    if isinstance(exc, KeyboardInterrupt | SystemExit):
        return Interrupted(signal.SIGINT)
    return None


class NonFiniteLoss(DlpipeError):
    """Training diverged: the loss became NaN or infinite."""


class StopOnNonFiniteLoss(Callback):
    """Fail training at the first step whose loss is NaN or infinite.

    Without it a diverged run (say `lr: 1e6`) trains to the end on NaN weights, is marked FINISHED, and
    only export notices. Raising inside `fit` makes Lightning end the MLflow run as FAILED, and since
    checkpoints are written at validation time only, no checkpoint of the diverged weights is kept.
    """

    def __init__(self, model: str) -> None:
        self.model = model

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if isinstance(loss, torch.Tensor) and not torch.isfinite(loss).all():
            raise NonFiniteLoss(
                f"train.{self.model}: loss became {loss.item()} at epoch {trainer.current_epoch}, "
                f"step {trainer.global_step}; training stopped, nothing saved (lower optimizer.lr?)"
            )


def _check_finite_weights(checkpoint_path: str, model: str) -> None:
    state = torch.load(checkpoint_path, map_location="cpu", weights_only=True)["state_dict"]  # written just now
    bad = [name for name, value in state.items() if value.is_floating_point() and not torch.isfinite(value).all()]
    if bad:
        raise NonFiniteLoss(f"train.{model}: the best checkpoint has non-finite weights ({bad[0]}); not kept")


def fit(config: Config, model: str) -> dict[str, Any] | None:
    """Train `model`; the facts for train.json on global rank 0, None on the other DDP ranks."""
    train = config.train_params(model)
    task = task_of(config, model)
    L.seed_everything(config.params.seed, workers=True, verbose=False)
    module, datamodule = task.build(config, model)
    data_sha256 = task.data_fingerprint(config)

    target = config.paths.checkpoint(model)
    target.parent.mkdir(parents=True, exist_ok=True)
    if rank_zero_only.rank == 0:  # DDP: the other ranks' processes are this run's, not orphans
        tracking.ensure_experiment(config)
        _clean_orphans(config, model)
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

    try:
        return _fit_and_test(config, model, train, task, module, datamodule, logger, data_sha256)
    except BaseException as exc:
        # Lightning has ended the run as FAILED already; an interruption is recorded as KILLED instead.
        interruption = _interruption(exc)
        if rank_zero_only.rank == 0:
            tracking.end_run(config, logger.run_id, "KILLED" if interruption else "FAILED")
        if interruption is not None:
            raise interruption from exc
        raise


def _fit_and_test(config, model, train, task, module, datamodule, logger, data_sha256) -> dict[str, Any] | None:
    monitor, mode = task.monitor
    target = config.paths.checkpoint(model)
    with tempfile.TemporaryDirectory(prefix=f"{SCRATCH_PREFIX}{os.getpid()}-", dir=target.parent) as scratch:
        # Under DDP, ModelCheckpoint broadcasts rank 0's directory, so only rank 0's scratch is written.
        checkpoint = ModelCheckpoint(dirpath=scratch, filename="best", monitor=monitor, mode=mode, save_top_k=1)
        trainer = L.Trainer(
            max_epochs=train.epochs,
            accelerator=config.params.trainer.accelerator,
            devices=config.params.trainer.devices,
            precision=config.params.trainer.precision,
            logger=logger,
            callbacks=[
                StopOnNonFiniteLoss(model),
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
        _check_finite_weights(checkpoint.best_model_path, model)
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
