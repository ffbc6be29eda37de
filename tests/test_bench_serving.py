"""The serving load benchmark (benchmarks/bench_serving.py) runs end to end on a tiny exported cnn: every
request is answered with the class the model gives in-process, and the figures it reports are consistent.
Behaviour only: no wall-clock assertions."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import benchmark_module, tiny_params, write_project


@pytest.fixture(scope="module")
def bench():
    with benchmark_module("bench_serving") as module:
        yield module


@pytest.fixture(scope="module")
def exported_cnn(tmp_path_factory) -> Path:
    """A project with a trained and exported cnn (no registry needed: the benchmark serves the file)."""
    from dlpipe import stages
    from dlpipe.config import load_config

    params = tiny_params()
    params["mlflow"]["register_model"] = False
    config = load_config(write_project(tmp_path_factory.mktemp("bench-serving") / "project", params))
    stages.fetch_images(config)
    stages.augment(config)
    stages.train(config, "cnn")
    stages.export(config, "cnn")
    return config.paths.root


def test_the_load_benchmark_answers_every_request_correctly(bench, exported_cnn, tmp_path):
    out = tmp_path / "serving.json"
    result = bench.main(
        ["--root", str(exported_cnn), "--requests", "60", "--concurrency", "6", "--runs", "20", "--out", str(out)]
    )
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    assert result["http"]["requests"] == 60 and result["http"]["errors"] == 0 and result["http"]["failures"] == {}
    assert result["http_serial"]["requests"] == 20 and result["http_serial"]["errors"] == 0
    http, path = result["http"], result["in_process"]["request_path_without_http"]
    assert 0 < http["p50_ms"] <= http["p99_ms"] and http["throughput_rps"] > 0
    # HTTP can only add to the in-process request path, which includes ONNX Runtime's own time.
    assert result["http_serial"]["p50_ms"] > path["p50_ms"] > result["in_process"]["onnxruntime_b1"]["p50_ms"]
    assert not (exported_cnn / ".bench-serving-params.yaml").exists()  # the server's params are cleaned up


def test_a_wrong_answer_counts_as_an_error(bench, exported_cnn, monkeypatch, tmp_path):
    # The correctness check can fail: with every expected class shifted by one, every answer is wrong.
    real = bench.in_process

    def shifted(*args, **kwargs):
        figures, expected = real(*args, **kwargs)
        return figures, [(c + 1) % 10 for c in expected]

    monkeypatch.setattr(bench, "in_process", shifted)
    result = bench.main(
        [
            "--root",
            str(exported_cnn),
            "--requests",
            "10",
            "--concurrency",
            "2",
            "--runs",
            "5",
            "--out",
            str(tmp_path / "s.json"),
        ]
    )
    assert result["http"]["errors"] == 10 and result["http"]["failures"] == {"wrong class": 10}
