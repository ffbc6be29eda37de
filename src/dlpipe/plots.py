"""Shared plotting helpers: a headless pyplot, and atomic writes of figures and of the CSV tables that
`dvc plots show` renders. Each task draws its own figures with them (see dlpipe.tasks)."""

from __future__ import annotations

from pathlib import Path

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
