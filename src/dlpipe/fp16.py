"""The fp16 variant of an exported fp32 ONNX model, for serving on a GPU.

Weights and activations in float16, inputs and outputs kept float32 (a Cast at each end), so a caller feeds
and reads the same arrays as the fp32 graph's. The conversion is onnxruntime's own
(`onnxruntime.transformers.float16`); values outside float16's range are clamped to it. On a GPU, ONNX
Runtime's CUDA kernels run float16 on the tensor cores; on a CPU it runs, but usually slower than fp32, so
the pipeline measures and offers this variant where ONNX Runtime has its CUDA provider (`export.fp16`).

onnx and onnxruntime only: serving an fp16 model must not need torch.
"""

from __future__ import annotations

from pathlib import Path

import onnx
from onnxruntime.transformers.float16 import convert_float_to_float16
from onnxruntime.transformers.onnx_model import OnnxModel

from dlpipe.errors import DlpipeError, first_line
from dlpipe.io import atomic_path
from dlpipe.quantize import load_source, stamp_variant
from dlpipe.runtime import PROVIDERS, provider_in_use

FP16_VARIANT = "fp16"


def convert_fp16(fp32_path: Path, fp16_path: Path) -> None:
    """models/<model>/model.fp16.onnx from the fp32 graph, written atomically, with the source's `dlpipe.*`
    metadata and `dlpipe.variant` = "fp16"."""
    fp32_path, fp16_path = Path(fp32_path), Path(fp16_path)
    source = load_source(fp32_path, fp16_path)
    try:
        copy = onnx.ModelProto()
        copy.CopyFrom(source)  # the converter edits the model it is given
        converted = convert_float_to_float16(copy, keep_io_types=True)
        # The converter appends its input Casts after their readers; ONNX requires nodes in topological order.
        OnnxModel(converted).topological_sort()
        onnx.checker.check_model(converted)
    except Exception as exc:  # onnx's ValidationError, a shape inference failure: a graph it cannot convert
        raise DlpipeError(f"{fp32_path}: fp16 conversion failed ({type(exc).__name__}: {first_line(exc)})") from exc
    with atomic_path(fp16_path) as tmp:
        onnx.save(converted, str(tmp))
        stamp_variant(tmp, source, FP16_VARIANT)


def measured(mode: str, providers: list[str]) -> bool:
    """Whether the fp16 variant is registered, evaluated and offered to the gate under `export.fp16` = `mode`
    and `evaluate.providers` = `providers`: "cuda" where ONNX Runtime would run it on its CUDA provider."""
    return mode == "always" or (mode == "cuda" and provider_in_use(providers) == PROVIDERS["cuda"])
