"""Atomic writes: a failure inside the block leaves the previous good output untouched."""

from __future__ import annotations

import pytest

from dlpipe.errors import DlpipeError
from dlpipe.io import atomic_dir, atomic_path, read_json, write_json


def test_atomic_path_replaces_on_success(tmp_path):
    target = tmp_path / "out.txt"
    target.write_text("old")
    with atomic_path(target) as tmp:
        tmp.write_text("new")
        assert target.read_text() == "old"
    assert target.read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.txt"]


def test_atomic_path_keeps_old_file_on_failure(tmp_path):
    target = tmp_path / "out.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("boom")
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.txt"]


def test_atomic_dir_swaps_whole_directory(tmp_path):
    target = tmp_path / "data"
    target.mkdir()
    (target / "stale.npz").write_text("stale")
    with atomic_dir(target) as tmp:
        (tmp / "fresh.npz").write_text("fresh")
    assert sorted(p.name for p in target.iterdir()) == ["fresh.npz"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]


def test_atomic_dir_keeps_old_directory_on_failure(tmp_path):
    target = tmp_path / "data"
    target.mkdir()
    (target / "good.npz").write_text("good")
    with pytest.raises(RuntimeError), atomic_dir(target) as tmp:
        (tmp / "partial.npz").write_text("partial")
        raise RuntimeError("boom")
    assert sorted(p.name for p in target.iterdir()) == ["good.npz"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]


def test_json_round_trip_and_missing_file(tmp_path):
    write_json(tmp_path / "a" / "m.json", {"x": 1.5})
    assert read_json(tmp_path / "a" / "m.json") == {"x": 1.5}
    with pytest.raises(DlpipeError, match="missing.json: file not found"):
        read_json(tmp_path / "missing.json")


def test_outputs_get_ordinary_permissions(tmp_path):
    import os

    mask = os.umask(0o022)
    try:
        with atomic_path(tmp_path / "report.html") as tmp:
            tmp.write_text("<html>")
        with atomic_dir(tmp_path / "data") as tmp:
            pass
    finally:
        os.umask(mask)
    assert (tmp_path / "report.html").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "data").stat().st_mode & 0o777 == 0o755
