"""The pipeline's stages: params in, files out, each output rewritten whole (temp name, then rename).

DVC (`python -m dlpipe <stage> [model]`) and Prefect (`pipelines/flows.py`) both call these functions.
"""

from __future__ import annotations

import hashlib
import logging
from typing import Any

import numpy as np

from dlpipe.config import Config
from dlpipe.errors import DlpipeError
from dlpipe.io import atomic_dir, read_json, sha256_file, write_json

log = logging.getLogger("dlpipe")
# What later stages read from train.json and export.json.
TRAIN_INFO_KEYS = ("run_id", "trainable_params", "train_seconds", "epochs_trained")
EXPORT_INFO_KEYS = ("registered_version", "onnx_sha256")
SKIPPED_LISTED = 100  # skipped files named in meta.json (all are counted)
EXAMPLE_ROWS = 2  # real inputs stored as the registered model's input example


def fetch_images(config: Config) -> dict[str, Any]:
    from dlpipe.data.images import SPLITS, arrays_sha256, load_images, save_split, split_stratified

    params = config.params.data.images
    images = load_images(params, config.paths.download_cache, config.paths.root)
    splits = split_stratified(images, params, config.params.seed)
    _, channels, height, width = images.x.shape
    meta = {
        "source": params.source,
        "provenance": images.provenance,
        "classes": images.classes,
        "channels": int(channels),
        "height": int(height),
        "width": int(width),
        "counts": {name: int(len(splits[name][1])) for name in SPLITS},
        "class_counts": {name: np.bincount(splits[name][1], minlength=len(images.classes)).tolist() for name in SPLITS},
        "split_sha256": {name: arrays_sha256(*splits[name]) for name in SPLITS},
        "seed": config.params.seed,
        # A folder source leaves out files it cannot use; the first ones are listed with the reason.
        "skipped": {
            "count": len(images.skipped),
            "files": [{"file": file, "reason": reason} for file, reason in images.skipped[:SKIPPED_LISTED]],
        },
    }
    meta["sha256"] = hashlib.sha256("".join(meta["split_sha256"][n] for n in SPLITS).encode()).hexdigest()
    with atomic_dir(config.paths.raw_images) as tmp:
        for name in SPLITS:
            save_split(tmp, name, *splits[name])
        write_json(config.paths.meta(tmp), meta)
    log.info("fetch_images: %s -> %s", params.source, meta["counts"])
    if images.skipped:
        log.warning(
            "fetch_images: %d files skipped (listed in %s)",
            len(images.skipped),
            config.paths.meta(config.paths.raw_images),
        )
    return meta


def fetch_stocks(config: Config) -> dict[str, Any]:
    """Daily prices of every ticker in data.stocks.tickers, validated, one CSV each; all or nothing."""
    from dlpipe.data.stocks import download_yfinance, read_sample, validate_prices

    params = config.params.data.stocks
    frames = {}
    for ticker in params.tickers:  # every ticker read and validated before anything is written
        if params.source == "sample":
            frame, origin = read_sample(config.paths.samples, ticker), f"data/samples/stocks/{ticker}.csv"
        else:
            frame, origin = download_yfinance(params, ticker), f"yfinance:{ticker}"
        frames[ticker] = (validate_prices(frame, origin, params, ticker), origin)
    files = {}
    with atomic_dir(config.paths.raw_stocks) as tmp:
        for ticker, (prices, origin) in frames.items():
            path = tmp / config.paths.prices(ticker).name
            prices.to_csv(path, index=False, date_format="%Y-%m-%d")
            files[ticker] = {
                "file": path.name,
                "origin": origin,
                "rows": int(len(prices)),
                "first_date": str(prices["Date"].iloc[0].date()),
                "last_date": str(prices["Date"].iloc[-1].date()),
                "sha256": sha256_file(path),
            }
        meta = {
            "source": params.source,
            "tickers": list(params.tickers),
            "files": files,
            "sha256": hashlib.sha256("".join(f["sha256"] for f in files.values()).encode()).hexdigest(),
        }
        write_json(config.paths.meta(tmp), meta)
    for f in files.values():
        log.info("fetch_stocks: %s %s rows %s..%s", f["origin"], f["rows"], f["first_date"], f["last_date"])
    return meta


def augment(config: Config) -> dict[str, Any]:
    from dlpipe.augment import PIPELINE_FILE, augment_images, describe, pipeline_dict, resolve, save_preview
    from dlpipe.data.images import load_split, save_split

    seed = config.params.seed
    x, y = load_split(config.paths.raw_images, "train")
    # The raw data's source picks the defaults of the probabilities params.yaml leaves at null.
    raw_meta = config.paths.meta(config.paths.raw_images)
    source = read_json(raw_meta, required=("source",))["source"]
    params = resolve(config.params.augment, source, where=f"{raw_meta}: source")
    x_aug, y_aug = augment_images(x, y, params, seed)
    with atomic_dir(config.paths.augmented) as tmp:
        digest = save_split(tmp, "train", x_aug, y_aug)
        write_json(tmp / PIPELINE_FILE, pipeline_dict(params, seed))
        meta = {
            "originals": int(len(y)),
            "total": int(len(y_aug)),
            "copies": params.copies,
            "sha256": digest,
            "split_sha256": {"train": digest},
            "source": source,
            "seed": seed,
            "settings": params.model_dump(),  # params.augment with the source's defaults filled in
            "transforms": describe(params),
            "pipeline": PIPELINE_FILE,  # A.from_dict(...) then set_random_seed(seed) reproduces the copies
        }
        write_json(config.paths.meta(tmp), meta)
    save_preview(x, y, params, seed, config.paths.augment_preview, source)
    log.info("augment: %s, %d -> %d images; %s", source, len(y), len(y_aug), "; ".join(meta["transforms"]))
    return meta


def train(config: Config, model: str) -> dict[str, Any] | None:
    from dlpipe import tracking
    from dlpipe.train import fit

    config.train_params(model)  # unknown model: fail before touching anything
    with tracking.keep_tracking_env():
        info = fit(config, model)
    if info is not None:  # None on the other ranks of a DDP run: rank 0 alone writes
        write_json(config.paths.train_info(model), info)
    return info


def export(config: Config, model: str) -> dict[str, Any]:
    """ONNX export gated on parity with PyTorch, then its int8 and fp16 variants; fp32 and int8 registered in
    MLflow, fp16 too where it is measured (`export.fp16`)."""
    from dlpipe import fp16, tracking
    from dlpipe.export import export_with_parity
    from dlpipe.tasks import task_of

    task = task_of(config, model)
    train_info = read_json(config.paths.train_info(model), required=TRAIN_INFO_KEYS)
    network = task.load_exported(config.paths.checkpoint(model))
    inputs = task.reference_inputs(config, model)
    target = config.paths.onnx(model)
    settings = config.params.export
    metadata = task.onnx_metadata(config, model)
    cases = task.parity_inputs(config, model)
    agreement_inputs = task.agreement_inputs(config, model)
    agreement = None if agreement_inputs is None else (agreement_inputs, settings.min_top1_agreement)
    checks = export_with_parity(
        network, cases, target, settings.opset, settings.parity_atol, metadata, task.dynamic_axes, agreement
    )
    diffs = {name: value for name, value in checks.items() if name != "top1_agreement"}
    diff = max(diffs.values())
    quantization = export_int8(config, model, task)
    fp16_path = config.paths.onnx_fp16(model)
    fp16.convert_fp16(target, fp16_path)
    # The parity gate's worst case over its batches (and a forecaster's longer windows): evaluate's
    # onnx_max_abs_diff is over the test split.
    logged = {
        "onnx_max_abs_diff_parity": diff,
        "onnx_size_bytes": target.stat().st_size,
        **variant_sizes(config, model, "int8"),
        **variant_sizes(config, model, "fp16"),
    }
    if "top1_agreement" in checks:
        # On the whole test split, as evaluate measures it again: one name for the one quantity.
        logged["onnx_top1_agreement"] = checks["top1_agreement"]
    tracking.log_metrics(config, train_info["run_id"], logged)
    version = int8_version = fp16_version = None
    fp16_measured = fp16.measured(settings.fp16, config.params.evaluate.providers)
    if config.params.mlflow.register_model:
        example, run_id = inputs[:EXAMPLE_ROWS], train_info["run_id"]
        version = tracking.register_onnx(config, model, run_id, target, example, metadata)
        int8_metadata = {**metadata, "dlpipe.variant": quantization}
        int8_path = config.paths.onnx_int8(model)
        int8_version = tracking.register_onnx(
            config, model, run_id, int8_path, example, int8_metadata, variant="int8", fp32_version=version
        )
        if fp16_measured:
            fp16_metadata = {**metadata, "dlpipe.variant": fp16.FP16_VARIANT}
            fp16_version = tracking.register_onnx(
                config, model, run_id, fp16_path, example, fp16_metadata, variant="fp16", fp32_version=version
            )
    info = {
        "onnx_sha256": sha256_file(target),  # evaluate refuses a file changed after export
        "onnx_max_abs_diff": diff,
        "parity": diffs,  # max abs difference per checked case (batch size, sequence length)
        "top1_agreement": checks.get("top1_agreement"),  # classifiers, over the whole test split
        "registered_version": version,
        "int8": {
            "sha256": sha256_file(config.paths.onnx_int8(model)),
            "quantization": quantization,
            "registered_version": int8_version,
        },
        "fp16": {
            "sha256": sha256_file(fp16_path),
            "measured": fp16_measured,  # evaluate times it and the gate may choose it (export.fp16)
            "registered_version": fp16_version,
        },
        "opset": settings.opset,
    }
    write_json(config.paths.export_info(model), info)
    return info


def export_int8(config: Config, model: str, task) -> str:
    """models/<model>/model.int8.onnx from the fp32 graph: static QDQ int8 calibrated on training inputs, or
    dynamic int8, as the task says. Returns the variant written ("int8-static" | "int8-dynamic")."""
    from dlpipe.quantize import quantize_dynamic_int8, quantize_static_int8

    settings = config.params.export
    source, target = config.paths.onnx(model), config.paths.onnx_int8(model)
    if task.quantization == "static":
        calibration = task.calibration_inputs(config, model, settings.calibration_samples, config.params.seed)
        quantize_static_int8(source, target, calibration, method=settings.calibration_method)
    else:
        quantize_dynamic_int8(source, target)
    return f"int8-{task.quantization}"


def variant_sizes(config: Config, model: str, variant: str) -> dict[str, float]:
    """`<variant>_size_bytes` and `<variant>_size_ratio` (to model.onnx) of a derived graph."""
    size = config.paths.onnx_variant(model, variant).stat().st_size
    return {f"{variant}_size_bytes": size, f"{variant}_size_ratio": size / config.paths.onnx(model).stat().st_size}


def evaluate(config: Config, model: str) -> dict[str, Any]:
    from dlpipe import promotion, tracking
    from dlpipe.evaluate import evaluate_model
    from dlpipe.tasks import task_of
    from dlpipe.tasks.base import VARIANTS

    task = task_of(config, model)
    train_info = read_json(config.paths.train_info(model), required=TRAIN_INFO_KEYS)
    export_info = read_json(config.paths.export_info(model), required=EXPORT_INFO_KEYS)
    onnx_path = config.paths.onnx(model)
    if not onnx_path.is_file():
        raise DlpipeError(f"{onnx_path}: file not found (run export first)")
    if sha256_file(onnx_path) != export_info["onnx_sha256"]:
        # Its metrics would be tagged on the registered version, which holds the file export wrote.
        raise DlpipeError(f"{onnx_path}: changed since export wrote it (sha256 differs from export.json); rerun export")
    for variant in VARIANTS:
        variant_path, variant_info = config.paths.onnx_variant(model, variant), export_info.get(variant) or {}
        if variant_path.is_file() and sha256_file(variant_path) != variant_info.get("sha256"):
            raise DlpipeError(
                f"{variant_path}: changed since export wrote it (sha256 differs from export.json); rerun export"
            )
    metrics = evaluate_model(config, model, train_info, export_info)
    write_json(config.paths.metrics(model), metrics)
    run_id = train_info["run_id"]
    tracking.log_metrics(config, run_id, metrics)
    # Beside the run's metrics: the figures under figures/ (confusion matrix, forecasts per ticker, a
    # generator's sample grid), the tables they are drawn from under plots/.
    plots_dir, grid = config.paths.plots(model), config.paths.samples_grid(model)
    files = sorted(path for path in plots_dir.iterdir() if path.is_file()) if plots_dir.is_dir() else []
    figures = [path for path in files if path.suffix == ".png"] + ([grid] if grid.is_file() else [])
    tracking.log_files(config, run_id, figures, "figures")
    tracking.log_files(config, run_id, [path for path in files if path.suffix != ".png"], "plots")
    registry = None
    if export_info.get("registered_version"):
        # Registry state, not a fact of this model: reported and returned, kept out of the DVC metrics file.
        metric, batch = task.promotion[0], config.params.promote.latency_batch
        options = promotion.candidates(metrics, export_info, metric, batch)
        decision = promotion.gate(config, model, options, task.promotion, task.evaluation_data(config, model))
        metrics["promotion"], metrics["champion"] = decision, decision["champion"]
        registry = f"{decision['chosen_variant']} v{decision['chosen_version']} " + (
            "is champion"
            if decision["champion"]
            else "not promoted: " + ("; ".join(decision["refused"]) or "the champion is better")
        )
        log.info("evaluate: %s: %s", model, registry)
    tracking.note_result(config, run_id, _evaluation_note(config, model, task, metrics, registry))
    return metrics


def _evaluation_note(config: Config, model: str, task, metrics: dict[str, Any], registry: str | None) -> str:
    """evaluate's line in the run's description: the task's headline (as the report shows it) and the
    registry's decision."""
    from dlpipe import tracking

    classes = tracking.dataset_meta(config, tracking.model_dataset(config, model) or task.dataset).get("classes")
    context = {"threshold": config.params.promote.thresholds.get(task.promotion[0]), "classes": classes}
    headline = task.headline(metrics, context)
    parts = [headline[key] for key in ("metric", "baseline", "verdict") if headline.get(key, "-") != "-"]
    return "; ".join(parts) + (f". Registry: {registry}." if registry else ".")


def report(config: Config) -> dict[str, Any]:
    from dlpipe.report import gather, write_report

    context = gather(config)
    write_report(context, config.paths.reports, config.paths.summary, config.paths.report_html)
    return context["summary"]


def cost(config: Config) -> dict[str, Any]:
    """A standard 3x3 convolution against a depthwise separable one of the same shape (MobileNet): parameters
    and multiply-adds counted by FlopCounterMode beside the textbook 1/N + 1/9, and the measured time ratio."""
    from dlpipe.cost import depthwise_table, plot_depthwise

    params = config.params.cost
    table = depthwise_table(
        params.channels, params.sizes, params.batch, params.repeats, params.warmup, threads=params.threads
    )
    with atomic_dir(config.paths.cost) as tmp:  # the table and its figure replace the old pair together
        write_json(tmp / config.paths.depthwise_json.name, table)
        plot_depthwise(table, tmp / config.paths.depthwise_png.name)
    for row in table["rows"]:
        shape = f"{row['in_channels']}->{row['out_channels']} channels at {row['size']}x{row['size']}"
        log.info(
            "cost: %s: multiply-adds x%.3f (textbook %.3f), forward time x%.2f",
            shape,
            row["multiply_adds_ratio"],
            row["textbook_ratio"],
            row["time_ratio"],
        )
    return table


def distill(config: Config) -> dict[str, Any]:
    """Knowledge distillation: params `distill.student` trained alone and from `distill.teacher`'s soft
    targets; reports/distill/ holds the table (JSON, CSV) and both students' checkpoints."""
    from dlpipe.distill import compare, mlflow_run, write_outputs

    comparison = compare(config)  # trains both students; writes nothing
    paths = config.paths
    with mlflow_run(config, comparison.summary) as run_id:
        comparison.summary["run_id"] = run_id
        with atomic_dir(paths.distill) as tmp:
            write_outputs(comparison, tmp, paths.distill_json.name, paths.distill_csv.name)
    summary = comparison.summary
    log.info(
        "distill: %s %.4f alone, %.4f distilled from %s (%.4f); helped: %s",
        summary["settings"]["student"],
        summary["rows"][1]["test_accuracy"],
        summary["rows"][2]["test_accuracy"],
        summary["settings"]["teacher"],
        summary["rows"][0]["test_accuracy"],
        summary["distillation_helped"],
    )
    return summary


def transfer(config: Config) -> dict[str, Any]:
    """Transfer learning (dlpipe.transfer): a backbone pretrained on some classes (or loaded from
    `transfer.weights`) learns new classes from k images each, from scratch, by feature extraction and by
    fine-tuning; reports/transfer/ gets the accuracy table (JSON, CSV) and the accuracy-vs-k figure, and
    MLflow one run."""
    import dataclasses

    from dlpipe import tracking
    from dlpipe.config import check_transfer
    from dlpipe.transfer import log_results, mlflow_run, run_transfer, write_outputs

    # A params file without a `transfer` section was not checked on load (the defaults name resnet).
    config = dataclasses.replace(config, params=check_transfer(config.params, config.params_file))
    with tracking.keep_tracking_env():
        results = run_transfer(config, log)
        with atomic_dir(config.paths.transfer) as tmp, mlflow_run(config, results) as run_id:
            results["run_id"] = run_id
            write_outputs(config, results, tmp)
            log_results(config, run_id, results, tmp)
    log.info("transfer: beats scratch at the smallest k? %s", results["smallest_k"]["answer"])
    return results


def compare_command(config: Config) -> str:
    """`dlpipe compare`: the table of every model from MLflow, also written to reports/compare.csv."""
    from dlpipe.compare import compare, format_table

    return format_table(compare(config))


def promote_command(config: Config, model: str, version: str) -> str:
    from dlpipe.promotion import promote

    return promote(config, model, version)


def rollback_command(config: Config, model: str) -> str:
    from dlpipe.promotion import rollback

    return rollback(config, model)


def serve_command(argv: list[str]) -> int:
    from dlpipe.serving.cli import serve  # torch-free: the service runs where torch is not installed

    return serve(argv)


def predict_command(argv: list[str]) -> int:
    from dlpipe.serving.cli import predict

    return predict(argv)


def generate_command(argv: list[str]) -> int:
    from dlpipe.generate import main  # onnxruntime only, like serving

    return main(argv)


COMMANDS = {"compare": compare_command, "promote": promote_command, "rollback": rollback_command}
# Commands with their own options (argv after the command name); they read only the serving params.
ARGV_COMMANDS = {"serve": serve_command, "predict": predict_command, "generate": generate_command}
STAGES = {
    "fetch_images": fetch_images,
    "fetch_stocks": fetch_stocks,
    "augment": augment,
    "train": train,
    "export": export,
    "evaluate": evaluate,
    "report": report,
    "distill": distill,
    "cost": cost,
    "transfer": transfer,
}
MODEL_STAGES = ("train", "export", "evaluate")  # stages that take a model name
