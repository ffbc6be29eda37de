"""The DVC pipeline as the Prefect flow sees it: dvc.yaml's stages, their order, the inputs DVC decides on,
and the record in dvc.lock. Read through DVC's own API, so the flow runs the graph `dvc dag` draws and keys
its cache on exactly what `dvc status` compares: each stage's command, its params section and the hashes of
its deps (data and code alike). No Prefect here: pipelines/flows.py turns these stages into tasks.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml
from dvc.repo import Repo

from dlpipe.config import Config

# Stages that measure time (latency percentiles, the promotion gate's latency budget, the cost stage's
# forward timings) run with no other stage beside them: a training on the next core would slow them.
TIMING_STAGES = ("evaluate", "evaluate_generator", "cost")
# Stages that train a network: on a GPU machine they take a slot of the GPU concurrency limit.
TRAINING_STAGES = ("train", "train_generator", "distill", "transfer")
# Fetch stages touch the network when their source is online; only they are retried.
FETCH_STAGES = ("fetch_images", "fetch_stocks")
# A model's own stages (config.stage_name gives their dvc.yaml names).
STAGE_KINDS = ("train", "export", "evaluate")
# Sources that read files already on this machine: fetching them again gives the same bytes.
OFFLINE_STOCK_SOURCES = ("sample",)


@dataclass(frozen=True)
class Stage:
    name: str  # dvc.yaml's address: fetch_images, train@cnn, evaluate_generator@dcgan, ...
    cmd: str
    upstream: tuple[str, ...]  # the stages whose outputs it reads (its direct dependencies)

    @property
    def kind(self) -> str:
        """The stage's group in dvc.yaml: `train` for train@cnn."""
        return self.name.split("@")[0]

    @property
    def measures_time(self) -> bool:
        return self.kind in TIMING_STAGES

    @property
    def trains(self) -> bool:
        return self.kind in TRAINING_STAGES

    @property
    def fetches(self) -> bool:
        return self.kind in FETCH_STAGES


def read_stages(root: Path) -> dict[str, Stage]:
    """Every stage of `root`/dvc.yaml (foreach groups expanded over params.yaml), each after the stages it
    depends on, and among those ready at any point the one with the longest chain of stages after it first
    (dvc.yaml's order breaks ties). Submitted in this order, no stage waits on one submitted after it, and the
    trainings that everything else waits for start before side stages such as cost or transfer."""
    with Repo(str(root)) as repo:
        graph = repo.index.graph  # an edge runs from a stage to a stage whose outputs it reads
        position = {stage.name: index for index, stage in enumerate(repo.index.stages)}
        # `name` is what dvc.lock keys (`addressing` is relative to the working directory).
        stages = {
            node.name: Stage(node.name, node.cmd, tuple(sorted(dep.name for dep in graph.successors(node))))
            for node in graph.nodes
        }
    downstream: dict[str, list[str]] = {name: [] for name in stages}
    for name, stage in stages.items():
        for dep in stage.upstream:
            downstream[dep].append(name)
    height: dict[str, int] = {}

    def chain(name: str) -> int:  # stages on the longest path from `name` to the end, itself included
        if name not in height:
            height[name] = 1 + max((chain(after) for after in downstream[name]), default=0)
        return height[name]

    ordered: dict[str, Stage] = {}
    while len(ordered) < len(stages):
        ready = [n for n in stages if n not in ordered and all(dep in ordered for dep in stages[n].upstream)]
        first = min(ready, key=lambda name: (-chain(name), position[name]))
        ordered[first] = stages[first]
    return ordered


def select(stages: dict[str, Stage], wanted: Iterable[str]) -> dict[str, Stage]:
    """`wanted` and every stage upstream of them, in `stages`' order. An unknown name is an error."""
    needed: set[str] = set()
    pending = list(wanted)
    while pending:
        name = pending.pop()
        if name not in stages:
            raise KeyError(f"dvc.yaml has no stage {name!r} (it has {', '.join(stages)})")
        if name not in needed:
            needed.add(name)
            pending.extend(stages[name].upstream)
    return {name: stage for name, stage in stages.items() if name in needed}


def stages_for(config: Config, stages: dict[str, Stage], models: list[str] | None) -> dict[str, Stage]:
    """The stages a flow run over `models` runs: without a subset, all of dvc.yaml; with one, each model's
    train, export and evaluate stages and what they need (the report, distillation, transfer and cost
    stages summarise or exercise the whole zoo, so only a full run has them)."""
    if not models or set(config.selected_models(models)) == set(config.all_models):
        return dict(stages)
    wanted = [config.stage_name(stage, model) for model in config.selected_models(models) for stage in STAGE_KINDS]
    return select(stages, wanted)


def _open_stage(repo: Repo, name: str):
    matches = [stage for stage in repo.index.stages if stage.name == name]
    if not matches:
        raise KeyError(f"dvc.yaml has no stage {name!r}")
    return matches[0]


def _inputs(stage) -> dict[str, Any]:
    """What DVC compares to decide whether a stage changed: its command, the values of its params
    sections and the hash of every dep (DVC's own hashes: a large data directory is hashed once, then
    recognised by its files' sizes and times)."""
    inputs: dict[str, Any] = {"cmd": stage.cmd, "deps": {}, "params": {}}
    for dep in stage.deps:
        if hasattr(dep, "read_params"):  # a ParamsDependency: the sections it names, with their values
            inputs["params"][dep.def_path] = dep.read_params()
        else:
            inputs["deps"][dep.def_path] = dep.get_hash().value
    return inputs


def inputs_key(root: Path, name: str, config: Config, today: Callable[[], datetime] = lambda: datetime.now(UTC)) -> str:
    """A digest of the stage's inputs (see `_inputs`), computed before it runs. An online fetch of prices also
    keys on the day: the same params ask for new prices tomorrow."""
    with Repo(str(root)) as repo:
        inputs = _inputs(_open_stage(repo, name))
    if name == "fetch_stocks" and config.params.data.stocks.source not in OFFLINE_STOCK_SOURCES:
        inputs["day"] = today().date().isoformat()
    canonical = json.dumps(inputs, sort_keys=True, default=str).encode()
    return f"{name}-{hashlib.sha256(canonical).hexdigest()[:32]}"


def up_to_date(root: Path, name: str) -> bool:
    """What `dvc status` says of one stage: dvc.lock records it with the command, params and dep hashes it
    has now, and its outputs in the workspace are the ones recorded. False when it was never recorded."""
    lock_file = root / "dvc.lock"
    if not lock_file.exists():
        return False
    entry = (yaml.safe_load(lock_file.read_text()) or {}).get("stages", {}).get(name)
    if not entry:
        return False
    recorded = {
        "cmd": entry.get("cmd"),
        "deps": {dep["path"]: dep.get("md5") for dep in entry.get("deps", [])},
        "params": entry.get("params", {}),
    }
    recorded_outs = {out["path"]: out.get("md5") for out in entry.get("outs", [])}
    with Repo(str(root)) as repo:
        stage = _open_stage(repo, name)
        try:
            if _inputs(stage) != recorded:
                return False
            return all(recorded_outs.get(out.def_path) == out.get_hash().value for out in stage.outs)
        except FileNotFoundError:  # a dep or an output is missing
            return False


def stage_command(stage: Stage, cpus: set[int] | None = None) -> list[str]:
    """The argv that runs the stage's command as DVC would (through the shell, in the project root), pinned
    to `cpus` when given (the stage's torch threads then follow: dlpipe counts the cores it may use)."""
    command = ["/bin/sh", "-c", stage.cmd]
    taskset = shutil.which("taskset")
    if cpus and taskset:
        command = [taskset, "--cpu-list", ",".join(str(cpu) for cpu in sorted(cpus)), *command]
    return command


def stage_environment(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The stage's environment: this interpreter's `python` and `dvc` first on PATH (a worker's venv)."""
    env = {**os.environ, **(extra or {})}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


def commit(root: Path, names: list[str]) -> None:
    """Record the stages' current deps, params and outputs in dvc.lock and the DVC cache (`dvc commit`), as
    `dvc repro` does after running a stage: `dvc status` is then clean and `dvc push` has the outputs. It
    waits for DVC's repository lock: stages finishing together commit one after the other."""
    command = [sys.executable, "-m", "dvc", "--wait-for-lock", "commit", "--force", "--quiet", *names]
    result = subprocess.run(command, cwd=root, env=stage_environment(), capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"dvc commit {' '.join(names)} exited {result.returncode}: {result.stderr.strip()[-2000:]}")
