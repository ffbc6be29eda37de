"""Readers (and, for tests and fixtures, writers) of the real dataset file formats.

- IDX (MNIST, Fashion-MNIST): big-endian magic (0, 0, dtype code, ndim), then ndim uint32 sizes, then data.
  http://yann.lecun.com/exdb/mnist/ describes the layout.
- CIFAR-10 "python version": a tar.gz of pickled dicts with b"data" (N, 3072) uint8 rows in CHW order
  and b"labels"; batches.meta holds b"label_names". Read with an unpickler that loads plain data only.
"""

from __future__ import annotations

import gzip
import pickle
import struct
import tarfile
from pathlib import Path

import numpy as np

from dlpipe.errors import DlpipeError

_IDX_DTYPES = {
    0x08: np.uint8,
    0x09: np.int8,
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_IDX_CODES = {np.dtype(np.uint8): 0x08, np.dtype(np.int8): 0x09}


def read_idx(path: Path) -> np.ndarray:
    """Parse an IDX file, gzip-compressed or not."""
    path = Path(path)
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError) as exc:  # e.g. a mirror's HTML error page saved under a .gz name
        raise DlpipeError(f"{path}: cannot decompress ({exc})") from exc
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise DlpipeError(f"{path}: not an IDX file (bad magic number)")
    dtype, ndim = np.dtype(_IDX_DTYPES[raw[2]]), raw[3]
    header_end = 4 + 4 * ndim
    if len(raw) < header_end:
        raise DlpipeError(f"{path}: IDX header truncated ({len(raw)} bytes, needs {header_end})")
    shape = struct.unpack(f">{ndim}I", raw[4:header_end])
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(raw) - header_end != expected:
        raise DlpipeError(f"{path}: IDX payload is {len(raw) - header_end} bytes, header promises {expected}")
    return np.frombuffer(raw, dtype=dtype, offset=header_end).reshape(shape).astype(dtype.newbyteorder("="))


def write_idx(path: Path, array: np.ndarray) -> None:
    """Write an IDX file (gzip-compressed when the name ends in .gz); used to build fixtures and mirrors."""
    array = np.ascontiguousarray(array)
    header = bytes([0, 0, _IDX_CODES[array.dtype], array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    payload = header + array.tobytes()
    Path(path).write_bytes(gzip.compress(payload) if str(path).endswith(".gz") else payload)


class _PlainDataUnpickler(pickle.Unpickler):
    """Unpickles containers, bytes, numbers and numpy arrays, nothing else.

    A pickle runs code only through the globals it names (`os.system`, a class's `__reduce__`); the CIFAR
    batches name just numpy's array reconstruction, so every other global is refused. A crafted archive
    (or a mirror serving one with a checksum from params) cannot execute anything.
    """

    ALLOWED = frozenset(
        {
            ("numpy.core.multiarray", "_reconstruct"),
            ("numpy._core.multiarray", "_reconstruct"),
            ("numpy", "ndarray"),
            ("numpy", "dtype"),
            ("_codecs", "encode"),  # how Python 3 writes bytes in protocol-2 pickles: text -> bytes only
        }
    )

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refused to load {module}.{name}: not plain data")
        return super().find_class(module, name)


def read_cifar10_archive(path: Path) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Read every batch of a cifar-10-python.tar.gz into (N, 3, 32, 32) uint8 images and int64 labels."""
    images, labels, names = [], [], None
    try:
        with tarfile.open(path, "r:gz") as archive:
            for member in sorted(archive.getmembers(), key=lambda m: m.name):
                base = Path(member.name).name
                if not member.isfile() or not (base.startswith("data_batch") or base in ("test_batch", "batches.meta")):
                    continue
                entry = _PlainDataUnpickler(archive.extractfile(member), encoding="bytes").load()
                if base == "batches.meta":
                    names = [n.decode() for n in entry[b"label_names"]]
                    continue
                images.append(np.asarray(entry[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
                labels.append(np.asarray(entry[b"labels"], dtype=np.int64))
    except (tarfile.TarError, OSError, EOFError, KeyError, ValueError, TypeError, pickle.UnpicklingError) as exc:
        raise DlpipeError(f"{path}: not a CIFAR-10 python archive ({exc})") from exc
    if not images or names is None:
        raise DlpipeError(f"{path}: CIFAR-10 archive has no data batches or no batches.meta")
    x, y = np.concatenate(images), np.concatenate(labels)
    if len(x) != len(y):
        raise DlpipeError(f"{path}: {len(x)} images but {len(y)} labels")
    return x, y, names
