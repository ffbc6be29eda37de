"""Training that diverges, is stopped or is killed: a clear failure and a non-zero exit, the MLflow run
ended FAILED or KILLED (never left RUNNING), no checkpoint of bad weights, no working directory left
behind; and after SIGKILL, `dvc repro` resumes where the training was and ends exactly where an
uninterrupted one does."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient

from conftest import tiny_params, write_project
from dlpipe import stages, tracking
from dlpipe.config import load_config
from dlpipe.errors import DlpipeError
from dlpipe.train import RESUME_RECORD, _resume_point
from dlpipe.training_callbacks import NonFiniteLoss
from projects import git_dvc_project, run

START_TIMEOUT_S = 180


def _project(tmp_path, optimizer: dict | None = None, **cnn):
    params = tiny_params()
    params["models"] = {"cnn": "images"}
    params["train"]["cnn"].update(cnn)
    params["train"]["cnn"]["optimizer"].update(optimizer or {})
    config = load_config(write_project(tmp_path / "project", params))
    stages.fetch_images(config)
    stages.augment(config)
    return config


def _runs(config) -> list:
    client = MlflowClient(tracking.tracking_uri(config))
    experiment = client.get_experiment_by_name(config.params.mlflow.experiment)
    return client.search_runs([experiment.experiment_id]) if experiment else []


def _env() -> dict[str, str]:
    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


def _last_epoch(resume_dir: Path) -> int:
    """Epoch of the last checkpoint a training has written (-1 before the first)."""
    last = resume_dir / "last.ckpt"
    return torch.load(last, map_location="cpu", weights_only=True)["epoch"] if last.is_file() else -1


def _wait_for_epoch(process: subprocess.Popen, resume_dir: Path, epoch: int) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while _last_epoch(resume_dir) < epoch:
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "training did not reach the epoch in time"
        time.sleep(0.05)


def test_diverging_loss_stops_training_and_fails_the_run(tmp_path):
    config = _project(tmp_path, optimizer={"lr": 1e6}, epochs=3)
    with pytest.raises(NonFiniteLoss, match=r"train\.cnn: loss became (nan|inf|-inf) at epoch 0"):
        stages.train(config, "cnn")
    assert not config.paths.checkpoint("cnn").exists() and not config.paths.train_info("cnn").exists()
    assert not config.paths.resume_dir("cnn").exists()
    assert [r.info.status for r in _runs(config)] == ["FAILED"]


@pytest.mark.slow
@pytest.mark.parametrize(("signum", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_stops_training_with_non_zero_exit_and_killed_run(tmp_path, signum, code):
    config = _project(tmp_path, epochs=200, patience=200)
    process = subprocess.Popen(
        [sys.executable, "-m", "dlpipe", "train", "cnn"],
        cwd=config.paths.root,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # A shell runs background jobs with SIGINT ignored, and Python keeps an inherited SIG_IGN: restore
        # the default so that the training process handles Ctrl-C as it does in a terminal.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    _wait_for_epoch(process, config.paths.resume_dir("cnn"), 0)
    sent = time.monotonic()
    process.send_signal(signum)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == code, stderr[-2000:]
    assert time.monotonic() - sent < 30
    assert f"stopped by {signal.Signals(signum).name}" in stderr
    assert [r.info.status for r in _runs(config)] == ["KILLED"]
    assert not config.paths.resume_dir("cnn").exists() and not config.paths.checkpoint("cnn").exists()


def test_leftovers_of_a_killed_training_with_other_params_are_cleaned(tmp_path):
    config = _project(tmp_path)
    client = MlflowClient(tracking.tracking_uri(config))
    orphan = client.create_run(tracking.ensure_experiment(config))  # RUNNING, its process long gone
    resume_dir = config.paths.resume_dir("cnn")
    resume_dir.mkdir(parents=True)
    (resume_dir / "last.ckpt").write_bytes(b"from another run")
    record = {"pid": 2**22 + 12345, "host": "x", "fingerprint": "other params", "run_id": orphan.info.run_id}
    (resume_dir / RESUME_RECORD).write_text(json.dumps(record))
    assert _resume_point(config, "cnn", "these params") == (None, None)
    assert not resume_dir.exists()
    assert client.get_run(orphan.info.run_id).info.status == "KILLED"


def test_training_the_same_model_twice_at_once_is_refused(tmp_path):
    config = _project(tmp_path)
    resume_dir = config.paths.resume_dir("cnn")
    resume_dir.mkdir(parents=True)
    record = {"pid": os.getppid(), "host": socket.gethostname(), "fingerprint": "f", "run_id": "r"}
    (resume_dir / RESUME_RECORD).write_text(json.dumps(record))
    with pytest.raises(DlpipeError, match=rf"train\.cnn: already being trained by process {os.getppid()}"):
        _resume_point(config, "cnn", "f")
    assert resume_dir.exists()  # the live training's files are left alone


def _checkpoint_state(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def _max_abs_diff(a, b) -> float:
    """Largest difference between two nested structures of tensors and numbers (inf where they differ in
    shape or kind)."""
    if isinstance(a, torch.Tensor):
        if not isinstance(b, torch.Tensor) or a.shape != b.shape:
            return float("inf")
        return float((a.double() - b.double()).abs().max()) if a.numel() else 0.0
    if isinstance(a, dict):
        if not isinstance(b, dict) or a.keys() != b.keys():
            return float("inf")
        return max([_max_abs_diff(a[k], b[k]) for k in a] or [0.0])
    if isinstance(a, list | tuple):
        if not isinstance(b, list | tuple) or len(a) != len(b):
            return float("inf")
        return max([_max_abs_diff(x, y) for x, y in zip(a, b, strict=True)] or [0.0])
    if isinstance(a, int | float) and not isinstance(a, bool):
        return abs(float(a) - float(b))
    return 0.0 if a == b else float("inf")


@pytest.mark.slow
def test_sigkill_then_dvc_repro_resumes_exactly(tmp_path):
    params = tiny_params()
    params["models"] = {"lstm": "stocks"}
    params["generators"] = {}  # the dcgan's judge, cnn, is not trained here
    # Small batches: epochs of about a second, so the kill lands mid-training, well before the end.
    params["train"]["lstm"].update(epochs=8, patience=8, batch_size=16)
    epochs_before_kill = 3

    reference, env = git_dvc_project(tmp_path / "reference", params)
    crashed, _ = git_dvc_project(tmp_path / "crashed", params)
    for root in (reference, crashed):
        run(["dvc", "repro", "fetch_stocks"], root, env)
    run(["dvc", "repro", "train@lstm"], reference, env)

    # The crashed copy: SIGKILL to `dvc repro` and the training it started, a few epochs in.
    process = subprocess.Popen(
        ["dvc", "repro", "train@lstm"], cwd=crashed, env=env, start_new_session=True, stdout=subprocess.DEVNULL
    )
    resume_dir = crashed / "models" / "lstm" / ".resume"
    _wait_for_epoch(process, resume_dir, epochs_before_kill - 1)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=30)
    killed_at = _last_epoch(resume_dir)
    crashed_run = json.loads((resume_dir / RESUME_RECORD).read_text())["run_id"]

    resumed = run(["dvc", "repro", "train@lstm"], crashed, env)
    assert "Running stage 'train@lstm'" in resumed.stdout
    info = json.loads((crashed / "models" / "lstm" / "train.json").read_text())
    assert info["resumed"] and info["run_id"] == crashed_run  # the same MLflow run, continued
    assert not resume_dir.exists()

    expected = _checkpoint_state(reference / "models" / "lstm" / "best.ckpt")
    got = _checkpoint_state(crashed / "models" / "lstm" / "best.ckpt")
    assert killed_at < 7  # epochs were left to train after the resume
    assert got["global_step"] == expected["global_step"] and got["epoch"] == expected["epoch"]
    assert _max_abs_diff(got["state_dict"], expected["state_dict"]) == 0.0
    assert _max_abs_diff(got["optimizer_states"], expected["optimizer_states"]) == 0.0
    assert _max_abs_diff(got["lr_schedulers"], expected["lr_schedulers"]) == 0.0

    # The resumed run's losses are the uninterrupted one's, epoch for epoch, to the last bit: the weights
    # and optimizer state went on exactly as they would have. Both runs ended FINISHED.
    def history(root: Path) -> tuple[str, dict[str, dict[int, set[float]]], int]:
        client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
        info = json.loads((root / "models" / "lstm" / "train.json").read_text())
        curves: dict[str, dict[int, set[float]]] = {}
        for name in ("train/loss", "val/loss"):
            # An epoch logged just before the kill is logged again after the resume: one value per step.
            for metric in client.get_metric_history(info["run_id"], name):
                curves.setdefault(name, {}).setdefault(metric.step, set()).add(metric.value)
        return client.get_run(info["run_id"]).info.status, curves, info["epochs_trained"]

    reference_status, reference_curves, reference_epochs = history(reference)
    crashed_status, crashed_curves, crashed_epochs = history(crashed)
    assert reference_status == crashed_status == "FINISHED"
    assert crashed_epochs == reference_epochs
    assert crashed_curves == reference_curves and len(reference_curves["val/loss"]) == 8
    # The training-curve file too: the epochs before the kill came back from the checkpoint, unchanged.
    curve_files = [root / "models" / "lstm" / "training_curves.csv" for root in (reference, crashed)]
    assert curve_files[1].read_text() == curve_files[0].read_text()
    assert len(curve_files[0].read_text().strip().splitlines()) == 1 + reference_epochs
