"""The single reader of params.yaml: validated, typed parameters and every path the pipeline uses.

Nothing here has side effects at import; `load_params` reads and validates, `Paths` only computes names.
"""

from __future__ import annotations

import datetime as dt
import functools
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, field_validator, model_validator

from dlpipe.errors import DlpipeError

IMAGE_SOURCES = ("mnist_5k", "digits", "mnist", "fashion_mnist", "cifar10", "folder")
# The datasets the data stages write (data/<name>/); `models` maps each model to the one it trains on.
DATASETS = ("images", "stocks")
PARAMS_ENV = "DLPIPE_PARAMS"  # environment variable naming the params file (default ./params.yaml)

Fraction = Annotated[float, Field(gt=0.0, lt=0.5)]
PositiveInt = Annotated[int, Field(gt=0)]
PositiveFloat = Annotated[float, Field(gt=0.0)]
NonNegativeFloat = Annotated[float, Field(ge=0.0)]
Beta = Annotated[float, Field(ge=0.0, lt=1.0)]
# Lightning's precision names; `bf16-mixed` needs bf16 units (Ampere+ GPUs, AVX-512-BF16/AMX CPUs) to be fast.
Precision = Literal["32-true", "32", "64-true", "16-mixed", "bf16-mixed", "16-true", "bf16-true"]


class _Strict(BaseModel):
    # Unknown keys are typos: reject them so a misspelt hyperparameter never silently falls back. Strict
    # types: `seed: true` or `epochs: "5"` is a mistake, not a 1 or a 5 (an int is still a valid float).
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class ImagesParams(_Strict):
    source: str
    folder: str = "data/image_folder"  # the `folder` source's images (relative to the project root)
    limit: PositiveInt | None = None
    val_fraction: Fraction = 0.1
    test_fraction: Fraction = 0.2
    mirror: str | None = None
    checksums: dict[str, str] = Field(default_factory=dict)

    @field_validator("source")
    @classmethod
    def _known_source(cls, value: str) -> str:
        if value in IMAGE_SOURCES:
            return value
        if value.startswith("folder:"):
            raise ValueError("use `source: folder` and `folder: <path>` (dvc.yaml watches that path)")
        raise ValueError(f"unknown image source {value!r}; expected one of {', '.join(IMAGE_SOURCES)}")


class StocksParams(_Strict):
    source: Literal["sample", "yfinance"]
    tickers: Annotated[list[Annotated[str, Field(min_length=1, pattern=r"^[A-Za-z0-9.^=-]+$")]], Field(min_length=1)]
    start: dt.date | None = None
    end: dt.date | None = None

    @model_validator(mode="before")
    @classmethod
    def _renamed_ticker(cls, values: Any) -> Any:
        if isinstance(values, dict) and "ticker" in values:
            raise ValueError("`ticker` is now `tickers`, a list (e.g. tickers: [GOOG])")
        return values

    @field_validator("tickers")
    @classmethod
    def _upper_and_unique(cls, tickers: list[str]) -> list[str]:
        upper = [t.upper() for t in tickers]  # Yahoo symbols are case-insensitive; files are named in capitals
        if len(set(upper)) != len(upper):
            raise ValueError(f"a ticker is listed twice: {', '.join(upper)}")
        return upper

    @field_validator("start", "end", mode="before")
    @classmethod
    def _iso_date(cls, value: Any) -> Any:
        # YAML reads an unquoted 2010-01-31 as a date already; a quoted one is a string.
        if isinstance(value, str):
            try:
                return dt.date.fromisoformat(value)
            except ValueError:
                raise ValueError("not a date (expected YYYY-MM-DD)") from None
        if isinstance(value, dt.datetime):
            raise ValueError("a date without a time (YYYY-MM-DD)")
        return value

    @model_validator(mode="after")
    def _start_before_end(self) -> StocksParams:
        if self.start and self.end and self.start >= self.end:
            raise ValueError(f"start ({self.start}) must be before end ({self.end})")
        return self


class DataParams(_Strict):
    images: ImagesParams
    stocks: StocksParams


Probability = Annotated[float, Field(ge=0.0, le=1.0)]
FactorRange = Annotated[list[PositiveFloat], Field(min_length=2, max_length=2)]  # [min, max]


class AugmentParams(_Strict):
    copies: Annotated[int, Field(ge=0)]
    p: Probability
    rotate_deg: Annotated[float, Field(ge=0.0, le=180.0)]
    translate_frac: Annotated[float, Field(ge=0.0, le=0.5)]
    scale_min: PositiveFloat
    scale_max: PositiveFloat
    shear_deg: Annotated[float, Field(ge=0.0, le=45.0)]
    preview_count: PositiveInt = 16
    # None: the image source's default (dlpipe.augment.SOURCE_DEFAULTS); the augment stage resolves it.
    hflip_p: Probability | None = None
    vflip_p: Probability | None = None
    stretch_p: Probability | None = None
    stretch_x: FactorRange = [1.0, 1.3]
    stretch_y: FactorRange = [1.0, 1.3]
    brightness_contrast_p: Probability | None = None
    brightness_limit: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.2
    contrast_limit: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.2

    @field_validator("stretch_x", "stretch_y")
    @classmethod
    def _min_before_max(cls, value: list[float]) -> list[float]:
        if value[0] > value[1]:
            raise ValueError(f"[min, max]: min ({value[0]}) must not exceed max ({value[1]})")
        return value

    @model_validator(mode="after")
    def _scale_order(self) -> AugmentParams:
        if self.scale_min > self.scale_max:
            raise ValueError(f"scale_min ({self.scale_min}) must not exceed scale_max ({self.scale_max})")
        return self


class OptimizerParams(_Strict):
    """The optimizer and learning-rate schedule of one model (shared by every task)."""

    name: Literal["adamw", "adam", "sgd", "rmsprop"] = "adamw"
    lr: PositiveFloat
    weight_decay: NonNegativeFloat = 0.0
    momentum: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.0
    nesterov: bool = False
    betas: Annotated[list[Beta], Field(min_length=2, max_length=2)] = [0.9, 0.999]
    schedule: Literal["cosine", "step", "none"] = "cosine"
    step_size: PositiveInt = 10
    gamma: Annotated[float, Field(gt=0.0, le=1.0)] = 0.1
    warmup_epochs: Annotated[int, Field(ge=0)] = 0

    @model_validator(mode="after")
    def _no_ignored_settings(self) -> OptimizerParams:
        # A setting the chosen optimizer or schedule would silently ignore is a mistake worth naming.
        given = self.model_fields_set
        if "momentum" in given and self.name not in ("sgd", "rmsprop"):
            raise ValueError(f"momentum: {self.name} has no momentum term (use sgd or rmsprop, or betas)")
        if "betas" in given and self.name not in ("adam", "adamw"):
            raise ValueError(f"betas: only adam and adamw use betas, not {self.name}")
        if self.nesterov and (self.name != "sgd" or self.momentum <= 0):
            raise ValueError("nesterov: needs name sgd and momentum > 0")
        if given & {"step_size", "gamma"} and self.schedule != "step":
            raise ValueError(f"step_size/gamma: only used by schedule step, not {self.schedule}")
        return self


class TrainParams(_Strict):
    """What every `train.<model>` section holds; each task extends it, chosen by `task` (see dlpipe.tasks)."""

    task: str
    epochs: PositiveInt
    batch_size: PositiveInt
    patience: PositiveInt = 3
    optimizer: OptimizerParams
    net: dict[str, Any] = Field(default_factory=dict)
    # This model's precision, chosen by measurement (benchmarks/bench_precision.py); null: the trainer's.
    precision: Precision | None = None

    @model_validator(mode="after")
    def _warmup_fits(self) -> TrainParams:
        if self.optimizer.warmup_epochs >= self.epochs:
            raise ValueError(
                f"optimizer.warmup_epochs ({self.optimizer.warmup_epochs}) must be less than epochs ({self.epochs})"
            )
        return self


class GpuProfileParams(_Strict):
    """What `trainer.profile: gpu` turns on (dlpipe.tasks.profiles.training_plan applies it)."""

    channels_last: bool = True  # image tensors and conv weights in NHWC: what tensor cores read fastest
    cudnn_benchmark: bool = True  # time conv algorithms once per input shape; costs bitwise reproducibility
    compile: str | None = None  # a torch.compile backend (e.g. inductor); null = eager
    batch_scale: PositiveInt = 4  # train.<model>.batch_size x this
    lr_scaling: Literal["linear", "sqrt", "none"] = "sqrt"  # how the learning rate follows batch_scale
    device_resident_mib: Annotated[int, Field(ge=0)] = 4096  # image sets up to this size (uint8) live on the GPU
    shift_px: Annotated[int, Field(ge=0, le=8)] = 2  # device-resident: random translation, batched on the device
    pin_memory: bool = True  # loaders of larger sets: page-locked host memory, asynchronous copies


class TrainerParams(_Strict):
    profile: Literal["cpu", "gpu"] = "cpu"
    accelerator: Literal["auto", "cpu", "gpu", "cuda", "mps"] = "auto"
    devices: PositiveInt | Literal["auto"] = "auto"
    # Lightning's strategy name: auto (DDP when devices > 1), ddp, ddp_spawn, fsdp, ... (see Lightning's docs)
    strategy: str = "auto"
    num_nodes: PositiveInt = 1  # machines of a multi-node DDP run (each launched with torchrun or SLURM)
    # null: each model's train.<model>.precision, else the profile's default; a value here applies to all.
    precision: Precision | None = None
    num_workers: Annotated[int, Field(ge=0)] = 0
    threads: PositiveInt | None = None  # torch intra-op threads on the CPU; null = the physical cores available
    gpu: GpuProfileParams = GpuProfileParams()


class ExportParams(_Strict):
    opset: Annotated[int, Field(ge=17)] = 18
    parity_atol: PositiveFloat = 1e-4
    # The exported graph is checked at each of these batch sizes (and, for sequence models, at two lengths).
    parity_batches: Annotated[list[PositiveInt], Field(min_length=1)] = Field(default_factory=lambda: [1, 7, 64])
    # Classifiers: share of the whole test split where the graph and PyTorch pick the same class.
    min_top1_agreement: Annotated[float, Field(ge=0.0, le=1.0)] = 0.999
    # The int8 variant beside model.onnx: static (calibrated) for convolutional nets, dynamic for recurrent ones.
    calibration_samples: PositiveInt = 256  # training inputs the static quantization calibrates activations on
    calibration_method: Literal["minmax", "entropy", "percentile"] = "minmax"
    # The fp16 variant (always written) is registered, evaluated and offered to the gate where ONNX Runtime has
    # its CUDA provider ("cuda"), everywhere ("always"; on a CPU it is usually slower than fp32) or nowhere.
    fp16: Literal["cuda", "always", "never"] = "cuda"


class PromoteParams(_Strict):
    """The gate a newly evaluated version passes to take the `champion` alias."""

    # The task's promotion metric must reach this: at least (accuracy), or at most (a ratio where lower is better).
    thresholds: dict[str, float] = Field(
        default_factory=lambda: {"onnx_accuracy": 0.95, "rmse_ratio_vs_persistence": 1.05}
    )
    max_latency_ms: PositiveFloat = 50.0  # p50 ONNX Runtime latency of the chosen variant at `latency_batch`
    latency_batch: Literal[1, 32] = 1  # the batch size deployment cares about
    max_int8_loss: Annotated[float, Field(ge=0.0)] = 0.005  # the int8 variant may lose this much of the metric
    max_fp16_loss: Annotated[float, Field(ge=0.0)] = 0.005  # the fp16 variant may lose this much of the metric


class BaselineParams(_Strict):
    """The forecasts every forecaster is judged against, on the same test days."""

    moving_average_days: PositiveInt = 5
    # [p, d, q] of the ARIMA on log returns, or null: the lowest AIC with p, q <= arima_max_order, d = 0.
    arima_order: Annotated[list[Annotated[int, Field(ge=0, le=10)]], Field(min_length=3, max_length=3)] | None = None
    arima_max_order: Annotated[int, Field(ge=0, le=5)] = 2


class EvaluateParams(_Strict):
    latency_warmup: Annotated[int, Field(ge=0)] = 10
    latency_runs: PositiveInt = 100
    providers: list[Literal["cuda", "cpu"]] = Field(default_factory=lambda: ["cuda", "cpu"])
    significance: Annotated[float, Field(gt=0.0, lt=0.5)] = 0.05  # level of the tests behind `skill: yes`
    baselines: BaselineParams = Field(default_factory=BaselineParams)


class MlflowParams(_Strict):
    tracking_uri: str | None = None
    experiment: str = "dlpipe"
    register_model: bool = True


class ServeParams(_Strict):
    """`dlpipe serve`: which models the HTTP service loads, and the limits every request is held to."""

    host: str = "127.0.0.1"
    port: Annotated[int, Field(ge=0, le=65535)] = 8000
    models: list[str] | None = None  # served from the registry; null: every model of `models` and `generators`
    alias: str = "champion"  # the registry alias each model is served at (models:/dlpipe-<model>@<alias>)
    poll_seconds: Annotated[float, Field(ge=0.0)] = 30.0  # alias check interval; 0: only POST /v1/admin/reload
    providers: list[Literal["cuda", "cpu"]] = Field(default_factory=lambda: ["cuda", "cpu"])
    threads: PositiveInt | None = None  # onnxruntime intra-op threads per session; null: onnxruntime's default
    max_body_bytes: PositiveInt = 8 * 1024 * 1024  # larger requests get 413 before they are read
    max_batch: PositiveInt = 64  # images or windows in one request; more gets 400
    max_image_pixels: PositiveInt = 4096 * 4096  # width x height from the header, checked before decoding


ChannelPair = Annotated[list[PositiveInt], Field(min_length=2, max_length=2)]  # [M input, N output channels]


class CostParams(_Strict):
    """The `cost` stage: a standard 3x3 convolution against a depthwise separable one of the same shape."""

    channels: Annotated[list[ChannelPair], Field(min_length=1)] = [[32, 64], [64, 128], [128, 256]]
    sizes: Annotated[list[PositiveInt], Field(min_length=1)] = [28, 14]  # feature map H = W
    batch: PositiveInt = 32  # images per timed forward pass
    repeats: PositiveInt = 7  # timed rounds of both layers; the median per-round time ratio is reported
    warmup: Annotated[int, Field(ge=0)] = 1  # untimed rounds first (allocations, thread pool start)
    threads: PositiveInt | None = 1  # torch threads while timing; None = torch's default (one per core)


class DistillParams(_Strict):
    """Knowledge distillation (the `distill` stage): a small student trained on a trained teacher's soft
    targets, compared with the same student trained on the labels alone."""

    teacher: str = "resnet"  # a classifier in `models`, trained by `train <teacher>` first
    student: str = "cnn"  # a registered classifier, built with `net` (not train.<student>.net)
    net: dict[str, Any] = Field(default_factory=dict)  # the student builder's arguments; {} = its defaults
    epochs: PositiveInt = 3
    batch_size: PositiveInt = 128
    optimizer: OptimizerParams = OptimizerParams(lr=0.003, weight_decay=0.0005)
    temperature: PositiveFloat = 4.0  # T: softmax(logits / T) of both networks
    alpha: Annotated[float, Field(ge=0.0, le=1.0)] = 0.7  # weight of the soft-target term; 1 - alpha on CE

    @model_validator(mode="after")
    def _warmup_fits(self) -> DistillParams:
        if self.optimizer.warmup_epochs >= self.epochs:
            raise ValueError(
                f"optimizer.warmup_epochs ({self.optimizer.warmup_epochs}) must be less than epochs ({self.epochs})"
            )
        return self


ClassIndex = Annotated[int, Field(ge=0)]  # an index into meta.json `classes` (for MNIST digits, the digit)


class TransferParams(_Strict):
    """The `transfer` stage: pretrain a backbone on some classes, then learn others from k images each,
    from scratch, by feature extraction and by fine-tuning (see dlpipe.transfer)."""

    backbone: str = "resnet"  # a registered classifier with the transfer protocol (`fc`, `blocks()`)
    net: dict[str, Any] = Field(default_factory=dict)  # the backbone builder's arguments; {} = its defaults
    pretrain_classes: Annotated[list[ClassIndex], Field(min_length=2)] = [0, 1, 2, 3, 4]
    target_classes: Annotated[list[ClassIndex], Field(min_length=2)] = [5, 6, 7, 8, 9]
    shots: Annotated[list[PositiveInt], Field(min_length=1)] = [5, 20, 100]  # k: training images per target class
    pretrain_epochs: PositiveInt = 5
    epochs: PositiveInt = 20  # every k-shot training, whatever the mode
    head_epochs: PositiveInt = 10  # fine-tuning: epochs with the base frozen before the top blocks unfreeze
    unfreeze_blocks: PositiveInt = 1  # fine-tuning: how many of `blocks()` (from the top) to unfreeze
    lr: PositiveFloat = 0.01
    finetune_lr_factor: Annotated[float, Field(gt=0.0, le=1.0)] = 0.3  # lr x this once the top blocks unfreeze
    batch_size: PositiveInt = 16
    weights: str | None = None  # a torchvision-format state_dict of the backbone; null = pretrain here

    @field_validator("pretrain_classes", "target_classes", "shots")
    @classmethod
    def _no_repeats(cls, value: list[int]) -> list[int]:
        if repeated := sorted({v for v in value if value.count(v) > 1}):
            raise ValueError(f"{repeated[0]} is listed twice")
        return value

    @field_validator("weights")
    @classmethod
    def _weights_named(cls, value: str | None) -> str | None:
        if value is not None and not value.strip():
            raise ValueError("empty path (null pretrains the backbone here)")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> TransferParams:
        if shared := sorted(set(self.pretrain_classes) & set(self.target_classes)):
            raise ValueError(f"pretrain_classes and target_classes share class {shared[0]}: the new task must be new")
        if self.head_epochs >= self.epochs:
            raise ValueError(
                f"head_epochs ({self.head_epochs}) must be less than epochs ({self.epochs}), "
                "or fine-tuning never unfreezes"
            )
        return self


class GeneratorEntry(_Strict):
    """One generative model: its dataset and the trained classifier whose features judge it (FID)."""

    data: Literal[DATASETS]
    features: str  # a classifier in `models`, trained before the generator (dvc.yaml orders them)


class FlowParams(_Strict):
    """The Prefect flow (pipelines/flows.py): how stages fan out, which are retried. Read by no DVC stage."""

    workers: PositiveInt = 2  # stages run at once on the local Dask cluster; each gets an equal share of the cores
    dask_address: str | None = None  # scheduler of an existing Dask cluster (tcp://host:8786); null = a local one
    gpu_limit: Annotated[int, Field(ge=0)] | None = None  # `dlpipe-gpu` concurrency slots; null = GPUs seen
    cache: bool = True  # skip a stage whose DVC inputs (params section, dep hashes, command) are unchanged
    fetch_retries: Annotated[int, Field(ge=0)] = 3  # network fetches only: training and evaluation are deterministic
    fetch_retry_delay_s: PositiveFloat = 10.0  # first retry's delay, doubled each time (exponential backoff)
    fetch_timeout_s: PositiveFloat = 1800.0  # a fetch that hangs longer fails (and is retried)


class Params(_Strict):
    seed: int
    # model -> the dataset it trains on; dvc.yaml makes each model's stages depend on data/<dataset> only.
    models: dict[str, Literal[DATASETS]] = Field(min_length=1)
    # Generative models, in their own dvc.yaml stages: they also depend on their judge's checkpoint.
    generators: dict[str, GeneratorEntry] = Field(default_factory=dict)
    data: DataParams
    augment: AugmentParams
    trainer: TrainerParams = TrainerParams()
    # Each section is validated by its task's own params type (a union discriminated on `task`, built
    # from the task registry by `params_schema`), so a forecaster's `window` is checked only for forecasters.
    train: dict[str, TrainParams]
    export: ExportParams = ExportParams()
    evaluate: EvaluateParams = EvaluateParams()
    promote: PromoteParams = PromoteParams()
    mlflow: MlflowParams = MlflowParams()
    serve: ServeParams = ServeParams()
    cost: CostParams = CostParams()
    distill: DistillParams = DistillParams()
    transfer: TransferParams = TransferParams()
    flow: FlowParams = FlowParams()

    @model_validator(mode="after")
    def _models_have_train_sections(self) -> Params:
        for name in self.models:
            if name not in self.train:
                raise ValueError(f"model {name!r} is listed in models but has no train.{name} section")
        for name, entry in self.generators.items():
            if name in self.models:
                raise ValueError(f"generators.{name}: {name!r} is in models too; a model is in one of them")
            if name not in self.train:
                raise ValueError(f"generators.{name}: listed in generators but has no train.{name} section")
            if entry.features not in self.models:
                raise ValueError(
                    f"generators.{name}.features: {entry.features!r} is not in models ({', '.join(self.models)})"
                )
        return self


@functools.cache
def params_schema() -> type[Params]:
    """`Params` with `train.<model>` as the union of every registered task's params type."""
    from dlpipe.tasks import train_params_types  # the tasks import torch; plain readers of Paths do not

    types = tuple(train_params_types())
    # pydantic accepts a discriminator only on a real union; with one task its type is the schema.
    section = types[0] if len(types) == 1 else Annotated[Union[types], Field(discriminator="task")]  # noqa: UP007
    return create_model("Params", __base__=Params, train=(dict[str, section], ...))


@dataclass(frozen=True)
class Paths:
    """Every file location, derived from the project root (the directory holding params.yaml)."""

    root: Path

    def dataset(self, name: str) -> Path:
        """Everything the data stages write for one dataset (`models.<model>` names it): a model's stages
        depend on this one directory, so a change to another dataset leaves them up to date."""
        return self.root / "data" / name

    @property
    def raw_images(self) -> Path:
        return self.dataset("images") / "raw"

    @property
    def augmented(self) -> Path:
        return self.dataset("images") / "augmented"

    @property
    def raw_stocks(self) -> Path:
        return self.dataset("stocks") / "raw"

    @staticmethod
    def meta(directory: Path) -> Path:
        """The integrity record (sha256, counts, provenance) each data stage writes into its output directory."""
        return directory / "meta.json"

    def prices(self, ticker: str) -> Path:
        return self.raw_stocks / f"{ticker}.csv"

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

    def resume_dir(self, model: str) -> Path:
        """Training's working directory: best and last checkpoints, kept after a crash to resume from."""
        return self.model_dir(model) / ".resume"

    def train_info(self, model: str) -> Path:
        return self.model_dir(model) / "train.json"

    def training_curves(self, model: str) -> Path:
        """Every per-epoch metric training logged, a row an epoch (`dvc plots` draws it against `epoch`)."""
        return self.model_dir(model) / "training_curves.csv"

    def onnx(self, model: str) -> Path:
        return self.model_dir(model) / "model.onnx"

    def onnx_variant(self, model: str, variant: str) -> Path:
        """A graph derived from model.onnx: model.int8.onnx, model.fp16.onnx."""
        return self.model_dir(model) / f"model.{variant}.onnx"

    def onnx_int8(self, model: str) -> Path:
        return self.onnx_variant(model, "int8")

    def onnx_fp16(self, model: str) -> Path:
        return self.onnx_variant(model, "fp16")

    def export_info(self, model: str) -> Path:
        return self.model_dir(model) / "export.json"

    @property
    def reports(self) -> Path:
        return self.root / "reports"

    @property
    def figures(self) -> Path:
        return self.reports / "figures"

    @property
    def augment_preview(self) -> Path:
        return self.figures / "augment_preview.png"

    def samples_grid(self, model: str) -> Path:
        """A generator's final 8x8 sample grid (evaluate writes it from the exported graph)."""
        return self.figures / f"{model}_samples.png"

    def metrics(self, model: str) -> Path:
        return self.reports / "metrics" / f"{model}.json"

    def plots(self, model: str) -> Path:
        return self.reports / "plots" / model

    def latency_csv(self, model: str) -> Path:
        """p50 latency in ms by batch size and backend (torch, onnx, int8), long format, for `dvc plots`."""
        return self.plots(model) / "latency.csv"

    @property
    def summary(self) -> Path:
        return self.reports / "summary.json"

    @property
    def report_html(self) -> Path:
        return self.reports / "index.html"

    @property
    def cost(self) -> Path:
        """The cost stage's outputs: standard vs depthwise separable convolution, as JSON and a figure."""
        return self.reports / "cost"

    @property
    def depthwise_json(self) -> Path:
        return self.cost / "depthwise.json"

    @property
    def depthwise_png(self) -> Path:
        return self.cost / "depthwise.png"

    @property
    def distill(self) -> Path:
        """The distill stage's output directory: the comparison table as JSON and CSV."""
        return self.reports / "distill"

    @property
    def distill_json(self) -> Path:
        return self.distill / "distill.json"

    @property
    def distill_csv(self) -> Path:
        return self.distill / "distill.csv"

    @property
    def transfer(self) -> Path:
        """The transfer stage's output directory (written whole): table as JSON and CSV, and the figure."""
        return self.reports / "transfer"

    @property
    def transfer_json(self) -> Path:
        return self.transfer / "transfer.json"

    @property
    def transfer_csv(self) -> Path:
        return self.transfer / "transfer.csv"

    @property
    def transfer_png(self) -> Path:
        return self.transfer / "accuracy_vs_k.png"

    def transfer_weights(self, weights: str) -> Path:
        """The file `transfer.weights` names: relative to the project root, or absolute."""
        return self.root / weights

    @property
    def mlflow_db(self) -> Path:
        return self.root / "mlflow.db"

    @property
    def mlflow_lock(self) -> Path:
        """Held while the local store's tables and experiment are created (see tracking.ensure_experiment)."""
        return self.root / ".mlflow.db.lock"

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

    @property
    def all_models(self) -> list[str]:
        """`models`, then `generators` (which are judged by models and so come after them), in params order."""
        return [*self.params.models, *self.params.generators]

    def dataset_of(self, model: str) -> str:
        if model in self.params.generators:
            return self.params.generators[model].data
        return self.params.models[model]

    def stage_name(self, stage: str, model: str) -> str:
        """The dvc.yaml stage of `stage` (train, export, evaluate) for `model`: generators have their own."""
        return f"{stage}_generator@{model}" if model in self.params.generators else f"{stage}@{model}"

    def selected_models(self, requested: list[str] | None = None) -> list[str]:
        """`requested` (default: all of `models` and `generators`), each checked to be a configured model."""
        if not requested:
            return self.all_models
        for model in requested:
            self.train_params(model)
            if model not in self.all_models:
                raise DlpipeError(f"model {model!r} is not in models: {self.all_models} of {self.params_file}")
        return list(requested)


def _yaml_problem(error: yaml.YAMLError) -> str:
    """PyYAML's multi-line report as one line: the problem and where it is."""
    problem, mark = getattr(error, "problem", None), getattr(error, "problem_mark", None)
    if problem and mark:
        return f"{problem} (line {mark.line + 1}, column {mark.column + 1})"
    return " ".join(str(error).split())


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.SafeLoader (no object construction) that refuses a key given twice in one mapping: PyYAML keeps
    the last silently, so `epochs: 5 ... epochs: 50` would train for 50 without a word."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, str | int | float | bool | dt.date | None):
                continue  # the base class reports an unhashable key
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def default_params_file() -> Path:
    return Path(os.environ.get(PARAMS_ENV, "params.yaml")).resolve()


def _one_line(error: ValidationError, params_file: Path, raw: dict[str, Any]) -> str:
    first = error.errors()[0]
    loc = [str(part) for part in first["loc"]]
    # A discriminated union puts the chosen tag into the location (train.cnn.classifier.epochs): drop it.
    if (
        len(loc) > 2
        and loc[0] == "train"
        and isinstance(raw["train"].get(loc[1]), dict)
        and raw["train"][loc[1]].get("task") == loc[2]
    ):
        del loc[2]
    if first["type"] in ("union_tag_invalid", "union_tag_not_found"):
        loc.append("task")
    key = ".".join(loc) or "<root>"
    message = first["msg"].removeprefix("Value error, ")
    got = first.get("input")
    shown = "" if isinstance(got, dict | list) or first["type"] == "missing" else f" (got {got!r})"
    more = f" [+{len(error.errors()) - 1} more]" if len(error.errors()) > 1 else ""
    return f"{params_file}: {key}: {message}{shown}{more}"


def _read_params_file(params_file: Path | str | None) -> tuple[Path, dict[str, Any]]:
    """The params file's path and its YAML mapping, or DlpipeError naming what is wrong with the file."""
    path = Path(params_file).resolve() if params_file else default_params_file()
    if not path.is_file():
        raise DlpipeError(f"params file not found: {path}")
    try:
        raw = yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader) or {}
    except UnicodeDecodeError as exc:
        raise DlpipeError(f"{path}: not UTF-8 text (byte {exc.start})") from exc
    except OSError as exc:
        raise DlpipeError(f"{path}: cannot read ({exc.strerror})") from exc
    except yaml.YAMLError as exc:
        raise DlpipeError(f"{path}: not valid YAML: {_yaml_problem(exc)}") from exc
    if not isinstance(raw, dict):
        raise DlpipeError(f"{path}: expected a mapping at the top level")
    return path, raw


class ServingParams(_Strict):
    """The sections `dlpipe serve` and `dlpipe predict` read. The others are left unvalidated: checking the
    `train` sections needs the task registry, which imports torch, and serving must run without torch."""

    model_config = ConfigDict(extra="ignore", frozen=True, strict=True)

    models: dict[str, Literal[DATASETS]] = Field(min_length=1)
    generators: dict[str, GeneratorEntry] = Field(default_factory=dict)
    mlflow: MlflowParams = MlflowParams()
    serve: ServeParams = ServeParams()


@dataclass(frozen=True)
class ServingConfig:
    """What serving needs of the project: its params (`ServingParams`) and its paths (the MLflow store)."""

    params: ServingParams
    paths: Paths
    params_file: Path


def load_serving_config(params_file: Path | str | None = None) -> ServingConfig:
    """Read params.yaml for serving: validates `models`, `mlflow` and `serve` only, imports no torch."""
    path, raw = _read_params_file(params_file)
    try:
        params = ServingParams.model_validate(raw)
    except ValidationError as exc:
        raise DlpipeError(_one_line(exc, path, raw)) from exc
    return ServingConfig(params=params, paths=Paths(path.parent), params_file=path)


def load_config(params_file: Path | str | None = None) -> Config:
    """Read and validate params.yaml; raise DlpipeError with one line naming the bad key or file."""
    path, raw = _read_params_file(params_file)
    _check_model_tasks(raw, path)
    try:
        params = params_schema().model_validate(raw)
    except ValidationError as exc:
        raise DlpipeError(_one_line(exc, path, raw)) from exc
    params = _with_checked_models(params, path)
    if "distill" in raw:  # an absent section is checked when the distill stage runs (check_distill)
        params = check_distill(params, path)
    if "transfer" in raw:  # an absent section is checked when the transfer stage runs (check_transfer)
        params = check_transfer(params, path)
    return Config(params=params, paths=Paths(path.parent), params_file=path, raw=raw)


def _check_model_tasks(raw: dict[str, Any], params_file: Path) -> None:
    """Each `train.<model>` names a registered model and that model's task.

    Checked before the sections are validated, so that a model filed under the wrong task is reported as
    such, not as the other task's missing or unexpected keys.
    """
    from dlpipe.models import get_spec

    sections = raw.get("train")
    for name, section in sections.items() if isinstance(sections, dict) else ():
        spec = get_spec(name, where=f"{params_file}: train.{name}")
        task = section.get("task") if isinstance(section, dict) else None
        if isinstance(task, str) and task != spec.task:
            raise DlpipeError(f"{params_file}: train.{name}.task: model {name!r} is a {spec.task}, not a {task}")


def _with_checked_models(params: Params, params_file: Path) -> Params:
    """Each model's `net:` values, checked against its builder's type hints (and coerced to them), and the
    dataset `models` gives it, checked against its task's."""
    from dlpipe.models import get_spec
    from dlpipe.tasks import get_task

    checked = {}
    for name, train in params.train.items():
        spec = get_spec(name)
        net = spec.validate_net(train.net, get_task(train.task).data_kwargs, where=f"{params_file}: train.{name}.net")
        checked[name] = train.model_copy(update={"net": net})
        dataset = get_task(train.task).dataset
        if name in params.models and params.models[name] != dataset:
            raise DlpipeError(
                f"{params_file}: models.{name}: a {train.task} trains on {dataset}, not {params.models[name]}"
            )
        if name in params.generators and params.generators[name].data != dataset:
            given = params.generators[name].data
            raise DlpipeError(f"{params_file}: generators.{name}.data: a {train.task} trains on {dataset}, not {given}")
    _check_generators(params, params_file)
    return params.model_copy(update={"train": checked})


def _check_generators(params: Params, params_file: Path) -> None:
    """A generator's judge is a classifier of the same images (its penultimate features are compared)."""
    from dlpipe.tasks.classifier import ClassifierTask

    for name, entry in params.generators.items():
        judge = params.train[entry.features].task
        if judge != ClassifierTask.name:
            raise DlpipeError(
                f"{params_file}: generators.{name}.features: {entry.features!r} is a {judge}, "
                f"not a {ClassifierTask.name}"
            )
        if params.models[entry.features] != entry.data:
            raise DlpipeError(
                f"{params_file}: generators.{name}.features: {entry.features!r} trains on "
                f"{params.models[entry.features]}, not on the generator's {entry.data}"
            )


def check_distill(params: Params, params_file: Path, running: bool = False) -> Params:
    """The `distill` section against the rest: the teacher is a classifier with a `train` section, the
    student a registered classifier whose `net` fits its builder (returned coerced to its type hints, as the
    models' are). One-line DlpipeError naming the key.

    `running`: the distill stage is about to run, so the teacher must also be in `models` (the pipeline
    trains it). Loading params does not ask that: a project may train a subset of models (stocks only,
    say) and run the stages it needs."""
    from dlpipe.models import get_spec
    from dlpipe.tasks import get_task
    from dlpipe.tasks.classifier import ClassifierTask

    # Distillation matches class probabilities: teacher and student are classifiers.
    classifier = ClassifierTask.name
    distill, where = params.distill, f"{params_file}: distill"
    if distill.teacher not in params.train:
        raise DlpipeError(
            f"{where}.teacher: {distill.teacher!r} has no train.{distill.teacher} section "
            f"(models with one: {', '.join(params.train)})"
        )
    if running and distill.teacher not in params.models:
        raise DlpipeError(
            f"{where}.teacher: {distill.teacher!r} is not in models ({', '.join(params.models)}); add it and train it"
        )
    if params.train[distill.teacher].task != classifier:
        raise DlpipeError(
            f"{where}.teacher: {distill.teacher!r} is a {params.train[distill.teacher].task}, not a {classifier}"
        )
    spec = get_spec(distill.student, where=f"{where}.student")
    if spec.task != classifier:
        raise DlpipeError(f"{where}.student: {distill.student!r} is a {spec.task}, not a {classifier}")
    net = spec.validate_net(distill.net, get_task(classifier).data_kwargs, where=f"{where}.net")
    return params.model_copy(update={"distill": distill.model_copy(update={"net": net})})


def check_transfer(params: Params, params_file: Path) -> Params:
    """`transfer.backbone` is a registered image classifier and `transfer.net` fits its builder (returned
    coerced to its type hints). One-line DlpipeError naming the key."""
    from dlpipe.models import get_spec
    from dlpipe.tasks import get_task
    from dlpipe.tasks.classifier import ClassifierTask

    transfer, where = params.transfer, f"{params_file}: transfer"
    spec = get_spec(transfer.backbone, where=f"{where}.backbone")
    if spec.task != ClassifierTask.name:
        raise DlpipeError(f"{where}.backbone: {spec.name!r} is a {spec.task}, not an image classifier")
    net = spec.validate_net(transfer.net, get_task(spec.task).data_kwargs, where=f"{where}.net")
    return params.model_copy(update={"transfer": transfer.model_copy(update={"net": net})})
