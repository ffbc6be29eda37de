"""Projects as users have them: the repository's tracked files copied into a fresh git + DVC repository."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from conftest import REPO_ROOT

COMMAND_TIMEOUT_S = 900


def run(args: list[str], cwd: Path, env: dict[str, str], check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S)
    if check:
        assert result.returncode == 0, f"{' '.join(args)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


def project_env(root: Path) -> dict[str, str]:
    env = {
        **os.environ,
        # The copy's own code runs, not the installed checkout's; this venv's dvc is on PATH.
        "PYTHONPATH": os.pathsep.join([str(root / "src"), str(root)]),
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "NO_ALBUMENTATIONS_UPDATE": "1",
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@localhost",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@localhost",
    }
    for key in [key for key in env if key.lstrip("_").startswith("MLFLOW_")] + ["DLPIPE_PARAMS"]:
        env.pop(key, None)  # a developer's (or an earlier in-process run's) store must not receive these runs
    return env


def git_dvc_project(root: Path, params: dict) -> tuple[Path, dict[str, str]]:
    """The repository's files (tracked and untracked-but-not-ignored) in `root`, with `params` as params.yaml,
    committed to a new git repository with DVC initialised. Returns the root and the environment to use."""
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    for name in listed:
        source = REPO_ROOT / name
        if source.is_file():
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, root / name)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = project_env(root)
    run(["git", "init", "-q"], root, env)
    if not (root / ".dvc").is_dir():
        run(["dvc", "init", "-q"], root, env)
    run(["dvc", "config", "core.analytics", "false"], root, env)
    run(["git", "add", "-A"], root, env)
    run(["git", "commit", "-qm", "snapshot"], root, env)
    return root, env
