"""Checks that only mean something on a CUDA machine (skipped elsewhere): training steps on the GPU and
ONNX Runtime's CUDA provider actually being used rather than silently falling back to the CPU."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dlpipe.models import get_model

pytestmark = pytest.mark.gpu


def test_cnn_trains_a_step_on_cuda_in_bf16():
    net = get_model("cnn", in_channels=1, image_size=28, num_classes=10).cuda().to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-3)
    x = torch.rand(64, 1, 28, 28, device="cuda").to(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (64,), device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = torch.nn.functional.cross_entropy(net(x), y)
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss)


def test_onnxruntime_uses_cuda_provider(tmp_path):
    pytest.importorskip("onnxruntime")
    from dlpipe.export import export_onnx
    from dlpipe.runtime import create_session

    net = get_model("cnn", in_channels=1, image_size=28, num_classes=10).eval()
    export_onnx(net, torch.rand(2, 1, 28, 28), tmp_path / "m.onnx", opset=18)
    onnx_session = create_session(tmp_path / "m.onnx", ["cuda", "cpu"])
    assert onnx_session.get_providers()[0] == "CUDAExecutionProvider"
    out = onnx_session.run(None, {"input": np.zeros((4, 1, 28, 28), np.float32)})[0]
    assert out.shape == (4, 10)
