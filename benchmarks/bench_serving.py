"""Serving load benchmark: `dlpipe serve` on loopback under concurrent PNG classification requests, beside
the same model's in-process latency, so the cost of HTTP (and of decoding the PNG) is visible.

    python benchmarks/bench_serving.py [--onnx models/cnn/model.onnx] [--requests 5000] [--concurrency 32]

It needs an exported classifier (the default is the pipeline's cnn after `dvc repro`). The script
1. starts `dlpipe serve --file cnn=<onnx> --poll 0` as a separate process on a free loopback port;
2. sends `--requests` POSTs of real test images (PNG, `image/png`, cycling over the test split) from
   `--concurrency` concurrent asyncio clients (httpx), bounded by `--max-seconds`; every answer's class is
   checked against the in-process prediction for the same image (a wrong answer counts as an error);
3. times, in this process, ONNX Runtime alone at batch 1 and the whole request path without HTTP
   (`dlpipe.serving.requests.parse` + `answer`: PNG decode, checks, inference, softmax).

Client and server share the machine's cores: on 2 cores the client's own work is part of the figures, so
the CPU seconds each used during the load are reported beside them.
Results go to `--out` (JSON); the README of this folder quotes them.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO_ROOT / "benchmarks" / "results" / "serving.json"
READY_TIMEOUT_S = 120


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python benchmarks/bench_serving.py", description=__doc__.splitlines()[0])
    p.add_argument("--root", type=Path, default=REPO_ROOT, help="project root (params.yaml, data/images/raw)")
    p.add_argument("--onnx", type=Path, default=None, help="classifier ONNX (default: <root>/models/cnn/model.onnx)")
    p.add_argument("--requests", type=int, default=5000, help="requests to send (default: 5000)")
    p.add_argument("--concurrency", type=int, default=32, help="requests in flight at once (default: 32)")
    p.add_argument("--max-seconds", type=float, default=600.0, help="stop sending after this long (default: 600)")
    p.add_argument("--threads", type=int, default=None, help="onnxruntime threads per session (serve.threads)")
    p.add_argument("--runs", type=int, default=500, help="timed in-process calls per figure (default: 500)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"results JSON (default: {DEFAULT_OUT})")
    return p.parse_args(argv)


def percentiles(milliseconds: np.ndarray) -> dict[str, float]:
    return {
        "p50_ms": float(np.percentile(milliseconds, 50)),
        "p99_ms": float(np.percentile(milliseconds, 99)),
        "mean_ms": float(milliseconds.mean()),
    }


def in_process(onnx: Path, images: list[bytes], runs: int, threads: int | None) -> tuple[dict[str, Any], list[int]]:
    """ONNX Runtime alone (batch 1) and the request path without HTTP, timed in this process; and the
    class each image should get."""
    from dlpipe.runtime import latency_ms
    from dlpipe.serving.models import FileSource, load_version
    from dlpipe.serving.requests import answer, parse
    from dlpipe.serving.tasks import Limits

    source = FileSource(onnx)
    served = load_version("cnn", source, source.current(), ("cpu",), threads)
    limits = Limits(max_batch=64, max_image_pixels=4096 * 4096)
    predicted = (answer(served, parse(served, "image/png", png, {}, limits)) for png in images)
    expected = [result["predictions"][0]["class"] for result in predicted]
    batch = parse(served, "image/png", images[0], {}, limits)
    ort = latency_ms(lambda: served.session.run(None, {served.contract.input_name: batch.inputs}), 20, runs)
    path = latency_ms(lambda: answer(served, parse(served, "image/png", images[0], {}, limits)), 20, runs)
    return {"onnxruntime_b1": percentiles(ort), "request_path_without_http": percentiles(path)}, expected


def start_server(root: Path, onnx: Path, threads: int | None) -> tuple[subprocess.Popen, str, Path]:
    import httpx

    from dlpipe.config import load_serving_config

    config = load_serving_config(root / "params.yaml")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    params = root / ".bench-serving-params.yaml"
    settings = {**config.params.serve.model_dump(), "threads": threads, "providers": ["cpu"]}
    raw = {"models": dict(config.params.models), "serve": settings}
    params.write_text(json.dumps(raw))  # JSON is YAML
    log_path = root / ".bench-serving.log"
    command = [sys.executable, "-m", "dlpipe", "serve", "--params", str(params), "--port", str(port)]
    command += ["--file", f"cnn={onnx}", "--poll", "0"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    log = open(log_path, "w")  # noqa: SIM115 - written by the server until it is stopped
    process = subprocess.Popen(command, cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + READY_TIMEOUT_S
    while True:
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return process, url, params
        except httpx.TransportError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise SystemExit(f"dlpipe serve did not become ready:\n{log_path.read_text()[-2000:]}")
        time.sleep(0.2)


async def load(url: str, images: list[bytes], expected: list[int], count: int, concurrency: int, limit_s: float):
    """`count` requests from `concurrency` workers; per request: latency, and whether it failed."""
    import httpx

    latencies, failures = [], {}
    next_index = iter(range(count))
    deadline = time.perf_counter() + limit_s
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)

    async def worker(client: httpx.AsyncClient) -> None:
        for i in next_index:
            if time.perf_counter() > deadline:
                return
            image = i % len(images)
            started = time.perf_counter()
            try:
                response = await client.post(
                    "/v1/models/cnn/predict", content=images[image], headers={"content-type": "image/png"}
                )
                ok = response.status_code == 200 and response.json()["predictions"][0]["class"] == expected[image]
                reason = f"HTTP {response.status_code}" if response.status_code != 200 else "wrong class"
            except httpx.HTTPError as exc:
                ok, reason = False, type(exc).__name__
            latencies.append((time.perf_counter() - started) * 1000.0)
            if not ok:
                failures[reason] = failures.get(reason, 0) + 1

    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:
        started = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    return np.array(latencies), failures, elapsed


def main(argv: list[str] | None = None) -> dict[str, Any]:
    import onnxruntime
    import psutil  # installed with dvc

    from dlpipe.data.images import load_split
    from dlpipe.data.pixels import image_layout, png_bytes

    args = parse_args(argv)
    root = args.root.resolve()
    onnx = (args.onnx or root / "models" / "cnn" / "model.onnx").resolve()
    if not onnx.is_file():
        raise SystemExit(f"{onnx}: not found; run `dvc repro` first or pass --onnx")
    x, _ = load_split(root / "data" / "images" / "raw", "test")
    images = [png_bytes(image_layout(pixels)) for pixels in x]  # PNG files, as a client uploads them
    local, expected = in_process(onnx, images, args.runs, args.threads)
    process, url, params = start_server(root, onnx, args.threads)
    try:
        # One request at a time first: latency without queueing, i.e. what HTTP itself adds.
        serial, serial_failures, _ = asyncio.run(load(url, images, expected, args.runs, 1, args.max_seconds))
        server, client = psutil.Process(process.pid), psutil.Process()
        before = (sum(server.cpu_times()[:2]), sum(client.cpu_times()[:2]))
        latencies, failures, elapsed = asyncio.run(
            load(url, images, expected, args.requests, args.concurrency, args.max_seconds)
        )
        # Who used the cores: on a small machine the load generator competes with the server it measures.
        cpu = {"server": sum(server.cpu_times()[:2]) - before[0], "client": sum(client.cpu_times()[:2]) - before[1]}
    finally:
        process.terminate()
        process.wait(timeout=30)
        params.unlink(missing_ok=True)
    http = {
        "requests": len(latencies),
        "errors": int(sum(failures.values())),
        "failures": failures,
        "seconds": elapsed,
        "throughput_rps": len(latencies) / elapsed,
        "cpu_seconds": cpu,
        "server_cpu_ms_per_request": 1000.0 * cpu["server"] / max(len(latencies), 1),
        **percentiles(latencies),
    }
    path_p50 = local["request_path_without_http"]["p50_ms"]
    result = {
        "model": str(onnx.relative_to(root)) if onnx.is_relative_to(root) else str(onnx),
        "concurrency": args.concurrency,
        "threads": args.threads,
        "http": http,
        "http_serial": {"requests": len(serial), "errors": int(sum(serial_failures.values())), **percentiles(serial)},
        "in_process": local,
        # What HTTP adds to one request (no queueing), and what a request waits at this concurrency.
        "http_serial_p50_over_request_path_p50": float(np.percentile(serial, 50)) / path_p50,
        "http_p50_over_request_path_p50": http["p50_ms"] / path_p50,
        "machine": {
            "cpu_count": os.cpu_count(),
            "platform": platform.platform(),
            "onnxruntime": onnxruntime.__version__,
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    temporary = args.out.with_suffix(".tmp")
    temporary.write_text(json.dumps(result, indent=2) + "\n")
    temporary.replace(args.out)
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
