"""ONNX Runtime for every consumer of an exported model (evaluation, benchmarks, serving): sessions on the
preferred execution provider, batched runs, latency timing, and the model's input contract.

onnxruntime and numpy only: serving a model must not need torch.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dlpipe.errors import DlpipeError, first_line

log = logging.getLogger("dlpipe")

INPUT_NAME, OUTPUT_NAME = "input", "output"
PROVIDERS = {"cuda": "CUDAExecutionProvider", "cpu": "CPUExecutionProvider"}
_ORT_DTYPES = {
    "tensor(float)": np.float32,
    "tensor(double)": np.float64,
    "tensor(int64)": np.int64,
    "tensor(uint8)": np.uint8,
}


def gpu_visible() -> bool:
    """An NVIDIA GPU on this machine, by its device file or driver tool (no CUDA library is loaded)."""
    return Path("/dev/nvidia0").exists() or shutil.which("nvidia-smi") is not None


def provider_in_use(providers: Sequence[str]) -> str:
    """The execution provider a session asked for `providers` would try first: the first of them this
    onnxruntime build has (the CPU's when none is)."""
    import onnxruntime as ort

    available = set(ort.get_available_providers())
    return next((PROVIDERS[p] for p in providers if PROVIDERS.get(p) in available), PROVIDERS["cpu"])


def create_session(
    path: Path | str,
    providers: Sequence[str] = ("cuda", "cpu"),
    threads: int | None = None,
    spin: bool = True,
    strict: bool = False,
):
    """An onnxruntime session on the first available of `providers` ("cuda", "cpu").

    `spin=False` stops the intra-op threads from busy-waiting for the next call: right for a service whose
    concurrent requests need the cores, wrong for timing back-to-back calls (each would wake the pool).

    A CUDA provider that cannot load falls back to the CPU, so the provider in use is whatever
    `session.get_providers()[0]` says; callers record that, not what they asked for. The fallback is never
    silent: with a GPU on the machine it is a warning, and with `strict` (the GPU profile's evaluation) an
    error naming the fix.
    """
    import onnxruntime as ort

    unknown = [p for p in providers if p not in PROVIDERS]
    if unknown:
        raise DlpipeError(f"unknown execution provider {unknown[0]!r}; expected one of {', '.join(PROVIDERS)}")
    available = set(ort.get_available_providers())
    chosen = [PROVIDERS[p] for p in providers if PROVIDERS[p] in available] or [PROVIDERS["cpu"]]
    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only: the CUDA-fallback warning is reported via get_providers()
    if threads is not None:
        options.intra_op_num_threads = threads
    if not spin:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    try:
        session = ort.InferenceSession(str(path), sess_options=options, providers=chosen)
    except Exception as exc:  # onnxruntime raises its own exception types for unreadable or invalid graphs
        first = first_line(exc)
        raise DlpipeError(f"{path}: not a loadable ONNX model ({first})") from exc
    wanted, used = PROVIDERS[providers[0]], session.get_providers()[0]
    if used != wanted and (strict or (wanted == PROVIDERS["cuda"] and gpu_visible())):
        why = f"{path}: ONNX Runtime runs on {used}, not {wanted} (onnxruntime {ort.__version__} has "
        why += f"{', '.join(sorted(available))}; the `gpu` extra installs onnxruntime-gpu)"
        if strict:
            raise DlpipeError(why + "; or set evaluate.providers: [cpu]")
        log.warning("%s", why)
    return session


def latent_vectors(count: int, latent_dim: int, seed: int) -> np.ndarray:
    """A generator's input: `count` standard-normal latent vectors, float32 (count, latent_dim), the same
    for the same seed wherever they are drawn (training's sample grids, `dlpipe generate`, serving)."""
    return np.random.default_rng(seed).standard_normal((count, latent_dim), dtype=np.float32)


def run_batched(session, inputs: np.ndarray, batch_size: int = 512) -> np.ndarray:
    """The model's first output for `inputs`, computed `batch_size` rows at a time."""
    name = session.get_inputs()[0].name
    outputs = [session.run(None, {name: inputs[i : i + batch_size]})[0] for i in range(0, len(inputs), batch_size)]
    return np.concatenate(outputs)


def latency_ms(call: Callable[[], Any], warmup: int, runs: int) -> np.ndarray:
    """Wall-clock milliseconds of `runs` calls after `warmup` untimed ones."""
    for _ in range(warmup):
        call()
    timings = np.empty(runs)
    for i in range(runs):
        started = time.perf_counter()
        call()
        timings[i] = (time.perf_counter() - started) * 1000.0
    return timings


@dataclass(frozen=True)
class InputContract:
    """What an exported model accepts and returns, read from the ONNX graph and its dlpipe metadata."""

    input_name: str
    output_name: str
    dtype: type
    shape: tuple[int | None, ...]  # None where the dimension is dynamic (batch, sequence length)
    value_range: tuple[float, float] | None
    metadata: dict[str, str] = field(default_factory=dict)

    @classmethod
    def of(cls, session) -> InputContract:
        model_input, model_output = session.get_inputs()[0], session.get_outputs()[0]
        metadata = dict(session.get_modelmeta().custom_metadata_map)
        bounds = metadata.get("dlpipe.input_range")
        value_range = tuple(float(v) for v in bounds.split(",")) if bounds else None
        shape = tuple(d if isinstance(d, int) else None for d in model_input.shape)
        return cls(
            model_input.name,
            model_output.name,
            _ORT_DTYPES.get(model_input.type, np.float32),
            shape,
            value_range,
            metadata,
        )

    def check(self, inputs: np.ndarray) -> None:
        """Raise DlpipeError naming the first way `inputs` breaks the contract."""
        if inputs.dtype != self.dtype:
            raise DlpipeError(f"input dtype {inputs.dtype} does not match the model's {np.dtype(self.dtype)}")
        if inputs.ndim != len(self.shape) or any(
            want is not None and got != want for got, want in zip(inputs.shape, self.shape, strict=True)
        ):
            expected = "(" + ", ".join("*" if d is None else str(d) for d in self.shape) + ")"
            raise DlpipeError(f"input shape {tuple(inputs.shape)} does not match the model's {expected}")
        if not np.isfinite(inputs).all():
            raise DlpipeError("input contains NaN or infinite values")
        if self.value_range is not None and inputs.size:
            low, high = self.value_range
            if inputs.min() < low or inputs.max() > high:
                span = f"[{inputs.min():g}, {inputs.max():g}]"
                raise DlpipeError(f"input values span {span}, outside the model's range [{low:g}, {high:g}]")
