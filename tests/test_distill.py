"""Knowledge distillation: the loss is Hinton et al.'s formula, the teacher stays frozen and out of the student,
and the distill stage writes its table and one MLflow run, or one line of error and nothing."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from conftest import tiny_params, write_project
from dlpipe import stages, tracking
from dlpipe.distill import distillation_loss, mcnemar_pvalue
from dlpipe.errors import DlpipeError

TEACHER_LOGITS = torch.tensor([[4.0, 1.0, -2.0], [0.5, 3.0, 0.0]])
STUDENT_LOGITS = torch.tensor([[1.0, 2.0, 0.0], [0.0, 1.0, 2.0]])
LABELS = torch.tensor([0, 2])


def by_hand(student, teacher, labels, temperature, alpha) -> float:
    """The formula written out with numpy: alpha T^2 KL(p_teacher || p_student) + (1 - alpha) CE."""

    def softmax(z):
        e = np.exp(z - z.max(axis=1, keepdims=True))
        return e / e.sum(axis=1, keepdims=True)

    s, t = student.numpy().astype(np.float64), teacher.numpy().astype(np.float64)
    p_teacher, p_student = softmax(t / temperature), softmax(s / temperature)
    kl = np.mean(np.sum(p_teacher * (np.log(p_teacher) - np.log(p_student)), axis=1))
    ce = -np.mean(np.log(softmax(s)[np.arange(len(labels)), labels.numpy()]))
    return alpha * temperature**2 * kl + (1 - alpha) * ce


@pytest.mark.parametrize(("temperature", "alpha"), [(1.0, 0.5), (4.0, 0.9), (2.0, 0.0), (3.0, 1.0), (0.5, 0.3)])
def test_loss_is_the_formula(temperature, alpha):
    loss = distillation_loss(STUDENT_LOGITS, TEACHER_LOGITS, LABELS, temperature, alpha)
    assert loss.item() == pytest.approx(by_hand(STUDENT_LOGITS, TEACHER_LOGITS, LABELS, temperature, alpha), rel=1e-5)


def test_alpha_zero_is_cross_entropy_and_alpha_one_ignores_labels():
    plain = distillation_loss(STUDENT_LOGITS, TEACHER_LOGITS, LABELS, 4.0, 0.0)
    assert plain.item() == pytest.approx(F.cross_entropy(STUDENT_LOGITS, LABELS).item(), rel=1e-6)
    soft = distillation_loss(STUDENT_LOGITS, TEACHER_LOGITS, LABELS, 4.0, 1.0)
    assert soft.item() == pytest.approx(
        distillation_loss(STUDENT_LOGITS, TEACHER_LOGITS, (LABELS + 1) % 3, 4.0, 1.0).item()
    )
    assert distillation_loss(TEACHER_LOGITS, TEACHER_LOGITS, LABELS, 4.0, 1.0).item() == pytest.approx(0.0, abs=1e-6)


def test_soft_term_is_scaled_by_t_squared():
    # KL at T, times T^2: doubling T quarters the factor the KL is divided by, not the loss.
    for temperature in (1.0, 2.0, 5.0):
        kl = F.kl_div(
            F.log_softmax(STUDENT_LOGITS / temperature, 1), F.softmax(TEACHER_LOGITS / temperature, 1), reduction="sum"
        ) / len(LABELS)
        soft = distillation_loss(STUDENT_LOGITS, TEACHER_LOGITS, LABELS, temperature, 1.0)
        assert soft.item() == pytest.approx(temperature**2 * kl.item(), rel=1e-5)


def test_loss_gradient_flows_to_the_student_only():
    student = STUDENT_LOGITS.clone().requires_grad_(True)
    teacher = TEACHER_LOGITS.clone().requires_grad_(True)
    distillation_loss(student, teacher.detach(), LABELS, 4.0, 0.9).backward()
    assert student.grad is not None and student.grad.abs().sum() > 0 and teacher.grad is None


def test_mcnemar_pvalue():
    assert mcnemar_pvalue(0, 0) == 1.0
    assert mcnemar_pvalue(5, 5) == 1.0
    assert mcnemar_pvalue(0, 10) == pytest.approx(2 / 1024)  # 10 of 10 one way: two-sided exact binomial
    assert mcnemar_pvalue(2, 7) == mcnemar_pvalue(7, 2) == pytest.approx(2 * (1 + 9 + 36) / 512)


# ----------------------------------------------------------------------------------------------- the module
def _network(channels, hidden):
    from dlpipe.models import get_model
    from dlpipe.tasks.classifier import StandardizedClassifier

    return StandardizedClassifier(
        get_model("cnn", in_channels=1, image_size=28, num_classes=10, channels=channels, hidden=hidden, dropout=0.0),
        1,
    )


def test_teacher_is_frozen_and_not_part_of_the_student(tmp_path):
    import lightning as L
    from torch.utils.data import DataLoader, TensorDataset

    from dlpipe.distill_training import DistillationModule

    torch.manual_seed(0)
    teacher = _network([8, 8], 16).eval()
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    student = _network([4], 8)
    spec = {"name": "cnn", "kwargs": {"in_channels": 1, "image_size": 28, "num_classes": 10}}
    module = DistillationModule(student, spec, 10, {"name": "adamw", "lr": 0.01}, 1, 4.0, 0.9).set_teacher(teacher)
    images = torch.randint(0, 256, (32, 1, 28, 28), dtype=torch.uint8)
    labels = torch.randint(0, 10, (32,))
    trainer = L.Trainer(
        max_steps=3,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    student_before = {k: v.clone() for k, v in student.state_dict().items()}
    trainer.fit(module, DataLoader(TensorDataset(images, labels), batch_size=8))

    after = teacher.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # weights and batch-norm statistics
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    assert any(not torch.equal(student_before[k], v) for k, v in student.state_dict().items())  # it did train
    keys = module.state_dict().keys()
    assert keys and all(k.startswith("model.") for k in keys)
    assert sum(p.numel() for p in module.parameters()) == sum(p.numel() for p in student.parameters())
    assert "teacher" not in module.hparams and module.hparams.temperature == 4.0


def test_precomputed_teacher_logits_give_the_same_loss():
    from torch.utils.data import TensorDataset

    from dlpipe.distill_training import DistillationModule, with_teacher_logits

    torch.manual_seed(0)
    teacher, student = _network([8], 16).eval(), _network([4], 8)
    spec = {"name": "cnn", "kwargs": {"in_channels": 1, "image_size": 28, "num_classes": 10}}
    module = DistillationModule(student, spec, 10, {"name": "adamw", "lr": 0.01}, 1, 2.0, 0.5).set_teacher(teacher)
    images = torch.randint(0, 256, (12, 1, 28, 28), dtype=torch.uint8)
    labels = torch.randint(0, 10, (12,))

    class Data:  # the ImageDataModule interface with_teacher_logits uses
        datasets = {"train": TensorDataset(images, labels)}

        def setup(self):
            pass

    data = Data()
    with_teacher_logits(data, teacher, batch_size=5)
    assert len(data.datasets["train"].tensors) == 3 and data.datasets["train"].tensors[2].shape == (12, 10)
    module.train()
    on_the_fly = module.model_step((images, labels))[0]
    given = module.model_step(data.datasets["train"].tensors)[0]
    assert given.item() == pytest.approx(on_the_fly.item(), rel=1e-5)


# ------------------------------------------------------------------------------------------------ the stage
DISTILL = {
    "teacher": "cnn",
    "student": "cnn",
    "net": {"channels": [4], "hidden": 8},
    "epochs": 1,
    "batch_size": 64,
    "optimizer": {"name": "adamw", "lr": 0.003},
    "temperature": 4,
    "alpha": 0.9,
}


@pytest.fixture(scope="module")
def distilled(tmp_path_factory):
    """A tiny project: images, a one-epoch cnn teacher, then the distill stage."""
    from dlpipe.config import load_config

    params = tiny_params()
    params["models"] = {"cnn": "images"}
    params["distill"] = dict(DISTILL)
    config = load_config(write_project(tmp_path_factory.mktemp("distill"), params))
    stages.fetch_images(config)
    stages.augment(config)
    stages.train(config, "cnn")
    teacher_bytes = config.paths.checkpoint("cnn").read_bytes()
    return config, stages.distill(config), teacher_bytes


def test_stage_writes_the_table(distilled):
    config, summary, _ = distilled
    written = json.loads(config.paths.distill_json.read_text())
    assert written == json.loads(json.dumps(summary))
    assert [row["role"] for row in written["rows"]] == ["teacher", "student alone", "student distilled"]
    teacher, alone, student = written["rows"]
    assert teacher["trainable_params"] > alone["trainable_params"] == student["trainable_params"] > 0
    assert teacher["multiply_adds"] > alone["multiply_adds"] == student["multiply_adds"] > 0
    assert all(0.0 <= row["test_accuracy"] <= 1.0 for row in written["rows"])
    assert teacher["train_seconds"] is None and alone["train_seconds"] > 0
    assert written["distillation_helped"] == (student["test_accuracy"] > alone["test_accuracy"])
    assert written["accuracy_gain"] == pytest.approx(student["test_accuracy"] - alone["test_accuracy"])
    assert written["test_samples"] == 60 and 0.0 <= written["mcnemar_pvalue"] <= 1.0
    settings = written["settings"]
    assert {**settings, "optimizer": None} == {
        "seed": config.params.seed,
        **DISTILL,
        "temperature": 4.0,
        "optimizer": None,
    }
    assert settings["optimizer"] == {**settings["optimizer"], **DISTILL["optimizer"]}  # plus the defaults used
    with open(config.paths.distill_csv, newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [row["role"] for row in rows] == ["teacher", "student alone", "student distilled"]
    assert float(rows[2]["test_accuracy"]) == pytest.approx(student["test_accuracy"])
    leftovers = [p.name for p in config.paths.reports.iterdir() if p.name.startswith(".")]
    assert not leftovers


def test_stage_logs_one_mlflow_run(distilled):
    config, summary, _ = distilled
    run = tracking.client(config).get_run(summary["run_id"])
    assert run.info.run_name == tracking.run_name(run.data.tags) and run.info.status == "FINISHED"
    assert run.info.run_name.startswith(f"distill: {run.data.tags['model']} images/")
    assert run.data.tags["stage"] == "distill" and run.data.tags["teacher"] == "cnn"
    assert run.data.tags["params_hash"] == config.params_hash
    assert run.data.params["distill.temperature"] == "4.0" and run.data.params["distill.alpha"] == "0.9"
    assert run.data.metrics["distilled/test_accuracy"] == pytest.approx(summary["rows"][2]["test_accuracy"])
    assert run.data.metrics["teacher/trainable_params"] == summary["rows"][0]["trainable_params"]


def test_students_checkpoints_hold_no_teacher(distilled):
    from dlpipe.tasks import get_task

    config, summary, teacher_bytes = distilled
    assert config.paths.checkpoint("cnn").read_bytes() == teacher_bytes  # the teacher's file is untouched
    state = torch.load(config.paths.distill / "student_distilled.ckpt", map_location="cpu", weights_only=True)
    assert all(key.startswith("model.") for key in state["state_dict"])
    student = get_task("classifier").load_exported(config.paths.distill / "student_distilled.ckpt")
    assert sum(p.numel() for p in student.parameters()) == summary["rows"][2]["trainable_params"]


def test_both_students_start_alike_and_see_the_same_batches(distilled):
    # With alpha 0 the distilled loss is plain cross-entropy: the same seed must then give the same weights,
    # so the only difference between the two students of the stage is the teacher's term.
    import dataclasses

    from dlpipe.distill_training import train_student
    from dlpipe.tasks import get_task

    config, _, _ = distilled
    task = get_task("classifier")
    teacher = task.load_exported(config.paths.checkpoint("cnn"))
    data_kwargs = {"in_channels": 1, "image_size": 28, "num_classes": 10}
    alone = train_student(config, data_kwargs, task.wrap, None)[0].state_dict()
    zero = config.params.model_copy(update={"distill": config.params.distill.model_copy(update={"alpha": 0.0})})
    distilled_zero = train_student(dataclasses.replace(config, params=zero), data_kwargs, task.wrap, teacher)[0]
    assert all(torch.allclose(alone[k].float(), v.float(), atol=1e-6) for k, v in distilled_zero.state_dict().items())


def test_missing_teacher_checkpoint_is_one_line_and_writes_nothing(config):
    with pytest.raises(DlpipeError) as caught:
        stages.distill(config)
    message = str(caught.value)
    assert "\n" not in message and "run `dlpipe train cnn` first" in message
    assert not config.paths.distill.exists() and not config.paths.mlflow_db.exists()


def test_default_section_names_a_teacher_that_is_not_in_models(tmp_path):
    from dlpipe.config import load_config

    params = tiny_params()
    params["models"] = {"cnn": "images"}
    del params["distill"]  # the default section: teacher resnet, checked when the stage runs
    config = load_config(write_project(tmp_path, params))
    with pytest.raises(DlpipeError, match=r"distill\.teacher: 'resnet' is not in models"):
        stages.distill(config)


def test_a_project_without_the_teacher_loads_and_only_distill_refuses(tmp_path):
    """A stocks-only project is valid params; the teacher must be in `models` when distillation runs."""
    from dlpipe.config import load_config

    params = tiny_params()
    params["models"] = {"lstm": "stocks"}  # the explicit section's teacher, cnn, is not trained here
    params["generators"] = {}  # nor the images the dcgan imitates
    config = load_config(write_project(tmp_path, params))
    assert list(config.params.models) == ["lstm"]
    with pytest.raises(DlpipeError, match=r"distill\.teacher: 'cnn' is not in models \(lstm\)"):
        stages.distill(config)
    assert not config.paths.distill.exists()
