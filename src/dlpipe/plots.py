"""Per-model figures and the CSV tables DVC renders with `dvc plots show`."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from dlpipe.io import atomic_path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(figure, target: Path) -> None:
    with atomic_path(target) as tmp:
        figure.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    _pyplot().close(figure)


def _save_csv(frame: pd.DataFrame, target: Path) -> None:
    with atomic_path(target) as tmp:
        frame.to_csv(tmp, index=False)


def classifier_plots(outputs: dict[str, np.ndarray], classes: list[str], directory: Path, title: str) -> None:
    plt = _pyplot()
    confusion = outputs["confusion"]
    figure, ax = plt.subplots(figsize=(0.5 * len(classes) + 2.5, 0.5 * len(classes) + 2))
    image = ax.imshow(confusion, cmap="Blues")
    ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(len(classes)), classes, fontsize=8)
    ax.set_xlabel("predicted (ONNX Runtime)")
    ax.set_ylabel("actual")
    for (row, col), count in np.ndenumerate(confusion):
        if count:
            ax.text(col, row, int(count), ha="center", va="center", fontsize=7, color="white" if count > confusion.max() / 2 else "black")
    figure.colorbar(image, ax=ax, fraction=0.046)
    ax.set_title(title)
    _save(figure, directory / "confusion.png")
    names = np.asarray(classes)
    _save_csv(pd.DataFrame({"actual": names[outputs["actual"]], "predicted": names[outputs["predicted"]]}), directory / "predictions.csv")


def forecaster_plots(outputs: dict[str, np.ndarray], directory: Path, title: str) -> None:
    plt = _pyplot()
    dates = pd.to_datetime(outputs["dates"])
    figure, (top, bottom) = plt.subplots(2, 1, figsize=(10, 6), sharex=True, height_ratios=(3, 1))
    top.plot(dates, outputs["actual"], label="actual close", color="black", linewidth=1)
    top.plot(dates, outputs["predicted"], label="model (ONNX Runtime)", linewidth=1)
    top.plot(dates, outputs["persistence"], label="persistence (yesterday's close)", linewidth=0.8, linestyle="--", alpha=0.7)
    top.set_ylabel("price")
    top.legend(fontsize=8)
    top.set_title(title)
    bottom.plot(dates, outputs["predicted"] - outputs["actual"], label="model error", linewidth=0.8)
    bottom.plot(dates, outputs["persistence"] - outputs["actual"], label="persistence error", linewidth=0.8, alpha=0.7)
    bottom.axhline(0, color="black", linewidth=0.5)
    bottom.set_ylabel("error")
    bottom.legend(fontsize=8)
    _save(figure, directory / "forecast.png")
    table = pd.DataFrame(
        {"date": dates.strftime("%Y-%m-%d"), "actual": outputs["actual"], "predicted": outputs["predicted"], "persistence": outputs["persistence"]}
    )
    _save_csv(table, directory / "forecast.csv")
