"""reports/index.html as a person sees it: the report of a finished tiny pipeline opened from disk in a real
headless Chromium with no network, checked for console errors, missing or empty images and one row per
model; a full-page screenshot is saved beside it (reports/report.png)."""

from __future__ import annotations

import struct

import pytest
from browser import chromium_or_skip, visit

from serving import copy_project

pytestmark = pytest.mark.slow

IMAGES = (
    "Array.from(document.images).map(i => ({file: i.dataset.file || i.src.slice(0, 60), "
    "complete: i.complete, width: i.naturalWidth, height: i.naturalHeight}))"
)
MODEL_ROWS = "Array.from(document.querySelectorAll('#models tbody tr')).map(r => r.dataset.model)"
RUN_ROWS = "Array.from(document.querySelectorAll('#runs tbody tr')).map(r => r.dataset.model)"
HEADINGS = "Array.from(document.querySelectorAll('h2')).map(h => h.textContent)"
BROKEN_LINKS = (
    "Array.from(document.querySelectorAll('a[href^=\"#\"]'))"
    ".filter(a => !document.getElementById(a.getAttribute('href').slice(1))).map(a => a.getAttribute('href'))"
)


@pytest.fixture(scope="module")
def report(built_project, tmp_path_factory):
    from dlpipe import stages
    from dlpipe.config import load_config

    chromium_or_skip()
    root = copy_project(built_project, tmp_path_factory.mktemp("report") / "project")
    config = load_config(root / "params.yaml")
    stages.report(config)
    screenshot = config.paths.reports / "report.png"
    expressions = {"images": IMAGES, "models": MODEL_ROWS, "runs": RUN_ROWS, "headings": HEADINGS}
    return (
        config,
        visit(config.paths.report_html, {**expressions, "broken_links": BROKEN_LINKS}, screenshot),
        screenshot,
    )


def test_the_page_loads_without_errors_or_network(report):
    _, page, _ = report
    assert page.console_errors == [] and page.exceptions == []
    assert page.external_requests == []  # self-contained: opens from disk, offline


def test_every_image_is_present_and_not_empty(report):
    config, page, _ = report
    images = page.values["images"]
    assert images and all(i["complete"] and i["width"] > 0 and i["height"] > 0 for i in images), images
    files = {i["file"] for i in images}
    expected = {
        "figures/augment_preview.png",
        "plots/cnn/confusion.png",
        "plots/lstm/forecast_GOOG.png",
        "figures/dcgan_samples.png",
        "latency",
    }
    assert expected <= files, sorted(files)
    curves = {f for f in files if f.endswith("training_curves.csv")}
    assert curves == {f"models/{m}/training_curves.csv" for m in config.all_models}


def test_one_row_per_model_and_every_section(report):
    config, page, _ = report
    assert page.values["models"] == list(config.all_models)
    assert page.values["runs"] == list(config.all_models)
    for heading in ("Models", "Training curves", "Figures", "Data", "Provenance"):
        assert any(h.startswith(heading) for h in page.values["headings"]), page.values["headings"]
    assert page.values["broken_links"] == []


def test_a_screenshot_is_saved_under_reports(report):
    config, _, screenshot = report
    assert screenshot.parent == config.paths.reports
    data = screenshot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])
    assert 1300 <= width <= 1400 and height > 2000  # the whole page (less a scrollbar), not one screen


def test_provenance_names_this_checkout_and_flags_runs_from_other_params(report, tmp_path):
    from dlpipe import stages
    from dlpipe.config import load_config

    config, _, _ = report
    page = config.paths.report_html.read_text()
    assert config.params_hash in page and "matches this checkout" in page
    # Edit params after training (a new seed): the report must say the runs came from other params.
    params_file = config.params_file
    params_file.write_text(params_file.read_text().replace("seed: 42", "seed: 7", 1))
    edited = load_config(params_file)
    assert edited.params_hash != config.params_hash
    stages.report(edited)
    assert "trained with other params" in edited.paths.report_html.read_text()
