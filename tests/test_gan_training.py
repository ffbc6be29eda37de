"""The generator task's training loop on synthetic images: both networks learn, and a discriminator that
wins outright epoch after epoch is reported (a warning in the stage output, a count in the test metrics
that evaluate turns into `warning`)."""

from __future__ import annotations

import logging

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

from dlpipe.models import get_model
from dlpipe.tasks import generator_training, get_task

DATA = {"in_channels": 1, "image_size": 8}


def module_and_data(epochs: int, d_win_epochs: int):
    task = get_task("generator")
    train = task.params_type.model_validate(
        {
            "task": "generator",
            "epochs": epochs,
            "batch_size": 16,
            "optimizer": {"lr": 2e-4},
            "d_win_epochs": d_win_epochs,
        }
    )
    torch.manual_seed(0)
    net = get_model("dcgan", **DATA, width=4, latent_dim=8)
    module = task.lightning_module(net, {"name": "dcgan", "kwargs": {**DATA, "width": 4, "latent_dim": 8}}, train)
    images = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (64, 1, 8, 8), dtype=np.uint8))
    loader = DataLoader(TensorDataset(images, torch.zeros(64, dtype=torch.int64)), batch_size=16, drop_last=True)
    return module, loader


def trainer(epochs: int) -> L.Trainer:
    return L.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )


def test_both_networks_learn_and_the_judge_scores_the_test_split():
    module, loader = module_and_data(epochs=2, d_win_epochs=3)
    generator = [p.detach().clone() for p in module.model.parameters()]
    discriminator = [p.detach().clone() for p in module.discriminator.parameters()]
    fit = trainer(2)
    fit.fit(module, train_dataloaders=loader)
    assert any(not torch.equal(a, b) for a, b in zip(generator, module.model.parameters(), strict=True))
    assert any(not torch.equal(a, b) for a, b in zip(discriminator, module.discriminator.parameters(), strict=True))
    results = fit.test(module, dataloaders=loader, verbose=False)[0]
    assert results["test/fid"] > 0 and results["test/d_longest_wins_streak"] >= 0


def test_a_discriminator_winning_outright_is_reported(monkeypatch, caplog):
    # Any accuracy counts as winning outright: every epoch is a win, so the streak reaches d_win_epochs.
    monkeypatch.setattr(generator_training, "WIN_ACCURACY", 0.0)
    module, loader = module_and_data(epochs=3, d_win_epochs=2)
    fit = trainer(3)
    with caplog.at_level(logging.WARNING, logger="dlpipe"):
        fit.fit(module, train_dataloaders=loader)
    warnings = [r.getMessage() for r in caplog.records if "won outright" in r.getMessage()]
    assert len(warnings) == 1 and "for 2 epochs" in warnings[0]  # once, when the streak reaches d_win_epochs
    assert fit.test(module, dataloaders=loader, verbose=False)[0]["test/d_longest_wins_streak"] == 3


def test_a_fair_fight_is_not_reported(monkeypatch, caplog):
    monkeypatch.setattr(generator_training, "WIN_ACCURACY", 1.01)  # no accuracy can reach it
    module, loader = module_and_data(epochs=2, d_win_epochs=1)
    fit = trainer(2)
    with caplog.at_level(logging.WARNING, logger="dlpipe"):
        fit.fit(module, train_dataloaders=loader)
    assert not [r for r in caplog.records if "won outright" in r.getMessage()]
    assert fit.test(module, dataloaders=loader, verbose=False)[0]["test/d_longest_wins_streak"] == 0
