"""Malformed requests to `dlpipe serve`: each one (bad pixels, bad JSON, bad base64, damaged or oversized
images, oversized bodies and batches, wrong routes and content types, bad price rows and CSV files) gets
the status it deserves and a JSON body `{"error", "status"}` naming what was wrong, never a 500, and the
service answers a valid request right after. And `dlpipe predict` on files answers as the service does,
with one line per file and one `dlpipe: error: FILE: ...` line per bad file (exit code 2)."""

from __future__ import annotations

import base64
import io
import json
import struct
import subprocess
import sys
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

from serving import copy_project, running_server, serving_env

# Smaller than the defaults, so the 413 and batch cases are cheap to send.
MAX_BODY = 2 * 1024 * 1024
MAX_BATCH = 16
MAX_PIXELS = 4096 * 4096  # serve.max_image_pixels (the default)
CNN = "/v1/models/cnn/predict"
LSTM = "/v1/models/lstm/predict"
JSON = "application/json"
ROWS_NEEDED = 11  # lstm: window 10 + 1


@dataclass(frozen=True)
class Samples:
    """Valid inputs from the built project, for the cases to damage."""

    image: np.ndarray  # (28, 28) uint8: a test image
    png: bytes  # that image as a PNG file
    rows: list[dict[str, Any]]  # the last ROWS_NEEDED days of GOOG as JSON rows
    csv: bytes  # those days as a CSV file


@pytest.fixture(scope="module")
def built(built_project, tmp_path_factory) -> Path:
    """A tiny trained project whose params hold the serving limits above (only the server reads `serve`)."""
    root = copy_project(built_project, tmp_path_factory.mktemp("serving_requests") / "project")
    params_file = root / "params.yaml"
    params = yaml.safe_load(params_file.read_text())
    params["serve"].update(max_body_bytes=MAX_BODY, max_batch=MAX_BATCH, max_image_pixels=MAX_PIXELS, threads=1)
    params_file.write_text(yaml.safe_dump(params, sort_keys=False))
    return root


@pytest.fixture(scope="module")
def samples(built) -> Samples:
    with np.load(built / "data" / "images" / "raw" / "test.npz") as split:
        image = split["x"][0, 0]
    prices = pd.read_csv(built / "data" / "stocks" / "raw" / "GOOG.csv").tail(ROWS_NEEDED)
    png = encode(image)
    assert len(png) > 100  # the truncated case cuts it at 100 bytes
    return Samples(image, png, json.loads(prices.to_json(orient="records")), prices.to_csv(index=False).encode())


@pytest.fixture(scope="module")
def client(built) -> Iterator[httpx.Client]:
    with running_server(built, "--poll", "0") as url, httpx.Client(base_url=url, timeout=30) as client:
        yield client


# ------------------------------------------------------------------------------------------------ inputs
def encode(pixels: np.ndarray, image_format: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, image_format)
    return buffer.getvalue()


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_claiming(width: int, height: int) -> bytes:
    """A small, well-formed PNG whose header declares `width` x `height` grayscale pixels."""
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", header)
        + png_chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + png_chunk(b"IEND", b"")
    )


def bad_crc(png: bytes) -> bytes:
    damaged = bytearray(png)
    damaged[29] ^= 0xFF  # the last byte of IHDR's CRC
    return bytes(damaged)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def grid(value: Any, height: int = 28, width: int = 28) -> list[list[Any]]:
    return [[value] * width for _ in range(height)]


def with_pixel(value: Any) -> list[list[Any]]:
    pixels = grid(0)
    pixels[3][5] = value
    return pixels


def nested(depth: int) -> Any:
    value: Any = 0
    for _ in range(depth):
        value = [value]
    return value


def chunks(total: int, head: bytes = b"") -> Iterator[bytes]:
    """A body streamed without Content-Length (httpx sends a generator chunked)."""
    yield head
    for _ in range(total // 65536 + 1):
        yield b"x" * 65536


def multipart_body(*parts: tuple[str, str | None, str | None, bytes], boundary: str = "dlpipe-boundary") -> bytes:
    """Parts of (field name, file name or None for a text field, content type or None, data)."""
    body = b""
    for name, filename, content_type, data in parts:
        disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
        body += f"--{boundary}\r\nContent-Disposition: {disposition}\r\n".encode()
        body += f"Content-Type: {content_type}\r\n".encode() if content_type else b""
        body += b"\r\n" + data + b"\r\n"
    return body + f"--{boundary}--\r\n".encode()


MULTIPART = "multipart/form-data; boundary=dlpipe-boundary"
# The head of a file part whose data never ends (for a multipart body streamed over the limit).
PART_HEAD = b'--dlpipe-boundary\r\nContent-Disposition: form-data; name="f"; filename="a.png"\r\n\r\n'

Request = Callable[[Samples], dict[str, Any]]


def payload(value: Any) -> Request:
    return lambda s: {"json": value}


def raw(content: bytes | Callable[[Samples], bytes], content_type: str | None = JSON, **params: str) -> Request:
    """A body of `content_type` (None: no Content-Type header)."""

    def request(s: Samples) -> dict[str, Any]:
        headers = {"Content-Type": content_type} if content_type else {}
        return {"content": content(s) if callable(content) else content, "headers": headers, "params": params}

    return request


def images(*encoded: str | Callable[[Samples], str]) -> Request:
    return lambda s: {"json": {"images": [e(s) if callable(e) else e for e in encoded]}}


def parts(*make: Callable[[Samples], tuple[str, str | None, str | None, bytes]]) -> Request:
    return lambda s: {"content": multipart_body(*(m(s) for m in make)), "headers": {"Content-Type": MULTIPART}}


def file_part(data: Callable[[Samples], bytes], content_type: str | None = "image/png", name: str = "a.png"):
    return lambda s: ("file", name, content_type, data(s))


def rows_where(change: Callable[[list[dict[str, Any]]], Any], ticker: Any = "GOOG") -> Request:
    """The GOOG rows after `change` (which edits them in place) as one {ticker, rows} request."""

    def request(s: Samples) -> dict[str, Any]:
        rows = [dict(row) for row in s.rows]
        change(rows)
        return {"json": {"ticker": ticker, "rows": rows}}

    return request


def csv_where(change: Callable[[pd.DataFrame], pd.DataFrame], **params: str) -> Request:
    def content(s: Samples) -> bytes:
        return change(pd.read_csv(io.BytesIO(s.csv))).to_csv(index=False).encode()

    return raw(content, "text/csv", **params)


def set_row(index: int, **values: Any) -> Callable[[list[dict[str, Any]]], None]:
    return lambda rows: rows[index].update(values)


def drop_key(key: str) -> Callable[[list[dict[str, Any]]], None]:
    return lambda rows: [row.pop(key) for row in rows]


def good_instance(s: Samples) -> dict[str, Any]:
    return {"ticker": "GOOG", "rows": s.rows}


# ------------------------------------------------------------------------------------------------- cases
@dataclass(frozen=True)
class Case:
    id: str
    path: str
    status: int
    error: str  # a substring the JSON `error` must hold
    request: Request
    method: str = "POST"


BIG = 10**400  # an integer no float holds
CASES = [
    # --- classifier pixel arrays: dtype
    Case(
        "pixels-float",
        CNN,
        400,
        "instances[0]: pixel values must be integers 0..255, got fractional",
        payload({"instances": [grid(0.5)]}),
    ),
    Case("pixels-integral-float", CNN, 400, "got fractional numbers", payload({"instances": [grid(1.0)]})),
    Case("pixels-one-float", CNN, 400, "got fractional numbers", payload({"instances": [with_pixel(0.5)]})),
    Case("pixels-string", CNN, 400, "got strings", payload({"instances": [grid("7")]})),
    Case("pixels-one-string", CNN, 400, "got strings", payload({"instances": [with_pixel("7")]})),
    Case("pixels-boolean", CNN, 400, "got booleans", payload({"instances": [grid(True)]})),
    Case("pixels-object", CNN, 400, "got mixed or ragged values", payload({"instances": [grid({"v": 1})]})),
    Case("pixels-null", CNN, 400, "got mixed or ragged values", payload({"instances": [grid(None)]})),
    Case("pixels-one-null", CNN, 400, "got mixed or ragged values", payload({"instances": [with_pixel(None)]})),
    Case(
        "pixels-huge-integer",
        CNN,
        400,
        "instances[0]: pixel values must lie in 0..255, got 0..1000000000000000000000000000000",
        payload({"instances": [with_pixel(10**30)]}),
    ),
    Case("instance-null", CNN, 400, "instances[0]: pixel values", payload({"instances": [None]})),
    Case(
        "instance-string",
        CNN,
        400,
        "instances[0]: pixel values must be integers 0..255, got strings",
        payload({"instances": ["abc"]}),
    ),
    Case("second-instance-bad", CNN, 400, "instances[1]: ", payload({"instances": [grid(0), grid(0.5)]})),
    # --- rank and shape
    Case("rank-0", CNN, 400, "instances[0]: shape ()", payload({"instances": [7]})),
    Case(
        "rank-1", CNN, 400, "instances[0]: shape (784,); the model takes (28, 28)", payload({"instances": [[0] * 784]})
    ),
    Case("rank-4", CNN, 400, "shape (1, 28, 28, 1)", payload({"instances": [np.zeros((1, 28, 28, 1), int).tolist()]})),
    Case(
        "shape-27x28",
        CNN,
        400,
        "shape (27, 28); the model takes (28, 28)",
        payload({"instances": [grid(0, height=27)]}),
    ),
    Case("shape-28x27", CNN, 400, "shape (28, 27)", payload({"instances": [grid(0, width=27)]})),
    Case(
        "shape-rgb-for-grayscale",
        CNN,
        400,
        "shape (28, 28, 3)",
        payload({"instances": [np.zeros((28, 28, 3), int).tolist()]}),
    ),
    Case("shape-channels-first", CNN, 400, "shape (1, 28, 28)", payload({"instances": [[grid(0)]]})),
    Case("shape-empty-array", CNN, 400, "instances[0]: shape (0,)", payload({"instances": [[]]})),
    Case(
        "shape-empty-rows", CNN, 400, "instances[0]: shape (28, 0)", payload({"instances": [[[] for _ in range(28)]]})
    ),
    Case("nested-past-numpy-dims", CNN, 400, "instances[0]: ", payload({"instances": [nested(100)]})),
    # --- values and raggedness
    Case(
        "value-negative",
        CNN,
        400,
        "pixel values must lie in 0..255, got -1..0",
        payload({"instances": [with_pixel(-1)]}),
    ),
    Case(
        "value-256", CNN, 400, "pixel values must lie in 0..255, got 0..256", payload({"instances": [with_pixel(256)]})
    ),
    Case("value-uint64", CNN, 400, "must lie in 0..255", payload({"instances": [with_pixel(2**63)]})),
    Case(
        "ragged-row",
        CNN,
        400,
        "instances[0]: not a rectangular array",
        payload({"instances": [[*grid(0, height=27), [0] * 27]]}),
    ),
    Case(
        "ragged-depth",
        CNN,
        400,
        "instances[0]: not a rectangular array",
        payload({"instances": [[*grid(0, height=27), 0]]}),
    ),
    # --- the payload's structure
    Case("instances-empty", CNN, 400, "'instances' is empty", payload({"instances": []})),
    Case("instances-string", CNN, 400, "'instances' must be a list", payload({"instances": "abc"})),
    Case("instances-object", CNN, 400, "'instances' must be a list", payload({"instances": {"a": grid(0)}})),
    Case("instances-null", CNN, 400, "'instances' must be a list", payload({"instances": None})),
    Case("neither-key", CNN, 400, "give either 'instances'", payload({})),
    Case("neither-key-other-name", CNN, 400, "give either 'instances'", payload({"inputs": [grid(0)]})),
    Case(
        "both-keys",
        CNN,
        400,
        "give either 'instances'",
        lambda s: {"json": {"instances": [grid(0)], "images": [b64(s.png)]}},
    ),
    Case("top-level-array", CNN, 400, "expected a JSON object with 'instances', got list", payload([grid(0)])),
    Case("top-level-number", CNN, 400, "expected a JSON object with 'instances', got int", payload(42)),
    Case("top-level-string", CNN, 400, "expected a JSON object with 'instances', got str", payload("abc")),
    Case("top-level-null", CNN, 400, "expected a JSON object with 'instances', got NoneType", raw(b"null")),
    Case(
        "instances-over-max-batch",
        CNN,
        400,
        f"{MAX_BATCH + 1} instances in one request; the limit is {MAX_BATCH}",
        payload({"instances": [grid(0)] * (MAX_BATCH + 1)}),
    ),
    Case(
        "images-over-max-batch",
        CNN,
        400,
        f"{MAX_BATCH + 1} images in one request; the limit is {MAX_BATCH}",
        lambda s: {"json": {"images": [b64(s.png)] * (MAX_BATCH + 1)}},
    ),
    # --- the body as bytes
    Case("empty-json", CNN, 400, "the request body is empty", raw(b"")),
    Case("empty-no-content-type", CNN, 400, "the request body is empty", raw(b"", None)),
    Case("empty-png", CNN, 400, "the request body is empty", raw(b"", "image/png")),
    Case("empty-jpeg", CNN, 400, "the request body is empty", raw(b"", "image/jpeg")),
    Case("empty-multipart", CNN, 400, "the multipart upload holds no file", raw(b"", MULTIPART)),
    Case("empty-json-forecaster", LSTM, 400, "the request body is empty", raw(b"")),
    Case("empty-csv", LSTM, 400, "the request body is empty", raw(b"", "text/csv", ticker="GOOG")),
    Case("invalid-json", CNN, 400, "not valid JSON", raw(b'{"instances": [')),
    Case("invalid-json-extra-data", CNN, 400, "not valid JSON: Extra data", raw(b'{"instances": []} trailing')),
    Case("invalid-json-single-quotes", CNN, 400, "not valid JSON", raw(b"{'instances': []}")),
    Case(
        "invalid-json-control-character",
        CNN,
        400,
        "not valid JSON: Invalid control character",
        raw(b'{"instances": "a\tb"}'),
    ),
    Case("json-not-utf8", CNN, 400, "the JSON body is not UTF-8", raw('{"instances": "café"}'.encode("latin-1"))),
    Case("json-nan", CNN, 400, "NaN is not a number a model can take", raw(b'{"instances": [[NaN]]}')),
    Case("json-infinity", CNN, 400, "Infinity is not a number a model can take", raw(b'{"instances": [[Infinity]]}')),
    Case(
        "json-minus-infinity",
        CNN,
        400,
        "-Infinity is not a number a model can take",
        raw(b'{"instances": [[-Infinity]]}'),
    ),
    Case("json-nan-forecaster", LSTM, 400, "NaN is not a number", raw(b'{"ticker": "GOOG", "rows": [{"Close": NaN}]}')),
    Case("json-nested-100000", CNN, 400, "the JSON body is nested too deeply", raw(b"[" * 100_000)),
    Case(
        "json-nested-100000-balanced",
        CNN,
        400,
        "nested too deeply",
        raw(b'{"instances": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"),
    ),
    Case("json-integer-of-5000-digits", CNN, 400, "not valid JSON", raw(b'{"instances": [1' + b"1" * 5000 + b"]}")),
    # --- base64 images
    Case("base64-non-alphabet", CNN, 400, "images[0]: not valid base64", images("!!!not*base64!!!")),
    Case(
        "base64-missing-padding",
        CNN,
        400,
        "images[0]: not valid base64",
        images(lambda s: b64(s.png + b"\0" * ((1 - len(s.png)) % 3)).rstrip("=")),
    ),
    Case(
        "base64-padding-inside",
        CNN,
        400,
        "images[0]: not valid base64",
        images(lambda s: b64(s.png)[:8] + "=" + b64(s.png)[8:]),
    ),
    Case("base64-no-padding", CNN, 400, "images[0]: not valid base64", images("abc")),
    Case(
        "base64-data-url",
        CNN,
        400,
        "images[0]: not valid base64",
        images(lambda s: "data:image/png;base64," + b64(s.png)),
    ),
    Case("base64-not-a-string", CNN, 400, "images[0]: expected a base64 string, got int", images(123)),
    Case(
        "base64-of-text", CNN, 400, "images[0]: not a readable PNG or JPEG image", images(b64(b"hello, not an image"))
    ),
    Case("base64-empty", CNN, 400, "images[0]: empty file", images("")),
    Case("base64-truncated-png", CNN, 400, "images[0]: not a readable image", images(lambda s: b64(s.png[:100]))),
    Case(
        "base64-second-bad",
        CNN,
        400,
        "images[1]: not a readable PNG or JPEG",
        images(lambda s: b64(s.png), b64(b"GIF89a")),
    ),
    Case("images-not-a-list", CNN, 400, "'images' must be a list", payload({"images": "abc"})),
    Case("images-empty", CNN, 400, "'images' is empty", payload({"images": []})),
    # --- image uploads
    Case("png-truncated", CNN, 400, "image: not a readable image", raw(lambda s: s.png[:100], "image/png")),
    Case("png-signature-only", CNN, 400, "image: not a readable", raw(b"\x89PNG\r\n\x1a\n", "image/png")),
    Case("png-bad-crc", CNN, 400, "image: not a readable", raw(lambda s: bad_crc(s.png), "image/png")),
    Case(
        "png-claims-50000x50000", CNN, 400, f"over {MAX_PIXELS} pixels", raw(png_claiming(50_000, 50_000), "image/png")
    ),
    Case(
        "png-claims-5000x5000",
        CNN,
        400,
        f"5000x5000 pixels, over {MAX_PIXELS}",
        raw(png_claiming(5000, 5000), "image/png"),
    ),
    Case(
        "png-wrong-size",
        CNN,
        400,
        "image is 30x30 pixels; the model takes 28x28",
        raw(encode(np.zeros((30, 30), np.uint8)), "image/png"),
    ),
    Case("png-random-bytes", CNN, 400, "not a readable PNG or JPEG image", raw(bytes(range(256)) * 4, "image/png")),
    Case(
        "jpeg-truncated",
        CNN,
        400,
        "image: not a readable image",
        raw(lambda s: encode(s.image, "JPEG")[:150], "image/jpeg"),
    ),
    Case("gif", CNN, 400, "not a readable PNG or JPEG image", raw(lambda s: encode(s.image, "GIF"), "image/png")),
    Case("bmp", CNN, 400, "not a readable PNG or JPEG image", raw(lambda s: encode(s.image, "BMP"), "image/jpeg")),
    Case("tiff", CNN, 400, "not a readable PNG or JPEG image", raw(lambda s: encode(s.image, "TIFF"), "image/png")),
    Case(
        "gif-content-type",
        CNN,
        415,
        "content type 'image/gif' is not one this model takes",
        raw(lambda s: encode(s.image, "GIF"), "image/gif"),
    ),
    # --- content types
    Case(
        "text-plain",
        CNN,
        415,
        "content type 'text/plain' is not one this model takes",
        raw(b'{"instances": []}', "text/plain"),
    ),
    Case("application-xml", CNN, 415, "content type 'application/xml'", raw(b"<instances/>", "application/xml")),
    Case(
        "form-urlencoded",
        CNN,
        415,
        "content type 'application/x-www-form-urlencoded'",
        raw(b"a=1", "application/x-www-form-urlencoded"),
    ),
    Case(
        "octet-stream",
        CNN,
        415,
        "content type 'application/octet-stream'",
        raw(lambda s: s.png, "application/octet-stream"),
    ),
    Case("csv-to-classifier", CNN, 415, "content type 'text/csv'", raw(lambda s: s.csv, "text/csv", ticker="GOOG")),
    Case(
        "png-to-forecaster",
        LSTM,
        415,
        "content type 'image/png' is not one this model takes (application/json, text/csv)",
        raw(lambda s: s.png, "image/png"),
    ),
    Case("multipart-to-forecaster-png", LSTM, 415, "content type 'image/png'", parts(file_part(lambda s: s.png))),
    # --- routes and methods
    Case(
        "unknown-model",
        "/v1/models/nope/predict",
        404,
        "unknown model 'nope'; served: cnn, lstm",
        payload({"instances": [grid(0)]}),
    ),
    Case("unknown-model-listing", "/v1/models/nope", 404, "unknown model 'nope'", lambda s: {}, "GET"),
    Case("unknown-route", "/v2/models", 404, "no route GET /v2/models", lambda s: {}, "GET"),
    Case("unknown-route-post", "/v1/predict", 404, "no route POST /v1/predict", payload({})),
    Case("get-on-predict", CNN, 405, f"no route GET {CNN}", lambda s: {}, "GET"),
    Case("put-on-predict", CNN, 405, f"no route PUT {CNN}", payload({}), "PUT"),
    Case("delete-on-models", "/v1/models", 405, "no route DELETE /v1/models", lambda s: {}, "DELETE"),
    Case(
        "reload-unknown-model", "/v1/admin/reload", 404, "unknown model 'nope'", lambda s: {"params": {"model": "nope"}}
    ),
    # --- oversized bodies
    Case(
        "body-over-limit-declared",
        CNN,
        413,
        f"the body ({MAX_BODY + 1} bytes) is over {MAX_BODY} bytes",
        raw(b"x" * (MAX_BODY + 1)),
    ),
    Case(
        "png-over-limit-declared",
        CNN,
        413,
        f"is over {MAX_BODY} bytes (serve.max_body_bytes)",
        raw(b"x" * (MAX_BODY + 1), "image/png"),
    ),
    Case("body-over-limit-chunked", CNN, 413, f"the body is over {MAX_BODY} bytes", raw(lambda s: chunks(MAX_BODY))),
    Case(
        "csv-over-limit-chunked",
        LSTM,
        413,
        f"the body is over {MAX_BODY} bytes",
        raw(lambda s: chunks(MAX_BODY), "text/csv", ticker="GOOG"),
    ),
    Case(
        "multipart-over-limit-chunked",
        CNN,
        413,
        f"the body is over {MAX_BODY} bytes",
        raw(
            lambda s: chunks(MAX_BODY, PART_HEAD),
            MULTIPART,
        ),
    ),
    # --- multipart uploads
    Case(
        "multipart-no-file",
        CNN,
        400,
        "the multipart upload holds no file",
        parts(lambda s: ("note", None, None, b"hello")),
    ),
    Case(
        "multipart-no-boundary", CNN, 400, "not a readable multipart upload", raw(b"--x\r\n\r\n", "multipart/form-data")
    ),
    Case("multipart-garbage", CNN, 400, "not a readable multipart upload", raw(b"garbage" * 10, MULTIPART)),
    Case("multipart-truncated-image", CNN, 400, "image: not a readable image", parts(file_part(lambda s: s.png[:100]))),
    Case("multipart-empty-file", CNN, 400, "empty", parts(file_part(lambda s: b""))),
    Case(
        "multipart-wrong-size-among-good",
        CNN,
        400,
        "image is 30x30 pixels",
        parts(
            file_part(lambda s: s.png),
            file_part(lambda s: encode(np.zeros((30, 30), np.uint8))),
            file_part(lambda s: s.png),
        ),
    ),
    Case(
        "multipart-text-file",
        CNN,
        415,
        "content type 'text/plain'",
        parts(file_part(lambda s: b"hello", "text/plain", "a.txt")),
    ),
    Case("multipart-file-without-type", CNN, 415, "content type ''", parts(file_part(lambda s: s.png, None))),
    Case(
        "multipart-over-max-batch",
        CNN,
        400,
        f"Maximum number of files is {MAX_BATCH}",
        parts(*[file_part(lambda s: s.png)] * (MAX_BATCH + 1)),
    ),
    Case(  # each JSON part within serve.max_batch, the request over it
        "multipart-json-parts-over-max-batch",
        CNN,
        400,
        f"the limit is {MAX_BATCH}",
        parts(*[file_part(lambda s: json.dumps({"instances": [grid(0)] * MAX_BATCH}).encode(), JSON, "a.json")] * 2),
    ),
    Case(
        "multipart-too-many-fields",
        CNN,
        400,
        f"Maximum number of fields is {MAX_BATCH}",
        parts(*[lambda s: ("note", None, None, b"x")] * (MAX_BATCH + 1), file_part(lambda s: s.png)),
    ),
    # --- forecaster rows
    Case(
        "ticker-unknown",
        LSTM,
        400,
        "request: ticker 'AAPL' is not one this model was trained on (GOOG, MSFT)",
        rows_where(lambda rows: None, "AAPL"),
    ),
    Case("ticker-lowercase", LSTM, 400, "ticker 'goog' is not one", rows_where(lambda rows: None, "goog")),
    Case("ticker-missing", LSTM, 400, "ticker None is not one", lambda s: {"json": {"rows": s.rows}}),
    Case("ticker-not-a-string", LSTM, 400, "ticker 123 is not one", rows_where(lambda rows: None, 123)),
    Case(
        "rows-too-few",
        LSTM,
        400,
        f"request: 5 days given; the model needs the last {ROWS_NEEDED} (window 10 + 1)",
        rows_where(lambda rows: rows.__delitem__(slice(0, 6))),
    ),
    Case(
        "rows-empty",
        LSTM,
        400,
        "missing column(s) Date, Open, High, Low, Close, Volume",
        rows_where(lambda rows: rows.clear()),
    ),
    Case(
        "rows-not-objects",
        LSTM,
        400,
        "request: each row must be an object with Date, Open, High, Low, Close, Volume",
        lambda s: {"json": {"ticker": "GOOG", "rows": [list(r.values()) for r in s.rows]}},
    ),
    Case(
        "rows-not-a-list",
        LSTM,
        400,
        "request: expected an object with 'ticker' and 'rows'",
        payload({"ticker": "GOOG", "rows": "abc"}),
    ),
    Case(
        "rows-missing", LSTM, 400, "request: expected an object with 'ticker' and 'rows'", payload({"ticker": "GOOG"})
    ),
    Case(
        "forecaster-top-level-array",
        LSTM,
        400,
        "request: expected an object with 'ticker' and 'rows'",
        lambda s: {"json": [good_instance(s)]},
    ),
    Case("column-close-missing", LSTM, 400, "request: missing column(s) Close", rows_where(drop_key("Close"))),
    Case("column-date-missing", LSTM, 400, "request: missing column(s) Date", rows_where(drop_key("Date"))),
    Case("close-abc", LSTM, 400, "missing, non-numeric or infinite Close on", rows_where(set_row(-1, Close="abc"))),
    Case("close-nan-string", LSTM, 400, "missing, non-numeric or infinite Close", rows_where(set_row(-1, Close="NaN"))),
    Case(
        "close-infinity-string",
        LSTM,
        400,
        "missing, non-numeric or infinite Close",
        rows_where(set_row(-1, Close="Infinity")),
    ),
    Case("close-inf-string", LSTM, 400, "missing, non-numeric or infinite Close", rows_where(set_row(-1, Close="inf"))),
    Case("close-null", LSTM, 400, "missing, non-numeric or infinite Close", rows_where(set_row(-1, Close=None))),
    Case(
        "close-object",
        LSTM,
        400,
        "missing, non-numeric or infinite Close",
        rows_where(set_row(-1, Close={"value": 800})),
    ),
    Case("close-boolean", LSTM, 400, "Close holds true/false, not a number", rows_where(set_row(-1, Close=True))),
    Case(
        "close-integer-of-400-digits",
        LSTM,
        400,
        "Close holds a number too large",
        rows_where(set_row(-1, Close=BIG)),
    ),
    Case("open-negative", LSTM, 400, "request: non-positive price on", rows_where(set_row(-1, Open=-5.0))),
    Case("close-zero", LSTM, 400, "non-positive price", rows_where(set_row(4, Close=0))),
    Case("high-below-low", LSTM, 400, "request: High below Low on", rows_where(set_row(-1, High=1.0))),
    Case("volume-negative", LSTM, 400, "request: negative volume on", rows_where(set_row(-1, Volume=-1))),
    Case(
        "dates-duplicate",
        LSTM,
        400,
        "request: duplicate date",
        rows_where(lambda rows: rows[-1].update(Date=rows[-2]["Date"])),
    ),
    Case(
        "date-unparseable", LSTM, 400, "request: unparseable date in row 10", rows_where(set_row(-1, Date="not a date"))
    ),
    Case("date-null", LSTM, 400, "unparseable date in row 10", rows_where(set_row(-1, Date=None))),
    Case(
        "date-mixed-time-zones",
        LSTM,
        400,
        "unparseable date",
        rows_where(set_row(-1, Date="2013-03-01T00:00:00+05:00")),
    ),
    Case(
        "instances-over-max-batch-forecaster",
        LSTM,
        400,
        f"{MAX_BATCH + 1} instances in one request; the limit is {MAX_BATCH}",
        lambda s: {"json": {"instances": [good_instance(s)] * (MAX_BATCH + 1)}},
    ),
    Case("instances-empty-forecaster", LSTM, 400, "'instances' is empty", payload({"instances": []})),
    Case("instances-not-a-list-forecaster", LSTM, 400, "'instances' must be a list", payload({"instances": "GOOG"})),
    Case(
        "instance-not-an-object",
        LSTM,
        400,
        "instances[0]: expected an object with 'ticker' and 'rows'",
        payload({"instances": ["GOOG"]}),
    ),
    Case(
        "second-instance-unknown-ticker",
        LSTM,
        400,
        "instances[1]: ticker 'AAPL'",
        lambda s: {"json": {"instances": [good_instance(s), {**good_instance(s), "ticker": "AAPL"}]}},
    ),
    Case(
        "instances-and-rows",
        LSTM,
        400,
        "give either 'instances'",
        lambda s: {"json": {**good_instance(s), "instances": [good_instance(s)]}},
    ),
    # --- forecaster CSV files
    Case(
        "csv-without-ticker",
        LSTM,
        400,
        "csv: ticker None is not one this model was trained on",
        raw(lambda s: s.csv, "text/csv"),
    ),
    Case(
        "csv-unknown-ticker",
        LSTM,
        400,
        "csv: ticker 'AAPL' is not one",
        raw(lambda s: s.csv, "text/csv", ticker="AAPL"),
    ),
    Case(
        "csv-garbage-bytes",
        LSTM,
        400,
        "not a readable price CSV",
        raw(bytes(range(256)) * 8, "text/csv", ticker="GOOG"),
    ),
    Case(
        "csv-blank-lines",
        LSTM,
        400,
        "not a readable price CSV (No columns to parse from file)",
        raw(b"\n\n\n", "text/csv", ticker="GOOG"),
    ),
    Case("csv-not-a-table", LSTM, 400, "csv: missing column(s) Date", raw(b"hello world\n", "text/csv", ticker="GOOG")),
    Case("csv-header-only", LSTM, 400, "csv: 0 days given", csv_where(lambda frame: frame.iloc[:0], ticker="GOOG")),
    Case("csv-too-few-rows", LSTM, 400, "csv: 5 days given", csv_where(lambda frame: frame.tail(5), ticker="GOOG")),
    Case(
        "csv-missing-volume",
        LSTM,
        400,
        "csv: missing column(s) Volume",
        csv_where(lambda frame: frame.drop(columns="Volume"), ticker="GOOG"),
    ),
    Case(
        "csv-close-abc",
        LSTM,
        400,
        "csv: missing, non-numeric or infinite Close",
        csv_where(lambda frame: frame.assign(Close="abc"), ticker="GOOG"),
    ),
    Case(
        "csv-integer-of-400-digits",
        LSTM,
        400,
        "csv: Volume holds a number too large",
        csv_where(lambda frame: frame.assign(Volume=str(BIG)), ticker="GOOG"),
    ),
]


def assert_serves(client: httpx.Client, samples: Samples) -> None:
    """The service still answers both models."""
    response = client.post(CNN, json={"instances": [samples.image.tolist()]})
    assert response.status_code == 200, response.text
    response = client.post(LSTM, json=good_instance(samples))
    assert response.status_code == 200, response.text


def test_case_ids_are_unique():
    ids = [case.id for case in CASES]
    assert len(ids) == len(set(ids)) >= 60


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_malformed_request_is_refused_by_name(client, samples, case):
    response = client.request(case.method, case.path, **case.request(samples))
    assert response.status_code == case.status, response.text
    assert response.headers["content-type"].startswith(JSON)
    body = response.json()
    assert set(body) == {"error", "status"}, body
    assert body["status"] == case.status
    assert case.error in body["error"], body["error"]
    assert "Traceback" not in body["error"] and "internal error" not in body["error"]
    assert_serves(client, samples)


def test_well_formed_requests_agree(client, samples):
    """The same image as pixels, base64, a PNG body and a multipart file gets the same answer; the same
    days as JSON rows and as a CSV file too (the malformed cases above differ from these only in the damage)."""
    pixels = samples.image.tolist()
    answers = [
        client.post(CNN, json={"instances": [pixels]}),
        client.post(CNN, json={"instances": [[[[value] for value in row] for row in pixels]]}),  # (28, 28, 1)
        client.post(CNN, json={"images": [b64(samples.png)]}),
        client.post(CNN, content=samples.png, headers={"Content-Type": "image/png"}),
        client.post(CNN, files=[("file", ("a.png", samples.png, "image/png"))]),
    ]
    for response in answers:
        assert response.status_code == 200, response.text
    predictions = [response.json()["predictions"] for response in answers]
    assert all(len(p) == 1 for p in predictions)
    assert len({p[0]["class"] for p in predictions}) == 1
    for p in predictions[1:]:
        assert p[0]["probabilities"] == pytest.approx(predictions[0][0]["probabilities"], abs=1e-6)

    rows = client.post(LSTM, json=good_instance(samples))
    csv = client.post(LSTM, content=samples.csv, headers={"Content-Type": "text/csv"}, params={"ticker": "GOOG"})
    assert rows.status_code == csv.status_code == 200, (rows.text, csv.text)
    assert rows.json()["predictions"] == csv.json()["predictions"]
    assert rows.json()["predictions"][0]["persistence"] == samples.rows[-1]["Close"]


def test_forecast_beyond_the_largest_float_is_refused(built, client, samples):
    """A rise from a close near the largest float has no JSON number: the answer is refused by name (a 400
    naming the ticker), not a 500 from the JSON encoder. Any model forecasts some log return, so the
    adapter is given one: a rise of 1 from the largest representable close."""
    from dlpipe.runtime import InputContract, create_session
    from dlpipe.serving.tasks import BadRequest, Batch, adapter_for

    adapter = adapter_for(InputContract.of(create_session(built / "models" / "lstm" / "model.onnx", ("cpu",))))
    context = [{"ticker": "GOOG", "last_close": sys.float_info.max / 2, "last_date": "2020-01-01"}]
    with pytest.raises(BadRequest, match="GOOG: .* beyond the largest number JSON can answer") as caught:
        adapter.answers(np.array([[1.0]], dtype=np.float32), Batch(np.zeros((1, 11, 6), np.float32), context))
    assert caught.value.status == 400
    # A fall from the same close is a number: answered.
    answer = adapter.answers(np.array([[-1.0]], dtype=np.float32), Batch(np.zeros((1, 11, 6), np.float32), context))
    assert answer[0]["next_close"] == pytest.approx(sys.float_info.max / 2 * np.exp(-1.0))
    assert_serves(client, samples)


# -------------------------------------------------------------------------------------------- dlpipe predict
def predict(root: Path, *args: str | Path) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "dlpipe", "predict", *map(str, args)]
    return subprocess.run(command, cwd=root, env=serving_env(), capture_output=True, text=True, timeout=120)


def test_predict_images_answers_as_the_service(built, client, tmp_path):
    with np.load(built / "data" / "images" / "raw" / "test.npz") as split:
        x = split["x"]
    files = []
    for i in range(3):
        path = tmp_path / f"digit-{i}.png"
        path.write_bytes(encode(x[i, 0]))
        files.append(path)
    result = predict(built, "cnn", *files)
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [line["file"] for line in lines] == [str(path) for path in files]
    for line, path in zip(lines, files, strict=True):
        served = client.post(CNN, content=path.read_bytes(), headers={"Content-Type": "image/png"})
        assert served.status_code == 200, served.text
        answer = served.json()
        assert (line["model"], line["version"]) == (answer["model"], answer["version"])
        assert line["class"] == answer["predictions"][0]["class"]
        assert line["probabilities"] == pytest.approx(answer["predictions"][0]["probabilities"], abs=1e-6)


def test_predict_prices_answers_as_the_service(built, client):
    csv = built / "data" / "stocks" / "raw" / "GOOG.csv"
    result = predict(built, "lstm", "data/stocks/raw/GOOG.csv")
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(lines) == 1
    prices = pd.read_csv(csv)
    assert lines[0]["ticker"] == "GOOG"  # from the file name
    assert lines[0]["persistence"] == pytest.approx(prices["Close"].iloc[-1])
    assert lines[0]["last_date"] == prices["Date"].iloc[-1]
    served = client.post(
        LSTM, content=csv.read_bytes(), headers={"Content-Type": "text/csv"}, params={"ticker": "GOOG"}
    )
    assert served.status_code == 200, served.text
    assert lines[0]["next_close"] == pytest.approx(served.json()["predictions"][0]["next_close"], rel=1e-9)
    assert lines[0]["next_close"] > 0


def test_predict_names_each_bad_file_and_answers_the_good_ones(built, samples, tmp_path):
    good, truncated, text, other = (tmp_path / name for name in ("good.png", "cut.png", "notes.txt", "other.png"))
    good.write_bytes(samples.png)
    truncated.write_bytes(samples.png[:100])
    text.write_text("not an image\n")
    other.write_bytes(samples.png)
    result = predict(built, "cnn", good, truncated, text, other)
    assert result.returncode == 2
    assert [json.loads(line)["file"] for line in result.stdout.splitlines()] == [str(good), str(other)], result.stderr
    errors = result.stderr.splitlines()
    assert len(errors) == 2, result.stderr
    assert errors[0].startswith(f"dlpipe: error: {truncated}: ") and "not a readable image" in errors[0]
    assert errors[1].startswith(f"dlpipe: error: {text}: ") and ".png" in errors[1]
    assert "Traceback" not in result.stderr


def test_predict_unknown_model_is_one_line(built, samples, tmp_path):
    image = tmp_path / "good.png"
    image.write_bytes(samples.png)
    result = predict(built, "nope", image)
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.splitlines() == [result.stderr.strip()]
    assert result.stderr.startswith("dlpipe: error: unknown model 'nope'")
