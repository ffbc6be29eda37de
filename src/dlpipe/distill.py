"""Knowledge distillation (Hinton, Vinyals and Dean, 2015, "Distilling the Knowledge in a Neural Network").

A small student learns from a trained teacher's softened class probabilities as well as from the labels:

    loss = alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T)) + (1 - alpha) * CE(student, labels)

A temperature T > 1 flattens both distributions, so the teacher's small probabilities (which wrong classes
look alike: a 7 and a 1) become a training signal; the gradients of the soft term scale as 1 / T^2, and the
T^2 factor keeps them comparable with the cross-entropy's whatever T is.

The distill stage trains the same student twice (same seed, data, optimizer and epochs): on the labels
alone, then with the teacher. It reports both, and the teacher, on the test split: accuracy, parameters,
multiply-adds (counted by `dlpipe.cost`). The training itself (Lightning) lives in `dlpipe.distill_training`;
this module needs torch only.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from dlpipe.config import Config, check_distill
from dlpipe.errors import DlpipeError
from dlpipe.io import atomic_path, read_json, write_json

# Rows of the comparison table, in order.
TEACHER, ALONE, DISTILLED = "teacher", "student alone", "student distilled"
COLUMNS = ("role", "model", "test_accuracy", "test_loss", "trainable_params", "multiply_adds", "train_seconds")
CHECKPOINTS = {ALONE: "student_alone.ckpt", DISTILLED: "student_distilled.ckpt"}  # in reports/distill/
EVAL_BATCH = 500


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    temperature: float,
    alpha: float,
) -> torch.Tensor:
    """alpha * T^2 * KL(softmax(teacher/T) || softmax(student/T)) + (1 - alpha) * CE(student, labels).

    Logits are (B, classes), labels (B,); the KL term is averaged over the batch, as the cross-entropy is.
    alpha = 0 is plain cross-entropy, alpha = 1 learns from the teacher alone.
    """
    soft_student = F.log_softmax(student_logits / temperature, dim=1)  # (B, classes)
    soft_teacher = F.log_softmax(teacher_logits / temperature, dim=1)  # (B, classes)
    kl = F.kl_div(soft_student, soft_teacher, reduction="batchmean", log_target=True)
    hard = F.cross_entropy(student_logits, labels)
    return alpha * temperature**2 * kl + (1.0 - alpha) * hard


@torch.inference_mode()
def predict(network: nn.Module, x: np.ndarray) -> np.ndarray:
    """Logits (N, classes) of an exported classifier (eval mode, CPU) for float32 pixels in [0, 1]."""
    network = network.eval()
    batches = [network(torch.from_numpy(x[i : i + EVAL_BATCH])) for i in range(0, len(x), EVAL_BATCH)]
    return torch.cat(batches).numpy()


def mcnemar_pvalue(only_first_right: int, only_second_right: int) -> float:
    """Exact two-sided McNemar test: how likely a split this uneven of the test images that exactly one of
    two classifiers gets right is, if both were equally accurate (binomial with p = 1/2)."""
    n, k = only_first_right + only_second_right, min(only_first_right, only_second_right)
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2**n
    return min(1.0, 2.0 * tail)


@dataclass
class Comparison:
    summary: dict[str, Any]  # distill.json: rows, settings, the verdict
    checkpoints: dict[str, dict[str, Any]]  # role -> the student's checkpoint (state_dict, hyper_parameters)


def _row(role: str, model: str, network: nn.Module, logits: np.ndarray, y: np.ndarray, example: torch.Tensor):
    from dlpipe.cost import model_cost

    loss = F.cross_entropy(torch.from_numpy(logits), torch.from_numpy(y).long()).item()
    return {
        "role": role,
        "model": model,
        "test_accuracy": float((logits.argmax(1) == y).mean()),
        "test_loss": float(loss),  # cross-entropy with the labels: distillation often improves it most
        # All parameters: the ones its own training trained (the frozen teacher's are trainable in that sense).
        "trainable_params": sum(p.numel() for p in network.parameters()),
        "multiply_adds": model_cost(network, example)["multiply_adds"],  # per image
        "train_seconds": None,
    }


def compare(config: Config) -> Comparison:
    """Train the student alone and distilled from the teacher; measure all three on the test split.

    Raises DlpipeError (one line, nothing written) when the section is inconsistent, the teacher's
    checkpoint is missing, or it does not fit the current data.
    """
    from dlpipe.data.images import load_split
    from dlpipe.distill_training import train_student
    from dlpipe.tasks import get_task
    from dlpipe.tasks.classifier import IMAGE_META_KEYS, ClassifierTask

    params = check_distill(config.params, config.params_file, running=True).distill
    checkpoint = config.paths.checkpoint(params.teacher)
    if not checkpoint.is_file():
        raise DlpipeError(f"{checkpoint}: no teacher checkpoint; run `dlpipe train {params.teacher}` first")
    task = get_task(ClassifierTask.name)
    meta = read_json(config.paths.meta(config.paths.raw_images), required=IMAGE_META_KEYS)
    data_kwargs = {"in_channels": meta["channels"], "image_size": meta["height"], "num_classes": len(meta["classes"])}
    x, y = load_split(config.paths.raw_images, "test")
    x = x.astype(np.float32) / 255.0
    example = torch.from_numpy(x[:1])

    teacher = task.load_exported(checkpoint)
    try:
        teacher_logits = predict(teacher, x)
    except RuntimeError as exc:
        raise DlpipeError(f"{checkpoint}: does not fit the current images ({meta['source']}); rerun train") from exc
    if teacher_logits.shape[1] != data_kwargs["num_classes"]:
        raise DlpipeError(f"{checkpoint}: {teacher_logits.shape[1]} classes, the data has {data_kwargs['num_classes']}")
    rows = [_row(TEACHER, params.teacher, teacher, teacher_logits, y, example)]
    checkpoints, predictions = {}, {}
    for role, guide in ((ALONE, None), (DISTILLED, teacher)):
        student, checkpoints[role], seconds = train_student(config, data_kwargs, task.wrap, guide)
        logits = predict(student, x)
        predictions[role] = logits.argmax(1)
        rows.append({**_row(role, params.student, student, logits, y, example), "train_seconds": seconds})
        teacher.cpu()  # back from the accelerator, if training moved it there

    alone_right, distilled_right = predictions[ALONE] == y, predictions[DISTILLED] == y
    gain = rows[2]["test_accuracy"] - rows[1]["test_accuracy"]
    only_alone = int((alone_right & ~distilled_right).sum())
    only_distilled = int((~alone_right & distilled_right).sum())
    summary = {
        "rows": rows,
        "distillation_helped": bool(gain > 0),
        "accuracy_gain": gain,  # distilled minus alone, as a fraction of the test images
        # Paired test on the same images: a gain of a few images out of a thousand can be chance.
        "only_alone_right": only_alone,
        "only_distilled_right": only_distilled,
        "mcnemar_pvalue": mcnemar_pvalue(only_alone, only_distilled),
        "test_samples": int(len(y)),
        "settings": {"seed": config.params.seed, **params.model_dump(mode="json")},
    }
    return Comparison(summary, checkpoints)


def write_outputs(comparison: Comparison, directory: Path, json_name: str, csv_name: str) -> None:
    """distill.json (the summary), distill.csv (the table) and the two students' checkpoints."""
    write_json(directory / json_name, comparison.summary)
    with atomic_path(directory / csv_name) as tmp, open(tmp, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(comparison.summary["rows"])
    for role, name in CHECKPOINTS.items():
        with atomic_path(directory / name) as tmp:
            torch.save(comparison.checkpoints[role], tmp)


def _flat(prefix: str, value: Any) -> dict[str, Any]:
    if isinstance(value, dict):
        return {k: v for key, item in value.items() for k, v in _flat(f"{prefix}.{key}", item).items()}
    return {prefix: value}


def metrics(summary: dict[str, Any]) -> dict[str, float]:
    """Flat numeric metrics for MLflow: `<role>/<column>` per row, plus the verdict."""
    keys = {TEACHER: "teacher", ALONE: "alone", DISTILLED: "distilled"}
    flat = {
        f"{keys[row['role']]}/{column}": row[column]
        for row in summary["rows"]
        for column in COLUMNS[2:]
        if row[column] is not None
    }
    flat.update({key: summary[key] for key in ("accuracy_gain", "mcnemar_pvalue")})
    flat["distillation_helped"] = int(summary["distillation_helped"])
    return flat


@contextmanager
def mlflow_run(config: Config, summary: dict[str, Any]) -> Iterator[str]:
    """One MLflow run (`distill: <student> <data>@<sha> <git>`), tagged as the training runs are (model = the
    student, plus the teacher), with the settings as params and the table as metrics; yields its id. The run
    ends FINISHED when the block succeeds (the stage writes its outputs there), FAILED when it raises."""
    from mlflow.entities import Param

    from dlpipe import tracking
    from dlpipe.tasks import get_task
    from dlpipe.tasks.classifier import ClassifierTask

    settings = summary["settings"]
    client = tracking.client(config)
    experiment = tracking.ensure_experiment(config)
    task = get_task(ClassifierTask.name)
    tags = tracking.run_tags(config, settings["student"], "distill", task.data_fingerprint(config), task.dataset)
    run = client.create_run(experiment, run_name=tracking.run_name(tags), tags={**tags, "teacher": settings["teacher"]})
    run_id = run.info.run_id
    try:
        flat = _flat("distill", settings)
        client.log_batch(run_id, params=[Param(key, str(value)) for key, value in sorted(flat.items())])
        tracking.log_metrics(config, run_id, metrics(summary))
        yield run_id
    except BaseException:
        client.set_terminated(run_id, status="FAILED")
        raise
    client.set_terminated(run_id, status="FINISHED")
