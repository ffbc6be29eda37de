"""ONNX export of a trained network: eval mode, dynamic batch, one self-contained file with dlpipe
metadata, checked by onnx.checker, and gated on numerical parity with PyTorch through onnxruntime."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

from dlpipe.errors import DlpipeError
from dlpipe.io import atomic_path
from dlpipe.runtime import INPUT_NAME, OUTPUT_NAME, create_session, run_batched


class ParityError(DlpipeError):
    """The exported graph disagrees with PyTorch beyond the tolerance."""


def export_onnx(
    network: nn.Module, example: torch.Tensor, target: Path, opset: int, metadata: dict[str, str] | None = None
) -> None:
    network = network.eval()  # dropout off, batch-norm running statistics: what deployment must see
    with atomic_path(target) as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            network,
            (example,),
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=65536)},),
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


def max_abs_diff(network: nn.Module, onnx_path: Path, inputs: np.ndarray) -> float:
    return float(np.max(np.abs(run_torch(network, inputs) - run_batched(create_session(onnx_path, ["cpu"]), inputs))))


def export_with_parity(
    network: nn.Module,
    inputs: np.ndarray,
    target: Path,
    opset: int,
    atol: float,
    metadata: dict[str, str] | None = None,
) -> float:
    """Export, then compare with PyTorch on real inputs; a graph that disagrees is not kept."""
    # Unique per process: the same export started twice must not share (and delete) one candidate file.
    candidate = target.with_name(f".{target.name}.{os.getpid()}.candidate")
    try:
        export_onnx(network, torch.from_numpy(inputs[:2]), candidate, opset, metadata)
        diff = max_abs_diff(network, candidate, inputs)
        if not diff <= atol:  # also catches NaN
            raise ParityError(f"{target}: ONNX output differs from PyTorch by {diff:.3g} > export.parity_atol={atol:g}")
        candidate.replace(target)
    finally:
        candidate.unlink(missing_ok=True)
    return diff
