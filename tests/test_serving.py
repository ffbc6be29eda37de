"""`dlpipe serve` on a really trained project. It proves that:

- the service's answers equal offline evaluation: same class, the softmax of the same logits, the same
  forecast, on every test image and on test days of both tickers;
- a request reaches the graph as exactly the same array as the test split does;
- a new champion is swapped in while requests keep succeeding, and a broken one never is;
- serving imports no torch;
- listing, health, metrics and admin reload behave as documented.
"""

from __future__ import annotations

import base64
import io
import json
import math
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from urllib.parse import urlparse

import httpx
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from PIL import Image

from dlpipe import tracking
from dlpipe.config import load_config
from dlpipe.data.pixels import unit_float
from dlpipe.data.stocks import forecast_input, load_stock_data, read_stock_meta, ticker_inputs
from dlpipe.io import read_json, sha256_file
from dlpipe.runtime import InputContract, create_session, run_batched
from dlpipe.serving.models import FileSource, ModelStore
from dlpipe.serving.tasks import Limits, adapter_for
from serving import copy_project, listing, metric, running_server, serving_env

TOKEN = "s3cret-admin-token"
LIMITS = Limits(max_batch=64, max_image_pixels=4096 * 4096)
CPU = "CPUExecutionProvider"


# ---------------------------------------------------------------------------------------------------- world


@pytest.fixture(scope="module")
def root(built_project, tmp_path_factory) -> Path:
    return copy_project(built_project, tmp_path_factory.mktemp("serving") / "project")


@pytest.fixture(scope="module")
def project(root):
    return load_config(root / "params.yaml")


@pytest.fixture(scope="module")
def server(root) -> str:
    """The registry champions, served with an admin token and no polling (for tests that change nothing)."""
    with running_server(root, "--poll", "0", env={**serving_env(), "DLPIPE_ADMIN_TOKEN": TOKEN}) as url:
        yield url


@pytest.fixture(scope="module")
def split_images(root) -> tuple[np.ndarray, np.ndarray]:
    with np.load(root / "data" / "images" / "raw" / "test.npz", allow_pickle=False) as archive:
        return archive["x"], archive["y"]  # uint8 (N, 1, 28, 28), int labels


@pytest.fixture(scope="module")
def split_inputs(project) -> np.ndarray:
    """What evaluation feeds the graph: the classifier task's own test split."""
    from dlpipe.tasks import task_of

    return task_of(project, "cnn")._test_split(project)[0]


def png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")  # lossless
    return buffer.getvalue()


def softmax(logits: np.ndarray) -> np.ndarray:
    exp = np.exp(logits.astype(np.float64) - logits.max(axis=1, keepdims=True))
    return exp / exp.sum(axis=1, keepdims=True)


def same_graph(a: Path, b: Path) -> bool:
    """The same nodes, inputs, outputs, weights and metadata (MLflow re-saves a logged graph with its weights
    in an external data file, so the bytes differ)."""
    first, second = onnx.load(a), onnx.load(b)
    weights = [{t.name: numpy_helper.to_array(t) for t in m.graph.initializer} for m in (first, second)]
    return (
        list(first.graph.node) == list(second.graph.node)
        and list(first.graph.input) == list(second.graph.input)
        and list(first.graph.output) == list(second.graph.output)
        and weights[0].keys() == weights[1].keys()
        and all(np.array_equal(weights[0][k], weights[1][k]) for k in weights[0])
        and list(first.metadata_props) == list(second.metadata_props)
    )


def registry_onnx(project, model: str, version: str) -> Path:
    """The ONNX file a registered version holds (the local store keeps it on disk), checked to be the graph
    export wrote for the version's variant."""
    mlflow_client, name = tracking.client(project), tracking.registered_name(model)
    location = mlflow_client.get_model_version_download_uri(name, version)
    graphs = sorted(Path(urlparse(location).path).rglob("*.onnx"))
    assert len(graphs) == 1, location
    variant = variant_of(project, model, version)
    exported = project.paths.onnx(model) if variant == "fp32" else project.paths.onnx_int8(model)
    assert same_graph(graphs[0], exported), f"{name} v{version} is not the {variant} graph export wrote"
    return graphs[0]


def variant_of(project, model: str, version: str) -> str:
    name = tracking.registered_name(model)
    return tracking.client(project).get_model_version(name, version).tags[tracking.VARIANT_TAG]


def price_lines(project, ticker: str) -> tuple[str, list[str]]:
    path = project.paths.raw_stocks / read_stock_meta(project.paths.raw_stocks)["files"][ticker]["file"]
    header, *rows = path.read_text().splitlines()
    return header, rows


def json_rows(prices, first: int, end: int) -> list[dict]:
    frame = prices.iloc[first:end]
    return [
        {
            "Date": str(row.Date.date()),
            **{c: float(getattr(row, c)) for c in ("Open", "High", "Low", "Close", "Volume")},
        }
        for row in frame.itertuples()
    ]


def wait_for(condition, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.05)


# ------------------------------------------------------------------------ answers equal offline evaluation


def test_classifier_answers_equal_offline_evaluation(project, server, split_images, split_inputs):
    served = listing(server)["cnn"]
    version = served["version"]
    graph = registry_onnx(project, "cnn", version)
    logits = run_batched(create_session(graph, ("cpu",)), split_inputs)
    expected_classes, expected_probabilities = logits.argmax(axis=1), softmax(logits)
    pixels, labels = split_images
    files = [png(image[0]) for image in pixels]

    multipart = httpx.post(
        f"{server}/v1/models/cnn/predict",
        files=[("images", (f"{i}.png", data, "image/png")) for i, data in enumerate(files)],
        timeout=30,
    )
    assert multipart.status_code == 200, multipart.text
    by_json = []
    for start in range(0, len(files), 25):
        encoded = [base64.b64encode(data).decode() for data in files[start : start + 25]]
        response = httpx.post(f"{server}/v1/models/cnn/predict", json={"images": encoded}, timeout=30)
        assert response.status_code == 200, response.text
        assert response.json()["version"] == version
        by_json += response.json()["predictions"]

    assert multipart.json()["version"] == version
    for answers in (multipart.json()["predictions"], by_json):
        assert len(answers) == len(pixels)
        classes = np.array([answer["class"] for answer in answers])
        np.testing.assert_array_equal(classes, expected_classes)
        assert [answer["class_name"] for answer in answers] == [served["classes"][c] for c in expected_classes]
        probabilities = np.array([[answer["probabilities"][name] for name in served["classes"]] for answer in answers])
        np.testing.assert_allclose(probabilities, expected_probabilities, rtol=0, atol=1e-6)
        # The served version's accuracy is the one evaluation reported for its variant.
        metrics = read_json(project.paths.metrics("cnn"))
        key = "onnx_accuracy" if variant_of(project, "cnn", version) == "fp32" else "int8_accuracy"
        assert float((classes == labels).mean()) == metrics[key]


def test_forecaster_answers_equal_offline_evaluation(project, server):
    served = listing(server)["lstm"]
    version, window = served["version"], served["window"]
    assert window == project.params.train["lstm"].window
    session = create_session(registry_onnx(project, "lstm", version), ("cpu",))
    data = load_stock_data(project.paths.raw_stocks, window)
    assert served["tickers"] == data.tickers == ["GOOG", "MSFT"]
    checked = 0
    for ticker in data.tickers:
        test = data.splits[ticker]["test"]
        inputs = ticker_inputs(test, len(data.tickers))
        header, lines = price_lines(project, ticker)
        prices = data.prices[ticker]
        chosen = [0, 1, len(test) // 3, len(test) // 2, len(test) - 2, len(test) - 1]
        # Each request's windows form one batch, and the champion may be the dynamic int8 variant, whose
        # activation scales come from the batch it is given: the offline answer uses the same batches.
        expected = {j: float(run_batched(session, inputs[j : j + 1])[0, 0]) for j in chosen}
        expected_together = run_batched(session, inputs[chosen])[:, 0]
        instances = []
        for j in chosen:
            day = int(test.target_days[j])  # rows window+1 days up to the day before the target
            csv = "\n".join([header, *lines[day - window - 1 : day]]) + "\n"
            response = httpx.post(
                f"{server}/v1/models/lstm/predict",
                content=csv.encode(),
                headers={"content-type": "text/csv"},
                params={"ticker": ticker},
                timeout=30,
            )
            assert response.status_code == 200, response.text
            assert response.json()["version"] == version
            (answer,) = response.json()["predictions"]
            assert answer["ticker"] == ticker
            assert answer["last_date"] == str(prices["Date"].iloc[day - 1].date())
            assert abs(answer["log_return"] - expected[j]) <= 1e-6, (ticker, j)
            assert answer["persistence"] == answer["last_close"] == float(test.last_close[j])
            assert answer["next_close"] == pytest.approx(test.last_close[j] * math.exp(answer["log_return"]), rel=1e-12)
            instances.append({"ticker": ticker, "rows": json_rows(prices, day - window - 1, day)})
            checked += 1
        response = httpx.post(f"{server}/v1/models/lstm/predict", json={"instances": instances}, timeout=30)
        assert response.status_code == 200, response.text
        answers = response.json()["predictions"]
        got = np.array([answer["log_return"] for answer in answers])
        np.testing.assert_allclose(got, expected_together, rtol=0, atol=1e-6)
        np.testing.assert_array_equal([answer["persistence"] for answer in answers], test.last_close[chosen])
    assert checked == 12


# --------------------------------------------------------------------------- the same array reaches the graph


def test_requests_reach_the_graph_as_the_test_split_does(project, split_images, split_inputs):
    pixels, _ = split_images
    adapter = adapter_for(InputContract.of(create_session(project.paths.onnx("cnn"), ("cpu",))))
    assert split_inputs.dtype == np.float32
    np.testing.assert_array_equal(split_inputs, unit_float(pixels))
    for i, image in enumerate(pixels):
        from_png = adapter.parse_upload(png(image[0]), "image/png", {}, LIMITS).inputs
        from_array = adapter.parse_json({"instances": [image[0].tolist()]}, LIMITS).inputs
        for parsed in (from_png, from_array):
            assert parsed.dtype == np.float32 and parsed.shape == (1, 1, 28, 28)
            assert np.array_equal(parsed[0], split_inputs[i]), i
    encoded = [base64.b64encode(png(image[0])).decode() for image in pixels]
    assert np.array_equal(adapter.parse_json({"images": encoded}, LIMITS).inputs, split_inputs)

    window = project.params.train["lstm"].window
    data = load_stock_data(project.paths.raw_stocks, window)
    forecaster = adapter_for(InputContract.of(create_session(project.paths.onnx("lstm"), ("cpu",))))
    for index, ticker in enumerate(data.tickers):
        test, prices = data.splits[ticker]["test"], data.prices[ticker]
        expected = ticker_inputs(test, len(data.tickers))
        header, lines = price_lines(project, ticker)
        for j, day in enumerate(test.target_days):
            inputs, last_close, last_date = forecast_input(
                prices.iloc[: int(day)], window, index, len(data.tickers), "test"
            )
            assert inputs.dtype == np.float32 and inputs.shape == (1, *expected.shape[1:])
            assert np.array_equal(inputs[0], expected[j]), (ticker, j)
            assert last_close == test.last_close[j] and last_date == prices["Date"].iloc[int(day) - 1]
        for j in (0, len(test) // 2, len(test) - 1):  # through the adapter: a CSV file and JSON rows
            day = int(test.target_days[j])
            csv = ("\n".join([header, *lines[day - window - 1 : day]]) + "\n").encode()
            from_csv = forecaster.parse_upload(csv, "text/csv", {"ticker": ticker}, LIMITS).inputs
            rows = {"ticker": ticker, "rows": json_rows(prices, day - window - 1, day)}
            from_json = forecaster.parse_json(rows, LIMITS).inputs
            assert np.array_equal(from_csv[0], expected[j]) and np.array_equal(from_json[0], expected[j])


# ------------------------------------------------------------------------------------------------ hot swap


def test_new_champion_is_swapped_in_without_failed_requests(root, project, split_images):
    old = tracking.champion_version(project, "cnn")
    old_file = registry_onnx(project, "cnn", old)
    body = png(split_images[0][0][0])
    responses: list[tuple[float, int, str | None, dict | None]] = []
    stop = threading.Event()

    def client(url: str) -> None:
        with httpx.Client(timeout=30) as http:
            while not stop.is_set():
                try:
                    response = http.post(
                        f"{url}/v1/models/cnn/predict", content=body, headers={"content-type": "image/png"}
                    )
                    payload = response.json()
                    answer = payload["predictions"][0] if response.status_code == 200 else None
                    responses.append((time.monotonic(), response.status_code, payload.get("version"), answer))
                except Exception as exc:  # a dropped connection is a failed request too
                    responses.append((time.monotonic(), -1, repr(exc), None))

    try:
        with running_server(root, "--poll", "0.2") as url:
            assert listing(url)["cnn"]["version"] == old
            # A new version of the champion's graph, registered as export registers one.
            session = create_session(old_file, ("cpu",))
            metadata = dict(session.get_modelmeta().custom_metadata_map)
            run_id = read_json(project.paths.train_info("cnn"))["run_id"]
            example = unit_float(split_images[0][:4])
            variant = variant_of(project, "cnn", old)
            new = tracking.register_onnx(project, "cnn", run_id, old_file, example, metadata, variant=variant)
            assert new != old
            thread = threading.Thread(target=client, args=(url,), daemon=True)
            thread.start()
            wait_for(lambda: len(responses) >= 20, 30, "requests before the swap")
            moved_at = time.monotonic()
            tracking.set_champion(project, "cnn", new)
            wait_for(lambda: any(r[2] == new for r in responses), 10, f"version {new} to be served")
            count = len(responses)
            wait_for(lambda: len(responses) >= count + 20, 30, "requests after the swap")
            stop.set()
            thread.join(timeout=30)

            assert [r for r in responses if r[1] != 200] == []
            versions = [r[2] for r in responses]
            assert set(versions) == {old, new}
            first_new = versions.index(new)
            assert versions[:first_new] == [old] * first_new and versions[first_new:] == [new] * (
                len(versions) - first_new
            ), "a response went back to the old version"
            assert responses[first_new][0] - moved_at < 5.0
            # The same graph under a new version number: every answer is the same.
            assert all(r[3] == responses[0][3] for r in responses)
            entry = listing(url)["cnn"]
            assert (entry["version"], entry["swaps"], entry["last_error"]) == (new, 1, None)
            assert metric(url, "dlpipe_model_swaps_total", model="cnn") == 1
            assert metric(url, "dlpipe_model_swaps_total", model="lstm") == 0
            assert metric(url, "dlpipe_requests_total", model="cnn", status="200") == len(responses)
    finally:
        stop.set()
        tracking.client(project).set_registered_model_alias("dlpipe-cnn", tracking.CHAMPION, old)


# ------------------------------------------------------------------------------ a broken version is refused


def _classifier_graph(kind: str) -> onnx.ModelProto:
    """A graph with the classifier contract that loads but whose outputs are NaN, or that fails when run."""
    x = helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 1, 28, 28])
    y = helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", 10])
    if kind == "nan":
        weights = numpy_helper.from_array(np.full((784, 10), np.nan, np.float32), "w")
        nodes = [
            helper.make_node("Flatten", ["input"], ["flat"]),
            helper.make_node("MatMul", ["flat", "w"], ["output"]),
        ]
        initializers = [weights]
    else:  # row 40 of a 28-row image: onnxruntime fails at run time, not when loading
        index = numpy_helper.from_array(np.array([40], np.int64), "index")
        weights = numpy_helper.from_array(np.zeros((28, 10), np.float32), "w")
        nodes = [
            helper.make_node("Gather", ["input", "index"], ["row"], axis=2),
            helper.make_node("Flatten", ["row"], ["flat"]),
            helper.make_node("MatMul", ["flat", "w"], ["output"]),
        ]
        initializers = [index, weights]
    graph = helper.make_graph(nodes, kind, [x], [y], initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    for key, value in {"dlpipe.task": "classifier", "dlpipe.classes": json.dumps([str(i) for i in range(10)])}.items():
        model.metadata_props.append(onnx.StringStringEntryProto(key=key, value=value))
    return model


def refused(entry: dict, version: str) -> dict | None:
    """`entry` if its last error is about `version` (named as the alias's version or by its own URI)."""
    error = entry["last_error"] or ""
    return entry if f"version {version}:" in error or f"dlpipe-cnn/{version}:" in error else None


def test_broken_versions_are_never_switched_to(root, project, split_images, tmp_path):
    mlflow_client, name = tracking.client(project), tracking.registered_name("cnn")
    old = tracking.champion_version(project, "cnn")
    body = png(split_images[0][0][0])
    versions = {}
    for kind in ("garbage", "nan", "fails", "missing"):
        directory = tmp_path / kind
        directory.mkdir()
        if kind == "garbage":
            (directory / "model.onnx").write_bytes(b"this is not an ONNX graph\n" * 40)
        elif kind == "missing":
            directory.rmdir()  # registered artifacts that are gone
        else:
            onnx.save(_classifier_graph(kind), directory / "model.onnx")
        versions[kind] = str(mlflow_client.create_model_version(name, source=directory.as_uri()).version)
    problems = {
        "garbage": "not a loadable ONNX model",
        "nan": "the smoke prediction is not finite",
        "fails": "the smoke prediction failed",
        "missing": "cannot be downloaded",
    }
    try:
        with running_server(root, "--poll", "0.2") as url:
            for kind, version in versions.items():
                mlflow_client.set_registered_model_alias(name, tracking.CHAMPION, version)
                entry = wait_for(
                    lambda v=version: refused(listing(url)["cnn"], v),
                    15,
                    f"the {kind} version {version} to be refused",
                )
                assert problems[kind] in entry["last_error"], entry["last_error"]
                assert entry["version"] == old and entry["loaded"] and entry["swaps"] == 0
                assert httpx.get(f"{url}/readyz", timeout=10).status_code == 200
                response = httpx.post(
                    f"{url}/v1/models/cnn/predict", content=body, headers={"content-type": "image/png"}, timeout=30
                )
                assert response.status_code == 200 and response.json()["version"] == old, response.text
            # The poller lived through every failure: a good version is still picked up.
            good_source = mlflow_client.get_model_version_download_uri(name, old)
            good = str(mlflow_client.create_model_version(name, source=good_source).version)
            mlflow_client.set_registered_model_alias(name, tracking.CHAMPION, good)
            entry = wait_for(lambda: (e := listing(url)["cnn"])["version"] == good and e, 15, f"version {good}")
            assert entry["last_error"] is None and entry["swaps"] == 1
            assert metric(url, "dlpipe_model_swaps_total", model="cnn") == 1
    finally:
        mlflow_client.set_registered_model_alias(name, tracking.CHAMPION, old)


def test_a_file_source_keeps_its_version_when_the_file_breaks(project, tmp_path):
    path = tmp_path / "model.onnx"
    shutil.copyfile(project.paths.onnx("cnn"), path)
    store = ModelStore({"cnn": FileSource(path)}, ("cpu",))
    first = store.refresh("cnn")
    version = f"sha256:{sha256_file(path)[:12]}"
    assert first == {"version": version, "changed": True, "previous": None} and store.ready

    path.write_bytes(b"garbage, not a graph")
    result = store.refresh("cnn")
    assert result["changed"] is False and result["version"] == version
    assert "not a loadable ONNX model" in result["error"] and store.status["cnn"].error == result["error"]
    assert store.get("cnn").version == version and store.ready
    path.unlink()
    assert "file not found" in store.refresh("cnn")["error"] and store.get("cnn").version == version

    shutil.copyfile(project.paths.onnx("cnn"), path)  # the same file again: nothing to swap, the error clears
    assert store.refresh("cnn") == {"version": version, "changed": False} and store.status["cnn"].error is None
    shutil.copyfile(project.paths.onnx_int8("cnn"), path)
    swapped = store.refresh("cnn")
    assert swapped["changed"] and swapped["previous"] == version and store.status["cnn"].swaps == 1
    assert store.get("cnn").version == f"sha256:{sha256_file(project.paths.onnx_int8('cnn'))[:12]}"


# ------------------------------------------------------------------------------------------ no torch needed

TORCH_FREE = """
import json, sys
from pathlib import Path
from dlpipe.config import load_serving_config
from dlpipe.serving.cli import limits_of, registry_source
from dlpipe.serving.models import ModelStore
from dlpipe.serving.requests import answer, parse
from dlpipe.serving.app import create_app

config = load_serving_config(sys.argv[1])
store = ModelStore({name: registry_source(config, name) for name in ("cnn", "lstm")}, ("cpu",))
loaded = store.refresh_all()
limits = limits_of(config)
cnn, lstm = store.get("cnn"), store.get("lstm")
image = json.dumps({"instances": [[[0] * 28] * 28]}).encode()
answers = [
    answer(cnn, parse(cnn, "application/json", image, {}, limits)),
    answer(lstm, parse(lstm, "text/csv", Path(sys.argv[2]).read_bytes(), {"ticker": "GOOG"}, limits)),
]
create_app(store, limits, 1 << 20, 0, None)
print(json.dumps({"loaded": loaded, "answers": answers, "torch": "torch" in sys.modules,
                  "lightning": "lightning" in sys.modules or "pytorch_lightning" in sys.modules}))
"""


def test_serving_imports_no_torch(root, project, tmp_path):
    # Run from another directory: the registry is the project's, whatever the working directory holds.
    prices = project.paths.prices("GOOG")
    command = [sys.executable, "-c", TORCH_FREE, str(root / "params.yaml"), str(prices)]
    done = subprocess.run(command, cwd=tmp_path, env=serving_env(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert {name: loaded.get("changed") for name, loaded in result["loaded"].items()} == {"cnn": True, "lstm": True}
    champions = {model: tracking.champion_version(project, model) for model in ("cnn", "lstm")}
    assert {a["model"]: a["version"] for a in result["answers"]} == champions
    assert len(result["answers"][0]["predictions"]) == 1 and len(result["answers"][1]["predictions"]) == 1
    assert (result["torch"], result["lightning"]) == (False, False)
    assert not list(tmp_path.glob("mlflow.db")), "serving created an MLflow store in the working directory"

    command = [sys.executable, "-X", "importtime", "-m", "dlpipe", "serve", "--help"]
    done = subprocess.run(command, cwd=tmp_path, env=serving_env(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "--poll" in done.stdout, done.stderr[-3000:]
    imported = [line.rsplit("|", 1)[-1].strip() for line in done.stderr.splitlines() if line.startswith("import time:")]
    assert "dlpipe.serving.app" in imported  # the importtime listing is real
    assert [m for m in imported if m.split(".")[0] in ("torch", "lightning", "pytorch_lightning")] == []


# ------------------------------------------------------------------------- listing, health, metrics, admin


def test_listing_health_metrics_and_admin(project, server, split_images):
    health = httpx.get(f"{server}/healthz", timeout=10)
    assert health.status_code == 200 and health.json() == {"status": "ok"}
    ready = httpx.get(f"{server}/readyz", timeout=10)
    assert ready.status_code == 200 and ready.json() == {"ready": True, "waiting": {}}

    models = listing(server)
    assert list(models) == ["cnn", "lstm", "dcgan"]
    for name, entry in models.items():
        assert entry["provider"] == CPU and entry["input"]["dtype"] == "float32"
        assert entry["loaded"] is True and entry["last_error"] is None and entry["swaps"] == 0
        assert entry["version"] == tracking.champion_version(project, name)
        assert entry["source"] == f"models:/dlpipe-{name}@champion" and entry["alias"] == "champion"
        assert httpx.get(f"{server}/v1/models/{name}", timeout=10).json() == entry
    assert models["cnn"]["input"]["shape"] == ["batch", 1, 28, 28] and models["cnn"]["task"] == "classifier"
    assert models["cnn"]["classes"] == [str(i) for i in range(10)]
    assert models["lstm"]["task"] == "forecaster" and models["lstm"]["tickers"] == ["GOOG", "MSFT"]
    assert httpx.get(f"{server}/v1/models/nope", timeout=10).status_code == 404

    counted = {
        "ok": ("dlpipe_requests_total", {"model": "cnn", "status": "200"}),
        "refused": ("dlpipe_requests_total", {"model": "cnn", "status": "400"}),
        "timed": ("dlpipe_request_duration_seconds_count", {"model": "cnn"}),
    }
    before = {key: metric(server, name, **labels) for key, (name, labels) in counted.items()}
    for image in split_images[0][:5]:
        response = httpx.post(
            f"{server}/v1/models/cnn/predict", content=png(image[0]), headers={"content-type": "image/png"}
        )
        assert response.status_code == 200
    refused = httpx.post(f"{server}/v1/models/cnn/predict", json={"instances": [[1, 2, 3]]}, timeout=10)
    assert refused.status_code == 400 and refused.json()["status"] == 400 and "shape" in refused.json()["error"]
    # Parts within the batch limit add up to one request over it (serve.max_batch is 64 here).
    part = json.dumps({"instances": [image[0].tolist() for image in split_images[0][:40]]}).encode()
    files = [("part", (f"{i}.json", part, "application/json")) for i in range(2)]
    too_many = httpx.post(f"{server}/v1/models/cnn/predict", files=files, timeout=30)
    assert too_many.status_code == 400 and "the limit is 64" in too_many.json()["error"], too_many.text[:300]
    after = {key: metric(server, name, **labels) for key, (name, labels) in counted.items()}
    assert {key: after[key] - before[key] for key in counted} == {"ok": 5, "refused": 2, "timed": 7}

    reload = f"{server}/v1/admin/reload"
    assert httpx.post(reload, timeout=30).status_code == 401
    assert httpx.post(reload, headers={"Authorization": "Bearer wrong"}, timeout=30).status_code == 401
    granted = httpx.post(reload, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30)
    assert granted.status_code == 200, granted.text
    assert granted.json()["models"] == {
        name: {"version": entry["version"], "changed": False} for name, entry in models.items()
    }
    one = httpx.post(reload, params={"model": "lstm"}, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30)
    assert one.status_code == 200 and list(one.json()["models"]) == ["lstm"]
    unknown = httpx.post(reload, params={"model": "nope"}, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30)
    assert unknown.status_code == 404


def test_a_file_is_served_as_the_registry_graph_is(root, project, split_inputs, split_images):
    path = project.paths.onnx("cnn")
    logits = run_batched(create_session(path, ("cpu",)), split_inputs)
    with running_server(root, "--file", f"cnn={path}") as url:
        entry = listing(url)["cnn"]
        assert entry["version"] == f"sha256:{sha256_file(path)[:12]}" and entry["source"] == str(path.resolve())
        assert entry["alias"] is None  # a file follows no alias
        assert entry["provider"] == CPU and entry["input"]["shape"] == ["batch", 1, 28, 28]
        files = [("images", (f"{i}.png", png(image[0]), "image/png")) for i, image in enumerate(split_images[0])]
        response = httpx.post(f"{url}/v1/models/cnn/predict", files=files, timeout=30)
        assert response.status_code == 200, response.text
        answers = response.json()["predictions"]
        np.testing.assert_array_equal([a["class"] for a in answers], logits.argmax(axis=1))
        probabilities = np.array([[a["probabilities"][c] for c in entry["classes"]] for a in answers])
        np.testing.assert_allclose(probabilities, softmax(logits), rtol=0, atol=1e-6)
