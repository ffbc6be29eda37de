"""What a person sees while a stage runs (`python -m dlpipe <stage>`, `dvc repro`): every message once, in
one format, without the libraries' per-run notices, and one line at the end that sums up the stage."""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from dlpipe.config import Config

log = logging.getLogger("dlpipe")

FORMAT = "%(levelname)s %(name)s: %(message)s"
# Lightning's notices of every run (devices, precision, LOCAL_RANK, an advertisement for litlogger,
# "`Trainer.fit` stopped", checkpoint restores) are INFO records of these loggers; on a GPU the CUDA
# accelerator adds "LOCAL_RANK: 0 - CUDA_VISIBLE_DEVICES: [0]" for the fit and again for the test.
LIGHTNING_NOTICES = (
    "lightning.pytorch.utilities.rank_zero",
    "lightning.fabric.utilities.rank_zero",
    "lightning.pytorch.accelerators.cuda",
)
# MLflow loads a model it logs to check its input example; an ONNX model declares MLflow's default providers
# (CUDA, then CPU), so on a machine without CUDA it warns that it checks on the CPU. Registering is unaffected.
MLFLOW_PROVIDERS_NOTICE = re.compile(r"ONNX model declares execution providers .* are unavailable")

_handler: logging.Handler | None = None


def setup_logging() -> None:
    """dlpipe's INFO lines and every library's warnings, once each, to stderr in one format. Call it before
    Lightning or MLflow is imported: both set up printing of their own when they are."""
    global _handler
    if _handler is not None:
        return
    _handler = logging.StreamHandler()  # stderr, where tqdm draws its bars and the error line goes
    _handler.setFormatter(logging.Formatter(FORMAT))
    root = logging.getLogger()
    root.addHandler(_handler)
    root.setLevel(logging.WARNING)
    log.setLevel(logging.INFO)
    # Importing `lightning` adds a handler of its own to the "lightning" logger, which also passes its records
    # on to the root's: each line twice. The records of its two packages stop at this handler instead.
    for name in ("lightning.pytorch", "lightning.fabric"):
        logger = logging.getLogger(name)
        logger.addHandler(_handler)
        logger.propagate = False
    for name in LIGHTNING_NOTICES:
        logging.getLogger(name).setLevel(logging.WARNING)
    # Unless told not to, MLflow gives its loggers a handler and format of their own (and prints at INFO).
    os.environ.setdefault("MLFLOW_CONFIGURE_LOGGING", "false")
    logging.getLogger("mlflow.onnx").addFilter(lambda record: not MLFLOW_PROVIDERS_NOTICE.search(record.getMessage()))


def log_summary(config: Config, stage: str, model: str | None, result: Any) -> None:
    """Log the line that sums up a finished stage, where the stage does not log one itself."""
    line = summary(config, stage, model, result)
    if line is not None:
        log.info(line)


def summary(config: Config, stage: str, model: str | None, result: Any) -> str | None:
    """One line from what the stage returned; None for the stages that log their own (fetch_images,
    fetch_stocks, augment, cost, distill, transfer) and for a DDP rank other than 0 (it returns nothing)."""
    describe = SUMMARIES.get(stage)
    if describe is None or result is None:
        return None
    return describe(config, model, result)


def _number(value: float) -> str:
    return f"{value:.4g}"


def _shown(config: Config, path: Path) -> str:
    """`path` relative to the project, as dvc.yaml names it."""
    try:
        return str(path.relative_to(config.paths.root))
    except ValueError:
        return str(path)


def _train(config: Config, model: str, info: dict[str, Any]) -> str:
    epochs, monitor = info["epochs_trained"], info["monitor"]
    parts = [f"{epochs} epoch{'' if epochs == 1 else 's'}", f"best {monitor} {_number(info['best_score'])}"]
    tested = "test/" + monitor.split("/", 1)[-1]  # the monitored metric, on the test split
    if tested in info.get("test", {}):
        parts.append(f"{tested} {_number(info['test'][tested])}")
    parts.append(f"{info['trainable_params']:,} parameters")
    parts.append(f"{info['train_seconds']:.1f} s" + (" (resumed)" if info.get("resumed") else ""))
    return f"train {model}: {', '.join(parts)} -> {_shown(config, config.paths.checkpoint(model))}"


def _export(config: Config, model: str, info: dict[str, Any]) -> str:
    parts = [f"parity {info['onnx_max_abs_diff']:.1g}"]
    if info.get("top1_agreement") is not None:
        parts.append(f"top-1 agreement {info['top1_agreement']:.3f}")
    int8 = info.get("int8") or {}
    parts.append(int8.get("quantization", "int8").replace("-", " "))
    if info.get("registered_version"):
        parts.append(f"registered v{info['registered_version']} (int8 v{int8.get('registered_version')})")
    return f"export {model}: {', '.join(parts)} -> {_shown(config, config.paths.onnx(model))}"


def _evaluate(config: Config, model: str, metrics: dict[str, Any]) -> str:
    from dlpipe.tasks import task_of
    from dlpipe.tasks.base import int8_metric_name

    metric = task_of(config, model).promotion[0]
    parts = [f"{metric} {_number(metrics[metric])}"]
    if int8_metric_name(metric) in metrics:
        parts.append(f"int8 {_number(metrics[int8_metric_name(metric)])}")
    if "latency_ms_onnx_b1_p50" in metrics:
        parts.append(f"p50 {metrics['latency_ms_onnx_b1_p50']:.2f} ms")
    return f"evaluate {model}: {', '.join(parts)} -> {_shown(config, config.paths.metrics(model))}"


def _report(config: Config, model: str | None, summary: dict[str, Any]) -> str:
    paths = config.paths
    models = f"{len(summary)} model{'' if len(summary) == 1 else 's'}"
    return f"report: {models} -> {_shown(config, paths.summary)}, {_shown(config, paths.report_html)}"


SUMMARIES: dict[str, Callable[[Config, str | None, Any], str]] = {
    "train": _train,
    "export": _export,
    "evaluate": _evaluate,
    "report": _report,
}
