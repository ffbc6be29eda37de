"""Which version serves: the promotion gate evaluate applies, and the manual `dlpipe promote` / `rollback`.

Each export registers versions of `dlpipe-<model>`: the fp32 graph, its int8 variant and, where it is
measured (`export.fp16`: on ONNX Runtime's CUDA provider by default), its fp16 variant. After evaluation the
gate picks the variant to offer (the fastest at `promote.latency_batch` among those within
`promote.max_int8_loss` / `max_fp16_loss` of fp32's metric), then lets it take `champion` only when it
reaches the task's threshold, fits the latency budget, and beats the current champion on the same test
data (dlpipe.tracking.promote_if_better). Every move of the alias is recorded, so `rollback` can undo it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from dlpipe import tracking
from dlpipe.config import Config, PromoteParams
from dlpipe.errors import DlpipeError
from dlpipe.tasks.base import VARIANTS, variant_metric_name

log = logging.getLogger("dlpipe")
GATE_TAG = "gate"  # version tag: why the gate promoted or refused it


@dataclass(frozen=True)
class Candidate:
    """One registered variant of a freshly evaluated model."""

    variant: str  # fp32 | int8 | fp16
    version: str | None  # registry version (None when the model is not registered)
    metric: float  # the task's promotion metric through ONNX Runtime
    latency_ms: float  # p50 at promote.latency_batch


def candidates(metrics: dict[str, Any], export_info: dict[str, Any], metric: str, batch: int) -> list[Candidate]:
    """fp32 first, then each variant (int8, fp16) that was measured."""
    found = [
        Candidate(
            "fp32", export_info.get("registered_version"), metrics[metric], metrics[f"latency_ms_onnx_b{batch}_p50"]
        )
    ]
    for variant in VARIANTS:
        if variant_metric_name(variant, metric) in metrics:
            found.append(
                Candidate(
                    variant,
                    (export_info.get(variant) or {}).get("registered_version"),
                    metrics[variant_metric_name(variant, metric)],
                    metrics[f"latency_ms_{variant}_b{batch}_p50"],
                )
            )
    return found


def choose(options: list[Candidate], higher_is_better: bool, max_loss: dict[str, float]) -> Candidate:
    """The fastest variant whose metric is within its `max_loss` of the fp32 one's (fp32 itself always is)."""
    reference = options[0].metric

    def loss(candidate: Candidate) -> float:
        return reference - candidate.metric if higher_is_better else candidate.metric - reference

    allowed = [options[0]] + [c for c in options[1:] if loss(c) <= max_loss[c.variant]]
    return min(allowed, key=lambda c: c.latency_ms)


def allowed_losses(settings: PromoteParams) -> dict[str, float]:
    """How much of the fp32 metric each variant may lose and still be chosen."""
    return {"int8": settings.max_int8_loss, "fp16": settings.max_fp16_loss}


def refusals(candidate: Candidate, metric: str, higher_is_better: bool, settings: PromoteParams) -> list[str]:
    """Why `candidate` may not be champion whatever the current one is (empty: it may)."""
    reasons = []
    threshold = settings.thresholds.get(metric)
    if threshold is not None:
        reached = candidate.metric >= threshold if higher_is_better else candidate.metric <= threshold
        if not reached:
            bound = "at least" if higher_is_better else "at most"
            reasons.append(f"{metric} {candidate.metric:.4f} is not {bound} promote.thresholds.{metric}={threshold:g}")
    if not candidate.latency_ms <= settings.max_latency_ms:
        reasons.append(
            f"p50 latency {candidate.latency_ms:.2f} ms at batch {settings.latency_batch} is over "
            f"promote.max_latency_ms={settings.max_latency_ms:g}"
        )
    return reasons


def gate(
    config: Config,
    model: str,
    options: list[Candidate],
    promotion: tuple[str, bool],
    evaluation_data: dict[str, Any],
) -> dict[str, Any]:
    """Tag every registered variant with its metric, choose one, and promote it if it passes. Returns the
    decision recorded in the metrics file: the chosen variant and version, `champion` (bool), the reasons."""
    metric, higher_is_better = promotion
    settings = config.params.promote
    chosen = choose(options, higher_is_better, allowed_losses(settings))
    reasons = refusals(chosen, metric, higher_is_better, settings)
    decision = {"chosen_variant": chosen.variant, "chosen_version": chosen.version, "refused": reasons}
    if chosen.version is None:  # not registered: nothing to point an alias at
        return decision | {"champion": False}
    mlflow_client, name = tracking.client(config), tracking.registered_name(model)
    for option in options:  # every variant carries its figures, so a later `dlpipe promote` can compare them
        if option.version is not None and option is not chosen:
            tracking.tag_evaluation(config, model, option.version, {metric: option.metric}, metric, evaluation_data)
    if reasons:
        tracking.tag_evaluation(config, model, chosen.version, {metric: chosen.metric}, metric, evaluation_data)
        mlflow_client.set_model_version_tag(name, chosen.version, GATE_TAG, "refused: " + "; ".join(reasons))
        log.warning("%s v%s (%s) not promoted: %s", name, chosen.version, chosen.variant, "; ".join(reasons))
        return decision | {"champion": False}
    promoted = tracking.promote_if_better(
        config, model, chosen.version, {metric: chosen.metric}, promotion, evaluation_data
    )
    verdict = "champion" if promoted else "passed, but does not beat the champion"
    mlflow_client.set_model_version_tag(name, chosen.version, GATE_TAG, verdict)
    return decision | {"champion": promoted}


def _require_model(config: Config, model: str) -> str:
    from mlflow.exceptions import MlflowException

    name = tracking.registered_name(model)
    try:
        tracking.client(config).get_registered_model(name)
    except MlflowException:
        raise DlpipeError(f"unknown model {model!r}: no registered model {name!r} in the registry") from None
    return name


def _require_version(config: Config, model: str, version: str) -> None:
    from mlflow.exceptions import MlflowException

    name, mlflow_client = _require_model(config, model), tracking.client(config)
    try:
        mlflow_client.get_model_version(name, version)
    except MlflowException:
        known = sorted(int(v.version) for v in mlflow_client.search_model_versions(f"name = '{name}'"))
        raise DlpipeError(f"{name}: no version {version!r} (registered: {', '.join(map(str, known))})") from None


def promote(config: Config, model: str, version: str) -> str:
    """`dlpipe promote MODEL VERSION`: an operator's decision, recorded like the gate's (rollback undoes it)."""
    _require_version(config, model, version)
    previous = tracking.set_champion(config, model, version)
    line = f"dlpipe-{model}: champion v{version} (was {'v' + previous if previous else 'none'})"
    log.info(line)
    return line


def rollback(config: Config, model: str) -> str:
    """`dlpipe rollback MODEL`: the champion before the current one serves again."""
    _require_model(config, model)
    current, restored = tracking.rollback_champion(config, model)
    line = f"dlpipe-{model}: champion v{restored} (rolled back from v{current})"
    log.info(line)
    return line
