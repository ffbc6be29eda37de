"""`dlpipe serve` serving the DCGAN generator of a really trained project. It proves that:

- the service serves generators by default beside `models`, and lists dcgan's latent size, image shape and classes;
- `{"n", "seed"}` answers exactly the images `dlpipe generate --n N --seed S` writes from the same graph (the
  registry champion, and the fp32 file served with `--file`), as PNG files or as uint8 arrays, the same on
  every call for the same seed and other images for another seed;
- each malformed request gets its 4xx and a JSON `{"error", "status"}` naming the problem, and the service
  answers a valid request right after;
- `/metrics` counts the generator's requests; serving a generator imports no torch; `dlpipe predict`
  refuses a generator with one line pointing at `dlpipe generate`; a graph whose output breaks its declared
  shape, or that answers NaN, is the model's fault (never a wrong image).
"""

from __future__ import annotations

import base64
import io
import json
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlparse

import httpx
import numpy as np
import onnxruntime as ort
import pytest
import yaml
from PIL import Image

from dlpipe import tracking
from dlpipe.config import load_config, load_serving_config
from dlpipe.errors import DlpipeError
from dlpipe.runtime import InputContract
from dlpipe.serving.cli import predict, registry_source
from dlpipe.serving.tasks import Batch, adapter_for
from serving import copy_project, listing, metric, running_server, serving_env

MAX_BATCH = 8  # serve.max_batch here: the over-the-limit case is cheap to send
PREDICT = "/v1/models/dcgan/predict"
JSON = "application/json"


# ---------------------------------------------------------------------------------------------------- world


@pytest.fixture(scope="module")
def root(built_project, tmp_path_factory) -> Path:
    root = copy_project(built_project, tmp_path_factory.mktemp("serving_generator") / "project")
    params_file = root / "params.yaml"
    params = yaml.safe_load(params_file.read_text())
    params["serve"].update(max_batch=MAX_BATCH, threads=1)  # only the server reads `serve`
    params_file.write_text(yaml.safe_dump(params, sort_keys=False))
    return root


@pytest.fixture(scope="module")
def project(root):
    return load_config(root / "params.yaml")


@pytest.fixture(scope="module")
def server(root) -> str:
    """The registry champions of every model and generator (no --models: the default), no polling."""
    with running_server(root, "--poll", "0") as url:
        yield url


@pytest.fixture(scope="module")
def champion_onnx(project) -> Path:
    """The ONNX file the registry's dcgan champion holds (the local store keeps it on disk)."""
    name = tracking.registered_name("dcgan")
    version = tracking.champion_version(project, "dcgan")
    assert version is not None, "the pipeline registered no dcgan champion"
    location = tracking.client(project).get_model_version_download_uri(name, version)
    graphs = sorted(Path(urlparse(location).path).rglob("*.onnx"))
    assert len(graphs) == 1, location
    return graphs[0]


def generated(root: Path, onnx: Path, n: int, seed: int, out: Path) -> np.ndarray:
    """uint8 images (n, H, W) as `dlpipe generate --file ONNX` writes them (one PNG each), read back."""
    command = [sys.executable, "-m", "dlpipe", "generate", "--n", str(n), "--seed", str(seed)]
    command += ["--file", str(onnx), "--out", str(out)]
    done = subprocess.run(command, cwd=root, env=serving_env(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    files = sorted(out.glob("*.png"))
    assert [f.name for f in files] == [f"{i:04d}.png" for i in range(n)]
    return np.stack([np.asarray(Image.open(f)) for f in files])


def post(url: str, payload) -> httpx.Response:
    return httpx.post(f"{url}{PREDICT}", json=payload, timeout=30)


def decoded(predictions: list[dict]) -> np.ndarray:
    """The answered PNG files' pixels, checked to be PNG files."""
    images = []
    for prediction in predictions:
        image = Image.open(io.BytesIO(base64.b64decode(prediction["png"], validate=True)))
        assert image.format == "PNG"
        images.append(np.asarray(image))
    return np.stack(images)


# ---------------------------------------------------------------------------------------------- listing


def test_generators_are_served_by_default_and_listed(server, project, root):
    graph = ort.InferenceSession(str(root / "models" / "dcgan" / "model.onnx"))
    latent_dim = graph.get_inputs()[0].shape[1]
    channels, height, width = graph.get_outputs()[0].shape[1:]
    models = listing(server)
    assert list(models) == ["cnn", "lstm", "dcgan"]  # `models`, then `generators`, as params lists them
    entry = models["dcgan"]
    assert entry["task"] == "generator" and entry["loaded"] is True and entry["last_error"] is None
    assert entry["version"] == tracking.champion_version(project, "dcgan")
    assert entry["source"] == "models:/dlpipe-dcgan@champion" and entry["alias"] == "champion"
    assert entry["latent_dim"] == latent_dim == 64 and entry["input"]["shape"] == ["batch", latent_dim]
    assert (
        entry["image"]
        == {"height": height, "width": width, "channels": channels}
        == {
            "height": 28,
            "width": 28,
            "channels": 1,
        }
    )
    assert entry["classes"] == [str(i) for i in range(10)] and entry["formats"] == ["png", "array"]
    assert httpx.get(f"{server}/v1/models/dcgan", timeout=10).json() == entry


def test_an_unknown_model_names_models_and_generators(root):
    with pytest.raises(DlpipeError, match=r"unknown model 'nope'.*\(cnn, lstm, dcgan\)"):
        registry_source(load_serving_config(root / "params.yaml"), "nope")


# ---------------------------------------------------------------------------------------------- answers


def test_answers_are_the_images_dlpipe_generate_writes(server, root, champion_onnx, tmp_path):
    expected = generated(root, champion_onnx, 4, 7, tmp_path / "seed7")
    assert expected.shape == (4, 28, 28) and expected.dtype == np.uint8

    response = post(server, {"n": 4, "seed": 7})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model"] == "dcgan" and body["version"] == listing(server)["dcgan"]["version"]
    answers = body["predictions"]
    assert [(a["index"], a["seed"]) for a in answers] == [(i, 7) for i in range(4)]
    np.testing.assert_array_equal(decoded(answers), expected)

    arrays = post(server, {"n": 4, "seed": 7, "format": "array"})
    assert arrays.status_code == 200, arrays.text
    rows = arrays.json()["predictions"]
    assert [(a["index"], a["seed"], sorted(a)) for a in rows] == [(i, 7, ["index", "pixels", "seed"]) for i in range(4)]
    pixels = np.array([a["pixels"] for a in rows])
    assert pixels.dtype.kind == "i" and pixels.min() >= 0 and pixels.max() <= 255  # uint8 values, as integers
    np.testing.assert_array_equal(pixels, expected)

    assert post(server, {"n": 4, "seed": 7}).json() == body  # the same seed: the same answer
    other = decoded(post(server, {"n": 4, "seed": 8}).json()["predictions"])
    assert other.shape == expected.shape and not np.array_equal(other, expected)

    # The defaults: one PNG of seed 0 (the pipeline's sample grid's first image).
    default = post(server, {}).json()["predictions"]
    assert len(default) == 1 and default[0]["index"] == 0 and default[0]["seed"] == 0 and "png" in default[0]


def test_a_file_is_served_as_dlpipe_generate_reads_it(root, tmp_path):
    fp32 = root / "models" / "dcgan" / "model.onnx"
    expected = generated(root, fp32, 4, 7, tmp_path / "fp32")
    with running_server(root, "--file", f"dcgan={fp32}") as url:
        entry = listing(url)["dcgan"]
        assert entry["task"] == "generator" and entry["source"] == str(fp32.resolve()) and entry["alias"] is None
        answers = post(url, {"n": 4, "seed": 7}).json()["predictions"]
        np.testing.assert_array_equal(decoded(answers), expected)
        rows = post(url, {"n": 4, "seed": 7, "format": "array"}).json()["predictions"]
        np.testing.assert_array_equal(np.array([a["pixels"] for a in rows]), expected)


def test_the_limits_themselves_are_served(server):
    full = post(server, {"n": MAX_BATCH, "seed": 2**63 - 1, "format": "array"})
    assert full.status_code == 200, full.text
    answers = full.json()["predictions"]
    assert [a["index"] for a in answers] == list(range(MAX_BATCH)) and {a["seed"] for a in answers} == {2**63 - 1}


# ------------------------------------------------------------------------------------------- malformed


def multipart_png() -> dict:
    buffer = io.BytesIO()
    Image.fromarray(np.zeros((28, 28), dtype=np.uint8)).save(buffer, "PNG")
    return {"files": [("image", ("0.png", buffer.getvalue(), "image/png"))]}


def png_upload() -> dict:
    return {"content": multipart_png()["files"][0][1][1], "headers": {"content-type": "image/png"}}


def raw(body: bytes) -> dict:
    return {"content": body, "headers": {"content-type": JSON}}


# (case, request keyword arguments for httpx.post, status, a fragment the error names)
MALFORMED = [
    ("n 0", {"json": {"n": 0}}, 400, "'n' must be an integer from 1 to 8, got 0"),
    ("n negative", {"json": {"n": -1}}, 400, "'n' must be an integer from 1 to 8, got -1"),
    ("n fractional", {"json": {"n": 1.5}}, 400, "'n' must be an integer from 1 to 8, got 1.5"),
    ("n a string", {"json": {"n": "4"}}, 400, "'n' must be an integer from 1 to 8, got \"4\""),
    ("n a boolean", {"json": {"n": True}}, 400, "'n' must be an integer from 1 to 8, got true"),
    ("n null", {"json": {"n": None}}, 400, "'n' must be an integer from 1 to 8, got null"),
    ("n over max_batch", {"json": {"n": MAX_BATCH + 1}}, 400, "'n' is 9 images; the limit is 8 (serve.max_batch)"),
    ("n huge", {"json": {"n": 10**30}}, 400, "the limit is 8 (serve.max_batch)"),
    ("seed negative", {"json": {"seed": -1}}, 400, "'seed' must be an integer from 0 to 2**63 - 1, got -1"),
    ("seed 2**63", {"json": {"seed": 2**63}}, 400, f"'seed' must be an integer from 0 to 2**63 - 1, got {2**63}"),
    ("seed a string", {"json": {"seed": "x"}}, 400, "'seed' must be an integer from 0 to 2**63 - 1, got \"x\""),
    ("seed a boolean", {"json": {"seed": True}}, 400, "'seed' must be an integer from 0 to 2**63 - 1, got true"),
    ("seed fractional", {"json": {"seed": 1.0}}, 400, "'seed' must be an integer from 0 to 2**63 - 1, got 1.0"),
    ("format gif", {"json": {"format": "gif"}}, 400, "'format' must be one of 'png', 'array', got \"gif\""),
    ("format a number", {"json": {"format": 3}}, 400, "'format' must be one of 'png', 'array', got 3"),
    ("an unknown key", {"json": {"n": 1, "count": 4}}, 400, "unknown key 'count': a generator takes n, seed, format"),
    ("a JSON list", {"json": [{"n": 1}]}, 400, 'expected a JSON object such as {"n": 4'),
    ("a JSON number", {"json": 4}, 400, "expected a JSON object such as"),
    ("an image upload", png_upload(), 415, "'image/png': a generator takes application/json only"),
    ("a multipart image", multipart_png(), 415, "'image/png': a generator takes application/json only"),
    ("an empty body", raw(b""), 400, "the request body is empty"),
    ("NaN", raw(b'{"n": 1, "seed": NaN}'), 400, "NaN is not a number a model can take"),
    ("not JSON", raw(b'{"n": '), 400, "not valid JSON"),
]


@pytest.mark.parametrize(
    ("request_kwargs", "status", "named"), [case[1:] for case in MALFORMED], ids=[c[0] for c in MALFORMED]
)
def test_a_malformed_request_is_named_and_refused(server, request_kwargs, status, named):
    response = httpx.post(f"{server}{PREDICT}", timeout=30, **request_kwargs)
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error", "status"} and body["status"] == status, body
    assert named in body["error"], body["error"]
    after = post(server, {"n": 1, "seed": 3})  # the service still serves
    assert after.status_code == 200 and len(after.json()["predictions"]) == 1, after.text


# ------------------------------------------------------------------------------ metrics, torch, predict


def test_metrics_count_the_generator_requests(server):
    counted = {
        "ok": ("dlpipe_requests_total", {"model": "dcgan", "status": "200"}),
        "refused": ("dlpipe_requests_total", {"model": "dcgan", "status": "400"}),
        "unsupported": ("dlpipe_requests_total", {"model": "dcgan", "status": "415"}),
        "timed": ("dlpipe_request_duration_seconds_count", {"model": "dcgan"}),
    }
    before = {key: metric(server, name, **labels) for key, (name, labels) in counted.items()}
    for seed in range(3):
        assert post(server, {"n": 2, "seed": seed}).status_code == 200
    assert post(server, {"n": 0}).status_code == 400
    assert httpx.post(f"{server}{PREDICT}", timeout=30, **png_upload()).status_code == 415
    after = {key: metric(server, name, **labels) for key, (name, labels) in counted.items()}
    assert {key: after[key] - before[key] for key in counted} == {"ok": 3, "refused": 1, "unsupported": 1, "timed": 5}


TORCH_FREE = """
import json, sys
from dlpipe.config import load_serving_config
from dlpipe.serving.cli import limits_of, registry_source
from dlpipe.serving.models import ModelStore
from dlpipe.serving.requests import answer, parse
from dlpipe.serving.app import create_app

config = load_serving_config(sys.argv[1])
store = ModelStore({"dcgan": registry_source(config, "dcgan")}, ("cpu",))
loaded = store.refresh_all()
dcgan = store.get("dcgan")
request = json.dumps({"n": 2, "seed": 7, "format": "array"}).encode()
result = answer(dcgan, parse(dcgan, "application/json", request, {}, limits_of(config)))
create_app(store, limits_of(config), 1 << 20, 0, None)
print(json.dumps({"loaded": loaded, "answer": result, "torch": "torch" in sys.modules,
                  "lightning": "lightning" in sys.modules or "pytorch_lightning" in sys.modules}))
"""


def test_serving_the_generator_imports_no_torch(root, project, server, tmp_path):
    command = [sys.executable, "-c", TORCH_FREE, str(root / "params.yaml")]
    done = subprocess.run(command, cwd=tmp_path, env=serving_env(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["loaded"]["dcgan"]["changed"] is True
    assert result["answer"]["version"] == tracking.champion_version(project, "dcgan")
    # The same answer as the service gives (the same code path, another process).
    assert result["answer"]["predictions"] == post(server, {"n": 2, "seed": 7, "format": "array"}).json()["predictions"]
    assert (result["torch"], result["lightning"]) == (False, False)


def test_dlpipe_predict_refuses_a_generator_in_one_line(root, capsys):
    image = root / "digit.png"
    image.write_bytes(png_upload()["content"])
    assert predict(["dcgan", str(image), "--params", str(root / "params.yaml")]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.splitlines() == [
        f"dlpipe: error: {image}: dcgan is a generator and takes no files; use `dlpipe generate dcgan --n N --seed S"
        " --out DIR`"
    ]


# -------------------------------------------------------------------------------- the model's own faults


def test_a_graph_that_breaks_its_declared_output_is_a_model_fault(champion_onnx):
    contract = InputContract.of(ort.InferenceSession(str(champion_onnx)))
    adapter = adapter_for(contract)
    batch = Batch(np.zeros((2, 64), np.float32), [{"index": i, "seed": 0, "format": "png"} for i in range(2)])
    assert len(adapter.answers(np.full((2, 1, 28, 28), 0.5, np.float32), batch)) == 2
    with pytest.raises(DlpipeError, match=r"answered shape \(2, 1, 14, 14\)"):
        adapter.answers(np.full((2, 1, 14, 14), 0.5, np.float32), batch)
    with pytest.raises(DlpipeError, match="NaN or infinite pixels"):
        adapter.answers(np.full((2, 1, 28, 28), np.nan, np.float32), batch)
    undeclared = InputContract(**{**contract.__dict__, "metadata": {**contract.metadata, "dlpipe.image": "[28, 28]"}})
    with pytest.raises(DlpipeError, match=r"dlpipe.image metadata is not an image shape"):
        adapter_for(undeclared)
    missing = {k: v for k, v in contract.metadata.items() if k != "dlpipe.image"}
    with pytest.raises(DlpipeError, match=r"no dlpipe.image metadata"):
        adapter_for(InputContract(**{**contract.__dict__, "metadata": missing}))
