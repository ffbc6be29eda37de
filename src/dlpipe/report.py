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
    ("rmse", "RMSE", "{:.3f}"),
    ("persistence_rmse", "persistence RMSE", "{:.3f}"),
    ("rmse_ratio_vs_persistence", "RMSE / persistence", "{:.3f}"),
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


def render_html(summary: dict[str, dict[str, Any]], reports_dir: Path) -> str:
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
        for image in sorted((reports_dir / "plots" / model).glob("*.png")):
            figures.append((f"{model}: {image.stem}", image.relative_to(reports_dir)))
    gallery = "".join(
        f'<figure><img src="{html.escape(str(src))}" alt="{html.escape(title)}">'
        f"<figcaption>{html.escape(title)}</figcaption></figure>"
        for title, src in figures
    )
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
<h2>Figures</h2>{gallery}
</body></html>
"""


def write_report(summary: dict[str, dict[str, Any]], reports_dir: Path, summary_path: Path, html_path: Path) -> None:
    write_json(summary_path, summary)
    with atomic_path(html_path) as tmp:
        tmp.write_text(render_html(summary, reports_dir))
