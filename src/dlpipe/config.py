"""The single reader of params.yaml: validated, typed parameters and every path the pipeline uses.

Nothing here has side effects at import; `load_params` reads and validates, `Paths` only computes names.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from dlpipe.errors import DlpipeError

IMAGE_SOURCES = ("mnist_5k", "digits", "mnist", "fashion_mnist", "cifar10")
STOCK_SOURCES = ("sample", "yfinance")

Fraction = Annotated[float, Field(gt=0.0, lt=0.5)]
PositiveInt = Annotated[int, Field(gt=0)]
PositiveFloat = Annotated[float, Field(gt=0.0)]


class _Strict(BaseModel):
    # Unknown keys are typos: reject them so a misspelt hyperparameter never silently falls back.
    model_config = ConfigDict(extra="forbid", frozen=True)


class ImagesParams(_Strict):
    source: str
    limit: PositiveInt | None = None
    val_fraction: Fraction = 0.1
    test_fraction: Fraction = 0.2
    mirror: str | None = None
    checksums: dict[str, str] = Field(default_factory=dict)

    @field_validator("source")
    @classmethod
    def _known_source(cls, value: str) -> str:
        if value in IMAGE_SOURCES or (value.startswith("folder:") and len(value) > len("folder:")):
            return value
        raise ValueError(f"unknown image source {value!r}; expected one of {', '.join(IMAGE_SOURCES)} or folder:<path>")


class StocksParams(_Strict):
    source: Literal["sample", "yfinance"]
    ticker: str = Field(min_length=1)
    start: str | None = None
    end: str | None = None


class DataParams(_Strict):
    images: ImagesParams
    stocks: StocksParams


class AugmentParams(_Strict):
    copies: Annotated[int, Field(ge=0)]
    p: Annotated[float, Field(ge=0.0, le=1.0)]
    rotate_deg: Annotated[float, Field(ge=0.0, le=180.0)]
    translate_frac: Annotated[float, Field(ge=0.0, le=0.5)]
    scale_min: PositiveFloat
    scale_max: PositiveFloat
    shear_deg: Annotated[float, Field(ge=0.0, le=45.0)]
    preview_count: PositiveInt = 16

    @model_validator(mode="after")
    def _scale_order(self) -> AugmentParams:
        if self.scale_min > self.scale_max:
            raise ValueError(f"scale_min ({self.scale_min}) must not exceed scale_max ({self.scale_max})")
        return self


class TrainParams(_Strict):
    task: Literal["classifier", "forecaster"]
    epochs: PositiveInt
    batch_size: PositiveInt
    lr: PositiveFloat
    weight_decay: Annotated[float, Field(ge=0.0)] = 0.0
    patience: PositiveInt = 3
    window: PositiveInt | None = None
    net: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _forecaster_needs_window(self) -> TrainParams:
        if self.task == "forecaster" and (self.window is None or self.window < 2):
            raise ValueError("forecasters need window >= 2")
        return self


class TrainerParams(_Strict):
    accelerator: str = "auto"
    devices: int | str = "auto"
    precision: str = "32-true"
    num_workers: Annotated[int, Field(ge=0)] = 0


class ExportParams(_Strict):
    opset: Annotated[int, Field(ge=17)] = 18
    parity_atol: PositiveFloat = 1e-4


class EvaluateParams(_Strict):
    latency_warmup: Annotated[int, Field(ge=0)] = 10
    latency_runs: PositiveInt = 100
    providers: list[Literal["cuda", "cpu"]] = Field(default_factory=lambda: ["cuda", "cpu"])


class MlflowParams(_Strict):
    tracking_uri: str | None = None
    experiment: str = "dlpipe"
    register_model: bool = True


class Params(_Strict):
    seed: int
    models: list[str] = Field(min_length=1)
    data: DataParams
    augment: AugmentParams
    trainer: TrainerParams = TrainerParams()
    train: dict[str, TrainParams]
    export: ExportParams = ExportParams()
    evaluate: EvaluateParams = EvaluateParams()
    mlflow: MlflowParams = MlflowParams()

    @model_validator(mode="after")
    def _models_have_train_sections(self) -> Params:
        for name in self.models:
            if name not in self.train:
                raise ValueError(f"model {name!r} is listed in models but has no train.{name} section")
        return self


@dataclass(frozen=True)
class Paths:
    """Every file location, derived from the project root (the directory holding params.yaml)."""

    root: Path

    @property
    def raw_images(self) -> Path:
        return self.root / "data" / "raw" / "images"

    @property
    def raw_stocks(self) -> Path:
        return self.root / "data" / "raw" / "stocks"

    @property
    def augmented(self) -> Path:
        return self.root / "data" / "augmented"

    @property
    def samples(self) -> Path:
        return self.root / "data" / "samples"

    @property
    def download_cache(self) -> Path:
        return self.root / "data" / "cache"

    def model_dir(self, model: str) -> Path:
        return self.root / "models" / model

    def checkpoint(self, model: str) -> Path:
        return self.model_dir(model) / "best.ckpt"

    def train_info(self, model: str) -> Path:
        return self.model_dir(model) / "train.json"

    def onnx(self, model: str) -> Path:
        return self.model_dir(model) / "model.onnx"

    @property
    def reports(self) -> Path:
        return self.root / "reports"

    @property
    def figures(self) -> Path:
        return self.reports / "figures"

    def metrics(self, model: str) -> Path:
        return self.reports / "metrics" / f"{model}.json"

    def plots(self, model: str) -> Path:
        return self.reports / "plots" / model

    @property
    def summary(self) -> Path:
        return self.reports / "summary.json"

    @property
    def report_html(self) -> Path:
        return self.reports / "index.html"

    @property
    def mlflow_db(self) -> Path:
        return self.root / "mlflow.db"

    @property
    def mlflow_artifacts(self) -> Path:
        return self.root / "mlartifacts"


@dataclass(frozen=True)
class Config:
    params: Params
    paths: Paths
    params_file: Path
    raw: dict[str, Any]

    @property
    def params_hash(self) -> str:
        canonical = json.dumps(self.raw, sort_keys=True, default=str).encode()
        return hashlib.sha256(canonical).hexdigest()[:16]

    def train_params(self, model: str) -> TrainParams:
        if model not in self.params.train:
            raise DlpipeError(f"unknown model {model!r}: no train.{model} section in {self.params_file}")
        return self.params.train[model]


def default_params_file() -> Path:
    return Path(os.environ.get("DLPIPE_PARAMS", "params.yaml")).resolve()


def _one_line(error: ValidationError, params_file: Path) -> str:
    first = error.errors()[0]
    key = ".".join(str(part) for part in first["loc"]) or "<root>"
    message = first["msg"].removeprefix("Value error, ")
    got = first.get("input")
    shown = "" if isinstance(got, dict | list) or first["type"] == "missing" else f" (got {got!r})"
    more = f" [+{len(error.errors()) - 1} more]" if len(error.errors()) > 1 else ""
    return f"{params_file}: {key}: {message}{shown}{more}"


def load_config(params_file: Path | str | None = None) -> Config:
    """Read and validate params.yaml; raise DlpipeError with one line naming the bad key or file."""
    path = Path(params_file).resolve() if params_file else default_params_file()
    if not path.is_file():
        raise DlpipeError(f"params file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise DlpipeError(f"{path}: not valid YAML: {str(exc).splitlines()[0]}") from exc
    if not isinstance(raw, dict):
        raise DlpipeError(f"{path}: expected a mapping at the top level")
    try:
        params = Params.model_validate(raw)
    except ValidationError as exc:
        raise DlpipeError(_one_line(exc, path)) from exc
    config = Config(params=params, paths=Paths(path.parent), params_file=path, raw=raw)
    _check_models_registered(config)
    return config


def _check_models_registered(config: Config) -> None:
    # Imported here: the registry pulls in torch, which plain config readers should not pay for twice.
    from dlpipe.models import get_spec

    for name, train in config.params.train.items():
        spec = get_spec(name, where=f"{config.params_file}: train.{name}")
        if spec.task != train.task:
            raise DlpipeError(
                f"{config.params_file}: train.{name}.task: model {name!r} is a {spec.task}, not a {train.task}"
            )
        spec.check_net_kwargs(train.net, where=f"{config.params_file}: train.{name}.net")
