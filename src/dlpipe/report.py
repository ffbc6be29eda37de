"""One page a person opens: every model's metrics side by side, with the figures the stages drew."""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

from dlpipe.io import atomic_path, write_json

# Columns shown in the comparison table, in order; absent keys show as a dash.
TABLE_COLUMNS = (
    ("trainable_params", "trainable params", "{:,.0f}"),
    ("multiply_adds", "multiply-adds / sample", "{:,.0f}"),
    ("train_seconds", "train s", "{:.1f}"),
    ("test_accuracy", "test acc (torch)", "{:.4f}"),
    ("onnx_accuracy", "test acc (ONNX)", "{:.4f}"),
    ("macro_f1", "macro F1", "{:.4f}"),
    ("rmse_ratio_vs_persistence", "RMSE / persistence", "{:.4f}"),
    ("dm_pvalue", "Diebold-Mariano p", "{:.3g}"),
    ("skill", "skill", "{}"),
    ("directional_accuracy", "direction acc", "{:.3f}"),
    ("onnx_max_abs_diff", "max |torch - ONNX|", "{:.2e}"),
    ("latency_ms_torch_b1_p50", "torch b1 p50 ms", "{:.3f}"),
    ("latency_ms_onnx_b1_p50", "ONNX b1 p50 ms", "{:.3f}"),
    ("latency_ms_onnx_b1_p99", "ONNX b1 p99 ms", "{:.3f}"),
    ("latency_ms_onnx_b32_p50", "ONNX b32 p50 ms", "{:.3f}"),
    ("throughput_onnx_b32_per_s", "ONNX b32 items/s", "{:,.0f}"),
)


def _cell(metrics: dict[str, Any], key: str, pattern: str) -> str:
    value = metrics.get(key)
    return "&ndash;" if value is None else html.escape(pattern.format(value))


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


def render_html(
    summary: dict[str, dict[str, Any]], reports_dir: Path, recipes: dict[str, dict[str, Any] | None] | None = None
) -> str:
    header = "".join(f"<th>{html.escape(label)}</th>" for _, label, _ in TABLE_COLUMNS)
    rows = "".join(
        f"<tr><th>{html.escape(model)}</th>"
        + "".join(f"<td>{_cell(m, k, p)}</td>" for k, _, p in TABLE_COLUMNS)
        + "</tr>"
        for model, m in summary.items()
    )
    figures = []
    preview = reports_dir / "figures" / "augment_preview.png"
    if preview.is_file():
        figures.append(("Augmentation preview", preview.relative_to(reports_dir)))
    for model in summary:
        grid = reports_dir / "figures" / f"{model}_samples.png"  # a generator's samples
        if grid.is_file():
            figures.append((f"{model}: generated samples", grid.relative_to(reports_dir)))
        for image in sorted((reports_dir / "plots" / model).glob("*.png")):
            figures.append((f"{model}: {image.stem}", image.relative_to(reports_dir)))
    gallery = "".join(
        f'<figure><img src="{html.escape(str(src))}" alt="{html.escape(title)}">'
        f"<figcaption>{html.escape(title)}</figcaption></figure>"
        for title, src in figures
    )
    from dlpipe.compare import render_html as render_compare
    from dlpipe.compare import rows_from_metrics

    compare_table = render_compare(rows_from_metrics(summary))  # `dlpipe compare` prints the same columns
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>dlpipe report</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2rem; color: #222; }}
table {{ border-collapse: collapse; font-size: 0.9rem; }}
th, td {{ border: 1px solid #ccc; padding: 0.3rem 0.6rem; text-align: right; }}
thead th {{ background: #f3f3f3; }} tbody th {{ text-align: left; }}
figure {{ display: inline-block; margin: 1rem; vertical-align: top; }} img {{ max-width: 640px; }}
</style></head><body>
<h1>dlpipe report</h1>
<p>Metrics from <code>reports/metrics/&lt;model&gt;.json</code>;
accuracy and errors through ONNX Runtime on the held-out test split.</p>
<table><thead><tr><th>model</th>{header}</tr></thead><tbody>{rows}</tbody></table>
<h2>Accuracy, speed and size: PyTorch, ONNX Runtime fp32 and int8</h2>
{compare_table}
{render_forecasts(summary)}
{render_generators(summary)}
<h2>Figures</h2>{gallery}
{render_recipes(recipes or {}, reports_dir)}
</body></html>
"""


def write_report(
    summary: dict[str, dict[str, Any]],
    reports_dir: Path,
    summary_path: Path,
    html_path: Path,
    recipes: dict[str, dict[str, Any] | None] | None = None,
) -> None:
    write_json(summary_path, summary)
    with atomic_path(html_path) as tmp:
        tmp.write_text(render_html(summary, reports_dir, recipes))
