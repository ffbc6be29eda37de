"""Start-up of a stage process: what a non-training stage imports versus what the training stage imports.

A DVC pipeline starts one Python process per stage, so import time is paid once per stage. The two are
measured side by side in one run, alternating, and reported as medians and their ratio.

    python benchmarks/bench_startup.py [--runs 5] [--out benchmarks/results/startup.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

# What `python -m dlpipe <stage>` imports before the stage runs: the CLI, the stage functions and the task
# registry (which params validation needs); training adds its LightningModules and the trainer.
STAGE_IMPORTS = {
    "non_training_stage": "import dlpipe.cli, dlpipe.stages, dlpipe.tasks, dlpipe.export, dlpipe.evaluate",
    "training_stage": "import dlpipe.cli, dlpipe.stages, dlpipe.tasks, dlpipe.train, dlpipe.tasks.classifier_training",
}


def time_import(statement: str) -> float:
    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1"}
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", statement], check=True, env=env)
    return time.perf_counter() - started


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5, help="timed starts of each kind (default 5)")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    args = parser.parse_args(argv)

    for statement in STAGE_IMPORTS.values():  # warm the file cache, untimed
        time_import(statement)
    timings: dict[str, list[float]] = {name: [] for name in STAGE_IMPORTS}
    for _ in range(args.runs):
        for name, statement in STAGE_IMPORTS.items():
            timings[name].append(time_import(statement))
    medians = {name: statistics.median(values) for name, values in timings.items()}
    result = {
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "runs": args.runs,
        "seconds": timings,
        "median_s": medians,
        "training_over_non_training": medians["training_stage"] / medians["non_training_stage"],
    }
    print(json.dumps({k: result[k] for k in ("median_s", "training_over_non_training")}, indent=2))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
