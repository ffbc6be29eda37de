"""reports/index.html: the page a person opens. One self-contained file (figures embedded): every model's
result against its baseline with a verdict, training curves, the stages' figures, speed and size, the
course's recipes, the data the models learnt from, and where every number came from (runs, code, params,
data, machine)."""

from __future__ import annotations

import base64
import datetime as dt
import html
import json
import logging
import os
import platform
from pathlib import Path
from typing import Any

import pandas as pd

from dlpipe.config import Config
from dlpipe.io import atomic_path, read_json, write_json
from dlpipe.report_figures import latency_vs_batch, training_curves

log = logging.getLogger("dlpipe")


def _table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(label)}</th>" for label in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(cell)}</td>" for cell in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _figure(reports_dir: Path, image: Path, title: str) -> str:
    if not image.is_file():
        return ""
    src = html.escape(str(image.relative_to(reports_dir)))
    return f'<figure><img src="{src}" alt="{html.escape(title)}"><figcaption>{html.escape(title)}</figcaption></figure>'


def number(value: Any, pattern: str) -> str:
    return "-" if value is None else pattern.format(value)


def _forecast_row(scope: str, scores: dict[str, Any], baselines: dict[str, Any]) -> list[str]:
    return [
        scope,
        number(scores["rmse_ratio_vs_persistence"], "{:.4f}"),
        number(scores["dm_pvalue"], "{:.3g}"),
        scores["skill"],
        number(scores.get("directional_accuracy"), "{:.3f}"),
        number(scores.get("directional_pvalue"), "{:.3g}"),
        number(scores.get("up_days_share"), "{:.3f}"),
        number(baselines["moving_average"]["rmse_ratio_vs_persistence"], "{:.4f}"),
        number(baselines["arima"]["rmse_ratio_vs_persistence"], "{:.4f}"),
    ]


def render_forecasts(summary: dict[str, dict[str, Any]]) -> str:
    """The forecasters judged: per model, pooled and per ticker, against persistence with the Diebold-Mariano
    test, and the baselines' ratios on the same days; one verdict line each."""
    forecasters = {model: m for model, m in summary.items() if "tickers" in m and "skill" in m}
    if not forecasters:
        return ""
    header = [
        "model on",
        "RMSE / persistence",
        "DM p",
        "skill",
        "direction acc",
        "direction p (vs 50%)",
        "up days (always-up acc)",
        "moving average / persistence",
        "ARIMA / persistence",
    ]
    rows, verdicts = [], []
    for model, metrics in forecasters.items():
        rows.append(_forecast_row(f"{model}: all tickers (log returns)", metrics, metrics["baselines"]))
        verdicts.append(metrics["verdict"])
        for ticker, scores in metrics["tickers"].items():
            rows.append(_forecast_row(f"{model}: {ticker}", scores, scores["baselines"]))
            verdicts.append(scores["verdict"])
    items = "".join(f"<li>{html.escape(line)}</li>" for line in verdicts)
    return (
        "<h2>Stock forecasts: skill over persistence?</h2><p>Same test days for every model and baseline; "
        "<em>skill</em> only when the RMSE is lower and the Diebold-Mariano test (Harvey-Leybourne-Newbold "
        "correction) rejects equal accuracy.</p>" + _table(header, rows) + f"<ul>{items}</ul>"
    )


def render_generators(summary: dict[str, dict[str, Any]]) -> str:
    """Each generator's FID beside the real-vs-real floor, its diversity and the classes it draws."""
    generators = {model: m for model, m in summary.items() if "fid_cnn" in m}
    if not generators:
        return ""
    header = ["model", "FID (judge)", "real floor", "FID / floor", "diversity", "classes drawn", "warning"]
    rows = [
        [
            f"{model} ({m.get('features', '?')} features)",
            number(m["fid_cnn"], "{:.1f}"),
            number(m["fid_cnn_real_floor"], "{:.1f}"),
            number(m.get("fid_cnn_over_floor"), "{:.1f}"),
            number(m["diversity_ratio"], "{:.2f}"),
            f"{m['classes_drawn']} of {len(m.get('class_counts') or {})}",
            str(m.get("warning", "none")),
        ]
        for model, m in generators.items()
    ]
    return (
        "<h2>Generated images: how far from real?</h2><p>FID in the judge classifier's penultimate features, "
        "generated vs real test images; the floor is the same distance between real training and test images. "
        "Diversity is the generated images' mean pairwise feature distance over the real ones' (near 0: "
        "collapse).</p>" + _table(header, rows)
    )


def render_recipes(recipes: dict[str, dict[str, Any] | None], reports_dir: Path) -> str:
    """The course's recipes beside the models: transfer learning, distillation, convolution cost. A recipe
    whose stage has not run says so instead of disappearing."""
    parts = ["<h2>Transfer learning</h2>"]
    transfer = recipes.get("transfer")
    if transfer:
        modes = list(dict.fromkeys(row["mode"] for row in transfer["rows"]))
        by_k: dict[int, dict[str, float]] = {}
        for row in transfer["rows"]:
            by_k.setdefault(row["k"], {})[row["mode"]] = row["test_accuracy"]
        rows = [[str(k)] + [f"{accuracy[m]:.3f}" for m in modes] for k, accuracy in by_k.items()]
        parts += [
            f"<p>{html.escape(transfer['smallest_k']['answer'])}</p>",
            _table(["k images a class", *(m.replace("_", " ") for m in modes)], rows),
            _figure(reports_dir, reports_dir / "transfer" / "accuracy_vs_k.png", "accuracy vs k"),
        ]
    else:
        parts.append("<p>Not run (<code>dlpipe transfer</code>).</p>")
    parts.append("<h2>Knowledge distillation</h2>")
    distill = recipes.get("distill")
    if distill:
        verdict = "helped" if distill["distillation_helped"] else "did not help"
        parts += [
            f"<p>Distillation {verdict}: {distill['accuracy_gain']:+.3f} test accuracy over the student trained "
            f"alone (McNemar p = {distill['mcnemar_pvalue']:.3g}).</p>",
            _table(
                ["role", "model", "test accuracy", "parameters", "multiply-adds"],
                [
                    [r["role"], r["model"], f"{r['test_accuracy']:.4f}", f"{r['trainable_params']:,}"]
                    + [f"{r['multiply_adds']:,}" if r.get("multiply_adds") is not None else "-"]
                    for r in distill["rows"]
                ],
            ),
        ]
    else:
        parts.append("<p>Not run (<code>dlpipe distill</code>).</p>")
    parts.append("<h2>Standard vs depthwise separable convolution</h2>")
    cost = recipes.get("cost")
    if cost:
        parts += [
            _table(
                ["M -> N", "H x W", "params ratio", "multiply-adds ratio", "1/N + 1/9", "measured time ratio"],
                [
                    [
                        f"{r['in_channels']} -> {r['out_channels']}",
                        f"{r['size']} x {r['size']}",
                        f"{r['params_ratio']:.4f}",
                        f"{r['multiply_adds_ratio']:.4f}",
                        f"{r['textbook_ratio']:.4f}",
                        f"{r['time_ratio']:.3f}",
                    ]
                    for r in cost["rows"]
                ],
            ),
            _figure(reports_dir, reports_dir / "cost" / "depthwise.png", "depthwise separable vs standard"),
        ]
    else:
        parts.append("<p>Not run (<code>dlpipe cost</code>).</p>")
    return "\n".join(part for part in parts if part)


# ------------------------------------------------------------------------------------------ the page
STYLE = """
body { font-family: system-ui, sans-serif; margin: 2rem; color: #222; max-width: 1400px; }
table { border-collapse: collapse; font-size: 0.85rem; margin: 0.5rem 0 1rem; }
th, td { border: 1px solid #ccc; padding: 0.25rem 0.5rem; text-align: right; vertical-align: top; }
thead th { background: #f3f3f3; } tbody th, td.text { text-align: left; }
figure { display: inline-block; margin: 0.6rem; vertical-align: top; } img { max-width: 640px; }
figure.wide img { max-width: 100%; }
figcaption { font-size: 0.8rem; color: #555; } .warn { color: #a40000; } code { font-size: 0.85rem; }
nav a { margin-right: 0.8rem; }
"""
SECTIONS = (
    ("models", "Models"),
    ("curves", "Training curves"),
    ("figures", "Figures"),
    ("speed", "Speed and size"),
    ("recipes", "Recipes"),
    ("data", "Data"),
    ("provenance", "Provenance"),
)


def _embedded(image: Path, reports_dir: Path, title: str) -> str:
    """An <img> carrying the PNG itself (a data: URI): the page opens from disk, moved or mailed, alone."""
    if not image.is_file():
        return ""
    source = image.relative_to(reports_dir) if image.is_relative_to(reports_dir) else image.name
    return _png_figure(image.read_bytes(), title, str(source))


def _png_figure(png: bytes | None, title: str, source: str, wide: bool = False) -> str:
    if not png:
        return ""
    data = base64.b64encode(png).decode()
    css = ' class="wide"' if wide else ""
    return (
        f'<figure{css}><img src="data:image/png;base64,{data}" alt="{html.escape(title)}" '
        f'data-file="{html.escape(source)}"><figcaption>{html.escape(title)}</figcaption></figure>'
    )


def _link(url: str | None, text: str) -> str:
    return f'<a href="{html.escape(url)}">{html.escape(text)}</a>' if url else html.escape(text)


def render_models(context: dict[str, Any]) -> str:
    """One row per model: its test result against its baseline with the verdict, export parity, latency,
    size of the job (train time, parameters, multiply-adds), registry champion and MLflow run."""
    header = [
        "model",
        "task",
        "test result (ONNX Runtime)",
        "baseline",
        "verdict",
        "max |torch - ONNX|",
        "p50 ms b1 torch / ORT / int8",
        "train s",
        "params",
        "multiply-adds",
        "champion",
        "MLflow run",
    ]
    rows = []
    for model, m in context["summary"].items():
        facts = context["models"][model]
        line = facts["headline"]
        latency = " / ".join(number(m.get(f"latency_ms_{b}_b1_p50"), "{:.3f}") for b in ("torch", "onnx", "int8"))
        champion = facts.get("champion")
        cells = [
            f"<th>{html.escape(model)}</th>",
            f'<td class="text">{html.escape(facts["task"])}</td>',
            f'<td class="text">{html.escape(line["metric"])}</td>',
            f'<td class="text">{html.escape(line["baseline"])}</td>',
            f'<td class="text">{html.escape(line["verdict"])}</td>',
            f"<td>{html.escape(number(m.get('onnx_max_abs_diff'), '{:.1e}'))}</td>",
            f"<td>{html.escape(latency)}</td>",
            f"<td>{html.escape(number(m.get('train_seconds'), '{:.1f}'))}</td>",
            f"<td>{html.escape(number(m.get('trainable_params'), '{:,.0f}'))}</td>",
            f"<td>{html.escape(number(m.get('multiply_adds'), '{:,.0f}'))}</td>",
            f"<td>{html.escape('v' + champion if champion else '-')}</td>",
            f'<td class="text">{_link(facts.get("run_url"), (facts.get("run_id") or "-")[:8])}</td>',
        ]
        rows.append(f'<tr data-model="{html.escape(model)}">{"".join(cells)}</tr>')
    head = "".join(f"<th>{html.escape(label)}</th>" for label in header)
    return f'<table id="models"><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table>'


def render_data(data: dict[str, Any]) -> str:
    """What the models learnt from: image counts per class and split, skipped files; tickers and days."""
    parts = []
    images = data.get("images")
    if images:
        classes, counts = images.get("classes", []), images.get("class_counts", {})
        splits = list(counts)
        rows = [[str(name)] + [str(counts[split][i]) for split in splits] for i, name in enumerate(classes)]
        rows.append(["all"] + [str(images.get("counts", {}).get(split, "-")) for split in splits])
        skipped = images.get("skipped") or {}
        parts += [
            f"<h3>Images: {html.escape(str(images.get('source')))}</h3>",
            f"<p>{html.escape(str(images.get('provenance', '')))}; "
            f"{images.get('channels')}x{images.get('height')}x{images.get('width')}; "
            f"sha256 <code>{html.escape(str(images.get('sha256', ''))[:16])}</code></p>",
            _table(["class", *splits], rows),
            f"<p>Files skipped as unreadable or unusable: {skipped.get('count', 0)}"
            + (
                ": " + html.escape(", ".join(str(f) for f in skipped.get("files", [])[:20]))
                if skipped.get("files")
                else ""
            )
            + "</p>",
        ]
    stocks = data.get("stocks")
    if stocks:
        files = stocks.get("files", {})
        rows = [
            [
                ticker,
                str(info.get("rows", "-")),
                f"{info.get('first_date', '?')} .. {info.get('last_date', '?')}",
                str(info.get("origin", info.get("file", ""))),
                str(info.get("sha256", ""))[:16],
            ]
            for ticker, info in files.items()
        ]
        flagged = stocks.get("flagged") or stocks.get("dropped") or {}
        parts += [
            f"<h3>Stock prices: {html.escape(str(stocks.get('source')))}</h3>",
            _table(["ticker", "days", "dates", "from", "sha256"], rows),
            f"<p>Days flagged or dropped by validation: {html.escape(json.dumps(flagged) if flagged else 'none')}</p>",
        ]
    return "\n".join(parts) or "<p>No data stage has run.</p>"


def render_provenance(context: dict[str, Any]) -> str:
    """Where every number came from: this checkout, its params and data, each model's MLflow run (flagged
    when it was trained from other params, code or data than these), the machine and library versions."""
    here = context["provenance"]
    rows = []
    for model in context["summary"]:
        facts = context["models"][model]
        tags = facts.get("tags") or {}
        notes = []
        for key, current in (("params_hash", here["params_hash"]), ("git_sha", here["git_sha"])):
            if tags.get(key) and tags[key] != current:
                notes.append(f"trained with other {key.split('_')[0]} ({tags[key][:10]})")
        if not tags:
            notes.append("run not found in the tracking store")
        rows.append(
            f'<tr data-model="{html.escape(model)}"><th>{html.escape(model)}</th>'
            f'<td class="text">{_link(facts.get("run_url"), facts.get("run_id") or "-")}</td>'
            f'<td class="text">{html.escape(tags.get("stage", "-"))}</td>'
            f'<td class="text"><code>{html.escape(tags.get("git_sha", "-")[:10])}</code></td>'
            f'<td class="text"><code>{html.escape(tags.get("params_hash", "-"))}</code></td>'
            f'<td class="text"><code>{html.escape(tags.get("data_sha256", "-")[:16])}</code></td>'
            f'<td class="text{" warn" if notes else ""}">'
            f"{html.escape('; '.join(notes) or 'matches this checkout')}</td>"
            "</tr>"
        )
    header = "".join(
        f"<th>{label}</th>" for label in ("model", "MLflow run", "stage", "git sha", "params hash", "data sha256", "")
    )
    versions = ", ".join(f"{name} {version}" for name, version in here["libraries"].items())
    return (
        f"<p>Checkout <code>{html.escape(here['git_sha'][:10])}</code>, params hash "
        f"<code>{html.escape(here['params_hash'])}</code>, "
        f"tracking store <code>{html.escape(here['tracking'])}</code>; "
        f"report written {html.escape(here['written'])}.</p>"
        f'<table id="runs"><thead><tr>{header}</tr></thead><tbody>{"".join(rows)}</tbody></table>'
        f"<p>Machine: {html.escape(here['machine'])}.</p><p>Libraries: {html.escape(versions)}.</p>"
    )


def render_html(context: dict[str, Any], reports_dir: Path) -> str:
    summary = context["summary"]
    curves = (
        "".join(
            _png_figure(png, f"{model}: training curves", source, wide=True)
            for model, (png, source) in context["curves"].items()
        )
        or "<p>No training curves (models/&lt;model&gt;/training_curves.csv) yet.</p>"
    )
    figures = [_embedded(reports_dir / "figures" / "augment_preview.png", reports_dir, "Augmentation preview")]
    for model in summary:
        figures.append(
            _embedded(reports_dir / "figures" / f"{model}_samples.png", reports_dir, f"{model}: generated samples")
        )
        for image in sorted((reports_dir / "plots" / model).glob("*.png")):
            figures.append(_embedded(image, reports_dir, f"{model}: {image.stem.replace('_', ' ')}"))
    from dlpipe.compare import render_html as render_compare
    from dlpipe.compare import rows_from_metrics

    champions = {model: (facts.get("champion"), None) for model, facts in context["models"].items()}
    compare_table = render_compare(rows_from_metrics(summary, champions))  # `dlpipe compare` prints the same
    nav = "".join(f'<a href="#s-{anchor}">{title}</a>' for anchor, title in SECTIONS)
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>dlpipe report</title><style>{STYLE}</style></head><body>
<h1>dlpipe report</h1><nav>{nav}</nav>
<p>Test results through ONNX Runtime on each dataset's held-out test split (reports/metrics/&lt;model&gt;.json);
everything below is in this one file.</p>
<h2 id="s-models">Models</h2>
{render_models(context)}
{render_forecasts(summary)}
{render_generators(summary)}
<h2 id="s-curves">Training curves</h2>{curves}
<h2 id="s-figures">Figures</h2>{"".join(figures)}
<h2 id="s-speed">Speed and size: PyTorch, ONNX Runtime fp32 and int8</h2>
{compare_table}
{_png_figure(context.get("latency_png"), "p50 latency against batch size", "latency", wide=True)}
<div id="s-recipes">{render_recipes(context["recipes"], reports_dir)}</div>
<h2 id="s-data">Data</h2>{render_data(context["data"])}
<h2 id="s-provenance">Provenance</h2>{render_provenance(context)}
</body></html>
"""


# ---------------------------------------------------------------------------------------- the inputs
def _library_versions() -> dict[str, str]:
    """Installed versions, read from package metadata (importing torch here would cost seconds)."""
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for name in ("torch", "lightning", "torchmetrics", "onnx", "onnxruntime", "onnxruntime-gpu", "mlflow", "dvc"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            continue
    return found


def _machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{platform.platform()}; {cpu}; {os.cpu_count()} CPUs; Python {platform.python_version()}"


def model_facts(
    config: Config, model: str, metrics: dict[str, Any], client: Any, classes: list[str] | None = None
) -> dict[str, Any]:
    """One model's row: its task, the task's headline (result, baseline, verdict), its MLflow run (id, tags,
    page) and registry champion. `client`: an MLflow client of the store, or None when there is none."""
    from dlpipe import tracking
    from dlpipe.tasks import task_of

    paths = config.paths
    task = task_of(config, model)
    info = read_json(paths.train_info(model)) if paths.train_info(model).is_file() else {}
    run_id = info.get("run_id")
    facts: dict[str, Any] = {"task": task.name, "run_id": run_id, "tags": {}, "champion": None, "run_url": None}
    context = {"threshold": config.params.promote.thresholds.get(task.promotion[0]), "classes": classes}
    facts["headline"] = task.headline(metrics, context)
    ui_base = tracking.ui_base(config)
    if client is not None and run_id:
        try:
            run = client.get_run(run_id)
            facts["tags"] = dict(run.data.tags)
            # The run is in hand: its page needs no second lookup of its experiment.
            facts["run_url"] = tracking.run_page(ui_base, run.info.experiment_id, run_id) if ui_base else None
        except Exception as exc:  # a run deleted or a store moved: shown as such, not fatal for a report
            log.warning("report: %s: MLflow run %s not readable (%s)", model, run_id, exc)
    if client is not None and config.params.mlflow.register_model:
        try:
            facts["champion"] = tracking.champion_version(config, model)
        except Exception as exc:  # no registered model yet
            log.debug("report: %s: no champion (%s)", model, exc)
    return facts


def models_markdown(config: Config, models: list[str]) -> str:
    """The models' results as a Markdown table (a Prefect artifact, a chat message): the headline, p50
    latency, the champion and a link to each model's MLflow run. Models without metrics yet are skipped."""
    from dlpipe import tracking

    client = tracking.client(config) if tracking.store_exists(config) else None
    lines = [
        "| model | task | test result (ONNX Runtime) | baseline | verdict | p50 ms b1 (ORT) | champion | MLflow run |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for model in models:
        if not config.paths.metrics(model).is_file():
            continue
        metrics = read_json(config.paths.metrics(model))
        facts = model_facts(config, model, metrics, client)
        line = facts["headline"]
        run = (facts["run_id"] or "-")[:8]
        link = f"[{run}]({facts['run_url']})" if facts["run_url"] else run
        cells = [
            model,
            facts["task"],
            line["metric"],
            line["baseline"],
            line["verdict"],
            number(metrics.get("latency_ms_onnx_b1_p50"), "{:.3f}"),
            f"v{facts['champion']}" if facts["champion"] else "-",
            link,
        ]
        lines.append("| " + " | ".join(cell.replace("|", "/") for cell in cells) + " |")
    return "\n".join(lines) + "\n"


def gather(config: Config) -> dict[str, Any]:
    """Everything the page shows, read from the stages' outputs and the tracking store."""
    from dlpipe import tracking

    paths = config.paths
    summary = {model: read_json(paths.metrics(model)) for model in config.all_models}
    recipes = {
        name: read_json(path) if path.is_file() else None
        for name, path in (
            ("transfer", paths.transfer_json),
            ("distill", paths.distill_json),
            ("cost", paths.depthwise_json),
        )
    }
    data = {
        name: read_json(paths.meta(directory))
        for name, directory in (("images", paths.raw_images), ("stocks", paths.raw_stocks))
        if paths.meta(directory).is_file()
    }
    client = tracking.client(config) if tracking.store_exists(config) else None
    classes = (data.get("images") or {}).get("classes")
    models, curves = {}, {}
    for model in summary:
        facts = model_facts(config, model, summary[model], client, classes)
        models[model] = facts
        curve_file = paths.training_curves(model)
        if curve_file.is_file():
            curves[model] = (training_curves(model, pd.read_csv(curve_file)), str(curve_file.relative_to(paths.root)))
    provenance = {
        "git_sha": tracking.git_sha(paths.root),
        "params_hash": config.params_hash,
        "tracking": tracking.tracking_uri(config),
        "written": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": _machine(),
        "libraries": _library_versions(),
    }
    return {
        "summary": summary,
        "recipes": recipes,
        "data": data,
        "models": models,
        "curves": curves,
        "latency_png": latency_vs_batch(summary),
        "provenance": provenance,
    }


def write_report(context: dict[str, Any], reports_dir: Path, summary_path: Path, html_path: Path) -> None:
    write_json(summary_path, context["summary"])
    with atomic_path(html_path) as tmp:
        tmp.write_text(render_html(context, reports_dir))
