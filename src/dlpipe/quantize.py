"""int8 variants of an exported fp32 ONNX model, for serving on the CPU.

Static QDQ int8 (activations calibrated on real training inputs, per-channel weights) for the convolutional
classifiers; dynamic int8 (weights int8, activations quantized at run time) for the recurrent forecasters.
Both write atomically and carry the source's dlpipe metadata plus a `dlpipe.variant` entry.

The static settings were chosen by measurement on this project's MNIST models (`benchmarks/bench_int8.py`,
section "Static int8" of benchmarks/README.md): u8 activations with symmetric per-channel s8 weights, the pair
onnxruntime's VNNI kernels are built for. Before quantizing, three rewrites that keep the fp32 values exactly
work around where onnxruntime's int8 graph is slower than its fp32 one:
- a convolution with fewer than 4 input channels (the 1-channel stem) stays fp32, with the Relu/MaxPool after
  it swapped so that the quantization point follows the pooling (`_float_stem`);
- a spatial ReduceMean becomes GlobalAveragePool, which has a channels-last int8 kernel (`_global_average_pools`);
- a flatten into a Gemm happens channels-last, its weight columns permuted (`_channels_last_flattens`).

onnx, onnxruntime and numpy only: serving an int8 model must not need torch.
"""

from __future__ import annotations

import dataclasses
import tempfile
from collections import defaultdict
from pathlib import Path

import numpy as np
import onnx
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_dynamic,
    quantize_static,
)
from onnxruntime.quantization.shape_inference import quant_pre_process

from dlpipe.errors import DlpipeError, first_line
from dlpipe.io import atomic_path

VARIANT_KEY = "dlpipe.variant"
STATIC_VARIANT, DYNAMIC_VARIANT = "int8-static", "int8-dynamic"
CALIBRATION_METHODS = {
    "minmax": CalibrationMethod.MinMax,
    "entropy": CalibrationMethod.Entropy,
    "percentile": CalibrationMethod.Percentile,
}
QUANT_TYPES = {"u8": QuantType.QUInt8, "s8": QuantType.QInt8}
# What quantize_dynamic has int8 kernels for here; GRU and RNN have none in onnxruntime and stay fp32.
DYNAMIC_OP_TYPES = ("LSTM", "MatMul", "Gemm")
# int8 dot products reduce 4 input bytes per 32-bit lane (VNNI), and onnxruntime's symmetric int8 convolution
# vectorises over input channels: a 1-channel 3x3 convolution ran 4-5x slower in int8 than in fp32 (README).
MIN_INT8_CONV_CHANNELS = 4
_MONOTONE_ACTIVATIONS = ("Relu", "Clip")  # max-pooling commutes with these: relu(max(x)) == max(relu(x))
_INT8_OP_TYPES = ("QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "DynamicQuantizeLSTM")


@dataclasses.dataclass(frozen=True)
class StaticSettings:
    """Everything static quantization is given besides the model and the calibration inputs. The defaults
    are the measured choice; `benchmarks/bench_int8.py --sweep` times the alternatives."""

    per_channel: bool = True
    method: str = "minmax"
    activation_type: str = "u8"  # s8 activations: 2.5-3.5x slower (resnet, mobilenet_v2): no u8 x s8 kernels
    weight_type: str = "s8"  # u8 weights: 2-3x slower
    weight_symmetric: bool = True  # zero weight offsets select onnxruntime's direct int8 convolution kernels
    activation_symmetric: bool = False  # symmetric u8 activations ran below fp32 speed
    # 7-bit weights: no speed or accuracy cost measured here, and AVX2 CPUs without VNNI, whose u8 x s8
    # instruction (vpmaddubsw) saturates 16-bit sums of full-range pairs, compute the same graph exactly.
    reduce_range: bool = True
    keep_removable_activations: bool = False  # Relu/Clip folded into the quantization range
    float_stem: bool = True  # convolutions with < MIN_INT8_CONV_CHANNELS input channels stay fp32
    global_average_pool: bool = True  # spatial ReduceMean as GlobalAveragePool, which has an NHWC int8 kernel
    channels_last_flatten: bool = True  # flatten before a Gemm in NHWC order (weights permuted to match)

    def __post_init__(self) -> None:
        if self.method not in CALIBRATION_METHODS:
            raise DlpipeError(f"calibration method {self.method!r}: expected one of {', '.join(CALIBRATION_METHODS)}")
        for name in ("activation_type", "weight_type"):
            if getattr(self, name) not in QUANT_TYPES:
                raise DlpipeError(f"{name} {getattr(self, name)!r}: expected one of {', '.join(QUANT_TYPES)}")


class CalibrationReader(CalibrationDataReader):
    """The calibration inputs (float32, in the model's input layout), `batch_size` rows at a time; rewindable."""

    def __init__(self, inputs: np.ndarray, input_name: str = "input", batch_size: int = 32) -> None:
        if batch_size < 1:
            raise DlpipeError(f"calibration batch_size must be at least 1, got {batch_size}")
        self.inputs, self.input_name, self.batch_size = inputs, input_name, batch_size
        self._start = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self._start >= len(self.inputs):
            return None
        batch = self.inputs[self._start : self._start + self.batch_size]
        self._start += self.batch_size
        return {self.input_name: batch}

    def rewind(self) -> None:
        self._start = 0

    def __len__(self) -> int:
        return -(-len(self.inputs) // self.batch_size)


def quantize_static_int8(
    fp32_path: Path,
    int8_path: Path,
    calibration: np.ndarray,
    *,
    per_channel: bool = True,
    method: str = "minmax",
) -> None:
    """Static QDQ int8 of an fp32 ONNX file, activations calibrated on `calibration` (float32 real inputs in
    the model's input layout, e.g. 256 training images). Written atomically; the source's `dlpipe.*`
    metadata is copied and `dlpipe.variant` = "int8-static" added. `method`: minmax | entropy | percentile."""
    quantize_static_with(fp32_path, int8_path, calibration, StaticSettings(per_channel=per_channel, method=method))


def quantize_static_with(fp32_path: Path, int8_path: Path, calibration: np.ndarray, settings: StaticSettings) -> None:
    """`quantize_static_int8` with every setting explicit (the benchmark's sweep of alternatives)."""
    fp32_path, int8_path = Path(fp32_path), Path(int8_path)
    source = load_source(fp32_path, int8_path)
    input_name = _check_calibration(source, calibration, fp32_path)
    with tempfile.TemporaryDirectory(prefix="dlpipe-quantize-") as scratch:
        prepared = _prepare(fp32_path, Path(scratch))
        model = onnx.load(str(prepared))
        if settings.global_average_pool:
            _global_average_pools(model)
        if settings.channels_last_flatten:
            _channels_last_flattens(model)
        excluded = _float_stem(model) if settings.float_stem else []
        onnx.save(model, str(prepared))
        with atomic_path(int8_path) as tmp:
            _run_quantizer(
                fp32_path,
                lambda: quantize_static(
                    str(prepared),
                    str(tmp),
                    CalibrationReader(calibration, input_name),
                    quant_format=QuantFormat.QDQ,
                    per_channel=settings.per_channel,
                    reduce_range=settings.reduce_range,
                    activation_type=QUANT_TYPES[settings.activation_type],
                    weight_type=QUANT_TYPES[settings.weight_type],
                    nodes_to_exclude=excluded,
                    calibrate_method=CALIBRATION_METHODS[settings.method],
                    extra_options=_static_extra_options(settings),
                ),
            )
            stamp_variant(tmp, source, STATIC_VARIANT)


def quantize_dynamic_int8(fp32_path: Path, int8_path: Path) -> None:
    """Dynamic int8 (weights int8, activations quantized at run time) of the LSTM, MatMul and Gemm nodes; GRU
    and RNN nodes have no int8 kernel in onnxruntime and stay fp32. Written atomically; the source's
    `dlpipe.*` metadata is copied and `dlpipe.variant` = "int8-dynamic" added."""
    fp32_path, int8_path = Path(fp32_path), Path(int8_path)
    source = load_source(fp32_path, int8_path)
    if not any(node.op_type in DYNAMIC_OP_TYPES for node in source.graph.node):
        raise DlpipeError(f"{fp32_path}: no {'/'.join(DYNAMIC_OP_TYPES)} node to quantize dynamically")
    with tempfile.TemporaryDirectory(prefix="dlpipe-quantize-") as scratch:
        prepared = _prepare(fp32_path, Path(scratch))
        with atomic_path(int8_path) as tmp:
            _run_quantizer(
                fp32_path,
                lambda: quantize_dynamic(
                    str(prepared),
                    str(tmp),
                    op_types_to_quantize=list(DYNAMIC_OP_TYPES),
                    weight_type=QuantType.QInt8,  # u8 activations x s8 weights: the VNNI/AMX kernels
                ),
            )
            stamp_variant(tmp, source, DYNAMIC_VARIANT)


def int8_op_counts(path: Path) -> dict[str, int]:
    """How many nodes of each int8 op type (QuantizeLinear, DynamicQuantizeLSTM, ...) a graph holds."""
    counts: dict[str, int] = defaultdict(int)
    for node in onnx.load(str(path)).graph.node:
        if node.op_type in _INT8_OP_TYPES or node.op_type.startswith("QLinear") or node.op_type.endswith("Integer"):
            counts[node.op_type] += 1
    return dict(counts)


# ------------------------------------------------------------------------------------------------ helpers


def load_source(fp32_path: Path, variant_path: Path) -> onnx.ModelProto:
    """The fp32 model, checked before anything is written: a bad source must leave no variant file behind."""
    if not fp32_path.is_file():
        raise DlpipeError(f"{fp32_path}: file not found (export the fp32 model first)")
    if variant_path.resolve() == fp32_path.resolve():
        raise DlpipeError(f"{variant_path}: a variant must not overwrite its fp32 source")
    try:
        model = onnx.load(str(fp32_path))
        onnx.checker.check_model(model)
    except Exception as exc:  # protobuf's DecodeError, onnx's ValidationError, ...: all mean an unusable file
        raise DlpipeError(f"{fp32_path}: not a readable ONNX model ({first_line(exc)})") from exc
    if not model.graph.node:
        raise DlpipeError(f"{fp32_path}: not a readable ONNX model (the graph has no nodes)")
    return model


def _graph_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    weights = {init.name for init in model.graph.initializer}
    return [value for value in model.graph.input if value.name not in weights]


def _check_calibration(model: onnx.ModelProto, calibration: np.ndarray, fp32_path: Path) -> str:
    """The model's input name, once `calibration` is known to fit it (a wrong array fails here in one line,
    not deep inside onnxruntime's calibrator)."""
    inputs = _graph_inputs(model)
    if len(inputs) != 1:
        raise DlpipeError(f"{fp32_path}: static int8 needs a model with one input, it has {len(inputs)}")
    if not isinstance(calibration, np.ndarray) or calibration.dtype != np.float32:
        kind = calibration.dtype if isinstance(calibration, np.ndarray) else type(calibration).__name__
        raise DlpipeError(f"calibration inputs must be a float32 array, got {kind}")
    dims = inputs[0].type.tensor_type.shape.dim
    expected = tuple(d.dim_value if d.HasField("dim_value") else None for d in dims)
    if calibration.ndim != len(expected) or any(
        want is not None and got != want for got, want in zip(calibration.shape[1:], expected[1:], strict=True)
    ):
        shape = "(" + ", ".join("*" if d is None else str(d) for d in expected) + ")"
        raise DlpipeError(f"calibration inputs of shape {calibration.shape} do not fit the model's input {shape}")
    if len(calibration) == 0 or not np.isfinite(calibration).all():
        raise DlpipeError("calibration inputs must be non-empty and finite (no NaN or infinity)")
    return inputs[0].name


def _prepare(fp32_path: Path, scratch: Path) -> Path:
    """Shape inference and onnxruntime's basic graph optimisations, as the quantizer expects its input."""
    prepared = scratch / "prepared.onnx"
    _run_quantizer(fp32_path, lambda: quant_pre_process(str(fp32_path), str(prepared)))
    return prepared


def _run_quantizer(fp32_path: Path, call) -> None:
    try:
        call()
    except DlpipeError:
        raise
    except Exception as exc:  # onnxruntime's own exception types: a graph it cannot run or quantize
        raise DlpipeError(f"{fp32_path}: int8 quantization failed ({type(exc).__name__}: {first_line(exc)})") from exc


def _static_extra_options(settings: StaticSettings) -> dict[str, bool]:
    return {
        "WeightSymmetric": settings.weight_symmetric,
        "ActivationSymmetric": settings.activation_symmetric,
        "QDQKeepRemovableActivations": settings.keep_removable_activations,
    }


def stamp_variant(tmp: Path, source: onnx.ModelProto, variant: str) -> None:
    """The source's dlpipe metadata and the variant onto a variant's file (still at its temporary name)."""
    model = onnx.load(str(tmp))
    kept = [prop for prop in model.metadata_props if not prop.key.startswith("dlpipe.")]
    copied = [prop for prop in source.metadata_props if prop.key.startswith("dlpipe.") and prop.key != VARIANT_KEY]
    del model.metadata_props[:]
    model.metadata_props.extend(kept + copied)
    model.metadata_props.add(key=VARIANT_KEY, value=variant)
    onnx.save(model, str(tmp))


# ------------------------------------------------------------------------------------------ the float stem


def _consumers(graph: onnx.GraphProto) -> dict[str, list[onnx.NodeProto]]:
    found: dict[str, list[onnx.NodeProto]] = defaultdict(list)
    for node in graph.node:
        for name in node.input:
            found[name].append(node)
    return found


def _only_consumer(graph: onnx.GraphProto, consumers, tensor: str) -> onnx.NodeProto | None:
    """The single node reading `tensor`, or None (several readers, or a graph output)."""
    readers = consumers.get(tensor, [])
    if len(readers) != 1 or tensor in {out.name for out in graph.output}:
        return None
    return readers[0]


def _is_thin_conv(node: onnx.NodeProto, weights: dict[str, onnx.TensorProto]) -> bool:
    if node.op_type != "Conv" or len(node.input) < 2 or node.input[1] not in weights:
        return False
    group = next((attr.i for attr in node.attribute if attr.name == "group"), 1)
    return group == 1 and weights[node.input[1]].dims[1] < MIN_INT8_CONV_CHANNELS


def _swap_activation_and_pool(graph: onnx.GraphProto, activation: onnx.NodeProto, pool: onnx.NodeProto) -> None:
    """act(x) -> a -> MaxPool -> p  becomes  MaxPool(x) -> a -> act -> p (equal: the activation is monotone).

    Why: onnxruntime moves a QuantizeLinear that follows a MaxPool up before it, and then runs that MaxPool
    on uint8 in NCHW layout, its slowest kernel (10x the fp32 one). With the activation last, the quantization
    point follows a node it cannot cross, and the float stem ends with onnxruntime's fast fp32 pooling."""
    middle = activation.output[0]
    new_pool = onnx.helper.make_node("MaxPool", [activation.input[0]], [middle], name=pool.name)
    new_pool.attribute.extend(pool.attribute)
    new_activation = onnx.helper.make_node(
        activation.op_type, [middle, *activation.input[1:]], list(pool.output), name=activation.name
    )
    new_activation.attribute.extend(activation.attribute)
    nodes = list(graph.node)
    nodes[nodes.index(activation)], nodes[nodes.index(pool)] = new_pool, new_activation
    del graph.node[:]
    graph.node.extend(nodes)
    # The middle tensor now has the pooled shape: drop its recorded shape rather than keep a wrong one.
    shapes = [value for value in graph.value_info if value.name != middle]
    del graph.value_info[:]
    graph.value_info.extend(shapes)


def _float_stem(model: onnx.ModelProto) -> list[str]:
    """Names of the nodes to keep fp32: each convolution with too few input channels for the int8 kernels, with
    the activation / max-pooling right after it (reordered so that the quantization point follows the pooling),
    where that region hands over to int8 through a single reader.

    Why the single reader: onnxruntime converts the hand-over tensor to channels-last for each reader. A ResNet
    stem also feeds the first residual Add, which onnxruntime then ran channels-first between three uint8
    transposes (~420 us at batch 32, more than the int8 stem costs)."""
    graph = model.graph
    weights = {init.name: init for init in graph.initializer}
    for index, node in enumerate(graph.node):
        node.name = node.name or f"dlpipe_node_{index}"  # the quantizer excludes nodes by name
    excluded: list[str] = []
    for conv in [node for node in graph.node if _is_thin_conv(node, weights)]:
        consumers = _consumers(graph)
        chain = _stem_chain(graph, consumers, conv)
        if _only_consumer(graph, consumers, chain[-1].output[0]) is None:
            continue
        if len(chain) == 3:
            _swap_activation_and_pool(graph, chain[1], chain[2])
        excluded += [node.name for node in chain]
    return excluded


def _stem_chain(graph: onnx.GraphProto, consumers, conv: onnx.NodeProto) -> list[onnx.NodeProto]:
    """The convolution, then its activation or max-pooling if that is its only reader, then a max-pooling
    reading the activation alone."""
    follower = _only_consumer(graph, consumers, conv.output[0])
    if follower is None or follower.op_type not in (*_MONOTONE_ACTIVATIONS, "MaxPool"):
        return [conv]
    pool = _only_consumer(graph, consumers, follower.output[0])
    if follower.op_type in _MONOTONE_ACTIVATIONS and pool is not None and _is_plain_max_pool(pool):
        return [conv, follower, pool]
    return [conv, follower]


def _is_plain_max_pool(node: onnx.NodeProto) -> bool:
    """A MaxPool without the optional Indices output (which would change meaning if moved)."""
    return node.op_type == "MaxPool" and len([name for name in node.output if name]) == 1


# ------------------------------------------------------------------------------------- global average pool


def _constant_ints(graph: onnx.GraphProto, name: str) -> list[int] | None:
    for init in graph.initializer:
        if init.name == name:
            return [int(v) for v in onnx.numpy_helper.to_array(init).ravel()]
    return None


def _rank(graph: onnx.GraphProto, tensor: str) -> int | None:
    for value in (*graph.value_info, *graph.input, *graph.output):
        if value.name == tensor and value.type.tensor_type.HasField("shape"):
            return len(value.type.tensor_type.shape.dim)
    return None


def _spatial_mean_axes(graph: onnx.GraphProto, node: onnx.NodeProto) -> bool:
    """A ReduceMean over the two spatial axes of a 4-d NCHW tensor, keeping them (what GlobalAveragePool is)."""
    attributes = {attr.name: attr for attr in node.attribute}
    if "keepdims" in attributes and attributes["keepdims"].i != 1:
        return False
    if "axes" in attributes:  # opset < 18
        axes = list(attributes["axes"].ints)
    else:
        axes = _constant_ints(graph, node.input[1]) if len(node.input) > 1 and node.input[1] else None
    rank = _rank(graph, node.input[0])
    return axes is not None and rank == 4 and sorted(a % 4 for a in axes) == [2, 3]


def _global_average_pools(model: onnx.ModelProto) -> int:
    """Rewrite spatial ReduceMean nodes as GlobalAveragePool (the same values); returns how many. Why:
    onnxruntime has no int8 ReduceMean, so the int8 graph would turn NHWC uint8 back into NCHW fp32 before it
    (a transpose and a dequantize of the largest late tensor); GlobalAveragePool gets a channels-last int8 kernel."""
    graph, axes_read = model.graph, set()
    nodes = list(graph.node)
    for index, node in enumerate(nodes):
        if node.op_type == "ReduceMean" and node.domain in ("", "ai.onnx") and _spatial_mean_axes(graph, node):
            nodes[index] = onnx.helper.make_node(
                "GlobalAveragePool", [node.input[0]], list(node.output), name=node.name
            )
            axes_read.update(node.input[1:])
    rewritten = sum(new.op_type != old.op_type for new, old in zip(nodes, graph.node, strict=True))
    if rewritten:
        del graph.node[:]
        graph.node.extend(nodes)
        # Axes constants that no node reads any more: onnxruntime warns about every unused initializer.
        unused = axes_read - _names_read(graph)
        kept = [init for init in graph.initializer if init.name not in unused]
        del graph.initializer[:]
        graph.initializer.extend(kept)
    return rewritten


def _names_read(graph: onnx.GraphProto) -> set[str]:
    """Every tensor name a node reads, in subgraphs (If, Loop, Scan bodies) too, and the graph outputs."""
    names = {value.name for value in graph.output}
    for node in graph.node:
        names.update(node.input)
        for attr in node.attribute:
            for body in [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs):
                names |= _names_read(body)
    return names


# -------------------------------------------------------------------------------- channels-last flatten


def _static_shape(graph: onnx.GraphProto, tensor: str) -> list[int] | None:
    for value in (*graph.value_info, *graph.input):
        if value.name == tensor and value.type.tensor_type.HasField("shape"):
            return [d.dim_value if d.HasField("dim_value") else -1 for d in value.type.tensor_type.shape.dim]
    return None


def _flatten_into_gemm(graph: onnx.GraphProto, node: onnx.NodeProto, consumers) -> tuple[onnx.NodeProto, int] | None:
    """The Gemm that reads `node`'s flattening of an (N, C, H, W) map, and C, or None for any other pattern."""
    shape = _static_shape(graph, node.input[0])
    if shape is None or len(shape) != 4 or min(shape[1:]) < 1 or shape[2] * shape[3] == 1:
        return None
    features = shape[1] * shape[2] * shape[3]
    if node.op_type == "Reshape":
        target = _constant_ints(graph, node.input[1])
        if target is None or len(target) != 2 or target[1] != features:
            return None
    elif node.op_type != "Flatten" or next((a.i for a in node.attribute if a.name == "axis"), 1) != 1:
        return None
    gemm = _only_consumer(graph, consumers, node.output[0])
    weights = {init.name for init in graph.initializer}
    if gemm is None or gemm.op_type != "Gemm" or gemm.input[0] != node.output[0] or gemm.input[1] not in weights:
        return None
    if len(consumers[gemm.input[1]]) != 1 or next((a.i for a in gemm.attribute if a.name == "transA"), 0):
        return None
    return gemm, shape[1]


def _permute_gemm_columns(graph: onnx.GraphProto, gemm: onnx.NodeProto, channels: int) -> None:
    """Reorder the Gemm's input features from (C, H, W) to (H, W, C) order."""
    init = next(init for init in graph.initializer if init.name == gemm.input[1])
    weight = onnx.numpy_helper.to_array(init)
    by_output = weight if next((a.i for a in gemm.attribute if a.name == "transB"), 0) else weight.T
    outputs = by_output.shape[0]
    permuted = by_output.reshape(outputs, channels, -1).transpose(0, 2, 1).reshape(outputs, -1)
    permuted = permuted if by_output is weight else permuted.T
    init.CopyFrom(onnx.numpy_helper.from_array(np.ascontiguousarray(permuted, dtype=weight.dtype), init.name))


def _channels_last_flattens(model: onnx.ModelProto) -> int:
    """Flatten (N, C, H, W) -> (N, C*H*W) before a Gemm in (H, W, C) order, the Gemm's weight columns permuted to
    match (the same logits); returns how many. Why: onnxruntime runs int8 convolutions and pooling channels-last
    and would transpose the map back to NCHW just to flatten it; an explicit NCHW -> NHWC transpose in front of
    the flatten cancels against that one."""
    graph, rewritten = model.graph, 0
    for node in list(graph.node):
        if node.op_type not in ("Reshape", "Flatten"):
            continue
        found = _flatten_into_gemm(graph, node, _consumers(graph))
        if found is None:
            continue
        gemm, channels = found
        _permute_gemm_columns(graph, gemm, channels)
        channels_last = f"{node.input[0]}_channels_last"
        transpose = onnx.helper.make_node(
            "Transpose", [node.input[0]], [channels_last], name=f"{node.name}_channels_last", perm=[0, 2, 3, 1]
        )
        position = list(graph.node).index(node)
        node.input[0] = channels_last
        graph.node.insert(position, transpose)
        rewritten += 1
    return rewritten
