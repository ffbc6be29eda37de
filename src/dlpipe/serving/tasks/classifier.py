"""Serving a classifier: images (PNG or JPEG files, base64 in JSON, or pixel arrays) in; class, class name
and probabilities out. Pixels reach the graph through `dlpipe.data.pixels`, as the test split does."""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping
from typing import Any

import numpy as np

from dlpipe.data.pixels import UnreadableImage, image_pixels, open_image, unit_float
from dlpipe.errors import DlpipeError
from dlpipe.serving.tasks import Adapter, BadRequest, Batch, Limits, instances, register_adapter

IMAGE_FORMATS = ("PNG", "JPEG")


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits.astype(np.float64) - logits.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=1, keepdims=True)


def _leaves(values: Any) -> list[Any]:
    return list(np.asarray(values, dtype=object).ravel())


def _integers(values: Any) -> bool:
    """Whether a rectangular nesting of lists holds integers only (JSON true and false are not)."""
    try:
        return all(type(value) is int for value in _leaves(values))
    except ValueError:
        return False


@register_adapter
class ClassifierAdapter(Adapter):
    task = "classifier"
    upload_types = {"image/png": (".png",), "image/jpeg": (".jpg", ".jpeg")}

    def __init__(self, contract) -> None:
        super().__init__(contract)
        self.classes = [str(name) for name in self.metadata_json("classes")]
        if len(contract.shape) != 4 or any(d is None for d in contract.shape[1:]):
            raise DlpipeError(f"a classifier graph takes (batch, C, H, W), not {contract.shape}")
        self.channels, self.height, self.width = contract.shape[1:]

    def describe(self) -> dict[str, Any]:
        return {
            "classes": self.classes,
            "image": {"height": self.height, "width": self.width, "channels": self.channels},
            "accepts": ["application/json", *self.upload_types, "multipart/form-data"],
        }

    # --------------------------------------------------------------------------------------------- input
    def _from_image(self, data: bytes, where: str, limits: Limits) -> np.ndarray:
        try:
            image = open_image(data, limits.max_image_pixels, IMAGE_FORMATS)
        except UnreadableImage as exc:
            raise BadRequest(f"{where}: {exc}") from None
        if image.size != (self.width, self.height):
            raise BadRequest(
                f"{where}: image is {image.width}x{image.height} pixels; the model takes {self.width}x{self.height}"
            )
        return image_pixels(image, self.channels)

    def _from_pixels(self, values: Any, where: str) -> np.ndarray:
        """One pixel array laid out as an image file decodes: (H, W) grayscale or (H, W, C), 0..255."""
        try:
            pixels = np.asarray(values)
        except ValueError:  # ragged nesting
            raise BadRequest(f"{where}: not a rectangular array") from None
        if pixels.size and pixels.dtype.kind in "fO" and _integers(values):  # past int64: numpy's float or object
            raise BadRequest(
                f"{where}: pixel values must lie in 0..255, got {min(_leaves(values))}..{max(_leaves(values))}"
            )
        if pixels.size and pixels.dtype.kind not in "iu":  # an empty list is numpy's float64: a shape problem
            kind = {"f": "fractional numbers", "b": "booleans", "U": "strings", "O": "mixed or ragged values"}
            got = kind.get(pixels.dtype.kind, str(pixels.dtype))
            raise BadRequest(f"{where}: pixel values must be integers 0..255, got {got}")
        expected = (self.height, self.width) if self.channels == 1 else (self.height, self.width, self.channels)
        if pixels.shape != expected and not (self.channels == 1 and pixels.shape == (*expected, 1)):
            raise BadRequest(f"{where}: shape {pixels.shape}; the model takes {expected} (height, width[, channels])")
        if pixels.size and (pixels.min() < 0 or pixels.max() > 255):
            raise BadRequest(f"{where}: pixel values must lie in 0..255, got {pixels.min()}..{pixels.max()}")
        pixels = pixels.astype(np.uint8).reshape(self.height, self.width, -1)
        return pixels.transpose(2, 0, 1)  # (C, H, W), as image_pixels gives

    def parse_json(self, payload: Any, limits: Limits) -> Batch:
        if isinstance(payload, dict) and ("images" in payload) == ("instances" in payload):
            raise BadRequest("give either 'instances' (pixel arrays) or 'images' (base64 PNG or JPEG files)")
        if isinstance(payload, dict) and "images" in payload:
            pixels = []
            for i, encoded in enumerate(instances(payload, "images", limits)):
                if not isinstance(encoded, str):
                    raise BadRequest(f"images[{i}]: expected a base64 string, got {type(encoded).__name__}")
                try:
                    data = base64.b64decode(encoded, validate=True)
                except (binascii.Error, ValueError):
                    raise BadRequest(f"images[{i}]: not valid base64") from None
                pixels.append(self._from_image(data, f"images[{i}]", limits))
        else:
            items = instances(payload, "instances", limits)
            pixels = [self._from_pixels(values, f"instances[{i}]") for i, values in enumerate(items)]
        return Batch(unit_float(np.stack(pixels)))

    def parse_upload(self, data: bytes, media_type: str, query: Mapping[str, str], limits: Limits) -> Batch:
        if media_type not in self.upload_types:
            accepted = ", ".join(["application/json", *self.upload_types, "multipart/form-data"])
            raise BadRequest(f"content type {media_type!r} is not one this model takes ({accepted})", status=415)
        return Batch(unit_float(self._from_image(data, "image", limits)[None]))

    # -------------------------------------------------------------------------------------------- output
    def answers(self, outputs: np.ndarray, batch: Batch) -> list[dict[str, Any]]:
        probabilities = softmax(outputs)
        chosen = outputs.argmax(axis=1)  # argmax of the logits, as evaluation takes it
        return [
            {
                "class": int(index),
                "class_name": self.classes[index],
                "probabilities": dict(zip(self.classes, map(float, row), strict=True)),
            }
            for index, row in zip(chosen, probabilities, strict=True)
        ]

    def smoke_input(self) -> np.ndarray:
        return np.full((1, self.channels, self.height, self.width), 0.5, dtype=np.float32)
