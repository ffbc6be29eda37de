"""Shared plotting helpers: a headless pyplot, and atomic writes of figures and of the CSV tables that
`dvc plots show` renders. Each task draws its own figures with them (see dlpipe.tasks)."""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from dlpipe.io import atomic_path


def pyplot():
    """matplotlib.pyplot on the non-interactive Agg backend (stages run without a display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(figure, target: Path, **savefig_kwargs) -> None:
    with atomic_path(target) as tmp:
        figure.savefig(tmp, format="png", **{"dpi": 110, "bbox_inches": "tight", **savefig_kwargs})
    pyplot().close(figure)


def save_csv(frame: pd.DataFrame, target: Path) -> None:
    with atomic_path(target) as tmp:
        frame.to_csv(tmp, index=False)


# The evaluate stage's latency metrics: latency_ms_<backend>_b<batch>_p50.
LATENCY_KEY = re.compile(r"latency_ms_(?P<backend>[a-z0-9]+)_b(?P<batch>[0-9]+)_p50")


def latency_rows(metrics: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Every p50 latency in a model's metrics as `{"batch", "backend", "p50_ms"}` rows (unordered)."""
    return [
        {"batch": int(match["batch"]), "backend": match["backend"], "p50_ms": float(value)}
        for key, value in metrics.items()
        if (match := LATENCY_KEY.fullmatch(key)) and isinstance(value, int | float)
    ]
