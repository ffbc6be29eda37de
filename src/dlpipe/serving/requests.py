"""A request's body -> the loaded model's answer: the one code path behind `POST .../predict` and
`dlpipe predict`. JSON is parsed with the standard library (NaN and Infinity refused); uploads go to
the model's adapter; nothing on this path unpickles anything."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import numpy as np

from dlpipe.serving.models import ServedModel
from dlpipe.serving.tasks import BadRequest, Batch, Limits

JSON = "application/json"


def _refuse_constant(name: str) -> Any:
    raise BadRequest(f"{name} is not a number a model can take (JSON has no NaN or Infinity)")


def decode_json(body: bytes) -> Any:
    if not body:
        raise BadRequest("the request body is empty")
    try:
        return json.loads(body, parse_constant=_refuse_constant)
    except UnicodeDecodeError:
        raise BadRequest("the JSON body is not UTF-8") from None
    except json.JSONDecodeError as exc:
        raise BadRequest(f"not valid JSON: {exc.msg} (line {exc.lineno}, column {exc.colno})") from None
    except RecursionError:
        raise BadRequest("the JSON body is nested too deeply") from None
    except ValueError as exc:  # an integer of more digits than int() converts (sys.get_int_max_str_digits)
        raise BadRequest(f"not valid JSON ({str(exc).split(';')[0]})") from None


def merge(batches: list[Batch]) -> Batch:
    return Batch(np.concatenate([b.inputs for b in batches]), [c for b in batches for c in b.context])


def parse(served: ServedModel, media_type: str, body: bytes, query: Mapping[str, str], limits: Limits) -> Batch:
    """The graph input for a body of `media_type` (JSON, or an upload the model's adapter takes)."""
    if media_type == JSON:
        return served.adapter.parse_json(decode_json(body), limits)
    if not body:
        raise BadRequest("the request body is empty")
    return served.adapter.parse_upload(body, media_type, query, limits)


def answer(served: ServedModel, batch: Batch) -> dict[str, Any]:
    if len(batch.inputs) == 0:
        raise BadRequest("nothing to predict")
    outputs = served.run(batch.inputs)
    return {"model": served.name, "version": served.version, "predictions": served.adapter.answers(outputs, batch)}
