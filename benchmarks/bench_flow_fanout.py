"""Wall time of the Prefect flow with stages fanned out on Dask against one stage at a time.

Each variant runs the whole flow (`pipelines.flows.dlpipe_pipeline`) on its own fresh copy of the project
(git + DVC, this checkout's tracked files) with params `flow.workers` set to 1 (serial) or N (parallel),
caching off, under a temporary Prefect API. Variants run one after the other, alternating, so both see the
same machine. Reported: seconds per run, the ratio, and which stages overlapped.

    python benchmarks/bench_flow_fanout.py                      # tiny params (the tests' pipeline), workers 1 vs 2
    python benchmarks/bench_flow_fanout.py --params default --rounds 1
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # tiny_params: the tests' seconds-long pipeline


def make_project(directory: Path, params: dict) -> Path:
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT, capture_output=True, text=True
    )
    for name in listed.stdout.split():
        if (ROOT / name).is_file():
            (directory / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, directory / name)
    (directory / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = {**os.environ, "GIT_AUTHOR_NAME": "b", "GIT_AUTHOR_EMAIL": "b@localhost"}
    env |= {"GIT_COMMITTER_NAME": "b", "GIT_COMMITTER_EMAIL": "b@localhost"}
    for command in (["git", "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-qm", "bench"]):
        subprocess.run(command, cwd=directory, env=env, check=True)
    return directory


def run_flow(project: Path) -> tuple[float, dict]:
    """One flow run in a child process (its own Dask cluster and stage bookkeeping); its seconds and task spans."""
    code = (
        "import json, sys; from pipelines.flows import dlpipe_pipeline; "
        "print('RESULT' + json.dumps(dlpipe_pipeline(project=sys.argv[1])['stages']))"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT), "NO_ALBUMENTATIONS_UPDATE": "1", "PREFECT_LOGGING_LEVEL": "WARNING"}
    env = {k: v for k, v in env.items() if not k.startswith("MLFLOW_")}
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-c", code, str(project)], env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(f"flow run failed in {project}:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    stages = json.loads(next(line for line in result.stdout.splitlines() if line.startswith("RESULT"))[6:])
    return seconds, stages


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", choices=["tiny", "default"], default="tiny")
    parser.add_argument("--workers", type=int, default=2, help="workers of the parallel variant (default 2)")
    parser.add_argument("--rounds", type=int, default=2, help="runs of each variant, alternating")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "flow_fanout.json")
    args = parser.parse_args(argv)

    from conftest import tiny_params

    base = tiny_params() if args.params == "tiny" else yaml.safe_load((ROOT / "params.yaml").read_text())
    seconds: dict[str, list[float]] = {"serial": [], "parallel": []}
    with tempfile.TemporaryDirectory(prefix="dlpipe-fanout-") as scratch:
        os.environ["PREFECT_HOME"] = str(Path(scratch) / "prefect")
        for round_ in range(args.rounds):
            for variant, workers in (("serial", 1), ("parallel", args.workers)):
                params = json.loads(json.dumps(base))
                params["flow"] = {**params.get("flow", {}), "workers": workers, "cache": False}
                project = make_project(Path(scratch) / f"{variant}-{round_}", params)
                took, stages = run_flow(project)
                seconds[variant].append(took)
                print(f"{variant:8s} (workers {workers}): {took:7.1f} s, {len(stages)} stages", flush=True)
    best = {variant: min(values) for variant, values in seconds.items()}
    summary = {
        "params": args.params,
        "workers": args.workers,
        "cpus": len(os.sched_getaffinity(0)),
        "machine": platform.processor() or platform.machine(),
        "seconds": seconds,
        "best_serial_s": round(best["serial"], 1),
        "best_parallel_s": round(best["parallel"], 1),
        "speedup": round(best["serial"] / best["parallel"], 3),
    }
    print(json.dumps(summary, indent=2))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    temporary = args.out.with_suffix(".tmp")
    temporary.write_text(json.dumps(summary, indent=2) + "\n")
    temporary.replace(args.out)


if __name__ == "__main__":
    main()
