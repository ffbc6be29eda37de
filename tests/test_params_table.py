"""Malformed params files, table-driven: each is refused by `load_config` with one line naming the key (or
the file), so nothing is accepted and then ignored. `test_cli.py` checks that such an error exits 2."""

from __future__ import annotations

import copy

import pytest
import yaml

from conftest import tiny_params
from dlpipe.config import load_config, load_serving_config
from dlpipe.errors import DlpipeError

DELETE = object()  # table value: remove the key


def _set(params: dict, dotted: str, value) -> None:
    *parents, last = dotted.split(".")
    node = params
    for part in parents:
        node = node[part]
    if value is DELETE:
        del node[last]
    else:
        node[last] = value


# (key to set, value, text the one-line error must contain; None: the key itself)
VALUE_CASES = [
    # types
    ("seed", True, "seed"),
    ("seed", "42", "seed"),
    ("seed", 4.2, "seed"),
    ("train.cnn.epochs", "5", None),
    ("train.cnn.epochs", 2.5, None),
    ("train.cnn.batch_size", True, None),
    ("train.cnn.patience", [3], None),
    ("train.cnn.optimizer.lr", "fast", None),
    ("train.cnn.optimizer.lr", None, None),
    ("train.cnn.optimizer.nesterov", "yes", None),
    ("train.lstm.window", "20", None),
    ("data.images.limit", "all", None),
    ("data.images.val_fraction", "10%", None),
    ("augment.copies", 1.5, None),
    ("augment.p", "likely", None),
    ("augment.stretch_p", "often", None),
    ("augment.brightness_contrast_p", True, None),
    ("mlflow.register_model", "no", None),
    ("mlflow.experiment", 7, None),
    ("export.parity_atol", "tiny", None),
    ("evaluate.latency_runs", "many", None),
    # ranges
    ("seed", None, "seed"),
    ("train.cnn.batch_size", 0, None),
    ("train.cnn.patience", -1, None),
    ("train.cnn.optimizer.lr", 0, None),
    ("train.cnn.optimizer.weight_decay", -0.1, None),
    ("train.lstm.optimizer.momentum", 1.5, "train.lstm.optimizer.momentum"),
    ("data.images.limit", 0, None),
    ("data.images.test_fraction", 0.6, None),
    ("data.images.val_fraction", 0, None),
    ("augment.p", 1.2, None),
    ("augment.rotate_deg", -5, None),
    ("augment.translate_frac", 0.9, None),
    ("augment.shear_deg", 90, None),
    ("augment.scale_min", 0, None),
    ("augment.preview_count", 0, None),
    ("augment.hflip_p", 1.5, None),
    ("augment.vflip_p", -0.1, None),
    ("augment.stretch_x", [1.3, 1.0], "augment.stretch_x: [min, max]: min (1.3) must not exceed max (1.0)"),
    ("augment.stretch_y", [0, 1.2], "augment.stretch_y.0"),
    ("augment.brightness_limit", 1.0, None),
    ("augment.contrast_limit", -0.1, None),
    ("export.opset", 12, None),
    ("export.parity_atol", 0, None),
    ("promote.max_fp16_loss", -0.01, None),
    ("evaluate.latency_warmup", -1, None),
    ("evaluate.latency_runs", 0, None),
    ("trainer.num_workers", -2, None),
    ("trainer.devices", 0, None),
    ("trainer.num_nodes", 0, None),
    ("flow.workers", 0, None),
    ("flow.fetch_retries", -1, None),
    ("flow.fetch_timeout_s", 0, None),
    ("flow.gpu_limit", -1, None),
    # choices
    ("trainer.accelerator", "quantum", None),
    ("trainer.devices", "many", None),
    ("trainer.precision", "8-bit", None),
    ("evaluate.providers", ["tpu"], "evaluate.providers.0"),
    ("export.fp16", "gpu", None),
    ("data.stocks.source", "csv", None),
    ("data.images.source", "folder:images", "use `source: folder` and `folder: <path>`"),
    ("data.images.folder", 3, None),
    ("train.cnn.optimizer.schedule", "exponential", None),
    # unknown keys at every depth
    ("sede", 1, "sede"),
    ("data.audio", {}, "data.audio"),
    ("data.images.shuffle", True, "data.images.shuffle"),
    ("data.stocks.interval", "1h", "data.stocks.interval"),
    ("augment.flip", True, "augment.flip"),
    ("trainer.max_epochs", 5, "trainer.max_epochs"),
    ("flow.retries", 3, "flow.retries"),
    ("train.cnn.lr", 0.1, "train.cnn.lr"),
    ("train.cnn.optimizer.eps", 1e-8, "train.cnn.optimizer.eps"),
    ("train.cnn.net.kernel", 5, "train.cnn.net"),
    ("train.lstm.net.bidirectional", True, "train.lstm.net"),
    ("export.dynamic", True, "export.dynamic"),
    ("evaluate.batch_sizes", [1], "evaluate.batch_sizes"),
    ("mlflow.run_name", "x", "mlflow.run_name"),
    # missing required keys and sections
    ("seed", DELETE, "seed"),
    ("data", DELETE, "data"),
    ("data.stocks", DELETE, "data.stocks"),
    ("augment.copies", DELETE, "augment.copies"),
    ("train.cnn.epochs", DELETE, None),
    ("train.cnn.optimizer.lr", DELETE, None),
    # wrong shapes of lists and maps
    ("models", [], "models"),
    ("models", {}, "models"),
    ("models", "cnn", "models"),
    ("train", ["cnn"], "train"),
    ("train.cnn", "cnn", "train.cnn"),
    ("train.cnn.optimizer", "adamw", "train.cnn.optimizer"),
    ("train.cnn.optimizer.betas", [0.9], "train.cnn.optimizer.betas"),
    ("train.cnn.optimizer.betas", 0.9, "train.cnn.optimizer.betas"),
    ("train.cnn.net", [32, 64], "train.cnn.net"),
    ("train.cnn.net.channels", {"a": 1}, "train.cnn.net.channels"),
    ("train.cnn.net.channels", [], "train.cnn.net.channels"),
    ("data.images.checksums", ["md5:x"], "data.images.checksums"),
    ("augment.stretch_x", 1.2, "augment.stretch_x"),
    ("augment.stretch_y", [1.0], "augment.stretch_y"),
    ("evaluate.providers", "cpu", "evaluate.providers"),
    # unknown models, bad net and optimizer values
    ("models.vgg99", "images", "vgg99"),
    ("models.cnn", "stocks", "models.cnn"),
    ("train.cnn.net.dropout", 1.5, "train.cnn.net.dropout"),
    ("train.cnn.net.hidden", 0, "train.cnn.net.hidden"),
    ("train.cnn.net.channels", [32, -1], "train.cnn.net.channels"),
    ("train.lstm.net.hidden", "big", "train.lstm.net.hidden"),
    ("train.lstm.net.dropout", -0.1, "train.lstm.net.dropout"),
    ("train.cnn.optimizer.name", "Adam", None),
    ("train.cnn.optimizer.betas", [1.0, 0.999], "train.cnn.optimizer.betas.0"),
    ("train.cnn.optimizer.step_size", 3, "step_size/gamma"),
    # distillation: the teacher a classifier in models, the student a registered classifier, T > 0, alpha in [0, 1]
    ("distill.teacher", "vgg99", "distill.teacher: 'vgg99' has no train.vgg99 section"),
    ("distill.teacher", "lstm", "distill.teacher: 'lstm' is a forecaster"),
    ("distill.student", "tiny", "distill.student: unknown model 'tiny'"),
    ("distill.student", "lstm", "distill.student: 'lstm' is a forecaster"),
    ("distill.temperature", 0, None),
    ("distill.temperature", -2.0, None),
    ("distill.temperature", "hot", None),
    ("distill.alpha", 1.5, None),
    ("distill.alpha", -0.1, None),
    ("distill.epochs", 0, None),
    ("distill.batch_size", "64", None),
    ("distill.optimizer.lr", 0, None),
    ("distill.net.hidden", 0, "distill.net.hidden"),
    ("distill.net.kernel", 5, "distill.net.kernel: not a parameter of cnn"),
    ("distill.soft", True, "distill.soft"),
    # transfer learning: a registered classifier as backbone, disjoint class lists, positive shots, unfreezing in time
    ("transfer.backbone", "resnet99", "transfer.backbone: unknown model 'resnet99'"),
    ("transfer.backbone", "lstm", "transfer.backbone: 'lstm' is a forecaster, not an image classifier"),
    ("transfer.net.widths", [8, 16], "transfer.net.widths"),
    ("transfer.net.kernel", 3, "transfer.net.kernel: not a parameter of resnet"),
    ("transfer.target_classes", [4, 5, 6], "transfer: pretrain_classes and target_classes share class 4"),
    ("transfer.target_classes", [5, 5], "transfer.target_classes: 5 is listed twice"),
    ("transfer.pretrain_classes", [1], "transfer.pretrain_classes"),
    ("transfer.pretrain_classes", [-1, 2], "transfer.pretrain_classes.0"),
    ("transfer.shots", [0, 5], "transfer.shots.0"),
    ("transfer.shots", [], "transfer.shots"),
    ("transfer.shots", 5, "transfer.shots"),
    ("transfer.shots", [5, 20, 5], "transfer.shots: 5 is listed twice"),
    ("transfer.epochs", 0, None),
    ("transfer.pretrain_epochs", 1.5, None),
    ("transfer.head_epochs", 2, "transfer: head_epochs (2) must be less than epochs (2)"),
    ("transfer.unfreeze_blocks", 0, None),
    ("transfer.lr", "fast", None),
    ("transfer.finetune_lr_factor", 0, None),
    ("transfer.finetune_lr_factor", 1.5, None),
    ("transfer.batch_size", 0, None),
    ("transfer.weights", "", "transfer.weights: empty path"),
    ("transfer.weights", 3, None),
    ("transfer.modes", ["scratch"], "transfer.modes"),
    # impossible dates
    ("data.stocks.start", "not-a-date", "data.stocks.start"),
    ("data.stocks.start", "2010-02-30", "data.stocks.start"),
    ("data.stocks.end", "2010/01/01", "data.stocks.end"),
    ("data.stocks.end", 20100101, "data.stocks.end"),
    # the cost stage
    ("cost.batch", "32", None),
    ("cost.batch", 0, None),
    ("cost.repeats", 2.5, None),
    ("cost.repeats", 0, None),
    ("cost.warmup", -1, None),
    ("cost.sizes", 28, None),
    ("cost.sizes", [], None),
    ("cost.sizes", [28, 0], "cost.sizes.1"),
    ("cost.channels", [32, 64], "cost.channels.0"),
    ("cost.channels", [], None),
    ("cost.channels", [[32]], "cost.channels.0"),
    ("cost.channels", [[32, 64, 128]], "cost.channels.0"),
    ("cost.channels", [[32, 0]], "cost.channels.0.1"),
    ("cost.kernel", 5, "cost.kernel"),
    ("cost.threads", 0, None),
    ("cost.threads", "all", None),
]

# The serving sections: refused by load_config and, alone, by load_serving_config (what `dlpipe serve` reads).
SERVE_CASES = [
    ("serve.port", 70000, None),
    ("serve.port", "http", None),
    ("serve.poll_seconds", -1, None),
    ("serve.max_batch", 0, None),
    ("serve.max_body_bytes", "8M", None),
    ("serve.max_image_pixels", 0, None),
    ("serve.providers", ["tpu"], "serve.providers.0"),
    ("serve.threads", 0, None),
    ("serve.workers", 4, "serve.workers"),
    ("serve.models", "cnn", None),
    ("mlflow.tracking_uri", 5, None),
    ("models", {}, "models"),
]
VALUE_CASES += SERVE_CASES


@pytest.mark.parametrize(("key", "value", "expected"), VALUE_CASES, ids=[f"{k}={v!r}" for k, v, _ in VALUE_CASES])
def test_malformed_value_is_refused_naming_its_key(tmp_path, key, value, expected):
    params = copy.deepcopy(tiny_params())
    _set(params, key, value)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    with pytest.raises(DlpipeError) as caught:
        load_config(path)
    message = str(caught.value)
    assert "\n" not in message and str(path) in message
    assert (expected or key) in message


@pytest.mark.parametrize(("key", "value", "expected"), SERVE_CASES, ids=[f"{k}={v!r}" for k, v, _ in SERVE_CASES])
def test_serving_reads_its_sections_strictly(tmp_path, key, value, expected):
    params = copy.deepcopy(tiny_params())
    _set(params, key, value)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    with pytest.raises(DlpipeError) as caught:
        load_serving_config(path)
    message = str(caught.value)
    assert "\n" not in message and str(path) in message and (expected or key) in message


def test_serving_ignores_the_training_sections(tmp_path):
    # A serving image has no torch: the train sections (validated by the tasks, which import torch) are
    # not its concern, even when they are wrong.
    params = copy.deepcopy(tiny_params())
    _set(params, "train.cnn.epochs", "many")
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    assert load_serving_config(path).params.serve.port == params["serve"]["port"]


def test_start_after_end_is_refused(tmp_path):
    params = tiny_params()
    params["data"]["stocks"].update(start="2012-01-01", end="2011-01-01")
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    with pytest.raises(DlpipeError, match=r"data\.stocks: .*start \(2012-01-01\) must be before end"):
        load_config(path)


# (file content, text the error must contain)
FILE_CASES = [
    (b"", "seed"),  # empty file: every required key is missing
    (b"# only a comment\n", "seed"),
    (b"- seed\n- models\n", "expected a mapping"),
    (b"just text\n", "expected a mapping"),
    (b"seed: [1, 2\n", "not valid YAML"),
    (b"seed: 1\n\tmodels: {}\n", "not valid YAML"),
    (b"seed: 1\nseed: 2\n", "duplicate key 'seed'"),
    (b"seed: 1\nseed: !!python/object/apply:os.system ['true']\n", "not valid YAML"),
    (b"seed: \xff\xfe\n", "not UTF-8"),
    (b"{[1, 2]: 3}\n", "not valid YAML"),
]


@pytest.mark.parametrize(("content", "expected"), FILE_CASES)
def test_malformed_file_is_refused_in_one_line(tmp_path, content, expected):
    path = tmp_path / "params.yaml"
    path.write_bytes(content)
    with pytest.raises(DlpipeError) as caught:
        load_config(path)
    assert "\n" not in str(caught.value) and expected in str(caught.value)


def test_duplicate_key_deep_in_a_section_is_refused(tmp_path):
    text = yaml.safe_dump(tiny_params(), sort_keys=False)
    line = next(line for line in text.splitlines(keepends=True) if line.strip() == "epochs: 1")
    text = text.replace(line, line + line.replace("1", "50"), 1)
    path = tmp_path / "params.yaml"
    path.write_text(text)
    with pytest.raises(DlpipeError, match="duplicate key 'epochs'"):
        load_config(path)


def test_the_table_is_large_enough():
    assert len(VALUE_CASES) + len(FILE_CASES) >= 60
