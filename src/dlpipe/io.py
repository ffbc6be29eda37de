"""Atomic file writes: every output goes to a temporary name first and is renamed into place, so a
failed stage never leaves a half-written file and the previous good output survives."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from dlpipe.errors import DlpipeError


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


@contextlib.contextmanager
def atomic_path(target: Path) -> Iterator[Path]:
    """Yield a temporary path beside `target`; rename it onto `target` only if the block succeeds."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    # mkstemp creates 0600; outputs (reports, models) should get the usual permissions.
    os.chmod(tmp, 0o666 & ~_umask())
    try:
        yield tmp
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_dir(target: Path) -> Iterator[Path]:
    """Yield an empty temporary directory beside `target`; swap it in for `target` on success."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    os.chmod(tmp, 0o777 & ~_umask())
    try:
        yield tmp
        # A unique name for the previous output: two writers of one target (the same stage started twice)
        # must not trip over each other's leftovers; the last to rename wins, whole.
        old = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".old", dir=target.parent))
        if target.exists():
            os.replace(target, old)
        os.replace(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_json(target: Path, payload: Any) -> None:
    with atomic_path(target) as tmp:
        tmp.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")


def read_json(path: Path, required: tuple[str, ...] = ()) -> Any:
    """The JSON document at `path`; with `required`, an object that has those keys (a record a stage
    wrote and a later one trusts: a damaged one is refused here, not met as a KeyError later)."""
    path = Path(path)
    if not path.is_file():
        raise DlpipeError(f"{path}: file not found (run the stage that produces it first)")
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DlpipeError(f"{path}: not valid JSON ({exc})") from exc
    if required:
        if not isinstance(document, dict):
            raise DlpipeError(f"{path}: expected a JSON object (rerun the stage that writes it)")
        if missing := [key for key in required if key not in document]:
            raise DlpipeError(f"{path}: missing {missing[0]!r} (rerun the stage that writes it)")
    return document


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
