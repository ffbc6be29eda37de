"""What serving needs to know about each kind of model: how a request becomes the graph's input and how
the graph's output becomes an answer. One adapter per task, keyed by the `dlpipe.task` metadata that
export writes into every ONNX file; a new task's serving is one module here that registers its adapter.

These live apart from `dlpipe.tasks` (which imports torch for training) so serving stays torch-free; the
preprocessing they call is the same code the tasks use (`dlpipe.data.pixels`, `dlpipe.data.stocks`).
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from dlpipe.errors import DlpipeError
from dlpipe.runtime import InputContract


class BadRequest(DlpipeError):
    """A request the model cannot take; the message names what was wrong. Served as `status`."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Limits:
    """What one request may hold (params `serve`)."""

    max_batch: int
    max_image_pixels: int


@dataclass
class Batch:
    """The graph's input for one request and, per row, what the answer needs besides the output."""

    inputs: np.ndarray
    context: list[dict[str, Any]] = field(default_factory=list)


class Adapter(ABC):
    """Turns requests into graph inputs and outputs into answers for one loaded model."""

    task: ClassVar[str]
    # Media types `parse_upload` takes besides JSON (which `parse_json` takes), and the file suffixes
    # `dlpipe predict` maps to them.
    upload_types: ClassVar[dict[str, tuple[str, ...]]] = {}

    def __init__(self, contract: InputContract) -> None:
        self.contract = contract

    def metadata_json(self, key: str) -> Any:
        """A JSON value export wrote into the graph's metadata as `dlpipe.<key>`."""
        raw = self.contract.metadata.get(f"dlpipe.{key}")
        if raw is None:
            raise DlpipeError(f"the ONNX file has no dlpipe.{key} metadata (export it with `dlpipe export`)")
        try:
            return json.loads(raw)
        except json.JSONDecodeError as exc:
            raise DlpipeError(f"the ONNX file's dlpipe.{key} metadata is not JSON ({exc.msg})") from None

    @abstractmethod
    def describe(self) -> dict[str, Any]:
        """What a client needs to build a request (e.g. the class names or tickers, the image size)."""

    @abstractmethod
    def parse_json(self, payload: Any, limits: Limits) -> Batch:
        """A decoded JSON body -> the graph's input; BadRequest naming the first problem."""

    def parse_upload(self, data: bytes, media_type: str, query: Mapping[str, str], limits: Limits) -> Batch:
        """One uploaded file (e.g. an image) of `media_type` -> the graph's input."""
        raise BadRequest(f"this model takes application/json, not {media_type}", status=415)

    @abstractmethod
    def answers(self, outputs: np.ndarray, batch: Batch) -> list[dict[str, Any]]:
        """One JSON-ready answer per input row."""

    @abstractmethod
    def smoke_input(self) -> np.ndarray:
        """A valid input (batch 1) that a freshly loaded version must answer with finite numbers."""

    def media_type_of(self, path: Path) -> str:
        """The upload media type of a file on disk, from its suffix (for `dlpipe predict`)."""
        for media_type, suffixes in self.upload_types.items():
            if path.suffix.lower() in suffixes:
                return media_type
        known = sorted(s for suffixes in self.upload_types.values() for s in suffixes)
        raise DlpipeError(f"{path}: this model takes {', '.join(known)} files")


def instances(payload: Any, key: str, limits: Limits) -> list[Any]:
    """`payload[key]`, checked to be a non-empty list of at most `limits.max_batch` items."""
    if not isinstance(payload, dict):
        raise BadRequest(f"expected a JSON object with {key!r}, got {type(payload).__name__}")
    items = payload.get(key)
    if not isinstance(items, list):
        raise BadRequest(f"{key!r} must be a list")
    if not items:
        raise BadRequest(f"{key!r} is empty")
    if len(items) > limits.max_batch:
        raise BadRequest(f"{len(items)} {key} in one request; the limit is {limits.max_batch} (serve.max_batch)")
    return items


_ADAPTERS: dict[str, type[Adapter]] = {}


def register_adapter(cls: type[Adapter]) -> type[Adapter]:
    _ADAPTERS[cls.task] = cls
    return cls


def adapter_for(contract: InputContract) -> Adapter:
    """The adapter of the task export recorded in the graph (`dlpipe.task`)."""
    from dlpipe.serving.tasks import classifier, forecaster, generator  # noqa: F401 - registers the adapters

    task = contract.metadata.get("dlpipe.task")
    if task not in _ADAPTERS:
        served = ", ".join(sorted(_ADAPTERS))
        raise DlpipeError(f"the ONNX file's task {task!r} cannot be served (dlpipe.task metadata; served: {served})")
    return _ADAPTERS[task](contract)
