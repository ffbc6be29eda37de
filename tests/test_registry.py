"""Every registered model through its task, parametrised over the registries: a model or task added to a
registry is tested here without editing this file. Output shape, one optimisation step through the task's
LightningModule in a real Trainer, ONNX parity at batch sizes 1, 7 and 64 (and two sequence lengths), and a
checkpoint round trip."""

from __future__ import annotations

import lightning as L
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from dlpipe.export import export_onnx, run_torch
from dlpipe.models import count_trainable_parameters, get_model, get_spec, list_models
from dlpipe.runtime import InputContract, create_session, run_batched
from dlpipe.tasks import get_task, list_tasks

MODELS = list_models()


def build(name: str):
    """(task, data kwargs, exported module with identity statistics) for a registered model."""
    task = get_task(get_spec(name).task)
    data_kwargs = task.example_data_kwargs()
    torch.manual_seed(0)
    return task, data_kwargs, task.wrap(get_model(name, **data_kwargs), data_kwargs).eval()


def train_params(task):
    section = {
        "task": task.name,
        "epochs": 2,
        "batch_size": 8,
        "optimizer": {"lr": 1e-3},
        **task.synthetic_train_params(),
    }
    return task.params_type.model_validate(section)


def test_every_model_names_a_registered_task():
    assert set(list_tasks()) >= {"classifier", "forecaster"}
    for name in MODELS:
        assert get_spec(name).task in list_tasks(), name


@pytest.mark.parametrize("name", MODELS)
def test_output_shape_follows_the_batch(name):
    task, data_kwargs, module = build(name)
    rng = np.random.default_rng(0)
    with torch.inference_mode():
        one, seven = (module(torch.from_numpy(task.synthetic_inputs(data_kwargs, n, rng))) for n in (1, 7))
    assert one.shape[0] == 1 and seven.shape[0] == 7
    assert one.shape[1:] == seven.shape[1:]
    assert torch.isfinite(seven).all()
    if "num_classes" in data_kwargs:
        assert seven.shape == (7, data_kwargs["num_classes"])


@pytest.mark.parametrize("name", MODELS)
def test_one_training_step_through_the_task_changes_the_weights(name):
    task, data_kwargs, _ = build(name)
    net = get_model(name, **data_kwargs)
    module = task.lightning_module(net, {"name": name, "kwargs": data_kwargs}, train_params(task))
    batch = task.synthetic_batch(data_kwargs, 8, np.random.default_rng(0))
    before = [p.detach().clone() for p in module.model.parameters()]
    trainer = L.Trainer(
        fast_dev_run=1,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, train_dataloaders=DataLoader(TensorDataset(*batch), batch_size=8))
    after = list(module.model.parameters())
    assert count_trainable_parameters(module.model) > 0
    assert all(torch.isfinite(p).all() for p in after)
    assert any(not torch.equal(b, a) for b, a in zip(before, after, strict=True))


@pytest.mark.parametrize("name", MODELS)
def test_onnx_export_matches_torch_at_batch_1_7_and_64(name, tmp_path):
    task, data_kwargs, module = build(name)
    rng = np.random.default_rng(1)
    target = tmp_path / f"{name}.onnx"
    example = torch.from_numpy(task.synthetic_inputs(data_kwargs, 2, rng))
    export_onnx(module, example, target, opset=18, dynamic_axes=task.dynamic_axes)
    session = create_session(target, ["cpu"])
    for batch in (1, 7, 64):
        inputs = task.synthetic_inputs(data_kwargs, batch, rng)
        cases = [inputs]
        if 1 in task.dynamic_axes:  # a sequence model: twice the length it was exported with, too
            cases.append(np.concatenate([inputs, task.synthetic_inputs(data_kwargs, batch, rng)], axis=1))
        for case in cases:
            InputContract.of(session).check(case)
            np.testing.assert_allclose(run_batched(session, case), run_torch(module, case), atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", MODELS)
def test_checkpoint_round_trip_rebuilds_the_exported_module(name, tmp_path):
    task, data_kwargs, _ = build(name)
    module = task.lightning_module(
        get_model(name, **data_kwargs), {"name": name, "kwargs": data_kwargs}, train_params(task)
    )
    with torch.no_grad():  # non-trivial statistics, so that a buffer lost on the way would show
        for buffer in module.model.buffers():
            if buffer.is_floating_point():
                buffer.copy_(torch.rand_like(buffer) + 0.5)
    trainer = L.Trainer(
        accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False
    )
    trainer.strategy.connect(module)
    trainer.save_checkpoint(tmp_path / "best.ckpt")
    rebuilt = task.load_exported(tmp_path / "best.ckpt")
    inputs = task.synthetic_inputs(data_kwargs, 3, np.random.default_rng(2))
    np.testing.assert_array_equal(run_torch(rebuilt, inputs), run_torch(module.model, inputs))
