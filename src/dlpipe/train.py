"""Train one registered model with Lightning: seeded, ModelCheckpoint on the task's monitored metric,
early stopping, one MLflow run per model. Returns the facts later stages need (run id, timing, sizes).

Training survives a crash. Its working directory (`models/<model>/.resume/`) holds the best and the last
checkpoint (written atomically at every validation, with the random-number states) and a record of the
run. A process killed outright (SIGKILL, out of memory, power loss) leaves it behind; the next `train`
of the same model with the same params and data resumes from the last checkpoint, in the same MLflow
run, and ends exactly where an uninterrupted run would. A stop that can be handled (an error, SIGTERM,
Ctrl-C) ends the MLflow run as FAILED or KILLED, exits non-zero and removes the directory.

Under DDP (`trainer.devices` > 1) every process runs `fit`; what follows training (MLflow logging, the
checkpoint's move into place, the returned facts) happens on global rank 0 only.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import signal
import socket
import time
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import EarlyStopping, LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.loggers import MLFlowLogger
from lightning.pytorch.utilities import rank_zero_only
from lightning.pytorch.utilities.exceptions import SIGTERMException

from dlpipe import tracking
from dlpipe.config import Config
from dlpipe.cost import model_cost
from dlpipe.curves import TrainingCurves
from dlpipe.errors import DlpipeError, Interrupted
from dlpipe.io import write_json
from dlpipe.tasks import task_of
from dlpipe.tasks.profiles import TrainingPlan, training_plan
from dlpipe.training_callbacks import (
    AtomicCheckpointIO,
    ChannelsLast,
    RestoreRandomState,
    StopOnNonFiniteLoss,
    check_finite_weights,
)

log = logging.getLogger("dlpipe")


RESUME_RECORD = "resume.json"  # in the resume directory: what the checkpoints belong to


class NamedMetricsLogger(MLFlowLogger):
    """Lightning's metrics under their MLflow names (tracking.metric_name), as export and evaluate log theirs:
    one name per quantity in the run."""

    @rank_zero_only
    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        super().log_metrics(tracking.mlflow_metrics(metrics), step)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def _fingerprint(config: Config, model: str, data_sha256: str) -> str:
    """What a resumed run must share with the crashed one: params of the model, trainer, seed, data."""
    train = config.train_params(model).model_dump(mode="json")
    trainer = config.params.trainer.model_dump(mode="json")
    facts = {"seed": config.params.seed, "train": train, "trainer": trainer, "data": data_sha256}
    return hashlib.sha256(json.dumps(facts, sort_keys=True).encode()).hexdigest()


def _resume_point(config: Config, model: str, fingerprint: str) -> tuple[Path | None, str | None]:
    """(last checkpoint, MLflow run id) to continue from, or (None, None) to start afresh.

    A resume directory left by a live process means the same model is being trained right now: refused.
    One from a dead process with other params or data, or without a readable last checkpoint, is stale:
    removed, and its MLflow run (still RUNNING) ended as KILLED.
    """
    directory = config.paths.resume_dir(model)
    record_path = directory / RESUME_RECORD
    if not directory.exists():
        return None, None
    try:
        record = json.loads(record_path.read_text())
        pid, run_id = int(record["pid"]), str(record["run_id"])
    except (OSError, ValueError, KeyError, TypeError):
        record, pid, run_id = None, None, None
    if record and record.get("host") == socket.gethostname() and pid != os.getpid() and _pid_alive(pid):
        raise DlpipeError(f"train.{model}: already being trained by process {pid} ({directory})")
    last = directory / "last.ckpt"
    if record and record.get("fingerprint") == fingerprint and last.is_file():
        log.info("%s: resuming from %s (MLflow run %s)", model, last, run_id)
        return last, run_id
    if run_id:
        tracking.end_run_if_running(config, run_id, "KILLED")
    shutil.rmtree(directory, ignore_errors=True)
    log.info("%s: removed %s, left by a killed training with other params or data", model, directory)
    return None, None


def _interruption(exc: BaseException) -> Interrupted | None:
    """The signal that stopped training, if one did: Lightning turns SIGTERM into SIGTERMException (a
    SystemExit with code 0, which would report success) and Ctrl-C into SystemExit(1)."""
    if isinstance(exc, SIGTERMException):
        return Interrupted(signal.SIGTERM)
    if isinstance(exc, KeyboardInterrupt | SystemExit):
        return Interrupted(signal.SIGINT)
    return None


def _apply_plan(plan: TrainingPlan) -> None:
    """Process-wide settings of the plan: CPU threads, and TF32 matmuls on GPUs that have them (fp32
    layers outside autocast; bf16 autocast covers the rest)."""
    torch.set_num_threads(plan.threads)
    if plan.profile == "gpu":
        torch.set_float32_matmul_precision("high")


def fit(config: Config, model: str) -> dict[str, Any] | None:
    """Train `model`; the facts for train.json on global rank 0, None on the other DDP ranks."""
    plan = training_plan(config, model)
    train = plan.train
    task = task_of(config, model)
    _apply_plan(plan)
    L.seed_everything(config.params.seed, workers=True, verbose=False)
    module, datamodule = task.build(config, model)
    data_sha256 = task.data_fingerprint(config)
    fingerprint = _fingerprint(config, model, data_sha256)
    resume_dir = config.paths.resume_dir(model)

    rank_zero = rank_zero_only.rank == 0
    if rank_zero:
        tracking.ensure_experiment(config)
        last, run_id = _resume_point(config, model, fingerprint)
    else:  # DDP: rank 0 has decided (and cleaned up) before it started this process
        last, run_id = (resume_dir / "last.ckpt" if (resume_dir / "last.ckpt").is_file() else None), None
    tags = tracking.run_tags(config, model, "train", data_sha256)
    logger = NamedMetricsLogger(
        experiment_name=config.params.mlflow.experiment,
        run_name=tracking.run_name(tags),
        run_id=run_id,  # a resumed training continues its run
        tracking_uri=tracking.tracking_uri(config),
        tags={**tags, tracking.NOTE_TAG: tracking.training_note(tags, task.name, train.model_dump(), task.monitor)},
        artifact_location=tracking.artifact_location(config),
        log_model=False,  # the best checkpoint is logged below, once, under a stable name
    )
    if rank_zero:
        if run_id:
            tracking.set_run_status(config, run_id, "RUNNING")
        else:
            logger.log_hyperparams(
                {
                    "seed": config.params.seed,
                    "trainer": config.params.trainer.model_dump(),
                    "train": train.model_dump(),
                    "plan": {"precision": plan.precision, "threads": plan.threads, "loader": asdict(plan.loader)},
                }
            )
        record = {"pid": os.getpid(), "host": socket.gethostname(), "fingerprint": fingerprint, "run_id": logger.run_id}
        write_json(resume_dir / RESUME_RECORD, record)

    try:
        info = _fit_and_test(config, model, plan, task, module, datamodule, logger, data_sha256, last)
    except BaseException as exc:
        # Lightning has ended the run as FAILED already; an interruption is recorded as KILLED instead.
        interruption = _interruption(exc)
        if rank_zero:
            tracking.set_run_status(config, logger.run_id, "KILLED" if interruption else "FAILED")
            shutil.rmtree(resume_dir, ignore_errors=True)
        if interruption is not None:
            raise interruption from exc
        raise
    if rank_zero:
        shutil.rmtree(resume_dir, ignore_errors=True)
    if info is not None:  # the run's description gains what training did
        note = tracking.training_note(tags, task.name, train.model_dump(), task.monitor, info)
        tracking.set_note(config, info["run_id"], note)
    return info


def _one_sample(task, module: L.LightningModule) -> torch.Tensor:
    """An input of the exported module (`module.model`) shaped like one real sample, batch 1: the
    LightningModule's `example_input_array` (a forecaster's has the configured window), else the task's
    synthetic input for the network's data-supplied arguments."""
    example = module.example_input_array
    if isinstance(example, torch.Tensor):
        return example[:1]
    data_kwargs = module.hparams.net_spec["kwargs"]
    return torch.from_numpy(task.synthetic_inputs(data_kwargs, 1, np.random.default_rng(0)))


def _fit_and_test(config, model, plan, task, module, datamodule, logger, data_sha256, last) -> dict[str, Any] | None:
    train = plan.train
    monitor, mode = task.monitor
    target = config.paths.checkpoint(model)
    resume_dir = config.paths.resume_dir(model)
    # Under DDP, ModelCheckpoint broadcasts rank 0's directory; the path is the same on every rank anyway.
    checkpoint = ModelCheckpoint(
        dirpath=resume_dir, filename="best", monitor=monitor, mode=mode, save_top_k=1, enable_version_counter=False
    )
    # last.ckpt, every epoch, is where a crashed training resumes (`save_last` writes only on improvement).
    last_checkpoint = ModelCheckpoint(
        dirpath=resume_dir, filename="last", save_top_k=1, every_n_epochs=1, enable_version_counter=False
    )
    memory_format = [ChannelsLast()] if plan.loader.channels_last else []
    trainer = L.Trainer(
        max_epochs=train.epochs,
        accelerator=config.params.trainer.accelerator,
        devices=config.params.trainer.devices,
        strategy=config.params.trainer.strategy,
        num_nodes=config.params.trainer.num_nodes,
        precision=plan.precision,
        logger=logger,
        callbacks=[
            StopOnNonFiniteLoss(model),
            RestoreRandomState(),
            TrainingCurves(config.paths.training_curves(model)),  # its rows ride in the checkpoints, for resumes
            checkpoint,
            last_checkpoint,
            EarlyStopping(monitor=monitor, mode=mode, patience=train.patience),
            LearningRateMonitor("epoch"),
            *memory_format,
            # Bars on stderr only where someone watches it: a log file or CI output gets none.
            L.pytorch.callbacks.TQDMProgressBar(refresh_rate=1 if os.isatty(2) else 0),
        ],
        enable_model_summary=False,  # the stage's closing line gives the parameter count
        plugins=[AtomicCheckpointIO()],
        deterministic=plan.deterministic,
        benchmark=plan.cudnn_benchmark,
        # A sanity check draws random numbers (every DataLoader iteration does) before training, and only
        # on a fresh start: without it, a resumed run's random stream is the uninterrupted one's.
        num_sanity_val_steps=0,
        default_root_dir=resume_dir,
        log_every_n_steps=1,  # metrics are logged per epoch; this only silences the small-data warning
    )
    # The directory holds resume.json from the start; Lightning's warning about it is not news.
    warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")
    # Lightning's own code builds torch's LeafSpec, which torch now deprecates; it behaves as before.
    warnings.filterwarnings(
        "ignore",
        message=r"`isinstance\(treespec, LeafSpec\)` is deprecated",
        category=FutureWarning,
        module=r"lightning\.pytorch\.utilities\._pytree",
    )
    started = time.perf_counter()
    if plan.compile:
        # The network alone, in place: its state_dict keys stay those of the plain module, and the steps'
        # metric updates (torchmetrics) stay eager.
        module.model.compile(backend=plan.compile)
    trainer.fit(module, datamodule=datamodule, ckpt_path=last)
    train_seconds = time.perf_counter() - started
    if not checkpoint.best_model_path:
        raise RuntimeError(f"{model}: training produced no checkpoint (no validation run?)")
    # Collective under DDP: every rank takes part in testing the best checkpoint.
    test_metrics = trainer.test(ckpt_path=checkpoint.best_model_path, datamodule=datamodule, verbose=False)[0]
    if not trainer.is_global_zero:
        return None
    check_finite_weights(checkpoint.best_model_path, model)
    os.replace(checkpoint.best_model_path, target)  # same directory tree: an atomic rename

    run_id = logger.run_id
    cost = model_cost(module.model, _one_sample(task, module))
    trainable_params, multiply_adds = cost["trainable_params"], cost["multiply_adds"]
    tracking.log_metrics(
        config,
        run_id,
        {"train_seconds": train_seconds, "trainable_params": trainable_params, "multiply_adds": multiply_adds},
    )
    tracking.log_artifact(config, run_id, target, "checkpoints")
    return {
        "model": model,
        "task": task.name,
        "run_id": run_id,
        "resumed": last is not None,
        "train_seconds": train_seconds,
        "trainable_params": trainable_params,
        "multiply_adds": multiply_adds,  # per sample (batch 1), counted by dlpipe.cost.model_cost
        "epochs_trained": trainer.current_epoch,
        "precision": plan.precision,
        "batch_size": train.batch_size,
        "device": str(trainer.strategy.root_device),
        # Where it trained: the strategy, its processes across nodes and, under DDP, the collective backend.
        "strategy": type(trainer.strategy).__name__,
        "world_size": trainer.world_size,
        "num_nodes": trainer.num_nodes,
        "process_group_backend": getattr(trainer.strategy, "process_group_backend", None),
        "monitor": monitor,
        "best_score": float(checkpoint.best_model_score),
        "test": {k: float(v) for k, v in test_metrics.items()},
        "data_sha256": data_sha256,
    }
