"""prefect.yaml as a user deploys it, against a real Prefect server: `prefect deploy --all` from the project
root with no extra environment, the server's scheduler creating the cron schedule's upcoming runs, and a
triggered run of the real flow on a tiny project, executed by a process worker started elsewhere. The flow
runs the DVC stages, tracks on a real MLflow server, and leaves `dvc status` clean.

Each `prefect` CLI call costs about 3 s of imports; the server about 20 s to start.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest
from mlflow import MlflowClient

from conftest import tiny_params
from projects import git_dvc_project, run
from servers import free_port

DEPLOYMENT = "dlpipe/nightly"
WORK_POOL = "dlpipe-process"
SERVER_START_TIMEOUT = 90
SCHEDULER_TIMEOUT = 60
CLI_TIMEOUT = 120
WORKER_TIMEOUT = 900  # the triggered run is the whole tiny pipeline

pytestmark = pytest.mark.slow


@pytest.fixture
def project(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    return git_dvc_project(tmp_path_factory.mktemp("deploy") / "dlpipe", tiny_params())


class PrefectServer:
    def __init__(self, home: Path, base_env: dict[str, str]):
        self.port = free_port()
        self.api_url = f"http://127.0.0.1:{self.port}/api"
        self.log_path = home / "server.log"
        self.env = {k: v for k, v in base_env.items() if not k.startswith("PREFECT_")}
        self.env.update(
            PREFECT_HOME=str(home),
            PREFECT_API_URL=self.api_url,
            PREFECT_SERVER_ANALYTICS_ENABLED="false",
            DO_NOT_TRACK="1",
            PREFECT_CLI_PROMPT="false",
            # the scheduler service that picks up new or changed deployments (default 5 s)
            PREFECT_SERVER_SERVICES_SCHEDULER_RECENT_DEPLOYMENTS_LOOP_SECONDS="1",
            NO_ALBUMENTATIONS_UPDATE="1",
            COLUMNS="250",  # keep rich tables from wrapping or truncating names
        )
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(self.port)],
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + SERVER_START_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"prefect server exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                if httpx.get(f"{self.api_url}/health", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.25)
        pytest.fail(f"prefect server not healthy after {SERVER_START_TIMEOUT}s:\n{self.log_tail()}")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def log_tail(self, n: int = 4000) -> str:
        return self.log_path.read_text(errors="replace")[-n:] if self.log_path.exists() else ""

    def cli(self, *args: str, cwd: Path, timeout: float = CLI_TIMEOUT, no_traceback: bool = True) -> str:
        """Run `prefect --no-prompt ARGS` non-interactively; fail with its output unless it exits 0."""
        cmd = [sys.executable, "-m", "prefect", "--no-prompt", *args]
        try:
            res = subprocess.run(
                cmd, cwd=cwd, env=self.env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout
            )
        except subprocess.TimeoutExpired as e:
            pytest.fail(f"`prefect {' '.join(args)}` timed out after {timeout}s:\n{e.stdout}\n{e.stderr}")
        out = res.stdout + res.stderr
        assert res.returncode == 0, f"`prefect {' '.join(args)}` exited {res.returncode}:\n{out}"
        # The CLI prints a traceback and "An exception occurred." for API errors; never accept that (a
        # worker's output carries the flow's own logs, which may hold tracebacks of retried tasks).
        assert not no_traceback or "Traceback" not in out, f"`prefect {' '.join(args)}` raised:\n{out}"
        return out

    def api(self, method: str, path: str, **kw) -> httpx.Response:
        r = httpx.request(method, f"{self.api_url}{path}", timeout=10, **kw)
        r.raise_for_status()
        return r


@pytest.fixture
def prefect_server(tmp_path_factory, project, mlflow_server):
    # The worker's environment is the flow's: the project's code and venv, and the tracking server.
    server = PrefectServer(
        tmp_path_factory.mktemp("prefect-home"), {**project[1], "MLFLOW_TRACKING_URI": mlflow_server}
    )
    server.start()
    try:
        yield server
    finally:
        server.stop()


def test_deploy_schedule_and_worker_run(prefect_server, project, mlflow_server, tmp_path):
    root, env = project
    srv = prefect_server
    timings: dict[str, float] = {}

    srv.cli("work-pool", "create", WORK_POOL, "--type", "process", cwd=tmp_path)
    started = time.monotonic()
    srv.cli("deploy", "--all", cwd=root)
    deployed_at = time.monotonic()
    timings["deploy"] = deployed_at - started
    assert DEPLOYMENT in srv.cli("deployment", "ls", cwd=tmp_path)

    flow_name, deployment_name = DEPLOYMENT.split("/")
    deployment = srv.api("GET", f"/deployments/name/{flow_name}/{deployment_name}").json()
    # Without a pull section, `prefect deploy` records the absolute directory it ran in: the worker needs
    # no environment variable to find the project.
    assert {"prefect.deployments.steps.set_working_directory": {"directory": str(root)}} in (
        deployment["pull_steps"] or []
    ), deployment["pull_steps"]
    assert deployment["schedules"], "prefect.yaml's cron schedule did not reach the deployment"

    # The server's scheduler creates the upcoming runs of the cron schedule by itself.
    scheduled: list = []
    deadline = time.monotonic() + SCHEDULER_TIMEOUT
    while not scheduled and time.monotonic() < deadline:
        time.sleep(0.5)
        query = {
            "flow_runs": {"deployment_id": {"any_": [deployment["id"]]}, "state": {"type": {"any_": ["SCHEDULED"]}}},
            "limit": 10,
        }
        scheduled = [r for r in srv.api("POST", "/flow_runs/filter", json=query).json() if r["auto_scheduled"]]
    timings["scheduler"] = time.monotonic() - deployed_at
    assert scheduled, f"no scheduled run for {DEPLOYMENT} within {SCHEDULER_TIMEOUT}s:\n{srv.log_tail()}"
    starts = [datetime.fromisoformat(r["expected_start_time"]).astimezone(UTC) for r in scheduled]
    assert all((start.hour, start.minute) == (3, 0) for start in starts), starts  # the nightly cron
    listed = srv.cli("flow-run", "ls", "--state-type", "SCHEDULED", cwd=tmp_path)
    assert any(r["id"] in listed for r in scheduled), listed

    triggered = srv.cli("deployment", "run", DEPLOYMENT, cwd=tmp_path)
    run_id = re.search(r"UUID:\s*([0-9a-f-]{36})", triggered).group(1)
    started = time.monotonic()
    srv.cli(
        "worker", "start", "--pool", WORK_POOL, "--run-once", cwd=tmp_path, timeout=WORKER_TIMEOUT, no_traceback=False
    )
    timings["worker"] = time.monotonic() - started
    flow_run = srv.api("GET", f"/flow_runs/{run_id}").json()
    assert flow_run["state_type"] == "COMPLETED", f"{flow_run['state_name']}: {flow_run['state'].get('message')}"
    print("timings (s):", {k: round(v, 1) for k, v in timings.items()})

    # The run went through DVC: its lock file is true, so there is nothing left to do.
    status = run(["dvc", "status"], root, env).stdout
    assert "Data and pipelines are up to date" in status, status
    assert (root / "reports" / "index.html").is_file()
    assert not (root / "mlflow.db").exists()  # everything went to the tracking server
    client = MlflowClient(mlflow_server, registry_uri=mlflow_server)
    runs = client.search_runs([client.get_experiment_by_name("dlpipe").experiment_id])
    assert all(r.info.status == "FINISHED" for r in runs)
    assert sorted(r.data.tags["stage"] for r in runs) == ["distill", "train", "train", "train", "transfer"]
    runs = [r for r in runs if r.data.tags["stage"] == "train"]
    assert sorted(r.data.tags["model"] for r in runs) == ["cnn", "dcgan", "lstm"]
    cnn_run = next(r for r in runs if r.data.tags["model"] == "cnn")
    assert [a.path for a in client.list_artifacts(cnn_run.info.run_id, "checkpoints")] == ["checkpoints/best.ckpt"]
    champion = client.get_model_version_by_alias("dlpipe-cnn", "champion")
    assert champion.run_id == cnn_run.info.run_id, (champion, {r.info.run_id: r.data.tags for r in runs})
