"""End to end as a user runs it: the repository copied into a fresh git + DVC repo, `dvc repro` on tiny
params, metrics and MLflow runs checked, a second `dvc repro` that has nothing to do, and `dvc push` to the
default remote then `dvc pull` into a fresh clone, which has nothing to rerun."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import yaml

from conftest import tiny_params
from projects import git_dvc_project, project_env, run

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    root, env = git_dvc_project(tmp_path_factory.mktemp("e2e") / "dlpipe", tiny_params())
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
    assert lstm["rmse_ratio_vs_persistence"] > 0 and lstm["skill"] in ("yes", "no")
    assert lstm["onnx_max_abs_diff"] <= 1e-4
    assert {ticker: scores["baselines"]["persistence"]["rmse"] > 0 for ticker, scores in lstm["tickers"].items()} == {
        "GOOG": True,
        "MSFT": True,
    }
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
    # One run per trained model (cnn, lstm, dcgan), plus one each for distillation and transfer learning.
    assert sorted(runs["tags.stage"]) == ["distill", "train", "train", "train", "transfer"]
    runs = runs[runs["tags.stage"] == "train"]
    assert sorted(runs["tags.model"]) == ["cnn", "dcgan", "lstm"]
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
    stages = ("fetch_images", "fetch_stocks", "augment", "train@cnn", "export@lstm", "evaluate@cnn", "report")
    for stage in (*stages, "train_generator@dcgan", "export_generator@dcgan", "evaluate_generator@dcgan"):
        assert stage in dag


def test_two_repros_at_once_one_runs_the_other_fails_cleanly(repo):
    root, env = repo
    params = root / "params.yaml"
    params.write_text(params.read_text().replace("latency_runs: 5", "latency_runs: 6"))  # evaluate@* must run
    processes = [
        subprocess.Popen(
            ["dvc", "repro"], cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        for _ in range(2)
    ]
    outputs = [process.communicate(timeout=600)[0] for process in processes]
    codes = [process.returncode for process in processes]
    assert sorted(codes)[0] == 0 and sorted(codes)[1] != 0, outputs  # one ran, the other found the repo locked
    assert "lock" in outputs[codes.index(sorted(codes)[1])].lower(), outputs
    assert "Data and pipelines are up to date" in run(["dvc", "status"], root, env).stdout
    metrics = json.loads((root / "reports" / "metrics" / "cnn.json").read_text())  # whole and valid
    assert 0 < metrics["test_accuracy"] <= 1


def test_checkout_restores_every_output(repo):
    root, env = repo
    written = ["models/cnn/train.json", "models/lstm/export.json", "reports/metrics/cnn.json", "reports/index.html"]
    before = {name: (root / name).read_bytes() for name in written}
    for name in written:
        (root / name).unlink()
    run(["dvc", "checkout"], root, env)
    assert {name: (root / name).read_bytes() for name in written} == before
    assert "up to date" in run(["dvc", "status"], root, env).stdout


def test_experiment_compares_with_baseline_and_image_change_spares_forecaster(repo):
    root, env = repo
    run(["git", "add", "-A"], root, env)
    run(["git", "commit", "-qm", "baseline results"], root, env)
    try:
        exp = run(["dvc", "exp", "run", "-S", "augment.copies=0"], root, env).stdout
        ran = {line.split("'")[1] for line in exp.splitlines() if line.startswith("Running stage '")}
        assert {"augment", "train@cnn", "export@cnn", "evaluate@cnn", "report"} <= ran
        assert not {stage for stage in ran if stage.endswith("@lstm") or stage.startswith("fetch_")}, ran

        rows = json.loads(run(["dvc", "exp", "show", "--json"], root, env).stdout)
        baseline = next(row for row in rows if row["rev"] != "workspace")
        experiments = [rev for group in baseline["experiments"] or [] for rev in group["revs"]]
        assert len(experiments) == 1
        for row in (baseline, experiments[0]):
            metrics = row["data"]["metrics"]
            assert 0 < metrics["reports/metrics/cnn.json"]["data"]["test_accuracy"] <= 1
            assert metrics["reports/metrics/lstm.json"]["data"]["tickers"]["GOOG"]["rmse"] > 0
        assert experiments[0]["data"]["params"]["params.yaml"]["data"]["augment"]["copies"] == 0

        diff = json.loads(run(["dvc", "metrics", "diff", "HEAD", "--json"], root, env).stdout)
        assert "test_accuracy" in diff["reports/metrics/cnn.json"]
        plots = run(["dvc", "plots", "diff", "HEAD", "--json"], root, env)
        assert "reports/plots/cnn/predictions.csv" in plots.stdout
    finally:
        run(["git", "checkout", "--", "params.yaml", "dvc.lock"], root, env)
        run(["dvc", "checkout", "--force"], root, env)
    assert "up to date" in run(["dvc", "status"], root, env).stdout


def test_push_then_pull_into_a_fresh_clone_restores_models_without_retraining(repo):
    # Last in the file: it commits, and test_one_finished_tagged_run_per_model compares the runs' git_sha
    # with HEAD. The workspace is the committed state again after the experiment test, or, run alone, the
    # first repro's: either way what is committed here is what was pushed.
    root, env = repo
    run(["git", "add", "-A"], root, env)  # dvc.lock (and params.yaml, the .gitignore files DVC wrote)
    if run(["git", "status", "--porcelain"], root, env).stdout.strip():
        run(["git", "commit", "-qm", "pipeline results"], root, env)
    assert run(["dvc", "remote", "default"], root, env).stdout.strip() == "local"

    run(["dvc", "push"], root, env)
    # .dvc/config's `../../dlpipe-remote` is resolved from .dvc/: a directory beside the checkout.
    remote = root.parent / "dlpipe-remote"
    lock = yaml.safe_load((root / "dvc.lock").read_text())
    md5 = next(out["md5"] for out in lock["stages"]["train@cnn"]["outs"] if out["path"] == "models/cnn/best.ckpt")
    assert (remote / "files" / "md5" / md5[:2] / md5[2:]).is_file()

    # A clone beside the original: its .dvc/config names the same remote directory, unchanged.
    clone = root.parent / "dlpipe-clone"
    run(["git", "clone", "-q", str(root), str(clone)], root.parent, env)
    clone_env = project_env(clone)
    assert not (clone / "models").exists()
    run(["dvc", "pull"], clone, clone_env)

    params = yaml.safe_load((root / "params.yaml").read_text())
    files = ("best.ckpt", "model.onnx", "model.int8.onnx", "train.json", "export.json")
    for model in [*params["models"], *params["generators"]]:
        for name in files:
            path = Path("models") / model / name
            assert (clone / path).read_bytes() == (root / path).read_bytes(), path
    assert "Data and pipelines are up to date" in run(["dvc", "status"], clone, clone_env).stdout
    again = run(["dvc", "repro"], clone, clone_env).stdout
    assert "Running stage" not in again and "Data and pipelines are up to date" in again, again
