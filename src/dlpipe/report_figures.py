"""The report's own figures, drawn from the stages' tables: training curves per model and latency against
batch size for all models. PNG bytes, embedded in reports/index.html; nothing is written to disk."""

from __future__ import annotations

import io
from collections.abc import Mapping
from typing import Any

import pandas as pd

from dlpipe.plots import latency_rows, pyplot

BACKEND_LABELS = {"torch": "PyTorch", "onnx": "ONNX Runtime fp32", "int8": "ONNX Runtime int8"}


def _png(figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    pyplot().close(figure)
    return buffer.getvalue()


def training_curves(model: str, curves: pd.DataFrame) -> bytes | None:
    """Losses (left) and every other per-epoch score (right) against the epoch; None without an epoch column
    or any numeric series."""
    if "epoch" not in curves or curves.empty:
        return None
    series = [c for c in curves.columns if c != "epoch" and pd.api.types.is_numeric_dtype(curves[c])]
    series = [c for c in series if curves[c].notna().any() and not c.startswith("lr")]
    losses = [c for c in series if "loss" in c]
    scores = [c for c in series if c not in losses]
    if not series:
        return None
    plt = pyplot()
    panels = [group for group in (losses, scores) if group]
    figure, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 3.4), squeeze=False, layout="constrained")
    for axis, group in zip(axes[0], panels, strict=True):
        for column in group:
            rows = curves[["epoch", column]].dropna()
            axis.plot(rows["epoch"] + 1, rows[column], marker="o", markersize=3, label=column)
        axis.set_xlabel("epoch")
        axis.set_title("losses" if group is losses else "scores")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    figure.suptitle(f"{model}: training curves")
    return _png(figure)


def latency_points(summary: Mapping[str, Mapping[str, Any]]) -> list[dict[str, Any]]:
    """(model, backend, batch, p50 ms) for every latency figure the evaluate stage measured."""
    return [
        {"model": model, "backend": row["backend"], "batch": row["batch"], "ms": row["p50_ms"]}
        for model, metrics in summary.items()
        for row in latency_rows(metrics)
    ]


def latency_vs_batch(summary: Mapping[str, Mapping[str, Any]]) -> bytes | None:
    """p50 milliseconds per batch against batch size, one panel per backend, one line per model (log axes)."""
    points = pd.DataFrame(latency_points(summary))
    if points.empty:
        return None
    backends = [b for b in BACKEND_LABELS if b in set(points["backend"])]
    plt = pyplot()
    figure, axes = plt.subplots(
        1, len(backends), figsize=(4.6 * len(backends), 3.8), squeeze=False, sharey=True, layout="constrained"
    )
    for axis, backend in zip(axes[0], backends, strict=True):
        for model, rows in points[points["backend"] == backend].groupby("model", sort=False):
            rows = rows.sort_values("batch")
            axis.plot(rows["batch"], rows["ms"], marker="o", label=model)
        axis.set_xscale("log", base=2)
        axis.set_yscale("log")
        axis.set_xlabel("batch size")
        axis.set_title(BACKEND_LABELS[backend])
        axis.grid(alpha=0.3, which="both")
    axes[0][0].set_ylabel("p50 ms per call")
    axes[0][-1].legend(fontsize=8)
    figure.suptitle("Latency against batch size")
    return _png(figure)
