"""dlpipe.runtime: onnxruntime without torch, the provider choice, batched runs, and the input contract
that an exported model carries in its metadata."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from dlpipe.errors import DlpipeError
from dlpipe.export import export_onnx
from dlpipe.models import get_model
from dlpipe.runtime import InputContract, create_session, latency_ms, run_batched


@pytest.fixture(scope="module")
def classifier_onnx(tmp_path_factory):
    path = tmp_path_factory.mktemp("runtime") / "cnn.onnx"
    net = get_model("cnn", in_channels=1, image_size=8, num_classes=3, channels=[4], hidden=8).eval()
    metadata = {"dlpipe.task": "classifier", "dlpipe.input_range": "0,1", "dlpipe.classes": '["a", "b", "c"]'}
    export_onnx(net, torch.rand(2, 1, 8, 8), path, opset=18, metadata=metadata)
    return path


def test_runtime_never_imports_torch():
    code = "import sys, dlpipe.runtime; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], timeout=60).returncode == 0


def test_contract_is_read_from_graph_and_metadata(classifier_onnx):
    contract = InputContract.of(create_session(classifier_onnx, ["cpu"]))
    assert (contract.input_name, contract.output_name) == ("input", "output")
    assert contract.dtype is np.float32
    assert contract.shape == (None, 1, 8, 8)  # dynamic batch
    assert contract.value_range == (0.0, 1.0)
    assert contract.metadata["dlpipe.classes"] == '["a", "b", "c"]'


@pytest.mark.parametrize(
    ("inputs", "message"),
    [
        (np.zeros((2, 1, 8, 8), np.float64), "dtype float64"),
        (np.zeros((2, 8, 8), np.float32), "shape (2, 8, 8)"),
        (np.zeros((2, 1, 9, 8), np.float32), "(*, 1, 8, 8)"),
        (np.full((2, 1, 8, 8), np.nan, np.float32), "NaN"),
        (np.full((2, 1, 8, 8), 255.0, np.float32), "outside the model's range [0, 1]"),
    ],
)
def test_contract_names_what_is_wrong(classifier_onnx, inputs, message):
    contract = InputContract.of(create_session(classifier_onnx, ["cpu"]))
    with pytest.raises(
        DlpipeError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[").replace("*", r"\*")
    ):
        contract.check(inputs)


def test_batched_run_equals_one_run(classifier_onnx):
    session = create_session(classifier_onnx, ["cpu"])
    inputs = np.random.default_rng(0).uniform(size=(10, 1, 8, 8)).astype(np.float32)
    np.testing.assert_allclose(
        run_batched(session, inputs, batch_size=3), session.run(None, {"input": inputs})[0], atol=1e-6
    )


def test_cpu_is_used_when_cuda_is_missing(classifier_onnx):
    import onnxruntime as ort

    session = create_session(classifier_onnx, ["cuda", "cpu"])
    expected = (
        "CUDAExecutionProvider" if "CUDAExecutionProvider" in ort.get_available_providers() else "CPUExecutionProvider"
    )
    assert session.get_providers()[0] == expected


def test_bad_provider_and_bad_file_are_one_line_errors(classifier_onnx, tmp_path):
    with pytest.raises(DlpipeError, match="unknown execution provider 'tpu'"):
        create_session(classifier_onnx, ["tpu"])
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"not a protobuf")
    with pytest.raises(DlpipeError, match="garbage.onnx: not a loadable ONNX model") as caught:
        create_session(garbage)
    assert "\n" not in str(caught.value)


def test_latency_counts_only_timed_runs():
    calls = []
    timings = latency_ms(lambda: calls.append(1), warmup=3, runs=5)
    assert len(calls) == 8 and timings.shape == (5,) and (timings >= 0).all()


def test_a_cuda_fallback_is_never_silent(tmp_path, monkeypatch, caplog):
    """Asked for CUDA where ONNX Runtime has only the CPU provider: an error under `strict` (the GPU
    profile's evaluation), a warning when a GPU is on the machine, nothing on a CPU-only machine."""
    import logging

    import onnxruntime as ort
    import torch

    from dlpipe import runtime
    from dlpipe.errors import DlpipeError
    from dlpipe.export import export_onnx

    path = tmp_path / "m.onnx"
    export_onnx(torch.nn.Linear(3, 2).eval(), torch.zeros(1, 3), path, opset=18)
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CPUExecutionProvider"])
    with pytest.raises(DlpipeError, match="runs on CPUExecutionProvider, not CUDAExecutionProvider.*gpu. extra"):
        runtime.create_session(path, ["cuda", "cpu"], strict=True)
    monkeypatch.setattr(runtime, "gpu_visible", lambda: True)
    with caplog.at_level(logging.WARNING, logger="dlpipe"):
        session = runtime.create_session(path, ["cuda", "cpu"])
    assert session.get_providers()[0] == "CPUExecutionProvider"
    assert any("not CUDAExecutionProvider" in record.getMessage() for record in caplog.records)
    caplog.clear()
    monkeypatch.setattr(runtime, "gpu_visible", lambda: False)
    with caplog.at_level(logging.WARNING, logger="dlpipe"):
        runtime.create_session(path, ["cuda", "cpu"])
    assert not caplog.records
    assert runtime.create_session(path, ["cpu"], strict=True).get_providers()[0] == "CPUExecutionProvider"
