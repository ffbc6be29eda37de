"""The generator task: a GAN trained on the images dataset, judged by a trained classifier of the pipeline.

- training: the LightningModule (`generator_training.GeneratorModule`) holds the generator as `model`
  (latent vector in, pixels in [0, 1] out: what export writes) beside the discriminator, and trains both
  with manual optimisation. The checkpoint kept is the one with the lowest FID on the validation split,
  measured in the feature space of the classifier named by `generators.<model>.features`;
- export: the generator alone, dynamic batch; its input is a standard-normal latent vector;
- evaluate: samples drawn through the ONNX session from seeded latents, scored by `gan_quality.judge`
  against the test split (FID, the real-vs-real floor, diversity, the classes drawn), a sample grid.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

import numpy as np
import torch
from pydantic import Field
from torch import nn

from dlpipe import plots
from dlpipe.config import Config, TrainParams
from dlpipe.data.images import load_split
from dlpipe.data.pixels import image_grid, to_uint8, unit_float
from dlpipe.errors import DlpipeError
from dlpipe.io import read_json, sha256_file
from dlpipe.models import get_model, get_spec
from dlpipe.runtime import latent_vectors, run_batched
from dlpipe.tasks.base import Task, register_task
from dlpipe.tasks.profiles import training_plan

if TYPE_CHECKING:
    import lightning as L

IMAGE_META_KEYS = ("classes", "channels", "height", "width", "sha256", "split_sha256", "source")
GRID_SAMPLES = 64  # images in every sample grid (8 x 8)
GRID_SEED = 0  # the grid's latents: the same images epoch after epoch, and from `dlpipe generate --seed 0`
SCORE_SEED = 1  # the latents FID is measured on (validation, test and evaluation alike)


class GeneratorParams(TrainParams):
    task: Literal["generator"]
    # One-sided label smoothing (Salimans et al., 2016): the discriminator's target for real images.
    real_label: Annotated[float, Field(gt=0.5, le=1.0)] = 0.9
    fid_samples: Annotated[int, Field(ge=64)] = 1000  # generated images FID is measured on
    grid_every: Annotated[int, Field(ge=1)] = 5  # epochs between sample grids logged to MLflow
    d_win_epochs: Annotated[int, Field(ge=1)] = 3  # warn after this many epochs the discriminator wins outright


def features_model(config: Config, model: str) -> str:
    """The classifier whose features judge `model` (`generators.<model>.features`)."""
    entry = config.params.generators.get(model)
    if entry is None:
        raise DlpipeError(f"train.{model}: a generator is listed under `generators` (with its features classifier)")
    return entry.features


def feature_extractor(config: Config, model: str):
    """`gan_quality.PenultimateFeatures` of the trained features classifier (its best checkpoint)."""
    from dlpipe.tasks import task_of
    from dlpipe.tasks.gan_quality import PenultimateFeatures

    classifier = features_model(config, model)
    return PenultimateFeatures(task_of(config, classifier).load_exported(config.paths.checkpoint(classifier)))


class PixelGenerator(nn.Module):
    """Latent (B, latent_dim) -> generator -> pixels in [0, 1] (B, C, H, W), what every classifier takes."""

    def __init__(self, generator: nn.Module) -> None:
        super().__init__()
        self.generator = generator
        self.latent_dim = generator.latent_dim

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return (self.generator(z) + 1.0) * 0.5  # tanh's [-1, 1] -> [0, 1]


@register_task
class GeneratorTask(Task):
    name = "generator"
    params_type = GeneratorParams
    dataset = "images"
    data_kwargs = ("in_channels", "image_size")
    monitor = ("val/fid", "min")
    promotion = ("fid_cnn", False)  # lower is better
    compare_metrics = ("fid_cnn", "fid_cnn")
    metric_keys = ("fid_cnn", "fid_cnn_real_floor", "diversity_ratio", "classes_drawn", "class_counts")
    input_range = None  # a latent vector: unbounded
    # Static: activation scales fixed by calibration on latents, so an image does not depend on the batch it
    # is generated in (dynamic quantization scales each batch's activations by that batch's range).
    quantization = "static"

    # ------------------------------------------------------------------------------------------ training

    def _image_meta(self, config: Config) -> dict[str, Any]:
        meta = read_json(config.paths.meta(config.paths.raw_images), required=IMAGE_META_KEYS)
        if meta["height"] != meta["width"]:
            raise DlpipeError(
                f"{config.paths.raw_images}: a generator needs square images, not {meta['height']}x{meta['width']}"
            )
        return meta

    def data_fingerprint(self, config: Config) -> str:
        return self._image_meta(config)["sha256"]

    def build(self, config: Config, model: str) -> tuple[L.LightningModule, L.LightningDataModule]:
        from dlpipe.tasks.generator_training import GeneratorDataModule

        plan = training_plan(config, model)
        train = plan.train  # the profile's batch size and learning rate
        meta = self._image_meta(config)
        kwargs = {"in_channels": meta["channels"], "image_size": meta["height"], **train.net}
        module = self.lightning_module(get_model(model, **kwargs), {"name": model, "kwargs": kwargs}, train)
        module.set_judge(feature_extractor(config, model))
        # No shifts: the generator imitates the images as they are.
        loader = dataclasses.replace(plan.loader, shift_px=0)
        datamodule = GeneratorDataModule(
            config.paths.raw_images, config.paths.raw_images, train.batch_size, plan=loader
        )
        return module, datamodule

    def lightning_module(self, net: nn.Module, net_spec: dict[str, Any], train: TrainParams) -> L.LightningModule:
        from dlpipe.tasks.generator_training import GeneratorModule

        return GeneratorModule(
            self.wrap(net, net_spec["kwargs"]),
            net.discriminator,
            net_spec,
            train.optimizer.model_dump(exclude_unset=True),
            train.epochs,
            real_label=getattr(train, "real_label", 0.9),
            fid_samples=getattr(train, "fid_samples", 1000),
            grid_every=getattr(train, "grid_every", 5),
            d_win_epochs=getattr(train, "d_win_epochs", 3),
        )

    def wrap(self, net: nn.Module, data_kwargs: dict[str, Any]) -> nn.Module:
        return PixelGenerator(net.generator)

    # -------------------------------------------------------------------------------------------- export

    def _latent_dim(self, config: Config, model: str) -> int:
        net = config.train_params(model).net
        return int(net.get("latent_dim", get_spec(model).signature().parameters["latent_dim"].default))

    def reference_inputs(self, config: Config, model: str) -> np.ndarray:
        return latent_vectors(256, self._latent_dim(config, model), SCORE_SEED)

    def calibration_inputs(self, config: Config, model: str, count: int, seed: int) -> np.ndarray:
        return latent_vectors(count, self._latent_dim(config, model), seed)

    def contract(self, config: Config, model: str) -> dict[str, str]:
        meta = self._image_meta(config)
        return {
            "input": (
                f"float32 [batch, {self._latent_dim(config, model)}] latent vectors drawn from the standard normal "
                "distribution (numpy.random.default_rng(seed).standard_normal gives `dlpipe generate --seed`'s)"
            ),
            "output": (
                f"float32 [batch, {meta['channels']}, {meta['height']}, {meta['width']}] pixels in [0, 1]: what the "
                "classifiers of this pipeline take (multiply by 255 and round for uint8 images)"
            ),
            "latent_dim": str(self._latent_dim(config, model)),
            "image": json.dumps({"channels": meta["channels"], "height": meta["height"], "width": meta["width"]}),
            "classes": json.dumps(meta["classes"]),  # of the dataset it imitates
        }

    def evaluation_data(self, config: Config, model: str) -> dict[str, Any]:
        meta = self._image_meta(config)
        classifier = features_model(config, model)
        return {
            "source": meta["source"],
            "test_sha256": meta["split_sha256"]["test"],
            "input_shape": [self._latent_dim(config, model)],
            # FIDs in another classifier's feature space are not comparable.
            "features": classifier,
            "features_sha256": sha256_file(config.paths.checkpoint(classifier)),
        }

    # ------------------------------------------------------------------------------------------ evaluate

    def _samples(self, config: Config, model: str, session: Any) -> torch.Tensor:
        """The `fid_samples` images every FID is measured on (the SCORE_SEED latents), from `session`."""
        count = config.train_params(model).fid_samples
        latents = latent_vectors(count, self._latent_dim(config, model), SCORE_SEED)
        return torch.from_numpy(run_batched(session, latents, batch_size=256))

    def _split(self, config: Config, split: str) -> torch.Tensor:
        return torch.from_numpy(unit_float(load_split(config.paths.raw_images, split)[0]))

    def _scored(self, config: Config, model: str, session: Any):
        from dlpipe.tasks.gan_quality import judge

        return judge(
            feature_extractor(config, model),
            self._samples(config, model, session),
            self._split(config, "test"),
            self._split(config, "train"),
            len(self._image_meta(config)["classes"]),
            seed=config.params.seed,
        )

    def evaluate(
        self, config: Config, model: str, network: nn.Module, session: Any
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        from dlpipe.export import run_torch

        quality = self._scored(config, model, session)
        latent_dim = self._latent_dim(config, model)
        grid_latents = latent_vectors(GRID_SAMPLES, latent_dim, GRID_SEED)
        grid = run_batched(session, grid_latents)
        # Training's record of the discriminator winning outright (a generator that stopped learning).
        trained = read_json(config.paths.train_info(model), required=("test",))["test"]
        streak = int(trained.get("test/d_longest_wins_streak", 0))
        limit = config.train_params(model).d_win_epochs
        metrics = {
            **quality.metrics(),
            "fid_samples": int(config.train_params(model).fid_samples),
            "features": features_model(config, model),
            "onnx_max_abs_diff": float(np.abs(run_torch(network, grid_latents) - grid).max()),
            "discriminator_longest_win_epochs": streak,
            "warning": (
                f"the discriminator won outright for {streak} epochs in a row (d_win_epochs: {limit})"
                if streak >= limit
                else "none"
            ),
            **self._batch_64_latency(config, network, session, latent_dim),
        }
        classes = self._image_meta(config)["classes"]
        metrics["class_counts"] = dict(zip(map(str, classes), quality.class_counts, strict=True))  # MLflow: one each
        return metrics, {"grid": to_uint8(grid), "class_counts": quality.class_counts, "classes": classes}

    @staticmethod
    def _batch_64_latency(config: Config, network: nn.Module, session: Any, latent_dim: int) -> dict[str, float]:
        """Time to generate 64 images, ONNX Runtime vs PyTorch (the shared table has batch 1 and 32)."""
        from dlpipe.runtime import latency_ms

        warmup, runs = config.params.evaluate.latency_warmup, config.params.evaluate.latency_runs
        latents = latent_vectors(64, latent_dim, SCORE_SEED)
        name = session.get_inputs()[0].name
        onnx = latency_ms(lambda: session.run(None, {name: latents}), warmup, runs)
        with torch.inference_mode():
            eager = latency_ms(lambda: network.eval()(torch.from_numpy(latents)), warmup, runs)
        return {"latency_ms_onnx_b64_p50": float(np.median(onnx)), "latency_ms_torch_b64_p50": float(np.median(eager))}

    def promotion_score(self, config: Config, model: str, network: nn.Module, session: Any) -> float:
        # The FID alone: no floor, diversity or classes for a second graph (the int8 variant).
        from dlpipe.tasks.gan_quality import frechet_distance

        samples = self._samples(config, model, session)
        return frechet_distance(feature_extractor(config, model), self._split(config, "test"), samples)

    def headline(self, metrics: dict[str, Any], context: dict[str, Any]) -> dict[str, str]:
        """FID in the judge's features against the real-vs-real floor; diversity and classes drawn."""
        fid, floor = metrics.get(self.promotion[0]), metrics.get("fid_cnn_real_floor")
        warning = metrics.get("warning") if metrics.get("warning") not in (None, "none") else None
        verdict = (
            f"diversity {metrics.get('diversity_ratio', float('nan')):.2f}, "
            f"{metrics.get('classes_drawn', '?')} of {len(metrics.get('class_counts') or {})} classes drawn"
        )
        return {
            "metric": "-" if fid is None else f"FID {fid:.1f}",
            "baseline": "-" if floor is None else f"real-vs-real floor {floor:.1f}",
            "verdict": f"{warning}; {verdict}" if warning else verdict,
        }

    def plots(self, config: Config, model: str, outputs: dict[str, Any], directory: Path) -> None:
        import pandas as pd

        grid = image_grid(outputs["grid"])
        plt = plots.pyplot()
        figure, axis = plt.subplots(figsize=(6, 6))
        axis.imshow(grid, cmap="gray" if grid.ndim == 2 else None, vmin=0, vmax=255)
        axis.set_axis_off()
        axis.set_title(f"{model}: {GRID_SAMPLES} samples (latent seed {GRID_SEED}, `dlpipe generate --seed 0`)")
        plots.save_figure(figure, config.paths.samples_grid(model))
        counts = pd.DataFrame({"class": outputs["classes"], "generated": outputs["class_counts"]})
        plots.save_csv(counts, directory / "class_counts.csv")
        figure, axis = plt.subplots(figsize=(6, 3))
        axis.bar([str(c) for c in outputs["classes"]], outputs["class_counts"], color="tab:blue")
        axis.set_xlabel("class the classifier sees")
        axis.set_ylabel("generated images")
        axis.set_title(f"{model}: classes of {sum(outputs['class_counts'])} generated images")
        plots.save_figure(figure, directory / "class_counts.png")

    # ------------------------------------------------------------------- synthetic data (tests, benchmarks)

    def example_data_kwargs(self) -> dict[str, Any]:
        return {"in_channels": 1, "image_size": 28}

    def synthetic_inputs(self, data_kwargs: dict[str, Any], batch: int, rng: np.random.Generator) -> np.ndarray:
        latent_dim = get_spec("dcgan").signature().parameters["latent_dim"].default
        return rng.standard_normal((batch, data_kwargs.get("latent_dim", latent_dim))).astype(np.float32)

    def synthetic_batch(
        self, data_kwargs: dict[str, Any], batch: int, rng: np.random.Generator
    ) -> tuple[torch.Tensor, ...]:
        shape = (batch, data_kwargs["in_channels"], data_kwargs["image_size"], data_kwargs["image_size"])
        images = rng.integers(0, 256, size=shape, dtype=np.uint8)
        return (torch.from_numpy(images), torch.zeros(batch, dtype=torch.int64))
