"""The HTTP service (FastAPI): predictions, model listing, health and readiness, Prometheus metrics, and
an admin reload. Every error is a JSON body `{"error": ..., "status": ...}` naming what was wrong.

Request bodies are capped while they stream in (413 before the whole body is held); parsing and
inference run in the thread pool (onnxruntime releases the GIL), so one slow request does not hold the
event loop.
"""

from __future__ import annotations

import hmac
import logging
import threading
import time
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from starlette.exceptions import HTTPException

from dlpipe.serving.models import ModelStore, ServedModel
from dlpipe.serving.requests import JSON, answer, merge, parse
from dlpipe.serving.tasks import BadRequest, Limits

log = logging.getLogger("dlpipe.serving")
MULTIPART = "multipart/form-data"
# Latency buckets (seconds) from sub-millisecond CPU inference to a slow batch.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


def error(message: str, status: int) -> JSONResponse:
    return JSONResponse({"error": message, "status": status}, status_code=status)


class BodyLimit:
    """ASGI middleware: a body over `max_bytes` (declared or streamed) is refused with 413 unread."""

    def __init__(self, app, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            size = declared.decode(errors="replace")
            message = f"the body ({size} bytes) is over {self.max_bytes} bytes (serve.max_body_bytes)"
            await error(message, 413)(scope, receive, send)
            return
        received = 0

        async def limited_receive():
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_bytes:  # a chunked body with no Content-Length
                raise BadRequest(f"the body is over {self.max_bytes} bytes (serve.max_body_bytes)", status=413)
            return message

        try:
            await self.app(scope, limited_receive, send)
        except BadRequest as exc:  # raised while a handler outside `predict` read the body
            await error(str(exc), exc.status)(scope, receive, send)


class Metrics:
    """Prometheus metrics of one app (its own registry, so several apps in one process do not collide)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "dlpipe_requests",
            "Prediction requests by model and HTTP status.",
            ["model", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "dlpipe_request_duration_seconds",
            "Prediction request latency (body read, parsing, inference, answer).",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.swaps = Counter(
            "dlpipe_model_swaps", "Versions switched to after the first.", ["model"], registry=self.registry
        )


async def _form_batch(request: Request, served: ServedModel, limits: Limits):
    """Every file part of a multipart upload, through the model's adapter, as one batch."""
    try:
        form = await request.form(max_files=limits.max_batch, max_fields=limits.max_batch)
    except HTTPException as exc:  # malformed multipart, too many parts
        raise BadRequest(f"not a readable multipart upload ({exc.detail})") from None
    uploads = [value for _, value in form.multi_items() if not isinstance(value, str)]
    if not uploads:
        raise BadRequest("the multipart upload holds no file")
    batches, rows = [], 0
    for upload in uploads:
        data = await upload.read()
        media_type = (upload.content_type or "").split(";")[0].strip().lower()
        query = dict(request.query_params)
        batches.append(await run_in_threadpool(parse, served, media_type, data, query, limits))
        rows += len(batches[-1].inputs)
        if rows > limits.max_batch:  # each part is checked alone; the request as a whole is one batch too
            raise BadRequest(
                f"{rows} inputs in the first {len(batches)} parts of one request; the limit is {limits.max_batch}"
                " (serve.max_batch)"
            )
    return merge(batches)


def create_app(
    store: ModelStore, limits: Limits, max_body_bytes: int, poll_seconds: float, admin_token: str | None
) -> FastAPI:
    """The service over `store`. Models load in the background from startup (`/readyz` says when); with
    `poll_seconds` > 0 each source is checked again that often and a new version swapped in."""
    metrics = Metrics()
    stop = threading.Event()

    def background() -> None:
        store.refresh_all()
        if poll_seconds > 0:
            store.poll(poll_seconds, stop)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        thread = threading.Thread(target=background, name="dlpipe-model-poller", daemon=True)
        thread.start()
        yield
        stop.set()

    app = FastAPI(title="dlpipe serving", lifespan=lifespan)
    app.add_middleware(BodyLimit, max_bytes=max_body_bytes)
    app.state.store, app.state.metrics = store, metrics
    store.on_swap = lambda name: metrics.swaps.labels(name).inc()

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        message = f"no route {request.method} {request.url.path}" if exc.status_code in (404, 405) else str(exc.detail)
        return error(message, exc.status_code)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        return error(f"{'.'.join(map(str, first['loc']))}: {first['msg']}", 400)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        return error(f"internal error ({type(exc).__name__})", 500)

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz")
    def readyz() -> JSONResponse:
        waiting = {name: store.status[name].error or "loading" for name in store.sources if store.get(name) is None}
        return JSONResponse({"ready": not waiting, "waiting": waiting}, status_code=200 if not waiting else 503)

    def listing(name: str) -> dict[str, Any]:
        served, status = store.get(name), store.status[name]
        entry = served.describe() if served else {"name": name, "source": store.sources[name].description}
        alias = getattr(store.sources[name], "alias", None)  # registry sources: the alias followed
        return {
            **entry,
            "alias": alias,
            "loaded": served is not None,
            "last_error": status.error,
            "swaps": status.swaps,
        }

    @app.get("/v1/models")
    def models() -> dict[str, Any]:
        return {"models": [listing(name) for name in store.sources]}

    @app.get("/v1/models/{name}")
    def model(name: str) -> JSONResponse:
        if name not in store.sources:
            return error(f"unknown model {name!r}; served: {', '.join(store.sources)}", 404)
        return JSONResponse(listing(name))

    @app.post("/v1/models/{name}/predict")
    async def predict(name: str, request: Request) -> JSONResponse:
        started, label = time.perf_counter(), name if name in store.sources else "unknown"
        try:
            if name not in store.sources:
                raise BadRequest(f"unknown model {name!r}; served: {', '.join(store.sources)}", status=404)
            served = store.get(name)  # once: this request finishes on this version, whatever swaps meanwhile
            if served is None:
                raise BadRequest(f"model {name!r} is not loaded ({store.status[name].error or 'loading'})", status=503)
            media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
            if media_type == MULTIPART:
                batch = await _form_batch(request, served, limits)
                result = await run_in_threadpool(answer, served, batch)
            else:
                body, query = await request.body(), dict(request.query_params)
                # Parsing and inference in one trip to the thread pool: each trip is a queue to wait in.
                result = await run_in_threadpool(
                    lambda: answer(served, parse(served, media_type or JSON, body, query, limits))
                )
            response = JSONResponse(result)
        except BadRequest as exc:
            response = error(str(exc), exc.status)
        except Exception as exc:  # a bug, not the client's fault: counted, logged with its traceback, 500
            log.exception("%s: prediction failed", name)
            response = error(f"internal error ({type(exc).__name__})", 500)
        metrics.requests.labels(label, str(response.status_code)).inc()
        metrics.latency.labels(label).observe(time.perf_counter() - started)
        return response

    @app.post("/v1/admin/reload")
    async def reload(request: Request, model: str | None = None) -> JSONResponse:
        if admin_token is not None:
            given = request.headers.get("authorization", "").removeprefix("Bearer ").strip()
            if not hmac.compare_digest(given.encode(), admin_token.encode()):
                return error("admin endpoints need 'Authorization: Bearer <DLPIPE_ADMIN_TOKEN>'", 401)
        if model is not None and model not in store.sources:
            return error(f"unknown model {model!r}; served: {', '.join(store.sources)}", 404)
        names = [model] if model else list(store.sources)
        results = {}
        for name in names:
            results[name] = await run_in_threadpool(store.refresh, name)
        return JSONResponse({"models": results})

    @app.get("/metrics")
    def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app
