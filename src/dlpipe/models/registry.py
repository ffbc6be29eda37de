"""Model registry: `register_model` decorates a builder; `get_model(name, **net)` builds the network.

Each entry records which task trains it (see `dlpipe.tasks`). A builder's type hints are its params
schema: `net:` values in params.yaml are validated against them (pydantic), so a wrong type or an
out-of-range value is reported with its key before anything is built.
"""

from __future__ import annotations

import inspect
import typing
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Annotated, Any

from pydantic import ConfigDict, Field, ValidationError, create_model
from torch import nn

from dlpipe.errors import DlpipeError

Builder = Callable[..., nn.Module]

# Types for builder arguments: the hint is the check (`hidden: PositiveInt` rejects `hidden: -5`).
PositiveInt = Annotated[int, Field(gt=0)]
DropoutRate = Annotated[float, Field(ge=0.0, lt=1.0)]
Widths = Annotated[Sequence[PositiveInt], Field(min_length=1)]  # one width per stage; at least one stage
PositiveFloat = Annotated[float, Field(gt=0.0)]  # a width multiplier: 0 would remove every channel
NonNegativeFloat = Annotated[float, Field(ge=0.0)]  # a loss weight: 0 switches the term off


@dataclass(frozen=True)
class ModelSpec:
    name: str
    task: str
    builder: Builder
    summary: str

    def signature(self) -> inspect.Signature:
        return inspect.signature(self.builder)

    def type_hints(self) -> dict[str, Any]:
        target = self.builder.__init__ if inspect.isclass(self.builder) else self.builder
        return typing.get_type_hints(target, include_extras=True)

    def validate_net(self, net: dict[str, Any], supplied_by_data: Iterable[str], where: str) -> dict[str, Any]:
        """`net` checked against the builder's type hints; returns the validated (coerced) values.

        `supplied_by_data` are builder arguments the task fills from the data (input shape, classes);
        they cannot be set in params.
        """
        hints = self.type_hints()
        data_args = set(supplied_by_data)
        fields: dict[str, Any] = {}
        for name, parameter in self.signature().parameters.items():
            if name in data_args or parameter.kind in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD):
                continue
            default = ... if parameter.default is parameter.empty else parameter.default
            fields[name] = (hints.get(name, Any), default)
        schema = create_model(f"{self.name}_net", __config__=ConfigDict(extra="forbid", strict=False), **fields)
        try:
            validated = schema.model_validate(net)
        except ValidationError as exc:
            first = exc.errors()[0]
            key = ".".join(str(part) for part in first["loc"])
            if first["type"] == "extra_forbidden":
                accepted = ", ".join(sorted(fields)) or "none"
                raise DlpipeError(f"{where}.{key}: not a parameter of {self.name} (accepted: {accepted})") from exc
            shown = "" if first["type"] == "missing" else f" (got {first.get('input')!r})"
            raise DlpipeError(f"{where}.{key}: {first['msg'].removeprefix('Value error, ')}{shown}") from exc
        return {name: getattr(validated, name) for name in net}


_REGISTRY: dict[str, ModelSpec] = {}


def register_model(name: str, task: str) -> Callable[[Builder], Builder]:
    """Register a network builder (a function or an nn.Module class) under `name`, trained by `task`."""

    def decorate(builder: Builder) -> Builder:
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} registered twice")
        doc = inspect.getdoc(builder)
        _REGISTRY[name] = ModelSpec(name=name, task=task, builder=builder, summary=doc.splitlines()[0] if doc else "")
        return builder

    return decorate


def list_models() -> list[str]:
    return sorted(_REGISTRY)


def get_spec(name: str, where: str = "model") -> ModelSpec:
    if name not in _REGISTRY:
        raise DlpipeError(f"{where}: unknown model {name!r}; registered models: {', '.join(list_models())}")
    return _REGISTRY[name]


def get_model(name: str, **kwargs: Any) -> nn.Module:
    return get_spec(name).builder(**kwargs)


def count_trainable_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)
