"""The models a service holds: where each comes from (a registry alias or a file), the loaded version
(one onnxruntime session shared by every request), and the swap to a new version.

A swap is copy-on-write: a new version is loaded and smoke-tested beside the old one, then the store's
mapping is replaced in one assignment. A request takes its `ServedModel` once, so requests in flight
finish on the version they started with; a version that fails to load or to answer is never switched to.
"""

from __future__ import annotations

import logging
import tempfile
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dlpipe.errors import DlpipeError, first_line
from dlpipe.io import sha256_file
from dlpipe.runtime import InputContract, create_session, run_batched
from dlpipe.serving.tasks import Adapter, BadRequest, adapter_for

log = logging.getLogger("dlpipe.serving")


class Source(ABC):
    """Where a model's versions come from."""

    description: str

    @abstractmethod
    def current(self) -> str:
        """The version that should be served now (cheap: called on every poll)."""

    @abstractmethod
    def fetch(self, version: str, directory: Path) -> Path:
        """The ONNX file of `version`, downloaded into `directory` if it is remote."""


class FileSource(Source):
    """An ONNX file on disk; its version is its content hash, so replacing the file is a new version."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.description = str(self.path)

    def current(self) -> str:
        if not self.path.is_file():
            raise DlpipeError(f"{self.path}: file not found")
        return f"sha256:{sha256_file(self.path)[:12]}"

    def fetch(self, version: str, directory: Path) -> Path:
        return self.path


class RegistrySource(Source):
    """The version an alias of a registered MLflow model points at (`models:/<name>@<alias>`)."""

    def __init__(self, tracking_uri: str, registered_name: str, alias: str) -> None:
        from mlflow import MlflowClient
        from mlflow.exceptions import MlflowException

        try:
            self.client = MlflowClient(tracking_uri, registry_uri=tracking_uri)
        except MlflowException as exc:  # e.g. a sqlite store where only mlflow-skinny is installed (the image)
            message = " ".join(str(exc).split())[:200]
            raise DlpipeError(
                f"cannot open the MLflow store {tracking_uri} ({message}); serve from an MLflow server "
                "(MLFLOW_TRACKING_URI=http://...) or from files (--file NAME=PATH.onnx)"
            ) from None
        self.tracking_uri, self.name, self.alias = tracking_uri, registered_name, alias
        self.description = f"models:/{registered_name}@{alias}"

    def current(self) -> str:
        from mlflow.exceptions import MlflowException

        try:
            return str(self.client.get_model_version_by_alias(self.name, self.alias).version)
        except MlflowException as exc:
            message = " ".join(str(exc).split())[:300]
            raise DlpipeError(f"{self.description}: not in the registry at {self.tracking_uri} ({message})") from None

    def fetch(self, version: str, directory: Path) -> Path:
        from mlflow.artifacts import download_artifacts
        from mlflow.environment_variables import MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR
        from mlflow.exceptions import MlflowException

        MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR.set(False)  # a service's log gets one line per load, not a bar
        uri = f"models:/{self.name}/{version}"
        try:
            # Resolved with this source's client: MLflow resolves a `models:/` URI in the process's default
            # registry (`sqlite:///mlflow.db` in the working directory), whatever tracking URI it is given.
            location = self.client.get_model_version_download_uri(self.name, version)
            if location.startswith("models:/"):  # a logged model (MLflow 3) with no storage location of its own
                model_id = location.removeprefix("models:/").split("/")[0]
                location = self.client.get_logged_model(model_id).artifact_location
            local = Path(download_artifacts(location, dst_path=str(directory), tracking_uri=self.tracking_uri))
        except MlflowException as exc:
            message = " ".join(str(exc).split())[:300]
            raise DlpipeError(f"{uri}: cannot be downloaded from {self.tracking_uri} ({message})") from None
        graphs = sorted(local.rglob("*.onnx"))
        if len(graphs) != 1:
            raise DlpipeError(f"models:/{self.name}/{version}: expected one .onnx file, found {len(graphs)}")
        return graphs[0]


@dataclass(frozen=True)
class ServedModel:
    """One loaded version of a model: its session, what it takes, and how requests map onto it."""

    name: str
    version: str
    source: str
    session: Any
    contract: InputContract
    adapter: Adapter
    loaded_at: float = field(default_factory=time.time)

    @property
    def provider(self) -> str:
        return self.session.get_providers()[0]

    def run(self, inputs: np.ndarray) -> np.ndarray:
        try:
            self.contract.check(inputs)  # the last guard: dtype, shape, finite values, range
        except DlpipeError as exc:
            raise BadRequest(str(exc)) from None
        return run_batched(self.session, inputs)

    def describe(self) -> dict[str, Any]:
        graph_input = self.session.get_inputs()[0]  # dynamic axes by name (batch, window), fixed ones as sizes
        shape = [d if isinstance(d, int) else str(d) for d in graph_input.shape]
        return {
            "name": self.name,
            "version": self.version,
            "source": self.source,
            "task": self.adapter.task,
            "input": {"name": self.contract.input_name, "shape": shape, "dtype": str(np.dtype(self.contract.dtype))},
            "provider": self.provider,
            "loaded_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.loaded_at)),
            **self.adapter.describe(),
        }


def load_version(
    name: str, source: Source, version: str, providers: tuple[str, ...], threads: int | None
) -> ServedModel:
    """Fetch, open and smoke-test one version; DlpipeError naming the version and what failed if any step
    fails (nothing is switched to)."""
    where = f"{source.description} version {version}"
    with tempfile.TemporaryDirectory(prefix=f"dlpipe-serve-{name}-") as directory:
        path = source.fetch(version, Path(directory))
        try:
            # Read whole into memory (the file may go); no spinning: the cores serve the other requests.
            session = create_session(path, providers, threads, spin=False)
            contract = InputContract.of(session)
            served = ServedModel(name, version, source.description, session, contract, adapter_for(contract))
        except DlpipeError as exc:
            raise DlpipeError(f"{where}: {str(exc).removeprefix(f'{path}: ')}") from None
    try:
        outputs = served.run(served.adapter.smoke_input())
    except Exception as exc:  # onnxruntime's own exception types: a graph that loads but cannot run
        first = first_line(exc)
        raise DlpipeError(f"{where}: the smoke prediction failed ({first})") from None
    if len(outputs) != 1 or not np.isfinite(outputs).all():
        raise DlpipeError(f"{where}: the smoke prediction is not finite")
    return served


@dataclass
class ModelStatus:
    """Per configured model: the last load error (None once a version loaded after it), for /v1/models."""

    error: str | None = None
    checked_at: float | None = None
    swaps: int = 0


class ModelStore:
    """The served models by name; `refresh` loads what each source says should be served."""

    def __init__(
        self, sources: dict[str, Source], providers: tuple[str, ...] = ("cuda", "cpu"), threads: int | None = None
    ):
        self.sources = sources
        self.providers, self.threads = tuple(providers), threads
        self._models: dict[str, ServedModel] = {}
        self.status = {name: ModelStatus() for name in sources}
        self._locks = {name: threading.Lock() for name in sources}
        self.on_swap: Callable[[str], None] | None = None  # called after a version replaced another

    def get(self, name: str) -> ServedModel | None:
        return self._models.get(name)

    @property
    def ready(self) -> bool:
        return all(name in self._models for name in self.sources)

    def refresh(self, name: str) -> dict[str, Any]:
        """Load `name`'s current version if it is not the one served; report what happened."""
        with self._locks[name]:  # one load per model at a time (the poller and an admin call may race)
            status, served = self.status[name], self._models.get(name)
            status.checked_at = time.time()
            try:
                version = self.sources[name].current()
                if served is not None and served.version == version:
                    status.error = None
                    return {"version": version, "changed": False}
                new = load_version(name, self.sources[name], version, self.providers, self.threads)
            except Exception as exc:  # whatever went wrong, the served version stays (and the poller lives)
                message = str(exc) if isinstance(exc, DlpipeError) else f"{type(exc).__name__}: {exc}"
                status.error = message
                kept = served.version if served else "nothing loaded"
                log.warning("%s: kept %s: %s", name, kept, message, exc_info=not isinstance(exc, DlpipeError))
                return {"version": served.version if served else None, "changed": False, "error": message}
            self._models = {**self._models, name: new}  # one assignment: readers see the old or the new
            status.error = None
            if served is not None:
                status.swaps += 1
                if self.on_swap is not None:
                    self.on_swap(name)
            log.info("%s: serving version %s from %s on %s", name, new.version, new.source, new.provider)
            return {"version": new.version, "changed": True, "previous": served.version if served else None}

    def refresh_all(self) -> dict[str, dict[str, Any]]:
        return {name: self.refresh(name) for name in self.sources}

    def poll(self, interval: float, stop: threading.Event) -> None:
        """Refresh every model each `interval` seconds until `stop` is set (a daemon thread's loop)."""
        while not stop.wait(interval):
            self.refresh_all()
