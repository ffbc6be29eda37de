"""The flow's view of the DVC pipeline (pipelines/dvc_stages.py) and its placement of concurrent stages
(pipelines/slots.py): the stage graph and its order, the cache key on DVC's inputs, `dvc status` of one
stage, the commit that records a stage run outside `dvc repro`, cores and GPUs shared between stages."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest
import yaml

from conftest import REPO_ROOT
from pipelines import dvc_stages, slots
from pipelines.dvc_stages import Stage


@pytest.fixture(scope="module")
def repo_stages() -> dict[str, Stage]:
    return dvc_stages.read_stages(REPO_ROOT)


def test_every_stage_comes_after_the_stages_it_reads(repo_stages):
    order = list(repo_stages)
    for position, stage in enumerate(repo_stages.values()):
        assert all(order.index(dep) < position for dep in stage.upstream), stage
    # The longest chains first: the trainings everything waits for start before the side stages.
    assert order[:3] == ["fetch_images", "augment", "fetch_stocks"] and order[-1] == "report"
    assert max(order.index(f"train@{model}") for model in ("cnn", "lstm")) < order.index("cost")
    assert set(repo_stages["evaluate@cnn"].upstream) >= {"train@cnn", "export@cnn", "augment"}
    assert "train@cnn" in repo_stages["train_generator@dcgan"].upstream  # the DCGAN's judge


def test_a_subset_of_models_brings_only_what_they_need(repo_stages):
    from dlpipe.config import load_config

    config = load_config(REPO_ROOT / "params.yaml")
    chosen = dvc_stages.stages_for(config, repo_stages, ["lstm"])
    assert list(chosen) == ["fetch_stocks", "train@lstm", "export@lstm", "evaluate@lstm"]
    everything = dvc_stages.stages_for(config, repo_stages, None)
    assert everything == repo_stages
    with pytest.raises(KeyError, match="no stage 'train@nope'"):
        dvc_stages.select(repo_stages, ["train@nope"])


def test_stage_kinds(repo_stages):
    assert repo_stages["evaluate_generator@dcgan"].measures_time and repo_stages["cost"].measures_time
    assert not repo_stages["train@cnn"].measures_time
    assert repo_stages["train@cnn"].trains and repo_stages["distill"].trains and not repo_stages["export@cnn"].trains
    assert repo_stages["fetch_stocks"].fetches and not repo_stages["augment"].fetches


def test_the_command_is_pinned_to_its_cores(repo_stages):
    command = dvc_stages.stage_command(repo_stages["train@cnn"], {1, 0})
    assert command[1:] == ["--cpu-list", "0,1", "/bin/sh", "-c", "python -m dlpipe train cnn"]
    assert dvc_stages.stage_command(repo_stages["train@cnn"]) == ["/bin/sh", "-c", "python -m dlpipe train cnn"]


# ------------------------------------------------------------------ a one-stage DVC project


def _dvc(root: Path, *args: str) -> str:
    result = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=root, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.fixture
def copy_project(tmp_path) -> Path:
    """`copy`: writes out.txt from in.txt and params `scale` (a stage as dvc.yaml's are: cmd, deps, params, outs)."""
    root = tmp_path / "copy"
    root.mkdir()
    (root / "in.txt").write_text("1\n")
    (root / "params.yaml").write_text(yaml.safe_dump({"scale": 2, "other": 1}))
    (root / "dvc.yaml").write_text(
        yaml.safe_dump(
            {
                "stages": {
                    "copy": {
                        "cmd": "python -c \"open('out.txt', 'w').write(open('in.txt').read() * 2)\"",
                        "deps": ["in.txt"],
                        "params": ["scale"],
                        "outs": ["out.txt"],
                    }
                }
            }
        )
    )
    _dvc(root, "init", "--no-scm", "-q")
    return root


def _config(root: Path, source: str = "sample"):
    from types import SimpleNamespace

    return SimpleNamespace(params=SimpleNamespace(data=SimpleNamespace(stocks=SimpleNamespace(source=source))))


def test_the_key_follows_what_dvc_decides_on(copy_project):
    root = copy_project
    key = dvc_stages.inputs_key(root, "copy", _config(root))
    assert key.startswith("copy-") and key == dvc_stages.inputs_key(root, "copy", _config(root))
    (root / "params.yaml").write_text(yaml.safe_dump({"scale": 2, "other": 5}))  # a section it does not read
    assert dvc_stages.inputs_key(root, "copy", _config(root)) == key
    (root / "params.yaml").write_text(yaml.safe_dump({"scale": 3, "other": 5}))
    rescaled = dvc_stages.inputs_key(root, "copy", _config(root))
    assert rescaled != key
    (root / "in.txt").write_text("2\n")
    assert dvc_stages.inputs_key(root, "copy", _config(root)) not in (key, rescaled)


def test_an_online_price_fetch_keys_on_the_day(repo_stages):
    def day(d: int):
        return lambda: datetime(2026, 11, d, 23, tzinfo=UTC)

    offline = [dvc_stages.inputs_key(REPO_ROOT, "fetch_stocks", _config(REPO_ROOT), day(d)) for d in (2, 3)]
    online = [dvc_stages.inputs_key(REPO_ROOT, "fetch_stocks", _config(REPO_ROOT, "yfinance"), day(d)) for d in (2, 3)]
    assert offline[0] == offline[1] and online[0] != online[1]


def test_up_to_date_is_dvc_status_of_one_stage(copy_project):
    root = copy_project
    assert not dvc_stages.up_to_date(root, "copy")  # never recorded
    _dvc(root, "repro", "-q")
    assert dvc_stages.up_to_date(root, "copy")
    (root / "out.txt").write_text("edited")
    assert not dvc_stages.up_to_date(root, "copy")  # an output changed since dvc.lock recorded it
    _dvc(root, "checkout", "-q", "--force")
    assert dvc_stages.up_to_date(root, "copy")
    (root / "params.yaml").write_text(yaml.safe_dump({"scale": 3, "other": 1}))
    assert not dvc_stages.up_to_date(root, "copy")  # a params section changed
    (root / "out.txt").unlink()
    assert not dvc_stages.up_to_date(root, "copy")  # and an output is missing


def test_a_stage_run_outside_dvc_is_recorded_by_commit(copy_project):
    root = copy_project
    stage = dvc_stages.read_stages(root)["copy"]
    subprocess.run(dvc_stages.stage_command(stage), cwd=root, env=dvc_stages.stage_environment(), check=True)
    assert (root / "out.txt").read_text() == "1\n1\n"
    dvc_stages.commit(root, ["copy"])
    assert dvc_stages.up_to_date(root, "copy")
    assert "up to date" in _dvc(root, "status")
    assert "didn't change" in _dvc(root, "repro")
    (root / "out.txt").unlink()
    _dvc(root, "checkout", "-q")  # the commit put the output in the DVC cache too
    assert (root / "out.txt").read_text() == "1\n1\n"


# ------------------------------------------------------------------ placement


def test_cores_are_dealt_into_disjoint_groups():
    assert slots.core_groups(2, {0, 1, 2, 3}) == [{0, 2}, {1, 3}]
    assert slots.core_groups(4, {0, 1}) == [{0}, {1}]  # no more groups than cores
    assert slots.core_groups(1, {0, 1}) == [{0, 1}]


def _record(events: list, name: str, hold: float):
    def work(context):
        with context as cpus:
            events.append((name, "start", cpus, time.monotonic()))
            time.sleep(hold)
            events.append((name, "end", cpus, time.monotonic()))

    return work


def test_sharing_stages_get_their_own_cores_and_a_timing_stage_runs_alone():
    placement = slots.StageSlots(2, {0, 1})
    events: list = []
    threads = [threading.Thread(target=_record(events, f"train{i}", 0.3), args=(placement.shared(),)) for i in range(2)]
    for thread in threads:
        thread.start()
    time.sleep(0.05)
    timing = threading.Thread(target=_record(events, "evaluate", 0.2), args=(placement.alone(),))
    timing.start()
    time.sleep(0.05)
    late = threading.Thread(target=_record(events, "train2", 0.1), args=(placement.shared(),))
    late.start()  # arrives while the timing stage waits: it goes after it
    for thread in [*threads, timing, late]:
        thread.join(5)
    order = [(name, what) for name, what, _, _ in events]
    starts = {name: cpus for name, what, cpus, _ in events if what == "start"}
    assert {frozenset(starts["train0"]), frozenset(starts["train1"])} == {frozenset({0}), frozenset({1})}
    assert starts["evaluate"] is None  # every core
    evaluate_start = order.index(("evaluate", "start"))
    assert order.index(("train0", "end")) < evaluate_start and order.index(("train1", "end")) < evaluate_start
    assert order.index(("evaluate", "end")) < order.index(("train2", "start"))


def test_each_gpu_goes_to_one_stage_at_a_time(tmp_path):
    claimed: list[list[int]] = []
    release = threading.Event()

    def hold():
        with slots.gpu_devices(1, 2, tmp_path) as devices:
            claimed.append(devices)
            release.wait(5)

    holders = [threading.Thread(target=hold) for _ in range(2)]
    for thread in holders:
        thread.start()
    deadline = time.monotonic() + 5
    while len(claimed) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert sorted(claimed) == [[0], [1]]
    waited: list[float] = []
    third = threading.Thread(target=lambda: _claim_after(tmp_path, waited))
    started = time.monotonic()
    third.start()
    time.sleep(slots.GPU_POLL_SECONDS * 1.5)
    assert not waited  # both GPUs are taken
    release.set()
    for thread in [*holders, third]:
        thread.join(10)
    assert waited and waited[0] - started >= slots.GPU_POLL_SECONDS
    with pytest.raises(ValueError, match="needs 3 GPUs and this machine has 2"), slots.gpu_devices(3, 2, tmp_path):
        pass


def _claim_after(lock_dir: Path, waited: list[float]) -> None:
    with slots.gpu_devices(2, 2, lock_dir):  # all or nothing: it needs both
        waited.append(time.monotonic())
