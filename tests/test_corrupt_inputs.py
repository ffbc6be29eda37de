"""Damaged files between stages: each is refused with one line naming the file, before the stage writes
anything, never a traceback or a silently wrong result; a crafted checkpoint never runs its payload. And
a write that fails (a full disk) leaves the previous output whole and no temporary file behind."""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow import MlflowClient

from conftest import tiny_params, write_project
from dlpipe import stages, tracking
from dlpipe.config import load_config
from dlpipe.errors import DlpipeError
from dlpipe.tasks import task_of

pytestmark = pytest.mark.slow

# What each stage writes: none of it may change when the stage refuses its input.
OUTPUTS = {
    "fetch_stocks": ["data/stocks/raw/GOOG.csv", "data/stocks/raw/meta.json"],
    "augment": ["data/images/augmented/train.npz", "data/images/augmented/meta.json"],
    "train": ["models/{model}/best.ckpt", "models/{model}/train.json"],
    "export": ["models/{model}/model.onnx", "models/{model}/export.json"],
    "evaluate": ["reports/metrics/{model}.json"],
}


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    """A tiny project after a complete run; each test corrupts a copy of it."""
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    config = load_config(write_project(tmp_path_factory.mktemp("built") / "project", tiny_params()))
    stages.fetch_images(config)
    stages.fetch_stocks(config)
    stages.augment(config)
    for model in config.params.models:
        for stage in ("train", "export", "evaluate"):
            stages.STAGES[stage](config, model)
    return config.paths.root


# ------------------------------------------------------------------------------------------ corruptions
def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])


def garbage(path: Path) -> None:
    # Seeded by the file's name: the same bytes on every run, so a failure reproduces.
    path.write_bytes(random.Random(path.name).randbytes(2048))


def empty(path: Path) -> None:
    path.write_bytes(b"")


def object_array_npz(path: Path) -> None:
    with open(path, "wb") as handle:  # unpickling the object array would run code: never done
        np.savez(handle, x=np.array([{"a": 1}], dtype=object), y=np.zeros(1, np.int64))


def shuffled_labels(path: Path) -> None:
    with np.load(path) as split:
        x, y = split["x"], split["y"]
    with open(path, "wb") as handle:
        np.savez(handle, x=x, y=np.roll(y, 1))  # a valid file, mislabelled


def drop_key(key: str) -> Callable[[Path], None]:
    def corrupt(path: Path) -> None:
        record = json.loads(path.read_text())
        del record[key]
        path.write_text(json.dumps(record))

    return corrupt


class Payload:
    """Unpickling this runs code: what a crafted checkpoint would carry."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def crafted_checkpoint(path: Path) -> None:
    state = torch.load(path, map_location="cpu", weights_only=True)
    state["hyper_parameters"]["payload"] = Payload(path.parent / "PWNED")
    buffer = io.BytesIO()
    torch.save(state, buffer)
    path.write_bytes(buffer.getvalue())


def edited_onnx(path: Path) -> None:
    import onnx

    model = onnx.load(path)
    onnx.helper.set_model_props(model, {"dlpipe.classes": json.dumps(["x"] * 10)})
    onnx.save(model, path)


def price_row(column: str, value: str) -> Callable[[Path], None]:
    """Set one cell of a price CSV; for the fetched file, also its recorded sha256, as a tool that rewrote
    both would, so that the content check itself is what refuses it."""

    def corrupt(path: Path) -> None:
        lines = path.read_text().splitlines()
        header = lines[0].split(",")
        row = len(lines) - 40  # near the end: inside any start/end range the params keep
        cells = lines[row].split(",")
        cells[header.index(column)] = value
        lines[row] = ",".join(cells)
        path.write_text("\n".join(lines) + "\n")
        meta = path.parent / "meta.json"
        if meta.is_file():
            record = json.loads(meta.read_text())
            record["files"][path.stem]["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
            meta.write_text(json.dumps(record))

    return corrupt


def swap_high_low(path: Path) -> None:
    lines = path.read_text().splitlines()
    header = lines[0].split(",")
    row = len(lines) - 40  # near the end: inside any start/end range the params keep
    cells = lines[row].split(",")
    high, low = header.index("High"), header.index("Low")
    cells[high], cells[low] = cells[low], cells[high]
    lines[row] = ",".join(cells)
    path.write_text("\n".join(lines) + "\n")


# (file, corruption, stage, model, text the error must contain besides the file's name)
CASES = [
    ("data/images/raw/val.npz", truncate, "train", "cnn", "not a readable split"),
    ("data/images/raw/test.npz", garbage, "evaluate", "cnn", "not a readable split"),
    ("data/images/raw/train.npz", object_array_npz, "augment", None, "not a readable split"),
    ("data/images/raw/test.npz", shuffled_labels, "evaluate", "cnn", "differ from the sha256"),
    ("data/images/augmented/train.npz", garbage, "train", "cnn", "not a readable split"),
    ("data/images/raw/meta.json", garbage, "train", "cnn", "not valid JSON"),
    ("data/images/raw/meta.json", drop_key("classes"), "export", "cnn", "missing 'classes'"),
    ("data/images/augmented/meta.json", empty, "train", "cnn", "not valid JSON"),
    ("models/cnn/best.ckpt", garbage, "export", "cnn", "not a loadable classifier checkpoint"),
    ("models/cnn/best.ckpt", truncate, "export", "cnn", "not a loadable classifier checkpoint"),
    ("models/cnn/best.ckpt", crafted_checkpoint, "export", "cnn", "not a loadable classifier checkpoint"),
    ("models/lstm/best.ckpt", crafted_checkpoint, "evaluate", "lstm", "not a loadable forecaster checkpoint"),
    ("models/cnn/model.onnx", garbage, "evaluate", "cnn", "changed since export"),
    ("models/cnn/model.onnx", edited_onnx, "evaluate", "cnn", "changed since export"),
    ("models/cnn/train.json", garbage, "export", "cnn", "not valid JSON"),
    ("models/lstm/train.json", drop_key("run_id"), "evaluate", "lstm", "missing 'run_id'"),
    ("models/cnn/export.json", drop_key("onnx_sha256"), "evaluate", "cnn", "missing 'onnx_sha256'"),
    ("data/stocks/raw/GOOG.csv", empty, "train", "lstm", "changed since fetch_stocks"),
    ("data/stocks/raw/GOOG.csv", swap_high_low, "export", "lstm", "changed since fetch_stocks"),
    ("data/stocks/raw/GOOG.csv", price_row("Close", "nan"), "train", "lstm", "infinite Close"),
    ("data/stocks/raw/GOOG.csv", price_row("Close", "0"), "train", "lstm", "non-positive price"),
    ("data/stocks/raw/GOOG.csv", price_row("Close", "-3.5"), "evaluate", "lstm", "non-positive price"),
    ("data/stocks/raw/GOOG.csv", price_row("Close", "inf"), "train", "lstm", "infinite Close"),
    ("data/stocks/raw/GOOG.csv", price_row("Volume", "-5"), "train", "lstm", "negative volume"),
    ("data/stocks/raw/meta.json", garbage, "train", "lstm", "not valid JSON"),
    ("data/samples/stocks/GOOG.csv", price_row("Close", "inf"), "fetch_stocks", None, "infinite Close"),
    ("data/samples/stocks/GOOG.csv", swap_high_low, "fetch_stocks", None, "High below Low"),
    ("data/samples/stocks/GOOG.csv", empty, "fetch_stocks", None, "not a readable price CSV"),
    ("data/samples/stocks/GOOG.csv", garbage, "fetch_stocks", None, "GOOG.csv"),
]


def _snapshot(root: Path, stage: str, model: str | None) -> dict[str, bytes]:
    names = [name.format(model=model) for name in OUTPUTS[stage]]
    return {name: (root / name).read_bytes() for name in names if (root / name).is_file()}


@pytest.mark.parametrize(
    ("relative", "corrupt", "stage", "model", "expected"),
    CASES,
    ids=[f"{stage}-{relative}-{corrupt.__name__}" for relative, corrupt, stage, _, _ in CASES],
)
def test_corrupt_input_is_refused_by_name(built, tmp_path, relative, corrupt, stage, model, expected):
    root = tmp_path / "project"
    shutil.copytree(built, root)
    config = load_config(root / "params.yaml")
    corrupt(root / relative)
    before = _snapshot(root, stage, model)
    with pytest.raises(DlpipeError) as caught:
        stages.STAGES[stage](config, model) if model else stages.STAGES[stage](config)
    message = str(caught.value)
    assert "\n" not in message and Path(relative).name in message and expected in message, message
    assert _snapshot(root, stage, model) == before  # nothing written over the last good outputs
    assert not list(root.rglob("PWNED"))  # no payload ran


def test_cli_exits_2_with_one_line_for_a_corrupt_file(built, tmp_path):
    root = tmp_path / "project"
    shutil.copytree(built, root)
    garbage(root / "models" / "cnn" / "model.onnx")
    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    result = subprocess.run(
        [sys.executable, "-m", "dlpipe", "evaluate", "cnn"], cwd=root, env=env, capture_output=True, text=True
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert lines == [lines[-1]] and "model.onnx: changed since export" in lines[-1], result.stderr[-2000:]


# ------------------------------------------------------------------------------------------ failed writes
def _disk_full(*args, **kwargs):
    raise OSError(28, "No space left on device")


def _leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("."))


@pytest.mark.parametrize(
    ("stage", "model", "patch", "directory"),
    [
        ("fetch_images", None, ("dlpipe.data.images.np.savez", _disk_full), "data/images"),
        ("augment", None, ("dlpipe.data.images.np.savez", _disk_full), "data/images"),
        ("export", "cnn", ("onnx.save", _disk_full), "models/cnn"),
        ("evaluate", "lstm", ("dlpipe.io.json.dumps", _disk_full), "reports/metrics"),
        ("train", "cnn", ("torch.save", _disk_full), "models/cnn"),
    ],
    ids=["dataset", "augmented-dataset", "onnx", "metrics", "checkpoint"],
)
def test_failed_write_leaves_the_previous_output_whole(built, tmp_path, monkeypatch, stage, model, patch, directory):
    root = tmp_path / "project"
    shutil.copytree(built, root)
    config = load_config(root / "params.yaml")
    outputs = {
        "fetch_images": ["data/images/raw/train.npz", "data/images/raw/meta.json"],
        **OUTPUTS,
    }[stage]
    names = [name.format(model=model) for name in outputs]
    before = {name: (root / name).read_bytes() for name in names}
    monkeypatch.setattr(*patch)
    with pytest.raises(OSError, match="No space left"):
        stages.STAGES[stage](config, model) if model else stages.STAGES[stage](config)
    assert {name: (root / name).read_bytes() for name in names} == before
    assert _leftovers(root / directory) == []
    if stage == "train":
        runs = MlflowClient(tracking.tracking_uri(config)).search_runs(["1"], order_by=["attributes.start_time DESC"])
        assert runs[0].info.status == "FAILED"


@pytest.mark.parametrize("size", [16, 2048])
def test_any_bytes_in_a_checkpoint_are_one_refusal(tmp_path, size):
    # torch's weights-only unpickler raises many kinds of exception on arbitrary bytes; each must become
    # the one-line refusal, never a traceback.
    task = task_of(load_config(write_project(tmp_path, tiny_params())), "cnn")
    checkpoint = tmp_path / "best.ckpt"
    for seed in range(300):
        checkpoint.write_bytes(random.Random(seed).randbytes(size))
        with pytest.raises(DlpipeError, match="not a loadable classifier checkpoint"):
            task.load_exported(checkpoint)
