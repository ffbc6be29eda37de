"""Transfer learning as the course notes teach it: a backbone pretrained on some classes (MNIST digits 0-4)
learns new classes (digits 5-9) from k labelled images each, three ways:

- `scratch`: the same network, randomly initialised, trained on the k-shot set alone;
- `feature_extraction`: the pretrained base frozen, a new head (a fresh `fc`) trained on top of it;
- `fine_tuning`: the head first with the base frozen, then the top `unfreeze_blocks` of `blocks()` unfrozen
  and trained with the head at the learning rate times `finetune_lr_factor`.

Accuracy is measured on the test split's images of the new classes, for each mode and k; the pretrained
backbone's accuracy on the pretraining classes is reported beside it. A backbone can also come from a file
of torchvision-format weights (`transfer.weights`); then nothing is pretrained here.

Every network used must follow the transfer protocol: an attribute `fc` (the final nn.Linear) and a method
`blocks()` (the feature-extractor stages from input to output). The backbone is the network without `fc`:
its state moves between networks by name, so a new head is simply the fresh `fc` of a new network.

Lightning is imported only when something trains (`dlpipe.transfer_training`), as in dlpipe.tasks.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from dlpipe import plots, tracking
from dlpipe.config import Config, TrainerParams, TransferParams
from dlpipe.data.images import load_split
from dlpipe.errors import DlpipeError
from dlpipe.io import read_json, sha256_file, write_json
from dlpipe.models import get_model
from dlpipe.tasks.classifier import StandardizedClassifier, to_unit_float

if TYPE_CHECKING:
    import lightning as L

MODES = ("scratch", "feature_extraction", "fine_tuning")
HEAD = "fc"  # the protocol's head attribute: its state_dict keys are `fc.*`, left out of a backbone
EVAL_BATCH = 500  # test images per forward pass when measuring accuracy
# The stage's networks are tiny (8-64 channels, batches of 16): on 2 cores a second intra-op thread gained at most
# 1.4x when both cores were free, and cost 10x (1,600 -> 60-170 images/s) whenever another process held one,
# as the OpenMP threads wait for each other at every operation. One thread is the robust choice.
CPU_THREADS = 1


# --------------------------------------------------------------------------------------------------- data
def select_classes(x: np.ndarray, y: np.ndarray, classes: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """The images of `classes` only, labelled by their position in `classes` (0 .. len(classes) - 1)."""
    position = {int(c): i for i, c in enumerate(classes)}
    keep = np.isin(y, list(position))
    return x[keep], np.array([position[int(label)] for label in y[keep]], dtype=np.int64)


def sample_k_shot(
    labels: np.ndarray, num_classes: int, k: int, seed: int, names: Sequence[str] | None = None
) -> np.ndarray:
    """Indices of k images of each class 0 .. num_classes - 1 (stratified), drawn with `seed`.

    Each class's images are shuffled once per seed and the first k taken, so with one seed the 5-shot set is
    part of the 20-shot set: a larger k only adds images. A class with fewer than k images is an error.
    """
    rng = np.random.default_rng(seed)
    chosen = []
    for label in range(num_classes):
        members = np.flatnonzero(labels == label)
        if len(members) < k:
            name = names[label] if names else label
            raise DlpipeError(f"transfer.shots: k={k} but class {name!r} has only {len(members)} training images")
        chosen.append(rng.permutation(members)[:k])
    return np.concatenate(chosen)


@dataclass(frozen=True)
class TransferData:
    """The two tasks' images (uint8, (N, C, H, W)) with labels relabelled 0 .. len(classes) - 1."""

    pretrain_train: tuple[np.ndarray, np.ndarray]
    pretrain_test: tuple[np.ndarray, np.ndarray]
    target_train: tuple[np.ndarray, np.ndarray]
    target_test: tuple[np.ndarray, np.ndarray]
    pretrain_names: list[str]
    target_names: list[str]
    data_kwargs: dict[str, int]  # the network's in_channels and image_size
    data_sha256: str


def load_transfer_data(config: Config) -> TransferData:
    """Train and test splits of the raw images, cut into the pretraining and the target task."""
    params = config.params.transfer
    meta = read_json(config.paths.meta(config.paths.raw_images), required=("classes", "channels", "height", "sha256"))
    classes = meta["classes"]
    for key in ("pretrain_classes", "target_classes"):
        if missing := [c for c in getattr(params, key) if c >= len(classes)]:
            raise DlpipeError(
                f"{config.params_file}: transfer.{key}: class {missing[0]} does not exist "
                f"(the images have {len(classes)} classes, 0..{len(classes) - 1})"
            )
    train, test = load_split(config.paths.raw_images, "train"), load_split(config.paths.raw_images, "test")
    return TransferData(
        pretrain_train=select_classes(*train, params.pretrain_classes),
        pretrain_test=select_classes(*test, params.pretrain_classes),
        target_train=select_classes(*train, params.target_classes),
        target_test=select_classes(*test, params.target_classes),
        pretrain_names=[classes[c] for c in params.pretrain_classes],
        target_names=[classes[c] for c in params.target_classes],
        data_kwargs={"in_channels": int(meta["channels"]), "image_size": int(meta["height"])},
        data_sha256=meta["sha256"],
    )


# ----------------------------------------------------------------------------------------------- networks
def build_network(params: TransferParams, data_kwargs: dict[str, int], num_classes: int) -> nn.Module:
    """The backbone architecture with a fresh `num_classes` head; checked to follow the transfer protocol."""
    net = get_model(params.backbone, **data_kwargs, num_classes=num_classes, **params.net)
    if not isinstance(getattr(net, HEAD, None), nn.Linear) or not callable(getattr(net, "blocks", None)):
        raise DlpipeError(
            f"transfer.backbone: {params.backbone!r} has no `fc` head and `blocks()` method (the transfer protocol)"
        )
    if params.unfreeze_blocks > len(net.blocks()):
        raise DlpipeError(
            f"transfer.unfreeze_blocks: {params.unfreeze_blocks} but {params.backbone!r} has {len(net.blocks())} blocks"
        )
    return net


def is_head_key(key: str) -> bool:
    return key == HEAD or key.startswith(f"{HEAD}.")


def backbone_state(net: nn.Module) -> dict[str, torch.Tensor]:
    """The network's state without its head: what transfers to a network for other classes."""
    return {key: value.detach().clone() for key, value in net.state_dict().items() if not is_head_key(key)}


def check_backbone_state(net: nn.Module, state: Mapping[str, Any], source: str) -> dict[str, torch.Tensor]:
    """`state` without head keys, checked against `net`'s: the same names and shapes, finite values.

    One-line DlpipeError naming `source` and the first offending key (missing, unexpected or mis-shaped).
    """
    expected = {key: value for key, value in net.state_dict().items() if not is_head_key(key)}
    given = {key: value for key, value in state.items() if not is_head_key(key)}
    for key, value in expected.items():
        if key not in given:
            raise DlpipeError(f"{source}: missing key {key!r} (the backbone has {len(expected)} non-head keys)")
        if not isinstance(given[key], torch.Tensor):
            raise DlpipeError(f"{source}: key {key!r} holds a {type(given[key]).__name__}, not a tensor")
        if tuple(given[key].shape) != tuple(value.shape):
            raise DlpipeError(
                f"{source}: key {key!r} has shape {tuple(given[key].shape)}, the backbone's is {tuple(value.shape)}"
            )
        if given[key].is_floating_point() and not torch.isfinite(given[key]).all():
            raise DlpipeError(f"{source}: key {key!r} holds non-finite values")
    for key in given:
        if key not in expected:
            raise DlpipeError(f"{source}: unexpected key {key!r} (not in the backbone)")
    return {key: given[key] for key in expected}


def load_backbone(net: nn.Module, state: Mapping[str, torch.Tensor], source: str) -> nn.Module:
    """Copy a backbone's state into `net`, keeping `net`'s own head."""
    checked = check_backbone_state(net, state, source)
    net.load_state_dict({**net.state_dict(), **checked})
    return net


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """A state_dict saved with `torch.save(model.state_dict(), path)`, loaded without running any code."""
    where = f"transfer.weights: {path}"
    if not path.is_file():
        raise DlpipeError(f"{where}: file not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - truncated, not a torch file, a pickle of other objects: one line
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise DlpipeError(f"{where}: not a readable torch state_dict ({first})") from exc
    if not isinstance(state, Mapping) or not all(isinstance(key, str) for key in state):
        raise DlpipeError(f"{where}: expected a state_dict (names -> tensors), as torch.save(net.state_dict()) writes")
    return dict(state)


def standardized(net: nn.Module, in_channels: int, images: np.ndarray) -> StandardizedClassifier:
    """`net` behind the classifier task's standardisation, with per-channel statistics of `images`."""
    model = StandardizedClassifier(net, in_channels)
    pixels = to_unit_float(torch.from_numpy(images))
    model.standardize.set_stats(pixels.mean(dim=(0, 2, 3)), pixels.std(dim=(0, 2, 3)))
    return model


@torch.no_grad()
def accuracy(model: nn.Module, images: np.ndarray, labels: np.ndarray) -> float:
    """Top-1 accuracy of `model` (eval mode) on uint8 `images`."""
    model.eval()
    device = next(model.parameters()).device
    correct = 0
    for start in range(0, len(images), EVAL_BATCH):
        batch = to_unit_float(torch.from_numpy(images[start : start + EVAL_BATCH]).to(device))
        correct += int((model(batch).argmax(1).cpu().numpy() == labels[start : start + EVAL_BATCH]).sum())
    return correct / len(labels)


# ---------------------------------------------------------------------------------------------- training
@dataclass(frozen=True)
class Fitted:
    trainer: L.Trainer  # the finished Trainer (its optimizer shows the parameter groups and learning rates)
    seconds: float


@dataclass(frozen=True)
class Schedule:
    """How one network is trained: which parameters learn, when, and at which learning rate."""

    epochs: int
    lr: float
    frozen_base: bool = False  # everything but `fc` frozen (and in inference mode) from the start
    unfreeze_at: int | None = None  # fine-tuning: the epoch at which the top blocks join the optimizer
    top_blocks: int = 0  # how many of `blocks()`, from the top, unfreeze then
    lr_factor: float = 1.0  # every learning rate times this from `unfreeze_at` on


def schedule_for(mode: str, params: TransferParams) -> Schedule:
    if mode == "scratch":
        return Schedule(params.epochs, params.lr)
    if mode == "feature_extraction":
        return Schedule(params.epochs, params.lr, frozen_base=True)
    if mode == "fine_tuning":
        return Schedule(
            params.epochs,
            params.lr,
            frozen_base=True,
            unfreeze_at=params.head_epochs,
            top_blocks=params.unfreeze_blocks,
            lr_factor=params.finetune_lr_factor,
        )
    raise ValueError(f"unknown transfer mode {mode!r}; expected one of {MODES}")


def train(
    model: StandardizedClassifier,
    images: np.ndarray,
    labels: np.ndarray,
    schedule: Schedule,
    *,
    batch_size: int,
    seed: int,
    trainer: TrainerParams,
    callbacks: Sequence[L.Callback] = (),
) -> Fitted:
    """Train `model` in place with Lightning (see dlpipe.transfer_training)."""
    from dlpipe.transfer_training import fit

    started = time.perf_counter()
    trained = fit(
        model, images, labels, schedule, batch_size=batch_size, seed=seed, trainer=trainer, callbacks=callbacks
    )
    state = model.state_dict()
    bad = [name for name, value in state.items() if value.is_floating_point() and not value.isfinite().all()]
    if bad:
        raise DlpipeError(f"transfer.lr: training diverged ({bad[0]} became non-finite); lower transfer.lr")
    return Fitted(trained, time.perf_counter() - started)


@dataclass(frozen=True)
class Backbone:
    state: dict[str, torch.Tensor]  # the pretrained network's state without its head
    mean: torch.Tensor | None  # standardisation of the pretraining images; None: from each k-shot set
    std: torch.Tensor | None
    info: dict[str, Any]  # where it came from, and how good it is on its own classes


def pretrain(config: Config, data: TransferData) -> Backbone:
    """Train the backbone on the pretraining classes (all of their training images)."""
    params = config.params.transfer
    x, y = data.pretrain_train
    torch.manual_seed(config.params.seed)
    net = build_network(params, data.data_kwargs, len(data.pretrain_names))
    model = standardized(net, data.data_kwargs["in_channels"], x)
    schedule = Schedule(params.pretrain_epochs, params.lr)
    fitted = train(
        model, x, y, schedule, batch_size=params.batch_size, seed=config.params.seed, trainer=config.params.trainer
    )
    info = {
        "source": "pretrained",
        "classes": data.pretrain_names,
        "train_images": int(len(y)),
        "epochs": params.pretrain_epochs,
        "seconds": round(fitted.seconds, 2),
        "test_images": int(len(data.pretrain_test[1])),
        "test_accuracy": accuracy(model, *data.pretrain_test),
    }
    return Backbone(backbone_state(net), model.standardize.mean.clone(), model.standardize.std.clone(), info)


def backbone_from_weights(config: Config, data: TransferData) -> Backbone:
    """The backbone in the `transfer.weights` file (its head ignored), checked against the architecture."""
    params = config.params.transfer
    path = config.paths.transfer_weights(params.weights)
    state = read_weights(path)
    net = build_network(params, data.data_kwargs, len(data.target_names))
    checked = check_backbone_state(net, state, f"transfer.weights: {path}")
    info = {"source": "weights", "weights": str(params.weights), "sha256": sha256_file(path), "test_accuracy": None}
    return Backbone(checked, None, None, info)


def train_mode(
    mode: str,
    config: Config,
    data: TransferData,
    backbone: Backbone | None,
    k_shot: np.ndarray,
    callbacks: Sequence[L.Callback] = (),
) -> tuple[StandardizedClassifier, Fitted]:
    """One mode on one k-shot set (indices into the target task's training images)."""
    params = config.params.transfer
    x, y = data.target_train[0][k_shot], data.target_train[1][k_shot]
    # The same seed for every mode: a scratch network and a new head start from the same draws.
    torch.manual_seed(config.params.seed)
    net = build_network(params, data.data_kwargs, len(data.target_names))
    model = standardized(net, data.data_kwargs["in_channels"], x)
    if mode != "scratch":
        if backbone is None:
            raise ValueError(f"mode {mode} needs a backbone")
        load_backbone(net, backbone.state, "pretrained backbone")
        if backbone.mean is not None:  # the base sees its inputs standardised as in pretraining
            model.standardize.set_stats(backbone.mean, backbone.std)
    schedule = schedule_for(mode, params)
    fitted = train(
        model,
        x,
        y,
        schedule,
        batch_size=params.batch_size,
        seed=config.params.seed,
        trainer=config.params.trainer,
        callbacks=callbacks,
    )
    return model, fitted


# ------------------------------------------------------------------------------------------------ results
@contextlib.contextmanager
def cpu_threads(count: int) -> Iterator[None]:
    """torch's intra-op threads set to `count` for the block, then restored."""
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def run_transfer(config: Config, log=None) -> dict[str, Any]:
    """Pretrain (or load) the backbone, train every mode on every k, measure; the results document."""
    with cpu_threads(CPU_THREADS):
        return _run_transfer(config, log)


def _run_transfer(config: Config, log=None) -> dict[str, Any]:
    params = config.params.transfer
    started = time.perf_counter()
    data = load_transfer_data(config)
    # Every k-shot set is drawn first: a class short of images fails before anything trains.
    k_shots = {
        k: sample_k_shot(data.target_train[1], len(data.target_names), k, config.params.seed, data.target_names)
        for k in params.shots
    }
    build_network(params, data.data_kwargs, len(data.target_names))  # the protocol and unfreeze_blocks, early
    backbone = backbone_from_weights(config, data) if params.weights else pretrain(config, data)
    if log:
        log.info("transfer: backbone %s (%s)", params.backbone, _describe_backbone(backbone.info))
    rows = []
    for k in sorted(params.shots):
        for mode in MODES:
            model, fitted = train_mode(mode, config, data, backbone, k_shots[k])
            acc = accuracy(model, *data.target_test)
            rows.append({"mode": mode, "k": k, "train_images": int(len(k_shots[k])), "test_accuracy": acc})
            rows[-1]["seconds"] = round(fitted.seconds, 2)
            if log:
                log.info("transfer: k=%d %-18s test accuracy %.3f", k, mode, acc)
    return {
        "backbone": {"name": params.backbone, "net": params.net, **backbone.info},
        "pretrain_classes": data.pretrain_names,
        "target_classes": data.target_names,
        "test_images": int(len(data.target_test[1])),
        "chance": 1.0 / len(data.target_names),
        "rows": rows,
        "smallest_k": smallest_k_answer(rows),
        "settings": {"seed": config.params.seed, **params.model_dump(mode="json")},
        "data_sha256": data.data_sha256,
        "seconds": round(time.perf_counter() - started, 2),
    }


def _describe_backbone(info: dict[str, Any]) -> str:
    if info["source"] == "weights":
        return f"weights from {info['weights']}"
    return f"pretrained on classes {', '.join(info['classes'])}: test accuracy {info['test_accuracy']:.3f}"


def smallest_k_answer(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Did fine-tuning or feature extraction beat training from scratch with the fewest images?"""
    k = min(row["k"] for row in rows)
    acc = {row["mode"]: row["test_accuracy"] for row in rows if row["k"] == k}
    beats = {mode: acc[mode] > acc["scratch"] for mode in ("feature_extraction", "fine_tuning")}
    winners = [mode.replace("_", " ") for mode, won in beats.items() if won]
    shown = ", ".join(f"{mode.replace('_', ' ')} {acc[mode]:.3f}" for mode in MODES)
    verdict = f"yes, {' and '.join(winners)}" if winners else "no"
    return {
        "k": k,
        "accuracy": acc,
        "feature_extraction_beats_scratch": beats["feature_extraction"],
        "fine_tuning_beats_scratch": beats["fine_tuning"],
        "transfer_beats_scratch": any(beats.values()),
        "answer": f"{verdict} (k={k}: {shown})",
    }


def table(results: dict[str, Any]) -> pd.DataFrame:
    """Accuracy per k (rows) and mode (columns): the CSV `dvc plots` draws."""
    frame = pd.DataFrame(results["rows"]).pivot(index="k", columns="mode", values="test_accuracy")
    return frame.reindex(columns=list(MODES)).reset_index()


MODE_STYLES = {"scratch": "s--", "feature_extraction": "o-", "fine_tuning": "^-"}


def plot(results: dict[str, Any], target: Path) -> None:
    """Accuracy vs k per mode (log-x), chance and the backbone's own accuracy for reference."""
    plt = plots.pyplot()
    frame = table(results)
    figure, ax = plt.subplots(figsize=(6.4, 4.2))
    for mode in MODES:
        ax.plot(frame["k"], frame[mode], MODE_STYLES[mode], label=mode.replace("_", " "), markersize=6)
    ax.axhline(results["chance"], color="grey", linestyle=":", linewidth=1, label="chance")
    backbone = results["backbone"]
    if backbone["test_accuracy"] is not None:
        ax.axhline(
            backbone["test_accuracy"],
            color="black",
            linestyle="-.",
            linewidth=1,
            label=f"pretrained backbone on its classes {','.join(results['pretrain_classes'])}",
        )
    ax.set_xscale("log")
    ax.set_xticks(frame["k"], [str(k) for k in frame["k"]])
    ax.minorticks_off()
    ax.set_ylim(0.0, 1.02)
    ax.set_xlabel("k: training images per new class (log scale)")
    ax.set_ylabel(f"test accuracy on classes {','.join(results['target_classes'])}")
    ax.set_title(f"transfer learning with {backbone['name']}: {results['test_images']} test images")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    plots.save_figure(figure, target)


def write_outputs(config: Config, results: dict[str, Any], directory: Path) -> None:
    """transfer.json (everything), transfer.csv (accuracy per k and mode) and the figure, into `directory`."""
    write_json(directory / config.paths.transfer_json.name, results)
    plots.save_csv(table(results), directory / config.paths.transfer_csv.name)
    plot(results, directory / config.paths.transfer_png.name)


# ------------------------------------------------------------------------------------------------- MLflow
RUN_NAME = "transfer"


@contextlib.contextmanager
def mlflow_run(config: Config, results: dict[str, Any]) -> Iterator[str]:
    """One MLflow run for the stage, tagged as training runs are; ended FAILED (KILLED on a signal) if the
    block fails, FINISHED otherwise."""
    client = tracking.client(config)
    tags = tracking.run_tags(config, results["backbone"]["name"], RUN_NAME, results["data_sha256"])
    experiment = tracking.ensure_experiment(config)
    run_id = client.create_run(experiment, run_name=tracking.run_name(tags), tags=tags).info.run_id
    try:
        yield run_id
    except BaseException as exc:
        client.set_terminated(run_id, "FAILED" if isinstance(exc, Exception) else "KILLED")
        raise
    client.set_terminated(run_id, "FINISHED")


def log_results(config: Config, run_id: str, results: dict[str, Any], directory: Path) -> None:
    """Params, metrics and the output files of the stage into its MLflow run.

    Each mode's accuracy is logged twice: as `test_acc/<mode>/k<k>`, and as `test_acc/<mode>` with k as the
    step, which MLflow draws as accuracy against k.
    """
    from mlflow.entities import Metric, Param

    stamp = int(time.time() * 1000)
    settings = results["settings"]
    params = [Param(f"transfer.{key}", str(value)) for key, value in settings.items() if key != "seed"]
    params += [Param("seed", str(settings["seed"]))]
    params += [Param(f"trainer.{key}", str(value)) for key, value in config.params.trainer.model_dump().items()]
    values = {f"test_acc/{row['mode']}/k{row['k']}": row["test_accuracy"] for row in results["rows"]}
    if results["backbone"]["test_accuracy"] is not None:
        values["pretrain/test_acc"] = results["backbone"]["test_accuracy"]
    values["transfer_seconds"] = results["seconds"]
    logged = [Metric(key, float(value), stamp, 0) for key, value in values.items()]
    logged += [Metric(f"test_acc/{row['mode']}", row["test_accuracy"], stamp, row["k"]) for row in results["rows"]]
    client = tracking.client(config)
    client.log_batch(run_id, metrics=logged, params=params)
    for path in sorted(directory.iterdir()):
        client.log_artifact(run_id, str(path), artifact_path=RUN_NAME)
