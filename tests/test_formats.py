"""The real dataset file formats: IDX (MNIST family) and the CIFAR-10 python archive."""

from __future__ import annotations

import gzip
import io
import pickle
import struct
import tarfile
from pathlib import Path

import numpy as np
import pytest

from dlpipe.data.formats import read_cifar10_archive, read_idx, write_idx
from dlpipe.errors import DlpipeError

CIFAR_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def _add_pickle(archive: tarfile.TarFile, name: str, obj: object) -> None:
    payload = pickle.dumps(obj, protocol=2)
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    archive.addfile(info, io.BytesIO(payload))


def build_cifar_archive(path: Path, batches: dict[str, tuple[np.ndarray, list[int]]], names=CIFAR_NAMES) -> Path:
    """A cifar-10-python.tar.gz laid out like the authors' one: cifar-10-batches-py/<batch> pickles."""
    with tarfile.open(path, "w:gz") as archive:
        directory = tarfile.TarInfo("cifar-10-batches-py")
        directory.type = tarfile.DIRTYPE
        archive.addfile(directory)
        readme = b"<html>not a batch</html>"
        info = tarfile.TarInfo("cifar-10-batches-py/readme.html")
        info.size = len(readme)
        archive.addfile(info, io.BytesIO(readme))
        _add_pickle(
            archive, "cifar-10-batches-py/batches.meta", {b"label_names": [n.encode() for n in names], b"num_vis": 3072}
        )
        for batch, (rows, labels) in batches.items():
            _add_pickle(
                archive,
                f"cifar-10-batches-py/{batch}",
                {
                    b"batch_label": batch.encode(),
                    b"labels": list(labels),
                    b"data": rows,
                    b"filenames": [b"x.png"] * len(labels),
                },
            )
    return path


# ---------------------------------------------------------------- IDX


@pytest.mark.parametrize("name", ["images-idx3-ubyte.gz", "images-idx3-ubyte"])
def test_idx_round_trip_images(tmp_path, name):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(7, 28, 28), dtype=np.uint8)
    path = tmp_path / name
    write_idx(path, images)

    raw = path.read_bytes()
    if name.endswith(".gz"):
        assert raw[:2] == b"\x1f\x8b"  # really gzip-compressed
        raw = gzip.decompress(raw)
    assert raw[:4] == bytes([0, 0, 0x08, 3])
    assert struct.unpack(">3I", raw[4:16]) == (7, 28, 28)

    back = read_idx(path)
    assert back.dtype == np.uint8
    assert back.shape == (7, 28, 28)
    np.testing.assert_array_equal(back, images)


@pytest.mark.parametrize("name", ["labels-idx1-ubyte.gz", "labels-idx1-ubyte"])
def test_idx_round_trip_labels(tmp_path, name):
    labels = np.array([5, 0, 4, 1, 9, 2, 1, 3, 1, 4, 3, 5], dtype=np.uint8)
    path = tmp_path / name
    write_idx(path, labels)
    back = read_idx(path)
    assert back.dtype == np.uint8
    assert back.shape == (12,)
    np.testing.assert_array_equal(back, labels)


def test_read_idx_big_endian_int32(tmp_path):
    # Type code 0x0C: big-endian int32, as the IDX description allows; the result is native-endian.
    values = np.array([[1, -2, 70000], [3, 4, -5]], dtype=">i4")
    path = tmp_path / "ints.idx"
    path.write_bytes(bytes([0, 0, 0x0C, 2]) + struct.pack(">2I", 2, 3) + values.tobytes())
    back = read_idx(path)
    assert back.dtype == np.dtype("=i4")
    np.testing.assert_array_equal(back, [[1, -2, 70000], [3, 4, -5]])


@pytest.mark.parametrize(
    "payload",
    [
        b"\x00\x01\x08\x01" + struct.pack(">I", 3) + b"abc",  # second byte must be 0
        b"\x00\x00\x42\x01" + struct.pack(">I", 3) + b"abc",  # unknown dtype code
        b"PK\x03\x04" + b"\x00" * 20,  # a zip file
        b"\x00\x00",  # shorter than the magic number
    ],
    ids=["nonzero-byte", "unknown-dtype", "zip", "short"],
)
def test_read_idx_bad_magic_names_file(tmp_path, payload):
    path = tmp_path / "bad-idx1-ubyte"
    path.write_bytes(payload)
    with pytest.raises(DlpipeError, match="bad magic") as info:
        read_idx(path)
    assert str(path) in str(info.value)
    assert "\n" not in str(info.value)


def test_read_idx_bad_magic_inside_gzip_names_file(tmp_path):
    path = tmp_path / "bad-idx3-ubyte.gz"
    path.write_bytes(gzip.compress(b"\x08\x00\x00\x03" + b"\x00" * 32))
    with pytest.raises(DlpipeError, match="bad magic") as info:
        read_idx(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_read_idx_truncated_payload_names_file(tmp_path, suffix):
    full = bytes([0, 0, 0x08, 3]) + struct.pack(">3I", 4, 28, 28) + bytes(4 * 28 * 28)
    path = tmp_path / f"train-images-idx3-ubyte{suffix}"
    truncated = full[:-100]
    path.write_bytes(gzip.compress(truncated) if suffix else truncated)
    with pytest.raises(DlpipeError) as info:
        read_idx(path)
    message = str(info.value)
    assert str(path) in message
    assert f"{4 * 28 * 28 - 100} bytes" in message
    assert f"promises {4 * 28 * 28}" in message


def test_read_idx_extra_trailing_bytes_rejected(tmp_path):
    path = tmp_path / "labels-idx1-ubyte"
    path.write_bytes(bytes([0, 0, 0x08, 1]) + struct.pack(">I", 3) + b"\x01\x02\x03\x04")
    with pytest.raises(DlpipeError, match="promises 3") as info:
        read_idx(path)
    assert str(path) in str(info.value)


def test_read_idx_truncated_header_is_dlpipe_error(tmp_path):
    path = tmp_path / "t10k-images-idx3-ubyte"
    path.write_bytes(bytes([0, 0, 0x08, 3, 0, 0]))  # promises 3 sizes, holds half of one
    with pytest.raises(DlpipeError) as info:
        read_idx(path)
    assert str(path) in str(info.value)


def test_read_idx_corrupt_gzip_is_dlpipe_error(tmp_path):
    path = tmp_path / "t10k-labels-idx1-ubyte.gz"
    path.write_bytes(b"<html>404 Not Found</html>")  # what a misconfigured mirror serves
    with pytest.raises(DlpipeError) as info:
        read_idx(path)
    assert str(path) in str(info.value)


# ---------------------------------------------------------------- CIFAR-10


def test_read_cifar10_archive(tmp_path):
    rng = np.random.default_rng(1)
    train_rows = rng.integers(0, 256, size=(6, 3072), dtype=np.uint8)
    test_rows = rng.integers(0, 256, size=(4, 3072), dtype=np.uint8)
    train_labels = [0, 9, 3, 3, 1, 8]
    test_labels = [2, 7, 5, 4]
    path = build_cifar_archive(
        tmp_path / "cifar-10-python.tar.gz",
        {"data_batch_1": (train_rows, train_labels), "test_batch": (test_rows, test_labels)},
    )

    images, labels, names = read_cifar10_archive(path)

    assert images.shape == (10, 3, 32, 32)
    assert images.dtype == np.uint8
    assert labels.dtype == np.int64
    assert names == CIFAR_NAMES
    # Members are read in name order: data_batch_1 before test_batch.
    rows = np.concatenate([train_rows, test_rows])
    np.testing.assert_array_equal(labels, train_labels + test_labels)
    for i, c, h, w in [(0, 0, 0, 0), (0, 2, 31, 31), (3, 1, 5, 17), (7, 2, 0, 31), (9, 0, 31, 0), (5, 1, 16, 1)]:
        assert images[i, c, h, w] == rows[i, c * 1024 + h * 32 + w]
    # And the whole thing, exhaustively: channel-major, then row-major within a channel.
    i, c, h, w = np.indices(images.shape)
    np.testing.assert_array_equal(images, rows[i, c * 1024 + h * 32 + w])


class _Payload:
    """Unpickling this runs code: what a crafted archive would carry."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_cifar10_archive_with_code_in_a_batch_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "PWNED"
    rows = np.zeros((2, 3072), dtype=np.uint8)
    path = build_cifar_archive(tmp_path / "c.tar.gz", {"data_batch_1": (rows, [0, 1])})
    with tarfile.open(path, "r:gz") as archive:
        members = {m.name: archive.extractfile(m).read() if m.isfile() else None for m in archive.getmembers()}
    crafted = tmp_path / "crafted.tar.gz"
    with tarfile.open(crafted, "w:gz") as archive:
        for name, data in members.items():
            if data is None:
                continue
            if name.endswith("data_batch_1"):
                data = pickle.dumps({b"data": rows, b"labels": [0, 1], b"filenames": _Payload(marker)})
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    with pytest.raises(DlpipeError, match=r"not a CIFAR-10 python archive \(refused to load (pathlib|posixpath)"):
        read_cifar10_archive(crafted)
    assert not marker.exists()


def test_read_cifar10_archive_several_training_batches(tmp_path):
    rows = [np.full((2, 3072), v, dtype=np.uint8) for v in (10, 20, 30)]
    path = build_cifar_archive(
        tmp_path / "c.tar.gz",
        {"data_batch_2": (rows[1], [2, 2]), "test_batch": (rows[2], [3, 3]), "data_batch_1": (rows[0], [1, 1])},
    )
    images, labels, _ = read_cifar10_archive(path)
    assert images.shape == (6, 3, 32, 32)
    np.testing.assert_array_equal(labels, [1, 1, 2, 2, 3, 3])
    np.testing.assert_array_equal(images[:, 0, 0, 0], [10, 10, 20, 20, 30, 30])


def test_read_cifar10_not_an_archive(tmp_path):
    path = tmp_path / "cifar-10-python.tar.gz"
    path.write_bytes(b"<html>this is an error page, not a tarball</html>")
    with pytest.raises(DlpipeError, match="not a CIFAR-10 python archive") as info:
        read_cifar10_archive(path)
    assert str(path) in str(info.value)


def test_read_cifar10_archive_without_meta(tmp_path):
    path = tmp_path / "c.tar.gz"
    with tarfile.open(path, "w:gz") as archive:
        _add_pickle(
            archive, "cifar-10-batches-py/data_batch_1", {b"data": np.zeros((1, 3072), np.uint8), b"labels": [0]}
        )
    with pytest.raises(DlpipeError, match="no batches.meta") as info:
        read_cifar10_archive(path)
    assert str(path) in str(info.value)


def test_read_cifar10_archive_batch_without_labels(tmp_path):
    path = tmp_path / "c.tar.gz"
    with tarfile.open(path, "w:gz") as archive:
        _add_pickle(archive, "cifar-10-batches-py/batches.meta", {b"label_names": [b"a", b"b"]})
        _add_pickle(archive, "cifar-10-batches-py/data_batch_1", {b"data": np.zeros((1, 3072), np.uint8)})
    with pytest.raises(DlpipeError, match="not a CIFAR-10 python archive") as info:
        read_cifar10_archive(path)
    assert str(path) in str(info.value)
