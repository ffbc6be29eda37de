"""`python -m dlpipe <stage> [model]` and the `dlpipe` command.

Exit codes: 0 success; 2 bad input (one line on stderr naming the key, file or value; nothing written).
"""

from __future__ import annotations

import argparse
import logging
import sys
import warnings

from dlpipe import stages
from dlpipe.config import PARAMS_ENV
from dlpipe.errors import DlpipeError, Interrupted


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dlpipe", description="Run one stage of the dlpipe pipeline (as dvc.yaml does).")
    p.add_argument(
        "stage", choices=(*stages.STAGES, "models"), help="pipeline stage to run, or 'models' to list registered models"
    )
    p.add_argument("model", nargs="?", help="model name for train / export / evaluate (see `dlpipe models`)")
    p.add_argument("--params", default=None, help=f"params file (default: ${PARAMS_ENV}, else ./params.yaml)")
    return p


def run(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.stage == "models":
        from dlpipe.models import get_spec, list_models

        names = list_models()
        width = max(map(len, names))
        for name in names:
            spec = get_spec(name)
            print(f"{name:{width}s}  {spec.task:11s} {spec.summary}")
        return 0
    if args.stage in stages.MODEL_STAGES and not args.model:
        raise DlpipeError(f"stage {args.stage!r} needs a model name, e.g. `dlpipe {args.stage} cnn`")
    if args.stage not in stages.MODEL_STAGES and args.model:
        raise DlpipeError(f"stage {args.stage!r} takes no model name (got {args.model!r})")

    from dlpipe.config import load_config

    config = load_config(args.params)
    if args.model:
        config.selected_models([args.model])

    stage = stages.STAGES[args.stage]
    stage(config, args.model) if args.model else stage(config)
    return 0


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("dlpipe").setLevel(logging.INFO)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    try:
        code = run(argv)
    except DlpipeError as exc:
        print(f"dlpipe: error: {exc}", file=sys.stderr)
        code = 2
    except OSError as exc:  # a full disk, a read-only folder: the message names the file; outputs are intact
        print(f"dlpipe: error: {exc}", file=sys.stderr)
        code = 1
    except Interrupted as exc:
        print(f"dlpipe: {exc}; nothing was written", file=sys.stderr)
        code = 128 + exc.signum
    sys.exit(code)
