"""`dlpipe generate` end to end on a tiny project whose dcgan was trained and exported: a folder of PNGs
whose pixels are the PyTorch generator's for the same seeded latents (within one grey level) and exactly
the ONNX graph's, a grid PNG of the size `image_grid` gives and the same bytes for the same seed, the
export's parity record, every bad argument refused with one stderr line and nothing written, and no torch
imported along the way."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dlpipe.data.pixels import image_grid, to_uint8
from dlpipe.runtime import create_session, latent_vectors, run_batched
from serving import copy_project, serving_env

MODEL = "dcgan"


@pytest.fixture(scope="module")
def root(built_project, tmp_path_factory) -> Path:
    """A copy of the session's tiny project after a complete run (cnn, lstm, dcgan)."""
    return copy_project(built_project, tmp_path_factory.mktemp("generate") / "project")


@pytest.fixture(scope="module")
def config(root):
    from dlpipe.config import load_config

    return load_config(root / "params.yaml")


def dlpipe_generate(root: Path, *args: str) -> subprocess.CompletedProcess:
    """`python -m dlpipe generate ARGS` on the project's params, as a user runs it."""
    command = [sys.executable, "-m", "dlpipe", "generate", "--params", str(root / "params.yaml"), *args]
    return subprocess.run(command, cwd=root, env=serving_env(), capture_output=True, text=True, timeout=60)


def onnx_images(root: Path, count: int, seed: int, onnx: Path | None = None) -> np.ndarray:
    """uint8 (N, C, H, W) images of the exported graph, run in this process."""
    session = create_session(onnx or root / "models" / MODEL / "model.onnx")
    latent_dim = session.get_inputs()[0].shape[1]
    return to_uint8(run_batched(session, latent_vectors(count, latent_dim, seed)))


def read_png(path: Path) -> np.ndarray:
    """A PNG's pixels as (C, H, W) uint8."""
    with Image.open(path) as image:
        assert image.format == "PNG"
        pixels = np.asarray(image)
    return pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)


def tree(directory: Path) -> dict[str, tuple[int, int]]:
    """Every file and folder under `directory`, with its size and mtime: what a refusal must leave alone."""
    return {
        str(path.relative_to(directory)): (path.stat().st_size, path.stat().st_mtime_ns)
        for path in sorted(directory.rglob("*"))
    }


# ------------------------------------------------------------------------------------------- outputs
def test_folder_of_pngs_matches_the_pytorch_generator(root, config, tmp_path):
    from dlpipe.tasks import task_of

    out = tmp_path / "imgs"
    result = dlpipe_generate(root, "--out", str(out), "--n", "5", "--seed", "3")  # the only generator: default
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert str(out) in result.stdout
    assert sorted(p.name for p in out.iterdir()) == [f"{i:04d}.png" for i in range(5)]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["imgs"]  # no temporary folder left beside it
    written = np.stack([read_png(out / f"{i:04d}.png") for i in range(5)])

    generator = task_of(config, MODEL).load_exported(config.paths.checkpoint(MODEL))
    with torch.inference_mode():
        pixels = generator(torch.from_numpy(latent_vectors(5, generator.latent_dim, 3))).numpy()
    expected = to_uint8(pixels)
    assert written.shape == expected.shape == (5, *pixels.shape[1:])
    assert np.abs(written.astype(int) - expected.astype(int)).max() <= 1
    np.testing.assert_array_equal(written, onnx_images(root, 5, 3))
    assert len({image.tobytes() for image in written}) == 5  # five different images, not one repeated


def test_grid_png_size_and_reproducibility(root, tmp_path):
    first, again, other = tmp_path / "g.png", tmp_path / "again.png", tmp_path / "other.png"
    for path, seed in ((first, "0"), (again, "0"), (other, "1")):
        result = dlpipe_generate(root, MODEL, "--out", str(path), "--n", "10", "--columns", "5", "--seed", seed)
        assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["again.png", "g.png", "other.png"]
    images = onnx_images(root, 10, 0)
    expected = image_grid(images, 5)
    with Image.open(first) as image:
        assert image.size == (expected.shape[1], expected.shape[0])  # PIL: (width, height)
    _, _, height, width = images.shape
    gap = 2
    assert expected.shape[:2] == (2 * (height + gap) + gap, 5 * (width + gap) + gap)  # 2 rows of 5
    np.testing.assert_array_equal(read_png(first)[0] if images.shape[1] == 1 else read_png(first), expected)
    assert first.read_bytes() == again.read_bytes()
    assert not np.array_equal(read_png(first), read_png(other))


def test_default_seed_zero_is_the_pipeline_sample_grid_latents(root, tmp_path):
    from dlpipe.tasks.generator import GRID_SEED

    out = tmp_path / "imgs"
    assert dlpipe_generate(root, "--out", str(out), "--n", "3").returncode == 0
    written = np.stack([read_png(out / f"{i:04d}.png") for i in range(3)])
    np.testing.assert_array_equal(written, onnx_images(root, 3, GRID_SEED))


def test_export_parity_is_recorded_within_tolerance(root, config):
    import json

    info = json.loads((root / "models" / MODEL / "export.json").read_text())
    parity = info["parity"]
    assert sorted(parity) == sorted(f"batch {b}" for b in config.params.export.parity_batches)
    assert all(0 <= value <= 1e-4 for value in parity.values()), parity
    assert info["onnx_max_abs_diff"] == max(parity.values())


# ------------------------------------------------------------------------------------------- refusals
BAD = {
    "zero images": (["--n", "0"], "--n: 0 images"),
    "negative count": (["--n", "-3"], "--n: -3 images"),
    "too many images": (["--n", "100001"], "--n: 100001 images"),
    "zero columns": (["--columns", "0"], "--columns: 0"),
    "negative seed": (["--seed", "-1"], "--seed: -1"),
    "missing model file": (["--file", "{tmp}/none.onnx"], "none.onnx: file not found"),
    "unknown generator": (["nope"], "unknown generator 'nope'"),
    "missing output parent": (["--out", "{tmp}/missing/imgs"], "missing does not exist"),
    "output inside a file": (["--out", "{tmp}/afile/grid.png"], "afile is not a folder"),
    "folder output is a file": (["--out", "{tmp}/afile"], "afile: exists and is not a folder"),
    "grid output is a folder": (["--out", "{tmp}/adir.png"], "adir.png: is a folder"),
    "not an onnx file": (["--file", "{tmp}/junk.onnx"], "junk.onnx: not a loadable ONNX model"),
    "classifier graph": (["--file", "{root}/models/cnn/model.onnx"], "not a generator graph"),
    "forecaster graph": (["--file", "{root}/models/lstm/model.onnx"], "not a generator graph"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_arguments_exit_2_with_one_line_and_write_nothing(root, tmp_path, case):
    args, message = BAD[case]
    (tmp_path / "afile").write_text("a regular file, not a folder\n")
    (tmp_path / "adir.png").mkdir()  # a folder, not a grid file
    (tmp_path / "junk.onnx").write_bytes(b"not a protobuf\n" * 8)
    args = [a.format(tmp=tmp_path, root=root) for a in args]
    if "--out" not in args:
        args += ["--out", str(tmp_path / "imgs")]
    before, models_before = tree(tmp_path), tree(root / "models")
    result = dlpipe_generate(root, *args)
    assert result.returncode == 2, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("dlpipe: error: ")
    assert message in lines[0]
    assert "Traceback" not in result.stderr
    assert result.stdout == ""
    assert tree(tmp_path) == before
    assert tree(root / "models") == models_before


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root writes to read-only folders")
def test_unwritable_output_folder_is_refused(root, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        result = dlpipe_generate(root, "--out", str(locked / "imgs"), "--n", "2")
        assert result.returncode == 2
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and "not writable" in lines[0]
        assert list(locked.iterdir()) == []
    finally:
        locked.chmod(0o700)


# ------------------------------------------------------------------------------------------- no torch
NO_TORCH = textwrap.dedent(
    """
    import sys

    from dlpipe.cli import main

    try:
        main(sys.argv[1:])
    except SystemExit as exit:
        code = exit.code
    print(f"exit={code} torch={'torch' in sys.modules} onnxruntime={'onnxruntime' in sys.modules}")
    """
)


@pytest.mark.parametrize("outcome", ["images", "refusal"])
def test_generation_imports_no_torch(root, tmp_path, outcome):
    out = tmp_path / ("imgs" if outcome == "images" else "g.png")
    args = ["generate", "--params", str(root / "params.yaml"), "--n", "2", "--out", str(out)]
    if outcome == "refusal":
        args += ["--file", str(root / "models" / "cnn" / "model.onnx")]
    result = subprocess.run(
        [sys.executable, "-c", NO_TORCH, *args], cwd=root, env=serving_env(), capture_output=True, text=True, timeout=60
    )
    last = result.stdout.strip().splitlines()[-1]
    assert result.returncode == 0, result.stderr
    if outcome == "images":
        assert last == "exit=0 torch=False onnxruntime=True", result.stderr
        assert sorted(p.name for p in out.iterdir()) == ["0000.png", "0001.png"]
    else:
        assert last == "exit=2 torch=False onnxruntime=True", result.stderr
        assert "not a generator graph" in result.stderr
        assert not out.exists()
