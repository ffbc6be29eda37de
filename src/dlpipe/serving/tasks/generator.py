"""Serving a generator: `{"n", "seed", "format"}` in; `n` images out, as base64 PNG files or uint8 pixel
arrays. The latents are `dlpipe.runtime.latent_vectors(n, latent_dim, seed)` and the pixels go through
`dlpipe.data.pixels.to_uint8`, as in `dlpipe generate`: a request answers the same images that
`dlpipe generate --n N --seed S` writes from the same graph."""

from __future__ import annotations

import base64
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from dlpipe.data.pixels import image_layout, png_bytes, to_uint8
from dlpipe.errors import DlpipeError
from dlpipe.runtime import latent_vectors
from dlpipe.serving.tasks import Adapter, BadRequest, Batch, Limits, register_adapter

FORMATS = ("png", "array")
KEYS = ("n", "seed", "format")
DEFAULTS = {"n": 1, "seed": 0, "format": "png"}
SEED_LIMIT = 2**63  # seeds are 0 .. 2**63 - 1: what a signed 64-bit integer holds in any client


def _shown(value: Any) -> str:
    """A JSON value as the client wrote it (true, null, "4"), cut short."""
    text = json.dumps(value)
    return text if len(text) <= 40 else f"{text[:37]}..."


@register_adapter
class GeneratorAdapter(Adapter):
    task = "generator"
    upload_types = {}  # JSON only: a generator's input is a seed, not a file

    def __init__(self, contract) -> None:
        super().__init__(contract)
        self.latent_dim = int(self.metadata_json("latent_dim"))
        if len(contract.shape) != 2 or contract.shape[1] not in (None, self.latent_dim):
            raise DlpipeError(f"a generator graph takes (batch, {self.latent_dim}) latents, not {contract.shape}")
        self.classes = [str(name) for name in self.metadata_json("classes")]
        image = self.metadata_json("image")  # {"channels", "height", "width"}: the output's fixed axes
        try:
            self.channels, self.height, self.width = (int(image[key]) for key in ("channels", "height", "width"))
        except (KeyError, TypeError, ValueError):
            raise DlpipeError(f"the ONNX file's dlpipe.image metadata is not an image shape: {image!r}") from None
        self.model = contract.metadata.get("dlpipe.model", "MODEL")

    def describe(self) -> dict[str, Any]:
        return {
            "latent_dim": self.latent_dim,
            "image": {"height": self.height, "width": self.width, "channels": self.channels},
            "classes": self.classes,
            "formats": list(FORMATS),
            "defaults": dict(DEFAULTS),  # of the request's {"n", "seed", "format"}
            "accepts": ["application/json"],
        }

    # --------------------------------------------------------------------------------------------- input
    def parse_json(self, payload: Any, limits: Limits) -> Batch:
        if not isinstance(payload, dict):
            example = '{"n": 4, "seed": 0, "format": "png"}'
            raise BadRequest(f"expected a JSON object such as {example}, got {_shown(payload)}")
        unknown = [key for key in payload if key not in KEYS]
        if unknown:
            raise BadRequest(f"unknown key {unknown[0]!r}: a generator takes {', '.join(KEYS)}")
        request = {**DEFAULTS, **payload}
        n, seed, image_format = request["n"], request["seed"], request["format"]
        # `type(...) is int`: JSON true and false are Python bools, and 4.0 is not an integer count.
        if type(n) is not int or n < 1:
            raise BadRequest(f"'n' must be an integer from 1 to {limits.max_batch}, got {_shown(n)}")
        if n > limits.max_batch:
            raise BadRequest(f"'n' is {_shown(n)} images; the limit is {limits.max_batch} (serve.max_batch)")
        if type(seed) is not int or not 0 <= seed < SEED_LIMIT:
            raise BadRequest(f"'seed' must be an integer from 0 to 2**63 - 1, got {_shown(seed)}")
        if not isinstance(image_format, str) or image_format not in FORMATS:
            raise BadRequest(f"'format' must be one of {', '.join(map(repr, FORMATS))}, got {_shown(image_format)}")
        context = [{"index": index, "seed": seed, "format": image_format} for index in range(n)]
        return Batch(latent_vectors(n, self.latent_dim, seed), context)

    def parse_upload(self, data: bytes, media_type: str, query: Mapping[str, str], limits: Limits) -> Batch:
        raise BadRequest(
            f'content type {media_type!r}: a generator takes application/json only ({{"n", "seed", "format"}})',
            status=415,
        )

    def media_type_of(self, path: Path) -> str:
        raise DlpipeError(
            f"{path}: {self.model} is a generator and takes no files; use `dlpipe generate {self.model} --n N "
            "--seed S --out DIR`"
        )

    # -------------------------------------------------------------------------------------------- output
    def answers(self, outputs: np.ndarray, batch: Batch) -> list[dict[str, Any]]:
        # The model's faults, not the client's: DlpipeError (served as a 500 and logged), never a wrong image.
        expected = (len(batch.inputs), self.channels, self.height, self.width)
        if outputs.shape != expected:
            raise DlpipeError(
                f"the generator answered shape {outputs.shape}; its dlpipe.image metadata gives {expected}"
            )
        if not np.isfinite(outputs).all():
            raise DlpipeError("the generator answered NaN or infinite pixels")
        answers = []
        for pixels, info in zip(to_uint8(outputs), batch.context, strict=True):
            image = image_layout(pixels)
            answer = {"index": info["index"], "seed": info["seed"]}
            if info["format"] == "png":
                answer["png"] = base64.b64encode(png_bytes(image)).decode("ascii")
            else:
                answer["pixels"] = image.tolist()
            answers.append(answer)
        return answers

    def smoke_input(self) -> np.ndarray:
        return latent_vectors(1, self.latent_dim, 0)
