"""End to end as a user runs it: the repository copied into a fresh git + DVC repo, `dvc repro` on tiny
params, metrics and MLflow runs checked, and a second `dvc repro` that has nothing to do."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import REPO_ROOT, tiny_params

pytestmark = pytest.mark.slow


def run(args: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, f"{' '.join(args)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    root = tmp_path_factory.mktemp("e2e") / "dlpipe"
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
    (root / "params.yaml").write_text(yaml.safe_dump(tiny_params(), sort_keys=False))
    env = {
        **os.environ,
        # The copy's own code runs, not the installed checkout's; its venv's dvc is on PATH.
        "PYTHONPATH": str(root / "src"),
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "NO_ALBUMENTATIONS_UPDATE": "1",
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@localhost",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@localhost",
    }
    env.pop("MLFLOW_TRACKING_URI", None)
    run(["git", "init", "-q"], root, env)
    if not (root / ".dvc").is_dir():
        run(["dvc", "init", "-q"], root, env)
    run(["dvc", "config", "core.analytics", "false"], root, env)
    run(["git", "add", "-A"], root, env)
    run(["git", "commit", "-qm", "snapshot"], root, env)
    first = run(["dvc", "repro"], root, env)
    assert "Running stage 'report'" in first.stdout
    return root, env


def test_repro_writes_contract_metrics(repo):
    root, env = repo
    shown = json.loads(run(["dvc", "metrics", "show", "--json"], root, env).stdout)
    metrics = next(iter(shown.values()))["data"]
    cnn = metrics["reports/metrics/cnn.json"]["data"]
    lstm = metrics["reports/metrics/lstm.json"]["data"]
    assert cnn["test_accuracy"] > 0.3 and cnn["onnx_max_abs_diff"] <= 1e-4
    assert lstm["rmse"] > 0 and lstm["persistence_rmse"] > 0 and lstm["onnx_max_abs_diff"] <= 1e-4
    assert (root / "reports" / "index.html").is_file()


def test_one_finished_tagged_run_per_model(repo):
    import mlflow

    root, _ = repo
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(f"sqlite:///{root / 'mlflow.db'}")
    try:
        runs = mlflow.search_runs(experiment_names=["dlpipe"], filter_string="attributes.status = 'FINISHED'")
    finally:
        mlflow.set_tracking_uri(previous)
    assert sorted(runs["tags.model"]) == ["cnn", "lstm"]
    for column in ("tags.git_sha", "tags.params_hash", "tags.data_sha256"):
        assert runs[column].notna().all() and (runs[column] != "").all()
    git_head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True).stdout.strip()
    assert set(runs["tags.git_sha"]) == {git_head}


def test_second_repro_runs_nothing(repo):
    root, env = repo
    second = run(["dvc", "repro"], root, env)
    assert "Running stage" not in second.stdout
    assert "Data and pipelines are up to date" in second.stdout


def test_dag_lists_every_stage(repo):
    root, env = repo
    dag = run(["dvc", "dag", "--md"], root, env).stdout
    for stage in ("fetch_images", "fetch_stocks", "augment", "train@cnn", "export@lstm", "evaluate@cnn", "report"):
        assert stage in dag
