"""ONNX export of a trained network: eval mode, dynamic batch, one self-contained file with dlpipe
metadata, checked by onnx.checker, and gated on numerical parity with PyTorch through onnxruntime."""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

from dlpipe.errors import DlpipeError, first_line
from dlpipe.io import atomic_path
from dlpipe.runtime import INPUT_NAME, OUTPUT_NAME, create_session, run_batched


class ParityError(DlpipeError):
    """The exported graph disagrees with PyTorch beyond the tolerance."""


# The exporter's registry names the translations of torchvision's detection ops (nms, roi_align, ...) and warns,
# once per op and export, that it skips them without torchvision; no dlpipe network uses them.
logging.getLogger("torch.onnx._internal.exporter._registration").addFilter(
    lambda record: not record.getMessage().startswith("torchvision is not installed. Skipping torchvision::")
)


def _onnx_elman_rnn_layer(x, weight_ih, weight_hh, bias_ih, bias_hh):
    """dlpipe::elman_rnn_layer (dlpipe.models.rnn) as one ONNX RNN node (tanh, forward, zero initial state)."""
    from onnxscript import opset18 as op

    sequence_first = op.Transpose(x, perm=[1, 0, 2])  # ONNX RNN's default layout is (T, B, in)
    bias = op.Unsqueeze(op.Concat(bias_ih, bias_hh, axis=0), [0])
    weights = (op.Unsqueeze(weight_ih, [0]), op.Unsqueeze(weight_hh, [0]))  # one direction
    states, _ = op.RNN(sequence_first, *weights, bias, hidden_size=weight_hh.shape[0])  # (T, 1, B, hidden)
    return op.Transpose(op.Squeeze(states, [1]), perm=[1, 0, 2])


def custom_translations() -> dict:
    """The project's own ops and their ONNX translations."""
    import dlpipe.models.rnn  # noqa: F401 - registers torch.ops.dlpipe.elman_rnn_layer

    return {torch.ops.dlpipe.elman_rnn_layer.default: _onnx_elman_rnn_layer}


def export_onnx(
    network: nn.Module,
    example: torch.Tensor,
    target: Path,
    opset: int,
    metadata: dict[str, str] | None = None,
    dynamic_axes: dict[int, str] | None = None,
) -> None:
    """`dynamic_axes` maps input axes to names (default: the batch, axis 0); the graph accepts any size there."""
    network = network.eval()  # dropout off, batch-norm running statistics: what deployment must see
    # min=1 on the batch (the example has 2 rows: a size-1 example would be specialised), 2 elsewhere.
    axes = dynamic_axes or {0: "batch"}
    dims = {axis: torch.export.Dim(name, min=1 if axis == 0 else 2, max=65536) for axis, name in axes.items()}
    with atomic_path(target) as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            network,
            (example,),
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_shapes=(dims,),
            custom_translation_table=custom_translations(),
            opset_version=opset,
            dynamo=True,
            external_data=False,
            verbose=False,
        )
        program.save(str(tmp), external_data=False)
        proto = onnx.load(str(tmp))
        written = next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))
        if written != opset:  # the exporter falls back to its default for opsets it cannot target
            raise DlpipeError(f"export.opset: {opset} is not supported by this exporter (it wrote opset {written})")
        if metadata:
            onnx.helper.set_model_props(proto, metadata)
            onnx.save(proto, str(tmp))
        onnx.checker.check_model(str(tmp), full_check=True)


@torch.inference_mode()
def run_torch(network: nn.Module, inputs: np.ndarray, batch_size: int = 512) -> np.ndarray:
    network = network.eval()
    outputs = [network(torch.from_numpy(inputs[i : i + batch_size])).numpy() for i in range(0, len(inputs), batch_size)]
    return np.concatenate(outputs)


def batch_cases(inputs: np.ndarray, batches: list[int], label: str = "") -> dict[str, np.ndarray]:
    """Real inputs at each batch size (rows repeated where there are fewer), named for error messages."""
    return {f"batch {b}{label}": np.resize(inputs, (b, *inputs.shape[1:])).astype(inputs.dtype) for b in batches}


def parity_diffs(network: nn.Module, onnx_path: Path, cases: dict[str, np.ndarray]) -> dict[str, float]:
    """max |PyTorch - onnxruntime| for each named input batch."""
    session = create_session(onnx_path, ["cpu"])
    diffs = {}
    for name, inputs in cases.items():
        try:
            onnx_outputs = run_batched(session, inputs)
        except Exception as exc:  # onnxruntime's own types: e.g. a dimension fixed where it should be dynamic
            first = first_line(exc)
            raise ParityError(f"{onnx_path}: the exported graph cannot run at {name} ({first})") from exc
        diffs[name] = float(np.max(np.abs(run_torch(network, inputs) - onnx_outputs)))
    return diffs


def top1_agreement(network: nn.Module, onnx_path: Path, inputs: np.ndarray) -> float:
    """Share of `inputs` where the graph's highest-scoring class is PyTorch's."""
    onnx_classes = run_batched(create_session(onnx_path, ["cpu"]), inputs).argmax(1)
    return float((run_torch(network, inputs).argmax(1) == onnx_classes).mean())


def export_with_parity(
    network: nn.Module,
    cases: dict[str, np.ndarray],
    target: Path,
    opset: int,
    atol: float,
    metadata: dict[str, str] | None = None,
    dynamic_axes: dict[int, str] | None = None,
    agreement: tuple[np.ndarray, float] | None = None,
) -> dict[str, float]:
    """Export, then compare with PyTorch on every case of real inputs (batch sizes, sequence lengths); a graph
    that disagrees on any of them is not kept. `agreement` (classifiers): (inputs, minimum share) where the
    graph's top-1 class must equal PyTorch's, e.g. the whole test split. Returns each case's max abs
    difference, and `top1_agreement` when checked."""
    # Unique per process: the same export started twice must not share (and delete) one candidate file.
    candidate = target.with_name(f".{target.name}.{os.getpid()}.candidate")
    largest = max(cases.values(), key=len)
    try:
        example = torch.from_numpy(np.resize(largest, (2, *largest.shape[1:])))
        export_onnx(network, example, candidate, opset, metadata, dynamic_axes)
        diffs = parity_diffs(network, candidate, cases)
        for name, diff in diffs.items():
            if not diff <= atol:  # also catches NaN
                raise ParityError(
                    f"{target}: ONNX output differs from PyTorch by {diff:.3g} at {name} > export.parity_atol={atol:g}"
                )
        if agreement is not None:
            inputs, minimum = agreement
            share = top1_agreement(network, candidate, inputs)
            if not share >= minimum:
                raise ParityError(
                    f"{target}: ONNX and PyTorch pick the same class on {share:.4f} of {len(inputs)} test inputs "
                    f"< export.min_top1_agreement={minimum:g}"
                )
            diffs["top1_agreement"] = share
        candidate.replace(target)
    finally:
        candidate.unlink(missing_ok=True)
    return diffs
