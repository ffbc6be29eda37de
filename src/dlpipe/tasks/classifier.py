"""Image classification: cross-entropy, accuracy and macro-F1 from torchmetrics; judged by ONNX accuracy.

The exported graph takes float32 pixels in [0, 1], shape (B, C, H, W), and returns logits (B, classes);
per-channel standardisation with the training split's statistics is part of it.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pandas as pd
import torch
from torch import nn

from dlpipe import plots
from dlpipe.config import Config, TrainParams
from dlpipe.data.images import load_split
from dlpipe.data.pixels import unit_float
from dlpipe.io import read_json
from dlpipe.models import get_model
from dlpipe.models.layers import Standardize
from dlpipe.runtime import run_batched
from dlpipe.tasks.base import Task, register_task
from dlpipe.tasks.profiles import training_plan

if TYPE_CHECKING:
    import lightning as L


class ClassifierParams(TrainParams):
    task: Literal["classifier"]


def to_unit_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 pixels -> float32 in [0, 1]: the input contract of every exported classifier."""
    return images.float().div_(255.0)


class StandardizedClassifier(nn.Module):
    """Pixels in [0, 1] -> (x - mean) / std per channel -> the network's logits."""

    def __init__(self, net: nn.Module, in_channels: int) -> None:
        super().__init__()
        self.standardize = Standardize((1, in_channels, 1, 1))
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.standardize(x))  # (B, C, H, W) -> (B, num_classes)


# What the classifier reads from fetch_images' meta.json.
IMAGE_META_KEYS = ("source", "classes", "channels", "height", "width", "sha256", "split_sha256")


@register_task
class ClassifierTask(Task):
    name = "classifier"
    params_type = ClassifierParams
    dataset = "images"
    data_kwargs = ("in_channels", "image_size", "num_classes")
    monitor = ("val/acc", "max")
    promotion = ("onnx_accuracy", True)
    compare_metrics = ("accuracy", "test_accuracy")
    metric_keys = ("test_accuracy", "onnx_accuracy", "onnx_top1_agreement", "macro_f1")
    input_range = (0.0, 1.0)

    # ------------------------------------------------------------------------------------------ training

    def data_fingerprint(self, config: Config) -> str:
        raw = self._image_meta(config)["sha256"]
        augmented = read_json(config.paths.meta(config.paths.augmented), required=("sha256",))["sha256"]
        return hashlib.sha256(f"{raw}:{augmented}".encode()).hexdigest()

    def _image_meta(self, config: Config) -> dict[str, Any]:
        return read_json(config.paths.meta(config.paths.raw_images), required=IMAGE_META_KEYS)

    def build(self, config: Config, model: str) -> tuple[L.LightningModule, L.LightningDataModule]:
        plan = training_plan(config, model)
        train = plan.train  # the profile's batch size and learning rate
        meta = self._image_meta(config)
        from dlpipe.data.datamodules import ImageDataModule

        datamodule = ImageDataModule(
            config.paths.raw_images, config.paths.augmented, train.batch_size, plan=plan.loader
        )
        data_kwargs = {
            "in_channels": meta["channels"],
            "image_size": meta["height"],
            "num_classes": len(meta["classes"]),
        }
        kwargs = {**data_kwargs, **train.net}
        module = self.lightning_module(get_model(model, **kwargs), {"name": model, "kwargs": kwargs}, train)
        # Per-channel pixel statistics of the training split, baked into the exported graph as buffers.
        pixels = to_unit_float(datamodule.train_images())
        module.model.standardize.set_stats(pixels.mean(dim=(0, 2, 3)), pixels.std(dim=(0, 2, 3)))
        return module, datamodule

    def lightning_module(self, net: nn.Module, net_spec: dict[str, Any], train: TrainParams) -> L.LightningModule:
        kwargs = net_spec["kwargs"]
        from dlpipe.tasks.classifier_training import ClassifierModule

        return ClassifierModule(
            self.wrap(net, kwargs),
            net_spec,
            kwargs["num_classes"],
            train.optimizer.model_dump(exclude_unset=True),
            train.epochs,
        )

    def wrap(self, net: nn.Module, data_kwargs: dict[str, Any]) -> nn.Module:
        return StandardizedClassifier(net, data_kwargs["in_channels"])

    # -------------------------------------------------------------------------------------------- export

    def _test_split(self, config: Config) -> tuple[np.ndarray, np.ndarray]:
        x, y = load_split(config.paths.raw_images, "test")
        return unit_float(x), y  # what serving feeds the graph, by the same function

    def reference_inputs(self, config: Config, model: str) -> np.ndarray:
        return self._test_split(config)[0][:256]

    def agreement_inputs(self, config: Config, model: str) -> np.ndarray:
        return self._test_split(config)[0]  # the whole test split

    def calibration_inputs(self, config: Config, model: str, count: int, seed: int) -> np.ndarray:
        x, _ = load_split(config.paths.raw_images, "train")  # the raw training images, as deployment will see
        chosen = np.random.default_rng(seed).choice(len(x), size=min(count, len(x)), replace=False)
        return unit_float(x[np.sort(chosen)])

    def contract(self, config: Config, model: str) -> dict[str, str]:
        meta = self._image_meta(config)
        colour = "grayscale" if meta["channels"] == 1 else "RGB"
        return {
            "input": (
                f"float32 [batch, {meta['channels']}, {meta['height']}, {meta['width']}] {colour} pixels divided "
                "by 255 (values 0..1, not standardised: the graph standardises)"
            ),
            "output": (
                "float32 [batch, classes] logits: argmax is the index into dlpipe.classes, softmax the probabilities"
            ),
            "classes": json.dumps(meta["classes"]),
        }

    def evaluation_data(self, config: Config, model: str) -> dict[str, Any]:
        meta = self._image_meta(config)
        return {
            "source": meta["source"],
            "test_sha256": meta["split_sha256"]["test"],
            "input_shape": [meta["channels"], meta["height"], meta["width"]],
        }

    # ------------------------------------------------------------------------------------------ evaluate

    def evaluate(
        self, config: Config, model: str, network: nn.Module, session: Any
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        from torchmetrics.functional.classification import multiclass_confusion_matrix, multiclass_f1_score

        from dlpipe.export import run_torch

        x, y = self._test_split(config)
        classes = self._image_meta(config)["classes"]
        torch_logits = run_torch(network, x)
        onnx_logits = run_batched(session, x)
        torch_pred, onnx_pred = torch_logits.argmax(1), onnx_logits.argmax(1)
        target = torch.from_numpy(y)
        metrics = {
            "test_accuracy": float((torch_pred == y).mean()),
            "onnx_accuracy": float((onnx_pred == y).mean()),
            "onnx_top1_agreement": float((torch_pred == onnx_pred).mean()),
            "macro_f1": float(multiclass_f1_score(torch.from_numpy(onnx_pred), target, len(classes), average="macro")),
            "onnx_max_abs_diff": float(np.abs(torch_logits - onnx_logits).max()),
            "test_samples": int(len(y)),
        }
        confusion = multiclass_confusion_matrix(torch.from_numpy(onnx_pred), target, len(classes)).numpy()
        return metrics, {"confusion": confusion, "actual": y, "predicted": onnx_pred, "classes": classes}

    def headline(self, metrics: dict[str, Any], context: dict[str, Any]) -> dict[str, str]:
        """ONNX test accuracy against chance (one class in `classes`); the verdict is the promotion floor's."""
        line = super().headline(metrics, context)
        classes = context.get("classes") or []
        if classes:
            line["baseline"] = f"chance {1 / len(classes):.3f}; " + line["baseline"]
        return line

    def plots(self, config: Config, model: str, outputs: dict[str, Any], directory: Path) -> None:
        plt = plots.pyplot()
        classes, confusion = outputs["classes"], outputs["confusion"]
        figure, ax = plt.subplots(figsize=(0.5 * len(classes) + 2.5, 0.5 * len(classes) + 2))
        image = ax.imshow(confusion, cmap="Blues")
        ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right", fontsize=8)
        ax.set_yticks(range(len(classes)), classes, fontsize=8)
        ax.set_xlabel("predicted (ONNX Runtime)")
        ax.set_ylabel("actual")
        for (row, col), count in np.ndenumerate(confusion):
            if count:
                color = "white" if count > confusion.max() / 2 else "black"
                ax.text(col, row, int(count), ha="center", va="center", fontsize=7, color=color)
        figure.colorbar(image, ax=ax, fraction=0.046)
        ax.set_title(f"{model}: test confusion matrix")
        plots.save_figure(figure, directory / "confusion.png")
        names = np.asarray(classes)
        table = pd.DataFrame({"actual": names[outputs["actual"]], "predicted": names[outputs["predicted"]]})
        plots.save_csv(table, directory / "predictions.csv")

    # ------------------------------------------------------------------- synthetic data (tests, benchmarks)

    def example_data_kwargs(self) -> dict[str, Any]:
        return {"in_channels": 1, "image_size": 28, "num_classes": 10}

    def synthetic_inputs(self, data_kwargs: dict[str, Any], batch: int, rng: np.random.Generator) -> np.ndarray:
        shape = (batch, data_kwargs["in_channels"], data_kwargs["image_size"], data_kwargs["image_size"])
        return rng.uniform(0.0, 1.0, size=shape).astype(np.float32)

    def synthetic_batch(
        self, data_kwargs: dict[str, Any], batch: int, rng: np.random.Generator
    ) -> tuple[torch.Tensor, ...]:
        images = (self.synthetic_inputs(data_kwargs, batch, rng) * 255).astype(np.uint8)
        labels = rng.integers(0, data_kwargs["num_classes"], size=batch)
        return torch.from_numpy(images), torch.from_numpy(labels)
