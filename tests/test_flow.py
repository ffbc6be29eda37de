"""The Prefect flow under a real (temporary) Prefect API: bad input fails before any stage runs, only the
network fetches retry, a timeout stops a stage's whole process group, and trainings on a GPU take the
`dlpipe-gpu` concurrency limit and a device each. Whole flow runs, from deployments through a worker, are
in test_prefect_deploy.py."""

from __future__ import annotations

import os
import tempfile
import threading
import time

import pytest

# Prefect reads its settings at import: point it at a throwaway home before anything imports it.
os.environ.setdefault("PREFECT_HOME", tempfile.mkdtemp(prefix="dlpipe-prefect-"))
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW", "ignore")  # a task run called on its own

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def prefect_api():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


def test_flow_rejects_unknown_model_before_writing(project, prefect_api):
    from pipelines.flows import dlpipe_pipeline

    state = dlpipe_pipeline(project=str(project.parent), models=["resnet"], return_state=True)
    assert state.is_failed()
    assert "resnet" in str(state.message) or "resnet" in repr(state.result(raise_on_failure=False))
    assert not (project.parent / "data" / "images").exists()


def test_a_dataset_selects_the_models_training_on_it(config):
    from pipelines.flows import models_of

    assert models_of(config, None, ["stocks"]) == ["lstm"]
    assert models_of(config, ["cnn"], None) == ["cnn"]
    assert models_of(config, None, None) is None  # everything
    with pytest.raises(Exception, match="no model trains on dataset 'audio'"):
        models_of(config, None, ["audio"])


def test_only_fetches_retry_with_backoff_and_a_timeout(config):
    from pipelines.dvc_stages import Stage
    from pipelines.flows import _stage_task

    flow = config.params.flow
    fetch = _stage_task(config, Stage("fetch_stocks", "python -m dlpipe fetch_stocks", ()))
    assert fetch.retries == flow.fetch_retries > 0 and fetch.timeout_seconds == flow.fetch_timeout_s
    delays = fetch.retry_delay_seconds
    assert delays == [flow.fetch_retry_delay_s * 2**i for i in range(flow.fetch_retries)]  # exponential backoff
    train = _stage_task(config, Stage("train@cnn", "python -m dlpipe train cnn", ("augment",)))
    assert train.retries == 0 and train.timeout_seconds is None
    assert train.refresh_cache  # no dvc.lock yet: DVC would run it, so the cache is not read


def test_a_timed_out_stage_is_stopped_with_its_children(tmp_path, prefect_api):
    from prefect.cache_policies import NO_CACHE

    from pipelines.dvc_stages import Stage
    from pipelines.flows import run_stage

    # The shell starts a child that would outlive a plain kill of the shell.
    stage = Stage("fetch_stocks", f"sleep 60 & echo $! > {tmp_path}/child; wait", ())

    started = time.monotonic()
    state = run_stage.with_options(timeout_seconds=2, cache_policy=NO_CACHE)(str(tmp_path), stage, return_state=True)
    assert state.name == "TimedOut" and time.monotonic() - started < 30
    child = int((tmp_path / "child").read_text())
    deadline = time.monotonic() + 5
    while _alive(child) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(child)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as stat:
        return stat.read().split()[2] != "Z"  # a zombie has exited


def test_trainings_on_one_gpu_take_turns(prefect_api, tmp_path, monkeypatch):
    from prefect.client.orchestration import get_client

    from pipelines import flows, slots
    from pipelines.dvc_stages import Stage

    monkeypatch.setattr(slots, "gpu_lock_dir", lambda: tmp_path)
    flows._ensure_gpu_limit(1)
    with get_client(sync_client=True) as client:
        assert client.read_global_concurrency_limit_by_name(flows.GPU_LIMIT).limit == 1
    spans: dict[str, tuple[float, float, str]] = {}

    def train(name: str) -> None:
        with flows._placement(Stage(f"train@{name}", "", ()), 1, 1) as (_, env):
            start = time.monotonic()
            time.sleep(0.5)
            spans[name] = (start, time.monotonic(), env["CUDA_VISIBLE_DEVICES"])

    threads = [threading.Thread(target=train, args=(name,)) for name in ("cnn", "resnet")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    (a_start, a_end, a_gpu), (b_start, b_end, b_gpu) = spans.values()
    assert a_gpu == b_gpu == "0"
    assert a_end <= b_start or b_end <= a_start, spans  # one after the other
