"""The Prefect flow under a real (temporary) Prefect API: bad input fails before any stage runs, and only the
network fetches retry. A whole flow run on a worker, from a deployment, is in test_prefect_deploy.py."""

from __future__ import annotations

import os
import tempfile

import pytest

# Prefect reads its settings at import: point it at a throwaway home before anything imports it.
os.environ.setdefault("PREFECT_HOME", tempfile.mkdtemp(prefix="dlpipe-prefect-"))
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")

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


def test_fetch_tasks_retry_and_other_stages_do_not():
    from pipelines import flows

    assert flows.fetch.retries == flows.FETCH_RETRIES > 0
    assert flows.run_stage.retries == 0
