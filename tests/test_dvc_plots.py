"""`dvc plots show` / `dvc plots diff` and `dvc exp show` as a user runs them: the data files the stages write
for them (training curves, confusion, latency), the plot definitions in dvc.yaml, and the offline page
(vendor/vega/offline.html, with vega, vega-lite and vega-embed inline) rendered in a headless browser that
cannot reach the network."""

from __future__ import annotations

import csv
import hashlib
import json
import re
import shutil
import subprocess
from pathlib import Path

import lightning as L
import pandas as pd
import pytest
import torch
import yaml
from torch.utils.data import DataLoader, TensorDataset

from conftest import REPO_ROOT, tiny_params
from dlpipe.curves import TrainingCurves
from projects import git_dvc_project, run

VENDOR = REPO_ROOT / "vendor" / "vega"
INLINED = re.compile(r'<script data-package="(?P<package>[^"@]+)@(?P<version>[^"]+)">\n(?P<code>.*?)</script>', re.S)
# The columns `dvc exp show` shows first (and here only): the README's command, on a one-classifier project
# (where `onnx_accuracy` names one column; with several classifiers it is `reports/metrics/<model>.json:...`).
KEY_COLUMNS = r"Experiment|Created|(.*:)?(onnx_accuracy|rmse_ratio_vs_persistence|fid_cnn|train_seconds)$"
EXP_SHOW = ["dvc", "exp", "show", "--drop", ".*", "--keep", KEY_COLUMNS, "--sort-by", "onnx_accuracy"]


def _header(path: Path) -> list[str]:
    with open(path, newline="") as handle:
        return next(csv.reader(handle))


def _top_level_plots() -> list[tuple[str, dict]]:
    """dvc.yaml's top-level plot definitions as (id, properties)."""
    entries = yaml.safe_load((REPO_ROOT / "dvc.yaml").read_text())["plots"]
    return [(entry, {}) if isinstance(entry, str) else next(iter(entry.items())) for entry in entries]


def _plotted_files() -> dict[str, tuple[list[str], dict]]:
    """Every file a top-level plot reads -> (the fields it reads from it, the plot's properties)."""
    files = {}
    for plot_id, props in _top_level_plots():
        y = props.get("y")
        sources = y if isinstance(y, dict) else {plot_id: y}
        for path, fields in sources.items():
            fields = fields if isinstance(fields, list) else [fields] if fields else []
            files[path] = ([props["x"], *fields] if "x" in props else fields, props)
    return files


# ------------------------------------------------------------------------------------ the vendored page
def test_template_inlines_the_released_builds_and_nothing_else():
    page = (VENDOR / "offline.html").read_text(encoding="utf-8")
    sources = json.loads((VENDOR / "SOURCES.json").read_text())
    inlined = {match["package"]: match for match in INLINED.finditer(page)}
    assert sorted(inlined) == sorted(source["package"] for source in sources) == ["vega", "vega-embed", "vega-lite"]
    for source in sources:
        code = inlined[source["package"]]["code"].encode("utf-8")
        assert inlined[source["package"]]["version"] == source["version"]
        assert (len(code), hashlib.sha256(code).hexdigest()) == (source["bytes"], source["sha256"])
        assert "Interactive Data Lab" in (VENDOR / f"LICENSE-{source['package']}.txt").read_text()
    assert not re.search(r"<script[^>]*\ssrc\s*=", page, re.I)
    # DVC fills its placeholders by text replacement; the scripts one would bring the CDN tags back. The plot
    # divs call vegaEmbed as they are parsed: the libraries come first.
    assert "{plot_divs}" in page and "{refresh_tag}" in page and "{scripts}" not in page
    assert page.rindex("</script>") < page.index("{plot_divs}")
    assert (VENDOR / "offline.html").stat().st_size < 1_000_000


def test_dvc_config_uses_the_offline_template():
    from configobj import ConfigObj

    template = ConfigObj(str(REPO_ROOT / ".dvc" / "config"))["plots"]["html_template"]
    assert (REPO_ROOT / ".dvc" / template).resolve() == VENDOR / "offline.html"  # relative to .dvc/, as DVC reads it


# ------------------------------------------------------------------------------------ dvc.yaml's plots
def test_every_plotted_file_is_a_cached_stage_output_of_a_default_model():
    from dvc.repo import Repo

    with Repo(str(REPO_ROOT)) as repo:
        outs = [(Path(out.fs_path).relative_to(REPO_ROOT).as_posix(), out) for out in repo.index.outs]
    # No stage output is a plot itself: a directory of them drew its CSVs column by column against the row
    # number ("predicted vs step"). The top-level definitions name each file and its axes instead.
    assert [path for path, out in outs if out.plot] == []
    for path in _plotted_files():
        covering = [out for out_path, out in outs if path == out_path or path.startswith(out_path + "/")]
        assert covering, f"{path}: no stage writes it"
        assert all(out.use_cache for out in covering), f"{path}: not in the DVC cache (`dvc plots diff` needs it)"
    params = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())
    for model in [*params["models"], *params["generators"]]:
        assert f"models/{model}/training_curves.csv" in _plotted_files()
        assert f"reports/plots/{model}/latency.csv" in _plotted_files()


def test_custom_templates_are_valid_vega_lite_with_dvc_anchors():
    for name in {props["template"] for _, props in _top_level_plots() if "template" in props} - {
        "simple",
        "confusion",
        "bar_horizontal",
    }:
        template = json.loads((REPO_ROOT / ".dvc" / "plots" / f"{name}.json").read_text())
        assert template["$schema"].endswith("/vega-lite/v5.json")
        text = json.dumps(template)
        assert all(f"<DVC_METRIC_{anchor}>" in text for anchor in ("DATA", "X", "Y", "TITLE")), name


# ------------------------------------------------------------------------------- the training curves
class _LogsLikeTheTasks(L.LightningModule):
    """Logs as the tasks do, each value telling its epoch and where it was logged: from training_step
    (epoch mean, the forecaster), the module's on_train_epoch_end (the classifier, the GAN), validation_step and
    on_validation_epoch_end (the GAN's FID)."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(2, 1)

    def training_step(self, batch, batch_idx):
        self.log("train/step_mean", self.current_epoch + 0.5, on_step=False, on_epoch=True)
        return self.layer(batch[0]).pow(2).mean()

    def on_train_epoch_end(self) -> None:
        self.log("train/epoch_end", 10.0 * self.current_epoch)

    def validation_step(self, batch, batch_idx) -> None:
        self.log("val/step_mean", 100.0 + self.current_epoch, on_epoch=True)

    def on_validation_epoch_end(self) -> None:
        self.log("val/epoch_end", 1000.0 + self.current_epoch)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)

    def train_dataloader(self):
        return DataLoader(TensorDataset(torch.randn(8, 2)), batch_size=4)

    def val_dataloader(self):
        return DataLoader(TensorDataset(torch.randn(4, 2)), batch_size=4)


def _expected_rows(epochs: int) -> list[dict[str, float]]:
    return [
        {
            "epoch": epoch,
            "train/epoch_end": 10.0 * epoch,
            "train/step_mean": epoch + 0.5,
            "val/epoch_end": 1000.0 + epoch,
            "val/step_mean": 100.0 + epoch,
        }
        for epoch in range(epochs)
    ]


def _fit(target: Path, epochs: int, resume_dir: Path | None = None, ckpt_path: Path | None = None) -> None:
    # The last-checkpoint callback of dlpipe.train: written at every epoch's end.
    checkpoints = (
        [L.pytorch.callbacks.ModelCheckpoint(dirpath=resume_dir, filename="last", enable_version_counter=False)]
        if resume_dir
        else []
    )
    trainer = L.Trainer(
        max_epochs=epochs,
        callbacks=[TrainingCurves(target), *checkpoints],
        enable_checkpointing=bool(checkpoints),
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        log_every_n_steps=1,
    )
    trainer.fit(_LogsLikeTheTasks(), ckpt_path=ckpt_path)


def test_curves_have_one_row_per_epoch_with_every_logged_metric(tmp_path):
    target = tmp_path / "training_curves.csv"
    _fit(target, epochs=3)  # no checkpoints: rows completed at the next epoch's start and the end of training
    assert _header(target) == ["epoch", "train/epoch_end", "train/step_mean", "val/epoch_end", "val/step_mean"]
    assert pd.read_csv(target).to_dict("records") == _expected_rows(3)


def test_resumed_training_ends_with_the_whole_curve(tmp_path):
    target, resume_dir = tmp_path / "training_curves.csv", tmp_path / ".resume"
    _fit(target, epochs=2, resume_dir=resume_dir)
    target.unlink()
    # A new process: a fresh callback, the first two epochs' rows only in the checkpoint.
    _fit(target, epochs=4, resume_dir=resume_dir, ckpt_path=resume_dir / "last.ckpt")
    assert pd.read_csv(target).to_dict("records") == _expected_rows(4)


# ------------------------------------------------------------------- a tiny project, as a user has it
@pytest.fixture(scope="module")
def project(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """One cnn through evaluate, committed as the baseline, then one experiment (an epoch more) applied to the
    workspace: what `dvc plots diff HEAD` and `dvc exp show` compare."""
    params = tiny_params()
    params["models"], params["generators"] = {"cnn": "images"}, {}
    params["train"]["cnn"].update(epochs=2)
    root, env = git_dvc_project(tmp_path_factory.mktemp("plots") / "dlpipe", params)
    run(["dvc", "repro", "evaluate@cnn"], root, env)
    run(["git", "add", "-A"], root, env)
    run(["git", "commit", "-qm", "baseline"], root, env)
    run(["dvc", "exp", "run", "-S", "train.cnn.epochs=3", "evaluate@cnn"], root, env)
    return root, env


@pytest.mark.slow
def test_plot_data_files_have_the_plotted_columns(project):
    root, _ = project
    cnn = {path: spec for path, spec in _plotted_files().items() if "/cnn/" in path}
    assert {
        "models/cnn/training_curves.csv",
        "reports/plots/cnn/predictions.csv",
        "reports/plots/cnn/latency.csv",
        "reports/plots/cnn/confusion.png",
    } <= set(cnn)
    for path, (fields, _) in cnn.items():
        assert (root / path).is_file(), path
        if path.endswith(".csv"):
            assert set(fields) <= set(_header(root / path)), path

    metrics = json.loads((root / "reports" / "metrics" / "cnn.json").read_text())
    curves = pd.read_csv(root / "models" / "cnn" / "training_curves.csv")
    assert curves["epoch"].tolist() == list(range(metrics["epochs_trained"])) == [0, 1, 2]
    assert not curves.isna().any().any()
    predictions = pd.read_csv(root / "reports" / "plots" / "cnn" / "predictions.csv")
    assert list(predictions.columns) == ["actual", "predicted"] and len(predictions) == metrics["test_samples"]
    assert (predictions["actual"] == predictions["predicted"]).mean() == pytest.approx(metrics["onnx_accuracy"])
    latency = pd.read_csv(root / "reports" / "plots" / "cnn" / "latency.csv")
    assert list(latency.columns) == ["batch", "backend", "p50_ms"]
    measured = {(row.backend, row.batch): row.p50_ms for row in latency.itertuples()}
    assert set(measured) == {("torch", 1), ("onnx", 1), ("onnx", 32), ("int8", 1), ("int8", 32)}
    assert all(metrics[f"latency_ms_{backend}_b{batch}_p50"] == ms for (backend, batch), ms in measured.items())


def _rendered(page: Path) -> str:
    """The page's DOM once its scripts have run, in headless Chromium with every host name unresolvable."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("no chromium on PATH: the page's scripts were checked, its rendering was not")
    command = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--host-resolver-rules=MAP * ~NOTFOUND"]
    command += ["--virtual-time-budget=15000", "--dump-dom", page.as_uri()]
    return subprocess.run(command, capture_output=True, text=True, timeout=120, check=True).stdout


@pytest.mark.slow
def test_plots_show_writes_a_page_that_renders_offline(project):
    root, env = project
    shown = json.loads(run(["dvc", "plots", "show", "--json"], root, env).stdout)
    # Only the default models this project does not train are missing.
    assert all("/cnn/" not in error["source"] for error in shown["errors"]), shown["errors"]
    assert {error["type"] for error in shown["errors"]} == {"FileNotFoundError"}
    drawn = {plot_id for plot_id, renders in shown["data"].items() if renders}
    assert {"val_accuracy_by_epoch", "val_loss_by_epoch", "latency", "reports/plots/cnn/predictions.csv"} <= drawn
    for plot_id in drawn - {"reports/plots/cnn/confusion.png"}:
        for render in shown["data"][plot_id]:  # DVC's x when none is given: the row number
            assert '"field": "step"' not in json.dumps(render["content"]), plot_id

    output = run(["dvc", "plots", "show"], root, env).stdout.strip().splitlines()[-1]
    page = Path(output.removeprefix("file://"))
    assert page.resolve() == (root / "dvc_plots" / "index.html").resolve()
    html = page.read_text(encoding="utf-8")
    assert not re.search(r"<script[^>]*\ssrc\s*=", html, re.I) and "cdn.jsdelivr" not in html
    assert [match["package"] for match in INLINED.finditer(html)] == ["vega", "vega-lite", "vega-embed"]

    dom = _rendered(page)
    views = {
        match["id"]: match["body"]
        for match in re.finditer(r'<div id="(?P<id>[^"]+)"(?P<body>.*?)(?=<div id="|</body>)', dom, re.S)
    }
    for plot_id in ("val_accuracy_by_epoch", "val_loss_by_epoch", "latency", "reports_plots_cnn_predictions_csv"):
        canvas = re.search(r'<canvas[^>]*class="marks"[^>]*>', views[plot_id])
        size = canvas and [int(re.search(rf'{side}="(\d+)"', canvas[0])[1]) for side in ("width", "height")]
        assert size and min(size) > 100, f"{plot_id}: no view drawn ({canvas and canvas[0]})"
    assert 'src="static/workspace_reports_plots_cnn_confusion.png"' in dom


@pytest.mark.slow
def test_plots_diff_draws_the_baseline_and_the_experiment(project):
    root, env = project
    diff = json.loads(run(["dvc", "plots", "diff", "HEAD", "--json"], root, env).stdout)
    (curves,) = diff["data"]["val_accuracy_by_epoch"]
    assert sorted(curves["revisions"]) == ["HEAD", "workspace"]
    epochs = {}
    for point in curves["content"]["data"]["values"]:
        epochs.setdefault(point["rev"], []).append(int(point["epoch"]))
    assert epochs == {"HEAD": [0, 1], "workspace": [0, 1, 2]}
    (latency,) = diff["data"]["latency"]
    assert sorted(latency["revisions"]) == ["HEAD", "workspace"]
    assert sorted(render["revisions"][0] for render in diff["data"]["reports/plots/cnn/confusion.png"]) == [
        "HEAD",
        "workspace",
    ]


@pytest.mark.slow
def test_exp_show_puts_the_key_columns_first(project):
    root, env = project
    table = list(csv.reader(run([*EXP_SHOW, "--csv"], root, env).stdout.splitlines()))
    assert table[0] == ["Experiment", "Created", "onnx_accuracy", "train_seconds"]
    assert len(table) == 4  # the workspace, the baseline and its one experiment
    experiments = [row for row in table[1:] if row[0]]
    assert len(experiments) == 1 and all(0 < float(row[2]) <= 1 for row in table[1:])
    run(EXP_SHOW, root, env)  # and the table a terminal gets
