"""Lightning DDP on two CPU processes (gloo), run as the user runs it (`dlpipe train cnn` with
`trainer.devices: 2`, `trainer.strategy: ddp`): every rank trains, rank 0 alone logs to MLflow and writes
the checkpoint and train.json. A subprocess, because DDP leaves a process group and MASTER_PORT behind."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

from conftest import tiny_params, write_project

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def dlpipe(*args: str, cwd, env) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [sys.executable, "-m", "dlpipe", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_two_process_ddp_gives_one_run_and_one_checkpoint(tmp_path):
    import mlflow

    params = tiny_params()
    params["models"] = {"cnn": "images"}
    params["trainer"].update(accelerator="cpu", devices=2, strategy="ddp", num_nodes=1)  # params -> Lightning
    root = write_project(tmp_path / "project", params).parent
    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1", "MASTER_PORT": str(free_port())}
    env.pop("MLFLOW_TRACKING_URI", None)
    for stage in ("fetch_images", "fetch_stocks", "augment"):
        dlpipe(stage, cwd=root, env=env)
    dlpipe("train", "cnn", cwd=root, env=env)

    model_dir = root / "models" / "cnn"
    # No scratch left behind; rank 0 alone wrote the curve (one row per epoch, not one per process).
    assert sorted(p.name for p in model_dir.iterdir()) == ["best.ckpt", "train.json", "training_curves.csv"]
    info = json.loads((model_dir / "train.json").read_text())
    assert (info["strategy"], info["world_size"], info["num_nodes"]) == ("DDPStrategy", 2, 1)
    assert info["process_group_backend"] == "gloo"  # the CPU's collective backend
    curve_rows = (model_dir / "training_curves.csv").read_text().strip().splitlines()[1:]
    assert len(curve_rows) == info["epochs_trained"]
    client = mlflow.MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("dlpipe").experiment_id])
    assert [run.info.run_id for run in runs] == [info["run_id"]]
    assert runs[0].info.status == "FINISHED"
    assert {a.path for a in client.list_artifacts(info["run_id"], "checkpoints")} == {"checkpoints/best.ckpt"}
