"""What a person sees in the terminal: the stages of a tiny project run as a user runs them (`python -m dlpipe
<stage>`, stdout and stderr together), and their output is read line by line: every message once, none of
the libraries' notices or warnings, one closing line per stage with the stage's real results, progress bars
only on a terminal, and a bad input still one `dlpipe: error:` line."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import shutil
import struct
import subprocess
import sys
import termios
from collections import Counter
from pathlib import Path

import pytest

from conftest import tiny_params, write_project

pytestmark = pytest.mark.slow

STAGES = (("fetch_images",), ("augment",), ("train", "cnn"), ("export", "cnn"), ("evaluate", "cnn"))
# Lines no normal run prints: Lightning's notices, library warnings, an advertisement.
NOISE = (
    "Warning",
    "warn(",
    "litlogger",
    "torchvision",
    "GPU available",
    "TPU available",
    "LOCAL_RANK",
    "Trainer.fit",
    "Restoring states",
    "Loaded model weights",
    "Automatic Mixed Precision",
    "execution providers",
    "Creating initial MLflow database tables",
)


def _env() -> dict[str, str]:
    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1"}
    for key in ("MLFLOW_TRACKING_URI", "MLFLOW_CONFIGURE_LOGGING", "DLPIPE_PARAMS"):
        env.pop(key, None)
    return env


def dlpipe(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """The command's output as a terminal would interleave it (stderr into stdout); neither is a terminal."""
    return subprocess.run(
        [sys.executable, "-m", "dlpipe", *args],
        cwd=cwd,
        env=_env(),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=600,
    )


def in_terminal(*args: str, cwd: Path) -> tuple[int, str]:
    """Exit code and output of the command with stdout and stderr on a pseudo-terminal, 100 columns wide."""
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # tqdm draws nothing in 0 columns
    process = subprocess.Popen(
        [sys.executable, "-m", "dlpipe", *args],
        cwd=cwd,
        env=_env(),
        stdin=subprocess.DEVNULL,
        stdout=follower,
        stderr=follower,
    )
    os.close(follower)
    chunks = []
    while True:
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # EIO: the command has exited and closed the terminal
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(leader)
    return process.wait(timeout=600), b"".join(chunks).decode()


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    params = tiny_params()
    params["models"] = {"cnn": "images"}
    params["generators"] = {}
    return write_project(tmp_path_factory.mktemp("console") / "project", params).parent


@pytest.fixture(scope="module")
def outputs(project) -> dict[str, str]:
    """Each stage's output, run in pipeline order."""
    printed = {}
    for args in STAGES:
        result = dlpipe(*args, cwd=project)
        assert result.returncode == 0, result.stdout[-3000:]
        printed[" ".join(args)] = result.stdout
    return printed


LEVELS = "DEBUG|INFO|WARNING|ERROR|CRITICAL"
# A log record as dlpipe prints it, and the other formats libraries print theirs in when left to themselves:
# Lightning's "INFO: ...", MLflow's timestamped "2026/01/31 12:00:00 INFO mlflow...", torch's "W0131 12:00:00.1 ...".
RECORD = re.compile(rf"^({LEVELS}) [\w.]+: ")
FOREIGN_RECORD = re.compile(rf"^(({LEVELS}):|\d{{4}}/\d\d/\d\d \d\d:\d\d:\d\d|[DIWEF]\d{{4}} \d\d:\d\d:\d\d)")


def lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.strip()]


def message(line: str) -> str:
    """A line without the level and logger name a handler puts before the message."""
    return re.sub(rf"^({LEVELS})( [\w.]+)?: ", "", line)


def test_no_message_is_printed_twice(outputs):
    for stage, output in outputs.items():
        repeated = [text for text, count in Counter(map(message, lines(output))).items() if count > 1]
        assert not repeated, f"{stage}:\n{output}"


def test_log_records_share_one_format(outputs):
    for stage, output in outputs.items():
        assert any(RECORD.match(line) for line in lines(output)), f"{stage}:\n{output}"
        assert not [line for line in lines(output) if FOREIGN_RECORD.match(line)], f"{stage}:\n{output}"


def test_no_library_notices_or_warnings(outputs):
    for stage, output in outputs.items():
        noisy = [line for line in lines(output) if any(word in line for word in NOISE)]
        assert not noisy, f"{stage}:\n{output}"


def test_every_stage_ends_with_one_summary_line(outputs):
    for stage, output in outputs.items():
        name = stage.split()[0]
        summaries = [
            line for line in lines(output) if line.startswith((f"INFO dlpipe: {stage}: ", f"INFO dlpipe: {name}: "))
        ]
        assert summaries and lines(output)[-1] == summaries[-1], f"{stage}:\n{output}"


def test_the_summaries_give_the_stages_results(project, outputs):
    train = json.loads((project / "models/cnn/train.json").read_text())
    export = json.loads((project / "models/cnn/export.json").read_text())
    metrics = json.loads((project / "reports/metrics/cnn.json").read_text())
    epochs = train["epochs_trained"]
    assert lines(outputs["train cnn"])[-1] == (
        f"INFO dlpipe: train cnn: {epochs} epoch{'' if epochs == 1 else 's'}, best val/acc {train['best_score']:.4g}, "
        f"test/acc {train['test']['test/acc']:.4g}, {train['trainable_params']:,} parameters, "
        f"{train['train_seconds']:.1f} s -> models/cnn/best.ckpt"
    )
    exported = lines(outputs["export cnn"])[-1]
    assert exported.startswith(f"INFO dlpipe: export cnn: parity {export['onnx_max_abs_diff']:.1g}, ")
    assert "int8 static" in exported and exported.endswith(" -> models/cnn/model.onnx")
    evaluated = lines(outputs["evaluate cnn"])[-1]
    assert evaluated.startswith(f"INFO dlpipe: evaluate cnn: onnx_accuracy {metrics['onnx_accuracy']:.4g}, ")
    assert f"p50 {metrics['latency_ms_onnx_b1_p50']:.2f} ms" in evaluated


def test_no_progress_bars_where_no_terminal_is(outputs):
    for stage in ("train cnn", "export cnn", "evaluate cnn"):
        assert "\r" not in outputs[stage] and "it/s" not in outputs[stage], outputs[stage]


def copy(project: Path, tmp_path: Path) -> Path:
    """The pipeline's project after its run, to change without touching the others' outputs."""
    return Path(shutil.copytree(project, tmp_path / "project"))


def test_training_in_a_terminal_draws_its_bars_and_ends_their_lines(project, outputs, tmp_path):
    code, output = in_terminal("train", "cnn", cwd=copy(project, tmp_path))
    assert code == 0, output[-3000:]
    text = output.replace("\r\n", "\n")
    assert re.search(r"Epoch 0: 100%.*\n", text), text  # the epoch bar, finished, then a new line
    assert "\nINFO dlpipe: train cnn: " in text  # the summary starts a line of its own
    assert not any(word in text for word in NOISE), text


def test_a_changed_graph_is_one_error_line(project, outputs, tmp_path):
    root = copy(project, tmp_path)
    onnx_path = root / "models/cnn/model.onnx"
    onnx_path.write_bytes(onnx_path.read_bytes() + b"\0")
    result = dlpipe("evaluate", "cnn", cwd=root)
    assert result.returncode == 2
    assert lines(result.stdout) == [
        f"dlpipe: error: {onnx_path}: changed since export wrote it (sha256 differs from export.json); rerun export"
    ]


def test_a_stage_that_fails_after_importing_lightning_prints_one_error_line(tmp_path):
    root = write_project(tmp_path / "project", tiny_params()).parent  # no data fetched
    result = dlpipe("train", "cnn", cwd=root)
    assert result.returncode == 2
    assert len(lines(result.stdout)) == 1 and lines(result.stdout)[0].startswith("dlpipe: error: "), result.stdout
    assert "meta.json: file not found" in result.stdout
