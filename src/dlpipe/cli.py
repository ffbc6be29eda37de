"""`python -m dlpipe <stage> [model]` and the `dlpipe` command.

Exit codes: 0 success; 2 bad input (one line on stderr naming the key, file or value; nothing written).
"""

from __future__ import annotations

import argparse
import sys

from dlpipe import console, stages
from dlpipe.config import PARAMS_ENV
from dlpipe.errors import DlpipeError, Interrupted

# Commands beside the stages (dlpipe.stages.COMMANDS): they read or move registry state, DVC tracks nothing.
COMMANDS = {
    "models": "list the registered networks",
    "compare": "one table of every model from MLflow (also reports/compare.csv)",
    "promote": "point the champion alias at MODEL VERSION",
    "rollback": "give the champion alias back to the previous champion of MODEL",
    "serve": "serve the champions over HTTP (see `dlpipe serve --help`)",
    "predict": "predict on files: `dlpipe predict MODEL FILE...` (see `dlpipe predict --help`)",
    "generate": "images from an exported generator: `dlpipe generate --n N --seed S --out DIR|grid.png`",
}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dlpipe", description="Run one stage of the dlpipe pipeline (as dvc.yaml does).")
    commands = "; ".join(f"'{name}' to {what}" for name, what in COMMANDS.items())
    p.add_argument("stage", choices=(*stages.STAGES, *COMMANDS), help=f"pipeline stage to run, or {commands}")
    p.add_argument("model", nargs="?", help="model name for train / export / evaluate (see `dlpipe models`)")
    p.add_argument("version", nargs="?", help="registry version for promote")
    p.add_argument("--params", default=None, help=f"params file (default: ${PARAMS_ENV}, else ./params.yaml)")
    return p


def run(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in stages.ARGV_COMMANDS:
        return stages.ARGV_COMMANDS[argv[0]](argv[1:])
    args = parser().parse_args(argv)
    if args.stage == "models":
        from dlpipe.models import get_spec, list_models

        names = list_models()
        width = max(map(len, names))
        for name in names:
            spec = get_spec(name)
            print(f"{name:{width}s}  {spec.task:11s} {spec.summary}")
        return 0
    if args.stage in ("compare", "promote", "rollback"):
        return registry_command(args)
    if args.version:
        raise DlpipeError(f"stage {args.stage!r} takes no version (got {args.version!r})")
    if args.stage in stages.MODEL_STAGES and not args.model:
        raise DlpipeError(f"stage {args.stage!r} needs a model name, e.g. `dlpipe {args.stage} cnn`")
    if args.stage not in stages.MODEL_STAGES and args.model:
        raise DlpipeError(f"stage {args.stage!r} takes no model name (got {args.model!r})")

    from dlpipe.config import load_config

    config = load_config(args.params)
    if args.model:
        config.selected_models([args.model])

    stage = stages.STAGES[args.stage]
    result = stage(config, args.model) if args.model else stage(config)
    console.log_summary(config, args.stage, args.model, result)
    return 0


def registry_command(args: argparse.Namespace) -> int:
    from dlpipe.config import load_config

    config = load_config(args.params)
    if args.stage == "compare" and args.model:
        raise DlpipeError(f"compare takes no model name (got {args.model!r})")
    if args.stage != "compare" and (not args.model or (args.stage == "promote") != bool(args.version)):
        usage = "dlpipe promote MODEL VERSION" if args.stage == "promote" else "dlpipe rollback MODEL"
        raise DlpipeError(f"usage: {usage}")
    command = stages.COMMANDS[args.stage]
    print(command(config, *(a for a in (args.model, args.version) if a)))
    return 0


def main(argv: list[str] | None = None) -> None:
    console.setup_logging()
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
