"""The command-line contract: bad input -> one stderr line naming the key/file/value, exit 2, nothing written."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import tiny_params, write_project


def dlpipe(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1"}
    return subprocess.run(
        [sys.executable, "-m", "dlpipe", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120
    )


def snapshot(root: Path) -> set[Path]:
    return {p.relative_to(root) for p in root.rglob("*")}


def _bad_project(tmp_path: Path, mutate) -> Path:
    params = tiny_params()
    mutate(params)
    return write_project(tmp_path / "project", params).parent


@pytest.mark.parametrize(
    ("args", "mutate", "expected"),
    [
        (["train", "resnet999"], lambda p: None, "resnet999"),
        (["train", "cnn"], lambda p: p["train"]["cnn"].update(epochs=-3), "train.cnn.epochs"),
        (["fetch_images"], lambda p: p["data"]["images"].update(source="imagenet21k"), "data.images.source"),
        (["fetch_stocks"], lambda p: p["data"]["stocks"].update(source="bloomberg"), "data.stocks.source"),
        (["fetch_stocks"], lambda p: p["data"]["stocks"].update(tickers=["ZZZZ"]), "data.stocks.tickers"),
        (["export", "cnn"], lambda p: None, "models/cnn/train.json: file not found"),
        (["train"], lambda p: None, "needs a model name"),
        (["train", "cnn"], lambda p: p["train"]["cnn"]["net"].update(channels="abc"), "train.cnn.net.channels"),
        (["train", "lstm"], lambda p: p["train"]["lstm"]["net"].update(hidden=-5), "train.lstm.net.hidden"),
        (["train", "cnn"], lambda p: p["train"]["cnn"]["optimizer"].update(name="lion"), "train.cnn.optimizer.name"),
        (["fetch_images"], lambda p: p["train"]["cnn"]["optimizer"].update(momentum=0.9), "train.cnn.optimizer"),
    ],
)
def test_bad_input_exits_2_with_one_line_and_writes_nothing(tmp_path, args, mutate, expected):
    root = _bad_project(tmp_path, mutate)
    before = snapshot(root)
    result = dlpipe(*args, cwd=root)
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("dlpipe: error: ") and expected in lines[0]
    assert snapshot(root) == before


def test_missing_params_file_exits_2(tmp_path):
    result = dlpipe("fetch_images", "--params", "absent.yaml", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip() == f"dlpipe: error: params file not found: {tmp_path / 'absent.yaml'}"
    assert list(tmp_path.iterdir()) == []


def test_unknown_stage_exits_2(tmp_path):
    result = dlpipe("deploy", cwd=tmp_path)
    assert result.returncode == 2 and "invalid choice: 'deploy'" in result.stderr


def test_models_lists_the_registry(tmp_path):
    result = dlpipe("models", cwd=tmp_path)
    assert result.returncode == 0
    names = {line.split()[0]: line.split()[1] for line in result.stdout.splitlines()}
    assert names["cnn"] == "classifier" and names["lstm"] == "forecaster"


def test_fetch_stocks_runs_from_the_cli(tmp_path):
    root = _bad_project(tmp_path, lambda p: None)
    result = dlpipe("fetch_stocks", cwd=root)
    assert result.returncode == 0, result.stderr
    assert (root / "data" / "stocks" / "raw" / "GOOG.csv").is_file()
    assert "GOOG" in (root / "data" / "stocks" / "raw" / "meta.json").read_text()


def test_stages_that_do_not_train_never_import_lightning(project):
    # Lightning and torchmetrics cost seconds per process; a DVC pipeline starts one process per stage.
    code = (
        "import sys; from dlpipe.cli import run; "
        f"run(['--params', {str(project)!r}, 'fetch_stocks']); "
        "print(sorted(m for m in ('lightning', 'torchmetrics', 'sklearn') if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == "[]"
