"""The transfer stage: k-shot sampling, what each mode trains, the weights-file loader, and the stage itself on
a tiny project (a small ResNet, one or two epochs)."""

from __future__ import annotations

import csv
import json
import shutil
from dataclasses import replace

import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn

from conftest import tiny_params, write_project
from dlpipe import stages, tracking
from dlpipe.config import TrainerParams, load_config
from dlpipe.errors import DlpipeError
from dlpipe.models import get_model
from dlpipe.transfer import (
    MODES,
    Schedule,
    check_backbone_state,
    load_backbone,
    read_weights,
    sample_k_shot,
    standardized,
    train,
)

TINY_NET = {"depth": 8, "widths": [4, 8, 8]}
CPU = TrainerParams(accelerator="cpu")


# --------------------------------------------------------------------------------------------- k-shot sets
def test_k_shot_is_stratified_seeded_and_nested():
    labels = np.repeat(np.arange(4), [30, 12, 50, 20])
    small = sample_k_shot(labels, 4, 5, seed=7)
    assert np.bincount(labels[small], minlength=4).tolist() == [5, 5, 5, 5]
    assert len(set(small.tolist())) == 20
    assert np.array_equal(small, sample_k_shot(labels, 4, 5, seed=7))
    assert not np.array_equal(small, sample_k_shot(labels, 4, 5, seed=8))
    larger = sample_k_shot(labels, 4, 12, seed=7)
    assert set(small.tolist()) <= set(larger.tolist())  # a larger k only adds images


def test_k_shot_refuses_a_class_with_fewer_than_k_images():
    labels = np.repeat(np.arange(3), [30, 9, 30])
    with pytest.raises(DlpipeError) as caught:
        sample_k_shot(labels, 3, 10, seed=0, names=["five", "six", "seven"])
    message = str(caught.value)
    assert "\n" not in message and "k=10" in message and "'six'" in message and "only 9" in message


# ------------------------------------------------------------------------------------------ what trains
def _tiny_model(num_classes: int = 3, seed: int = 0):
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(num_classes), 8)
    images = rng.integers(0, 256, size=(len(labels), 1, 12, 12), dtype=np.uint8)
    net = get_model("resnet", in_channels=1, image_size=12, num_classes=num_classes, **TINY_NET)
    return standardized(net, 1, images), images, labels


def _state(net: nn.Module) -> dict[str, torch.Tensor]:
    return {key: value.detach().clone() for key, value in net.state_dict().items()}


def _changed(before: dict, after: dict, prefixes: tuple[str, ...]) -> dict[str, bool]:
    return {key: not torch.equal(before[key], after[key]) for key in before if key.startswith(prefixes)}


LOWER = ("conv1.", "bn1.", "layer1.", "layer2.")  # resnet's blocks(): the stem, layer1, layer2 ...
TOP = ("layer3.",)  # ... and the top block, layer3


def test_feature_extraction_trains_the_head_only():
    model, images, labels = _tiny_model()
    before = _state(model.net)
    train(model, images, labels, Schedule(epochs=2, lr=0.05, frozen_base=True), batch_size=8, seed=0, trainer=CPU)
    after = _state(model.net)
    base = _changed(before, after, LOWER + TOP)
    assert base and not any(base.values()), [key for key, changed in base.items() if changed]  # BN statistics too
    assert all(_changed(before, after, ("fc.",)).values())


def test_scratch_trains_every_block():
    model, images, labels = _tiny_model()
    before = _state(model.net)
    train(model, images, labels, Schedule(epochs=1, lr=0.05), batch_size=8, seed=0, trainer=CPU)
    changed = _changed(before, _state(model.net), ("conv1.weight", "layer1.0.conv1.weight", "layer3.0.conv2.weight"))
    assert all(changed.values())


class Snapshots(Callback):
    """The network's state at the end of every training epoch."""

    def __init__(self) -> None:
        self.states: list[dict[str, torch.Tensor]] = []

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.states.append(_state(pl_module.model.net))


def test_fine_tuning_unfreezes_the_top_blocks_after_the_head_epochs_at_the_lower_rate():
    model, images, labels = _tiny_model()
    before = _state(model.net)
    snapshots = Snapshots()
    schedule = Schedule(epochs=3, lr=0.05, frozen_base=True, unfreeze_at=2, top_blocks=1, lr_factor=0.1)
    fitted = train(model, images, labels, schedule, batch_size=8, seed=0, trainer=CPU, callbacks=[snapshots])
    head_epochs, after = snapshots.states[1], snapshots.states[2]
    assert not any(_changed(before, head_epochs, LOWER + TOP).values())  # head epochs: the base is frozen
    assert all(_changed(before, head_epochs, ("fc.",)).values())
    top = _changed(head_epochs, after, TOP)
    assert top["layer3.0.conv1.weight"] and top["layer3.0.bn2.weight"] and top["layer3.0.downsample.0.weight"]
    assert not top["layer3.0.bn1.running_mean"]  # the base stays in inference mode: BatchNorm statistics kept
    assert not any(_changed(before, after, LOWER).values())
    groups = fitted.trainer.optimizers[0].param_groups
    assert [group["lr"] for group in groups] == pytest.approx([0.005, 0.005])  # head and top block at lr x 0.1
    assert {id(p) for p in groups[0]["params"]} == {id(p) for p in model.net.fc.parameters()}
    assert {id(p) for p in groups[1]["params"]} == {id(p) for p in model.net.layer3.parameters()}


# ----------------------------------------------------------------------------------------- weights files
def _resnet(num_classes: int = 5, in_channels: int = 1) -> nn.Module:
    return get_model("resnet", in_channels=in_channels, image_size=28, num_classes=num_classes, **TINY_NET)


def test_weights_file_of_the_same_architecture_loads_without_its_head(tmp_path):
    torch.manual_seed(1)
    source = _resnet(num_classes=1000)  # another label set, as torchvision's ImageNet head
    path = tmp_path / "backbone.pt"
    torch.save(source.state_dict(), path)
    target = _resnet(num_classes=5)
    head = _state(target.fc)
    load_backbone(target, read_weights(path), str(path))
    loaded = target.state_dict()
    backbone = {key: value for key, value in source.state_dict().items() if not key.startswith("fc.")}
    assert all(torch.equal(loaded[key], value) for key, value in backbone.items())
    assert all(torch.equal(value, head[key]) for key, value in target.fc.state_dict().items())


def _weights_error(tmp_path, state_or_bytes) -> str:
    path = tmp_path / "weights.pt"
    if isinstance(state_or_bytes, bytes):
        path.write_bytes(state_or_bytes)
    else:
        torch.save(state_or_bytes, path)
    with pytest.raises(DlpipeError) as caught:
        check_backbone_state(_resnet(), read_weights(path), f"transfer.weights: {path}")
    message = str(caught.value)
    assert "\n" not in message and str(path) in message
    return message


def test_weights_file_missing_key_is_named(tmp_path):
    state = _resnet().state_dict()
    del state["layer1.0.bn1.running_mean"]
    assert "missing key 'layer1.0.bn1.running_mean'" in _weights_error(tmp_path, state)


def test_weights_file_unexpected_key_is_named(tmp_path):
    state = {**_resnet().state_dict(), "layer4.0.conv1.weight": torch.zeros(3, 3)}
    assert "unexpected key 'layer4.0.conv1.weight'" in _weights_error(tmp_path, state)


def test_weights_file_wrong_shape_is_named(tmp_path):
    state = _resnet(in_channels=3).state_dict()  # RGB weights for grayscale images
    message = _weights_error(tmp_path, state)
    assert "key 'conv1.weight' has shape (4, 3, 3, 3), the backbone's is (4, 1, 3, 3)" in message


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b"not a torch file", "not a readable torch state_dict"),
        (None, "not a readable torch state_dict"),  # a pickled module: would run code to load, refused
        ([1, 2], "expected a state_dict"),
    ],
)
def test_weights_file_that_is_no_state_dict_is_refused_in_one_line(tmp_path, content, expected):
    path = tmp_path / "weights.pt"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        torch.save(nn.Linear(2, 2) if content is None else content, path)
    with pytest.raises(DlpipeError) as caught:
        read_weights(path)
    assert "\n" not in str(caught.value) and str(path) in str(caught.value) and expected in str(caught.value)


def test_weights_file_not_found(tmp_path):
    with pytest.raises(DlpipeError, match=r"transfer\.weights: .*absent\.pt: file not found"):
        read_weights(tmp_path / "absent.pt")


# ----------------------------------------------------------------------------------------------- the stage
def _transfer_params(**changes) -> dict:
    params = tiny_params()  # 300 images: 21 training and 6 test images a class
    tiny = {"net": TINY_NET, "shots": [2, 5], "pretrain_epochs": 1, "epochs": 2, "head_epochs": 1, "batch_size": 16}
    params["transfer"].update({**tiny, **changes})
    return params


@pytest.fixture(scope="module")
def transfer_run(tmp_path_factory):
    config = load_config(write_project(tmp_path_factory.mktemp("transfer"), _transfer_params()))
    stages.fetch_images(config)
    return config, stages.transfer(config)


def test_stage_writes_table_csv_and_plot(transfer_run):
    config, results = transfer_run
    document = json.loads(config.paths.transfer_json.read_text())
    assert [(row["mode"], row["k"]) for row in document["rows"]] == [(m, k) for k in (2, 5) for m in MODES]
    assert all(0.0 <= row["test_accuracy"] <= 1.0 for row in document["rows"])
    assert document["test_images"] == 30 and document["target_classes"] == ["5", "6", "7", "8", "9"]
    assert document["backbone"]["source"] == "pretrained" and 0.0 <= document["backbone"]["test_accuracy"] <= 1.0
    answer = document["smallest_k"]
    assert answer["k"] == 2 and set(answer["accuracy"]) == set(MODES)
    assert answer["transfer_beats_scratch"] == (
        answer["feature_extraction_beats_scratch"] or answer["fine_tuning_beats_scratch"]
    )
    assert document["settings"]["shots"] == [2, 5] and document["run_id"] == results["run_id"]
    with open(config.paths.transfer_csv) as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0]) == ["k", *MODES] and [row["k"] for row in rows] == ["2", "5"]
    assert config.paths.transfer_png.read_bytes()[:4] == b"\x89PNG"
    assert sorted(path.name for path in config.paths.transfer.iterdir()) == [
        "accuracy_vs_k.png",
        "transfer.csv",
        "transfer.json",
    ]


def test_stage_logs_one_tagged_mlflow_run(transfer_run):
    config, results = transfer_run
    client = tracking.client(config)
    run = client.get_run(results["run_id"])
    assert run.info.run_name == tracking.run_name(run.data.tags) and run.info.status == "FINISHED"
    assert run.info.run_name.startswith("transfer: resnet images/")
    assert run.data.tags["stage"] == "transfer" and run.data.tags["model"] == "resnet"
    assert run.data.tags["params_hash"] == config.params_hash and "git_sha" in run.data.tags
    assert run.data.params["transfer.shots"] == "[2, 5]" and run.data.params["seed"] == str(config.params.seed)
    assert {f"test_acc/{mode}/k{k}" for mode in MODES for k in (2, 5)} <= set(run.data.metrics)
    assert "pretrain/test_acc" in run.data.metrics
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "test_acc/fine_tuning")) == [2, 5]
    artifacts = {artifact.path for artifact in client.list_artifacts(run.info.run_id, "transfer")}
    assert artifacts == {"transfer/accuracy_vs_k.png", "transfer/transfer.csv", "transfer/transfer.json"}


def test_stage_with_a_weights_file_skips_pretraining(transfer_run, tmp_path):
    config, _ = transfer_run
    torch.save(_resnet(num_classes=1000).state_dict(), tmp_path / "resnet8.pt")
    weighted = load_config(write_project(tmp_path / "project", _transfer_params(weights="../resnet8.pt", shots=[2])))
    shutil.copytree(config.paths.raw_images, weighted.paths.raw_images)
    results = stages.transfer(weighted)
    assert results["backbone"]["source"] == "weights" and results["backbone"]["test_accuracy"] is None
    assert len(results["backbone"]["sha256"]) == 64 and [row["k"] for row in results["rows"]] == [2, 2, 2]
    assert "pretrain/test_acc" not in tracking.client(weighted).get_run(results["run_id"]).data.metrics


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"weights": "absent.pt"}, "absent.pt: file not found"),
        ({"shots": [2, 50]}, "transfer.shots: k=50 but class '5' has only 21 training images"),
        ({"target_classes": [5, 12]}, "transfer.target_classes: class 12 does not exist"),
        ({"unfreeze_blocks": 5}, "transfer.unfreeze_blocks: 5 but 'resnet' has 4 blocks"),
    ],
)
def test_stage_bad_input_is_one_line_and_writes_nothing(transfer_run, tmp_path, changes, expected):
    config, _ = transfer_run
    bad = replace(config, params=load_config(write_project(tmp_path / "p", _transfer_params(**changes))).params)
    before = {path.name: path.read_bytes() for path in config.paths.transfer.iterdir()}
    runs = len(tracking.client(config).search_runs([tracking.ensure_experiment(config)]))
    with pytest.raises(DlpipeError) as caught:
        stages.transfer(bad)
    assert "\n" not in str(caught.value) and expected in str(caught.value)
    assert {path.name: path.read_bytes() for path in config.paths.transfer.iterdir()} == before
    assert len(tracking.client(config).search_runs([tracking.ensure_experiment(config)])) == runs
