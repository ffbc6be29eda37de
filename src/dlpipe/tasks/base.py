"""The Task protocol: everything that varies by kind of model (classifier, forecaster, generator, ...).

A task turns a registered network into something trainable, exportable and measurable:

- training: its params type (`train.<model>` sections with `task: <name>`), the builder arguments the data
  supplies, the LightningModule and DataModule built from the config, the metric checkpointing watches;
- export: the module that becomes the ONNX graph (the network wrapped with its input/output scaling, or
  one network of several, e.g. a GAN's generator) and real inputs for the parity check;
- evaluation: metrics through an onnxruntime session, the figures, the promotion metric.

The pipeline (train.py, stages.py, evaluate.py, tracking.py, the Prefect flow, the benchmarks) asks the
task and never branches on its name. A new kind of model is one module that subclasses `Task` and
registers it with `@register_task`.

The shape also fits a generator (a GAN): its LightningModule holds the generator as `self.model` (what
`load_exported` rebuilds and export writes) beside a discriminator, trains both with manual optimisation,
and monitors a quality score computed in validation (e.g. `("val/fid", "min")`); `wrap` maps the
generator's output to pixels, `reference_inputs` are latent vectors, and `evaluate` scores samples drawn
through the ONNX session.
"""

from __future__ import annotations

import pickle
from abc import ABC, abstractmethod
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import numpy as np
import torch
from torch import nn

from dlpipe.errors import DlpipeError, first_line
from dlpipe.models import get_model

if TYPE_CHECKING:
    import lightning as L

    from dlpipe.config import Config, TrainParams

# The LightningModule of every task keeps the exported module as `self.model`; its weights are the
# checkpoint's state-dict entries under this prefix.
EXPORTED_PREFIX = "model."


class Task(ABC):
    """One kind of model. Subclasses set the class attributes and implement the abstract methods."""

    name: ClassVar[str]
    params_type: ClassVar[type[TrainParams]]
    dataset: ClassVar[str]  # the data it trains on: one of config.DATASETS, the directory data/<dataset>
    data_kwargs: ClassVar[tuple[str, ...]]  # builder arguments the data supplies (input shape, classes)
    monitor: ClassVar[tuple[str, Literal["min", "max"]]]  # what ModelCheckpoint and EarlyStopping watch
    promotion: ClassVar[tuple[str, bool]]  # metric that decides the `champion` alias; True: higher is better
    metric_keys: ClassVar[tuple[str, ...]]  # keys `evaluate` adds to reports/metrics/<model>.json
    input_range: ClassVar[tuple[float, float] | None] = None  # value range of the exported input, if bounded
    dynamic_axes: ClassVar[dict[int, str]] = {0: "batch"}  # exported input axes of any size
    # How the int8 variant is made: "static" (activations calibrated on training inputs; convolutions) or
    # "dynamic" (activations quantized at run time; matrix products and recurrent cells).
    quantization: ClassVar[Literal["static", "dynamic"]] = "static"
    # `dlpipe compare`: the promotion metric's name in the table and its PyTorch counterpart's metric key.
    compare_metrics: ClassVar[tuple[str, str]]

    # ------------------------------------------------------------------------------------------ training

    @abstractmethod
    def data_fingerprint(self, config: Config) -> str:
        """sha256 of the data the model trains on, as recorded by the data stages."""

    @abstractmethod
    def build(self, config: Config, model: str) -> tuple[L.LightningModule, L.LightningDataModule]:
        """The LightningModule (network wrapped, statistics fitted on the training split) and its data."""

    @abstractmethod
    def lightning_module(self, net: nn.Module, net_spec: dict[str, Any], train: TrainParams) -> L.LightningModule:
        """The LightningModule around `net`, with identity input/output statistics."""

    @abstractmethod
    def wrap(self, net: nn.Module, data_kwargs: dict[str, Any]) -> nn.Module:
        """The module that is exported: `net` plus the task's scaling, so the ONNX graph takes raw inputs."""

    def network(self, net_spec: dict[str, Any]) -> nn.Module:
        """The bare network a checkpoint's `net_spec` describes (`name` and builder `kwargs`)."""
        return get_model(net_spec["name"], **net_spec["kwargs"])

    # -------------------------------------------------------------------------------------------- export

    def load_exported(self, checkpoint: Path) -> nn.Module:
        """Rebuild the exported module (eval mode) from a checkpoint, without executing anything in it."""
        checkpoint = Path(checkpoint)
        if not checkpoint.is_file():
            raise DlpipeError(f"{checkpoint}: file not found (run train first)")
        try:
            # torch's weights-only unpickler meets arbitrary bytes with arbitrary exceptions (IndexError,
            # AttributeError, ...): any failure to read the file is the same one-line refusal.
            try:
                state = torch.load(checkpoint, map_location="cpu", weights_only=True)
            except Exception as exc:  # noqa: BLE001
                raise pickle.UnpicklingError(str(exc).strip() or type(exc).__name__) from exc
            spec = state["hyper_parameters"]["net_spec"]
            module = self.wrap(self.network(spec), spec["kwargs"])
            weights = {
                k.removeprefix(EXPORTED_PREFIX): v
                for k, v in state["state_dict"].items()
                if k.startswith(EXPORTED_PREFIX)
            }
            module.load_state_dict(weights)
        except (OSError, RuntimeError, KeyError, TypeError, ValueError, EOFError, pickle.UnpicklingError) as exc:
            first = first_line(exc)
            raise DlpipeError(f"{checkpoint}: not a loadable {self.name} checkpoint ({first})") from exc
        return module.eval()

    @abstractmethod
    def reference_inputs(self, config: Config, model: str) -> np.ndarray:
        """Real inputs (float32, at most a few hundred) for the export parity check and latency."""

    def parity_inputs(self, config: Config, model: str) -> dict[str, np.ndarray]:
        """Named batches of real inputs the exported graph must match PyTorch on (export.parity_batches)."""
        from dlpipe.export import batch_cases

        return batch_cases(self.reference_inputs(config, model), config.params.export.parity_batches)

    def agreement_inputs(self, config: Config, model: str) -> np.ndarray | None:
        """Inputs on which the graph's top-1 class must match PyTorch's (export.min_top1_agreement), or None
        where the output is not a class score."""
        return None

    def calibration_inputs(self, config: Config, model: str, count: int, seed: int) -> np.ndarray:
        """Real training inputs for static int8 calibration (never the test split the int8 graph is judged on)."""
        raise NotImplementedError(f"the {self.name} task has no calibration inputs (its quantization is dynamic)")

    @abstractmethod
    def contract(self, config: Config, model: str) -> dict[str, str]:
        """What the exported model takes and returns: `input` and `output` in words (shape, dtype, scaling,
        meaning) plus the values a caller needs (class names, feature formulas). The one source of the ONNX
        metadata, the MLflow model's metadata and the README's deployment examples."""

    def onnx_metadata(self, config: Config, model: str) -> dict[str, str]:
        """Key-value metadata stored in the ONNX file (`dlpipe.<key>` for each contract entry), read back
        by `dlpipe.runtime.InputContract`."""
        metadata = {"model": model, "task": self.name, **self.contract(config, model)}
        if self.input_range is not None:
            metadata["input_range"] = f"{self.input_range[0]:g},{self.input_range[1]:g}"
        return {f"dlpipe.{key}": value for key, value in metadata.items()}

    @abstractmethod
    def evaluation_data(self, config: Config, model: str) -> dict[str, Any]:
        """What the test metrics were measured on (source, test-set hash, input shape): versions are
        compared for the `champion` alias only when this is equal."""

    # ------------------------------------------------------------------------------------------ evaluate

    @abstractmethod
    def evaluate(
        self, config: Config, model: str, network: nn.Module, session: Any
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """Metrics (`metric_keys` and more) through the onnxruntime `session`, and the outputs for `plots`."""

    def promotion_score(self, config: Config, model: str, network: nn.Module, session: Any) -> float:
        """The promotion metric of the graph behind `session` (e.g. an int8 variant) on the test split. A task
        whose `evaluate` does more than that metric needs (baselines, figures' data) overrides this."""
        return float(self.evaluate(config, model, network, session)[0][self.promotion[0]])

    @abstractmethod
    def plots(self, config: Config, model: str, outputs: dict[str, Any], directory: Path) -> None:
        """Figures and the CSV tables `dvc plots` renders, written into `directory`."""

    def headline(self, metrics: dict[str, Any], context: dict[str, Any]) -> dict[str, str]:
        """The report's one-line judgement of a model: `metric` (its test result), `baseline` (what it is
        measured against) and `verdict`. `context`: `threshold` (the promotion floor or ceiling, if any)
        and `classes` (the image classes, when the data has them)."""
        value = metrics.get(self.promotion[0])
        threshold = context.get("threshold")
        metric = "-" if value is None else f"{self.promotion[0]} {value:.4g}"
        if value is None or threshold is None:
            return {"metric": metric, "baseline": "-", "verdict": "-"}
        passes = value >= threshold if self.promotion[1] else value <= threshold
        bound = ">=" if self.promotion[1] else "<="
        verdict = (
            f"meets the promotion gate ({bound} {threshold:g})"
            if passes
            else f"misses the gate ({bound} {threshold:g})"
        )
        return {"metric": metric, "baseline": f"gate {bound} {threshold:g}", "verdict": verdict}

    # ------------------------------------------------------------------- synthetic data (tests, benchmarks)

    @abstractmethod
    def example_data_kwargs(self) -> dict[str, Any]:
        """Data-supplied builder arguments of a typical dataset (MNIST-sized images, the stock features)."""

    @abstractmethod
    def synthetic_inputs(self, data_kwargs: dict[str, Any], batch: int, rng: np.random.Generator) -> np.ndarray:
        """A float32 batch shaped like the exported module's input."""

    @abstractmethod
    def synthetic_batch(
        self, data_kwargs: dict[str, Any], batch: int, rng: np.random.Generator
    ) -> tuple[torch.Tensor, ...]:
        """A training batch shaped like the DataModule's (a tuple of tensors)."""

    def synthetic_train_params(self) -> dict[str, Any]:
        """The task's own `train.<model>` keys (beyond the common ones) for a quick synthetic run."""
        return {}


VARIANTS = ("int8", "fp16")  # the graphs derived from each exported fp32 one, offered to the promotion gate


def variant_metric_name(variant: str, metric: str) -> str:
    """A variant's promotion metric: `onnx_accuracy` -> `int8_accuracy`; `rmse_ratio_vs_persistence` ->
    `fp16_rmse_ratio_vs_persistence`."""
    return f"{variant}_{metric.removeprefix('onnx_')}"


def int8_metric_name(metric: str) -> str:
    """The int8 variant's promotion metric (`variant_metric_name` for "int8")."""
    return variant_metric_name("int8", metric)


_TASKS: dict[str, Task] = {}


def register_task(cls: type[Task]) -> type[Task]:
    """Class decorator: make `cls` the task named `cls.name`."""
    if cls.name in _TASKS:
        raise ValueError(f"task {cls.name!r} registered twice")
    _TASKS[cls.name] = cls()
    return cls


def list_tasks() -> list[str]:
    return sorted(_TASKS)


def get_task(name: str) -> Task:
    if name not in _TASKS:
        raise DlpipeError(f"unknown task {name!r}; registered tasks: {', '.join(list_tasks())}")
    return _TASKS[name]


def train_params_types() -> list[type[TrainParams]]:
    return [_TASKS[name].params_type for name in list_tasks()]


def task_of(config: Config, model: str) -> Task:
    """The task that trains `model` according to its `train.<model>` section."""
    return get_task(config.train_params(model).task)
