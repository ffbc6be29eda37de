"""Model registry: `register_model` decorates a builder; `get_model(name, **net)` builds the network.

Each entry records which training task drives it (classifier, forecaster, ...), so params, the CLI and
the pipeline can route a model name to the right LightningModule and evaluation without special cases.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

from dlpipe.errors import DlpipeError

Builder = Callable[..., nn.Module]


@dataclass(frozen=True)
class ModelSpec:
    name: str
    task: str
    builder: Builder
    summary: str

    def data_kwargs(self) -> set[str]:
        """Builder arguments that come from the data (input shape, classes), not from params."""
        return {"in_channels", "image_size", "num_classes", "n_features"}

    def check_net_kwargs(self, net: dict[str, Any], where: str) -> None:
        accepted = set(inspect.signature(self.builder).parameters) - self.data_kwargs()
        for key in net:
            if key not in accepted:
                raise DlpipeError(f"{where}.{key}: not a parameter of {self.name} (accepted: {', '.join(sorted(accepted))})")


_REGISTRY: dict[str, ModelSpec] = {}


def register_model(name: str, task: str) -> Callable[[Builder], Builder]:
    def decorate(builder: Builder) -> Builder:
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} registered twice")
        summary = (inspect.getdoc(builder) or "").splitlines()[0] if inspect.getdoc(builder) else ""
        _REGISTRY[name] = ModelSpec(name=name, task=task, builder=builder, summary=summary)
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


# Importing the family modules registers their models.
from dlpipe.models import cnn, rnn  # noqa: E402,F401
