"""prefect.yaml as a user deploys it, against real servers: a Prefect server (on PostgreSQL where one is
reachable, else sqlite), `prefect deploy --all` from the project root with no extra environment, the
server's scheduler creating each cron schedule's upcoming runs, and two triggered runs of the weekly
deployment on a tiny project, each executed by a process worker started elsewhere. The flow runs the DVC
stages with trainings fanned out on Dask, tracks on a real MLflow server (PostgreSQL backend store where
reachable) and leaves `dvc status` clean; the second run, with nothing changed, runs no stage.

Each `prefect` CLI call costs about 3 s of imports; the server about 20 s to start.
"""

from __future__ import annotations

import contextlib
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest
from mlflow import MlflowClient

from conftest import tiny_params
from pipelines.dvc_stages import read_stages
from projects import git_dvc_project, run
from servers import (
    database_url,
    free_port,
    postgres_database,
    postgres_rows,
    postgres_unreachable,
    running_mlflow_server,
    stop,
)

FULL = "dlpipe/weekly-retrain"
STOCKS = "dlpipe/stocks-weekday"
WORK_POOL = "dlpipe-process"
SERVER_START_TIMEOUT = 90
SCHEDULER_TIMEOUT = 60
CLI_TIMEOUT = 120
WORKER_TIMEOUT = 900  # the triggered run is the whole tiny pipeline

pytestmark = pytest.mark.slow
NO_POSTGRES = postgres_unreachable()


class PrefectServer:
    def __init__(self, home: Path, base_env: dict[str, str], database_url: str | None = None):
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
        if database_url:  # the server's database (default: sqlite under PREFECT_HOME)
            self.env["PREFECT_SERVER_DATABASE_CONNECTION_URL"] = database_url
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
            stop(self.proc, timeout=20)

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

    def deployment(self, name: str) -> dict:
        flow_name, deployment_name = name.split("/")
        return self.api("GET", f"/deployments/name/{flow_name}/{deployment_name}").json()

    def api(self, method: str, path: str, **kw) -> httpx.Response:
        r = httpx.request(method, f"{self.api_url}{path}", timeout=10, **kw)
        r.raise_for_status()
        return r


@dataclass
class Deployed:
    """What the module's one deployment session left behind, for the tests below to read."""

    root: Path
    env: dict[str, str]
    server: PrefectServer
    mlflow_url: str
    mlflow_database: str | None  # the MLflow server's PostgreSQL database; None on sqlite
    prefect_database: str | None
    scheduled: dict[str, list[dict]] = field(default_factory=dict)  # deployment -> its auto-scheduled runs
    runs: list[str] = field(default_factory=list)  # the triggered flow runs, in order
    timings: dict[str, float] = field(default_factory=dict)


@pytest.fixture(scope="module")
def deployed(tmp_path_factory) -> Deployed:
    root, env = git_dvc_project(tmp_path_factory.mktemp("deploy") / "dlpipe", tiny_params())
    work = tmp_path_factory.mktemp("cli")
    with contextlib.ExitStack() as stack:
        mlflow_db = prefect_db = None
        if NO_POSTGRES is None:
            mlflow_db = stack.enter_context(postgres_database("mlflow"))
            prefect_db = stack.enter_context(postgres_database("prefect"))
        mlflow_root = tmp_path_factory.mktemp("mlflow-server")
        backend = database_url(mlflow_db, "psycopg2") if mlflow_db else f"sqlite:///{mlflow_root / 'mlflow.db'}"
        mlflow_url = stack.enter_context(running_mlflow_server(mlflow_root, backend))
        # The worker's environment is the flow's: the project's code and venv, and the tracking server.
        server = PrefectServer(
            tmp_path_factory.mktemp("prefect-home"),
            {**env, "MLFLOW_TRACKING_URI": mlflow_url},
            database_url(prefect_db, "asyncpg") if prefect_db else None,
        )
        server.start()
        stack.callback(server.stop)
        state = Deployed(root, env, server, mlflow_url, mlflow_db, prefect_db)
        deploy_and_run(state, work)
        yield state


def deploy_and_run(state: Deployed, work: Path) -> None:
    srv, timings = state.server, state.timings
    srv.cli("work-pool", "create", WORK_POOL, "--type", "process", cwd=work)
    started = time.monotonic()
    srv.cli("deploy", "--all", cwd=state.root)
    deployed_at = time.monotonic()
    timings["deploy"] = deployed_at - started

    # The server's scheduler creates the upcoming runs of each cron schedule by itself.
    for name in (FULL, STOCKS):
        deployment = srv.deployment(name)
        deadline = time.monotonic() + SCHEDULER_TIMEOUT
        while not state.scheduled.get(name) and time.monotonic() < deadline:
            time.sleep(0.5)
            query = {
                "flow_runs": {
                    "deployment_id": {"any_": [deployment["id"]]},
                    "state": {"type": {"any_": ["SCHEDULED"]}},
                },
                "limit": 10,
            }
            runs = srv.api("POST", "/flow_runs/filter", json=query).json()
            state.scheduled[name] = [r for r in runs if r["auto_scheduled"]]
    timings["scheduler"] = time.monotonic() - deployed_at

    for attempt in ("first", "second"):
        triggered = srv.cli("deployment", "run", FULL, cwd=work)
        state.runs.append(re.search(r"UUID:\s*([0-9a-f-]{36})", triggered).group(1))
        started = time.monotonic()
        srv.cli(
            "worker", "start", "--pool", WORK_POOL, "--run-once", cwd=work, timeout=WORKER_TIMEOUT, no_traceback=False
        )
        timings[f"worker, {attempt} run"] = time.monotonic() - started
    print("timings (s):", {k: round(v, 1) for k, v in timings.items()})


def stage_runs(state: Deployed, flow_run_id: str) -> dict[str, dict]:
    """The task runs of the flow run's sub-flows, by name: one per dvc.yaml stage."""
    srv = state.server
    query = {"flow_runs": {"parent_flow_run_id": {"any_": [flow_run_id]}}, "limit": 50}
    children = [r["id"] for r in srv.api("POST", "/flow_runs/filter", json=query).json()]
    query = {"task_runs": {"flow_run_id": {"any_": children}}, "limit": 200}
    runs = {r["name"]: r for r in srv.api("POST", "/task_runs/filter", json=query).json()}
    assert set(runs) == set(read_stages(state.root)), sorted(runs)
    return runs


def test_cron_schedules_reach_the_server(deployed):
    srv = deployed.server
    for name in (FULL, STOCKS):
        deployment = srv.deployment(name)
        # Without a pull section, `prefect deploy` records the absolute directory it ran in: the worker
        # needs no environment variable to find the project.
        assert {"prefect.deployments.steps.set_working_directory": {"directory": str(deployed.root)}} in (
            deployment["pull_steps"] or []
        ), deployment["pull_steps"]
        assert deployment["work_pool_name"] == WORK_POOL
        assert deployed.scheduled[name], f"no scheduled run for {name} within {SCHEDULER_TIMEOUT}s:\n{srv.log_tail()}"
    assert srv.deployment(STOCKS)["parameters"] == {"project": ".", "datasets": ["stocks"]}
    starts = {
        name: [datetime.fromisoformat(r["expected_start_time"]).astimezone(UTC) for r in runs]
        for name, runs in deployed.scheduled.items()
    }
    assert all((s.weekday(), s.hour, s.minute) == (6, 3, 0) for s in starts[FULL]), starts  # Sunday 03:00
    assert all(s.weekday() < 5 and (s.hour, s.minute) == (22, 30) for s in starts[STOCKS]), starts
    listed = srv.cli("flow-run", "ls", "--state-type", "SCHEDULED", cwd=deployed.root)
    assert all(r["id"] in listed for runs in deployed.scheduled.values() for r in runs[:1]), listed


def test_a_worker_runs_the_deployment_through_dvc_and_mlflow(deployed):
    srv, root = deployed.server, deployed.root
    flow_run = srv.api("GET", f"/flow_runs/{deployed.runs[0]}").json()
    assert flow_run["state_type"] == "COMPLETED", f"{flow_run['state_name']}: {flow_run['state'].get('message')}"
    # Every stage ran in the flow and was committed: DVC has nothing left to do.
    assert {r["state_name"] for r in stage_runs(deployed, deployed.runs[0]).values()} == {"Completed"}
    status = run(["dvc", "status"], root, deployed.env).stdout
    assert "Data and pipelines are up to date" in status, status
    assert (root / "reports" / "index.html").is_file()
    assert not (root / "mlflow.db").exists()  # everything went to the tracking server
    client = MlflowClient(deployed.mlflow_url, registry_uri=deployed.mlflow_url)
    runs = client.search_runs([client.get_experiment_by_name("dlpipe").experiment_id])
    assert all(r.info.status == "FINISHED" for r in runs)
    assert sorted(r.data.tags["stage"] for r in runs) == ["distill", "train", "train", "train", "transfer"]
    runs = [r for r in runs if r.data.tags["stage"] == "train"]
    assert sorted(r.data.tags["model"] for r in runs) == ["cnn", "dcgan", "lstm"]
    cnn_run = next(r for r in runs if r.data.tags["model"] == "cnn")
    assert [a.path for a in client.list_artifacts(cnn_run.info.run_id, "checkpoints")] == ["checkpoints/best.ckpt"]
    champion = client.get_model_version_by_alias("dlpipe-cnn", "champion")
    assert champion.run_id == cnn_run.info.run_id, (champion, {r.info.run_id: r.data.tags for r in runs})

    # The run's artifact: one table row per model, each linking its MLflow run on the tracking server.
    query = {"artifacts": {"key": {"any_": ["dlpipe-models"]}, "flow_run_id": {"any_": [deployed.runs[0]]}}}
    [artifact] = srv.api("POST", "/artifacts/filter", json=query).json()
    assert artifact["type"] == "markdown"
    for model_run in runs:
        model = model_run.data.tags["model"]
        row = next(line for line in artifact["data"].splitlines() if line.startswith(f"| {model} |"))
        assert f"{deployed.mlflow_url}/#/experiments/" in row and model_run.info.run_id in row, row


def test_independent_trainings_overlap_on_the_dask_runner(deployed):
    stages = stage_runs(deployed, deployed.runs[0])
    spans = {
        name: (datetime.fromisoformat(stages[name]["start_time"]), datetime.fromisoformat(stages[name]["end_time"]))
        for name in ("train@cnn", "train@lstm")  # images and prices: neither waits for the other
    }
    (cnn_start, cnn_end), (lstm_start, lstm_end) = spans["train@cnn"], spans["train@lstm"]
    assert cnn_start < lstm_end and lstm_start < cnn_end, spans


def test_a_second_run_with_nothing_changed_runs_no_stage(deployed):
    flow_run = deployed.server.api("GET", f"/flow_runs/{deployed.runs[1]}").json()
    assert flow_run["state_type"] == "COMPLETED", f"{flow_run['state_name']}: {flow_run['state'].get('message')}"
    states = {name: r["state_name"] for name, r in stage_runs(deployed, deployed.runs[1]).items()}
    assert set(states.values()) == {"Cached"}, states
    client = MlflowClient(deployed.mlflow_url)
    runs = client.search_runs([client.get_experiment_by_name("dlpipe").experiment_id])
    assert len(runs) == 5  # the first run's: nothing trained again


@pytest.mark.skipif(NO_POSTGRES is not None, reason=f"PostgreSQL backend stores: {NO_POSTGRES}")
def test_the_servers_keep_their_state_in_postgresql(deployed):
    client = MlflowClient(deployed.mlflow_url, registry_uri=deployed.mlflow_url)
    run_ids = {r.info.run_id for r in client.search_runs([client.get_experiment_by_name("dlpipe").experiment_id])}
    champion = client.get_model_version_by_alias("dlpipe-cnn", "champion")
    assert {row[0] for row in postgres_rows(deployed.mlflow_database, "SELECT run_uuid FROM runs")} == run_ids
    aliases = "SELECT version FROM registered_model_aliases WHERE name = 'dlpipe-cnn' AND alias = 'champion'"
    assert postgres_rows(deployed.mlflow_database, aliases) == [(int(champion.version),)]
    flow_runs = postgres_rows(
        deployed.prefect_database, "SELECT id::text FROM flow_run WHERE deployment_id IS NOT NULL"
    )
    assert set(deployed.runs) <= {row[0] for row in flow_runs}
