"""`dlpipe serve` (the HTTP service) and `dlpipe predict MODEL FILE...` (the same code path on files).

Both read params with `load_serving_config` (the `models`, `generators`, `mlflow` and `serve` sections): no
torch. A generator is served too (`{"n", "seed", "format"}` in, images out); `dlpipe predict` refuses one.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from dlpipe.config import ServingConfig, load_serving_config
from dlpipe.errors import DlpipeError
from dlpipe.serving.models import FileSource, RegistrySource, Source, load_version
from dlpipe.serving.requests import answer, parse
from dlpipe.serving.tasks import BadRequest, Limits

ADMIN_TOKEN_ENV = "DLPIPE_ADMIN_TOKEN"  # when set, POST /v1/admin/reload needs it as a bearer token


def limits_of(config: ServingConfig) -> Limits:
    serve = config.params.serve
    return Limits(max_batch=serve.max_batch, max_image_pixels=serve.max_image_pixels)


def servable_models(config: ServingConfig) -> list[str]:
    """Every model the registry can serve: `models`, then `generators`, in params order."""
    return [*config.params.models, *config.params.generators]


def registry_source(config: ServingConfig, model: str) -> RegistrySource:
    from dlpipe.tracking import registered_name, tracking_uri

    if model not in servable_models(config):
        raise DlpipeError(
            f"unknown model {model!r}: not in models or generators of {config.params_file}"
            f" ({', '.join(servable_models(config))})"
        )
    return RegistrySource(tracking_uri(config), registered_name(model), config.params.serve.alias)


def file_sources(specs: list[str]) -> dict[str, Source]:
    sources: dict[str, Source] = {}
    for spec in specs:
        name, _, path = spec.partition("=")
        if not name or not path:
            raise DlpipeError(f"--file {spec!r}: expected NAME=PATH.onnx")
        if not Path(path).is_file():
            raise DlpipeError(f"--file {spec!r}: {path}: file not found")
        sources[name] = FileSource(Path(path).resolve())
    return sources


def serve_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="dlpipe serve",
        description="Serve models over HTTP: each model's registry alias (serve.alias: champion), or ONNX files.",
    )
    p.add_argument("--params", default=None, help="params file (default: $DLPIPE_PARAMS, else ./params.yaml)")
    p.add_argument("--host", default=None, help="interface to listen on (default: serve.host)")
    p.add_argument("--port", type=int, default=None, help="port (default: serve.port)")
    p.add_argument(
        "--models",
        default=None,
        help="comma-separated models to serve from the registry (default: serve.models, else every model of"
        " `models` and `generators`)",
    )
    p.add_argument(
        "--file", action="append", default=[], metavar="NAME=PATH", help="serve an ONNX file as NAME (repeatable)"
    )
    p.add_argument(
        "--poll", type=float, default=None, help="seconds between alias checks; 0: only POST /v1/admin/reload"
    )
    return p


def serve(argv: list[str]) -> int:
    import uvicorn

    from dlpipe.serving.app import create_app
    from dlpipe.serving.models import ModelStore

    args = serve_parser().parse_args(argv)
    config = load_serving_config(args.params)
    settings = config.params.serve
    if args.file:
        sources = file_sources(args.file)
    else:
        names = args.models.split(",") if args.models else settings.models or servable_models(config)
        sources = {name: registry_source(config, name) for name in names}
    store = ModelStore(sources, tuple(settings.providers), settings.threads)
    poll = settings.poll_seconds if args.poll is None else args.poll
    app = create_app(store, limits_of(config), settings.max_body_bytes, poll, os.environ.get(ADMIN_TOKEN_ENV))
    host, port = args.host or settings.host, settings.port if args.port is None else args.port
    print(f"dlpipe: serving {', '.join(sources)} on http://{host}:{port} (models load in the background: GET /readyz)")
    logging.getLogger("dlpipe.serving").setLevel(logging.INFO)
    uvicorn.run(app, host=host, port=port, log_level="info")
    return 0


def predict_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="dlpipe predict",
        description="Predict on files with a served model (one JSON line per file), through the service's code path.",
    )
    p.add_argument("model", help="model name (its registry alias serve.alias is used unless --file is given)")
    p.add_argument(
        "files",
        nargs="+",
        type=Path,
        help="images (PNG or JPEG) for classifiers; OHLCV CSV files for forecasters (generators: `dlpipe generate`)",
    )
    p.add_argument("--file", dest="onnx", type=Path, default=None, help="an ONNX file instead of the registry")
    p.add_argument(
        "--ticker", default=None, help="forecasters: the CSV files' ticker (default: each file's name, e.g. GOOG.csv)"
    )
    p.add_argument("--params", default=None, help="params file (default: $DLPIPE_PARAMS, else ./params.yaml)")
    return p


def predict(argv: list[str]) -> int:
    args = predict_parser().parse_args(argv)
    config = load_serving_config(args.params)
    if args.onnx is not None and not args.onnx.is_file():
        raise DlpipeError(f"--file {args.onnx}: file not found")
    source = FileSource(args.onnx) if args.onnx is not None else registry_source(config, args.model)
    settings = config.params.serve
    served = load_version(args.model, source, source.current(), tuple(settings.providers), settings.threads)
    failed = 0
    for path in args.files:
        try:
            if not path.is_file():
                raise DlpipeError("file not found")
            query = {"ticker": args.ticker or path.stem.upper()}
            batch = parse(served, served.adapter.media_type_of(path), path.read_bytes(), query, limits_of(config))
            result = answer(served, batch)
        except (BadRequest, DlpipeError, OSError) as exc:
            print(f"dlpipe: error: {path}: {str(exc).removeprefix(f'{path}: ')}", file=sys.stderr)
            failed += 1
            continue
        for prediction in result["predictions"]:
            print(json.dumps({"file": str(path), "model": served.name, "version": served.version, **prediction}))
    return 2 if failed else 0
