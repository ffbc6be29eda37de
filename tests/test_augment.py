"""The albumentations pipeline built from params, its per-source defaults, and the augment stage's files."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import albumentations as A
import numpy as np
import pytest

from dlpipe import stages
from dlpipe.augment import (
    PER_SOURCE,
    PIPELINE_FILE,
    SOURCE_DEFAULTS,
    augment_images,
    build_pipeline,
    describe,
    pipeline_dict,
    resolve,
    save_preview,
)
from dlpipe.config import IMAGE_SOURCES, AugmentParams, Paths
from dlpipe.data.images import load_split, save_split
from dlpipe.errors import DlpipeError
from dlpipe.io import write_json

PARAMS = AugmentParams(
    copies=2, p=1.0, rotate_deg=15, translate_frac=0.1, scale_min=0.9, scale_max=1.1, shear_deg=10, preview_count=4
)
DIGITS = resolve(PARAMS, "mnist_5k")
PHOTOS = resolve(PARAMS, "cifar10")
# Every transform off: a test switches on the one it checks.
NOTHING = AugmentParams(
    copies=1,
    p=1.0,
    rotate_deg=0,
    translate_frac=0,
    scale_min=1.0,
    scale_max=1.0,
    shear_deg=0,
    hflip_p=0.0,
    vflip_p=0.0,
    stretch_p=0.0,
    brightness_contrast_p=0.0,
)


def digits(n: int = 6) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    return (bunch.images[:n] * 15).astype(np.uint8)[:, None], bunch.target[:n]


def photos(n: int = 6, size: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """Small RGB images (N, 3, H, W) with structure in every channel."""
    rng = np.random.default_rng(0)
    return rng.integers(40, 220, (n, 3, size, size), dtype=np.uint8), np.arange(n) % 10


def names(pipeline) -> list[str]:
    return [type(transform).__name__ for transform in pipeline.transforms]


def apply_once(params: AugmentParams, image: np.ndarray, seed: int = 0) -> np.ndarray:
    return build_pipeline(params, seed)(image=image)["image"].reshape(image.shape)


def test_pipeline_reflects_params():
    pipeline = build_pipeline(DIGITS, seed=0)
    assert names(pipeline) == ["Affine"] and pipeline.p == 1.0
    affine = pipeline.transforms[0]
    assert affine.p == 1.0
    assert tuple(affine.rotate) == (-15, 15)


def test_every_image_source_has_defaults_for_every_null_key():
    assert set(SOURCE_DEFAULTS) == set(IMAGE_SOURCES)
    assert all(set(defaults) == set(PER_SOURCE) for defaults in SOURCE_DEFAULTS.values())
    assert all(getattr(PARAMS, key) is None for key in PER_SOURCE)  # params.yaml's null is the model default


@pytest.mark.parametrize("source", ["mnist_5k", "digits", "mnist"])
def test_digits_are_never_flipped_stretched_or_relit(source):
    resolved = resolve(PARAMS, source)
    assert all(getattr(resolved, key) == 0.0 for key in PER_SOURCE)
    assert names(build_pipeline(resolved, seed=0)) == ["Affine"]


@pytest.mark.parametrize("source", ["cifar10", "folder"])
def test_photos_are_mirrored_stretched_and_relit_but_not_upside_down(source):
    resolved = resolve(PARAMS, source)
    assert (resolved.hflip_p, resolved.vflip_p, resolved.stretch_p, resolved.brightness_contrast_p) == (
        0.5,
        0,
        0.5,
        0.5,
    )
    assert names(build_pipeline(resolved, seed=0)) == ["HorizontalFlip", "Affine", "Affine", "RandomBrightnessContrast"]


def test_fashion_mnist_is_mirrored_but_not_relit():
    resolved = resolve(PARAMS, "fashion_mnist")
    assert (resolved.hflip_p, resolved.vflip_p, resolved.brightness_contrast_p) == (0.5, 0.0, 0.0)


def test_an_explicit_value_overrides_the_source_default():
    assert resolve(PARAMS.model_copy(update={"hflip_p": 0.3}), "mnist_5k").hflip_p == 0.3
    no_flip = resolve(PARAMS.model_copy(update={"hflip_p": 0.0, "vflip_p": 0.25}), "cifar10")
    assert (no_flip.hflip_p, no_flip.vflip_p, no_flip.stretch_p) == (0.0, 0.25, 0.5)  # the others keep the default
    assert "HorizontalFlip" not in names(build_pipeline(no_flip, seed=0))
    assert resolve(no_flip, "mnist_5k") == no_flip  # resolving twice changes nothing


def test_unknown_source_and_unresolved_params_are_refused():
    with pytest.raises(DlpipeError, match=r"^meta\.json: source: unknown image source 'imagenet'"):
        resolve(PARAMS, "imagenet", where="meta.json: source")
    with pytest.raises(ValueError, match="hflip_p"):
        build_pipeline(PARAMS, seed=0)


def test_horizontal_flip_mirrors_exactly():
    image = np.arange(5 * 7, dtype=np.uint8).reshape(5, 7, 1)  # no symmetry: every pixel differs
    assert np.array_equal(apply_once(NOTHING.model_copy(update={"hflip_p": 1.0}), image), image[:, ::-1])
    assert np.array_equal(apply_once(NOTHING.model_copy(update={"vflip_p": 1.0}), image), image[::-1])


def _extent(image: np.ndarray) -> tuple[int, int]:
    """(width, height) of the bright pixels' bounding box."""
    rows, cols = np.nonzero(image[..., 0] > 127)
    return int(cols.max() - cols.min() + 1), int(rows.max() - rows.min() + 1)


def test_stretch_changes_x_and_y_scale_independently():
    image = np.zeros((40, 40, 1), np.uint8)
    image[15:25, 15:25] = 255  # a centred 10x10 square
    stretch = NOTHING.model_copy(update={"stretch_p": 1.0})
    wide = apply_once(stretch.model_copy(update={"stretch_x": [1.6, 1.6], "stretch_y": [1.0, 1.0]}), image)
    tall = apply_once(stretch.model_copy(update={"stretch_x": [1.0, 1.0], "stretch_y": [1.6, 1.6]}), image)
    assert _extent(image) == (10, 10)
    assert _extent(wide)[1] == 10 and 15 <= _extent(wide)[0] <= 17
    assert _extent(tall)[0] == 10 and 15 <= _extent(tall)[1] <= 17


def test_brightness_and_contrast_change_pixel_statistics():
    image = np.random.default_rng(1).integers(90, 160, (16, 16, 3), dtype=np.uint8)  # room either way: no clipping
    relight = NOTHING.model_copy(update={"brightness_contrast_p": 1.0})
    brighter = relight.model_copy(update={"brightness_limit": 0.3, "contrast_limit": 0.0})
    contrast = relight.model_copy(update={"brightness_limit": 0.0, "contrast_limit": 0.3})
    for seed in range(4):
        shifted, scaled = apply_once(brighter, image, seed), apply_once(contrast, image, seed)
        assert abs(shifted.mean() - image.mean()) > 1 and shifted.std() == pytest.approx(image.std(), abs=0.05)
        assert abs(scaled.std() - image.std()) > 0.1


def test_copies_are_added_after_originals_and_differ():
    x, y = digits()
    x_aug, y_aug = augment_images(x, y, DIGITS, seed=0, progress=False)
    assert x_aug.shape == (18, 1, 8, 8) and x_aug.dtype == np.uint8
    assert np.array_equal(x_aug[:6], x) and np.array_equal(y_aug, np.tile(y, 3))
    assert not np.array_equal(x_aug[6:12], x)  # p=1: every copy transformed


@pytest.mark.parametrize(("params", "data"), [(DIGITS, digits), (PHOTOS, photos)], ids=["digits", "photos"])
def test_same_seed_same_augmentation(params, data):
    x, y = data()
    first, _ = augment_images(x, y, params, seed=3, progress=False)
    second, _ = augment_images(x, y, params, seed=3, progress=False)
    other, _ = augment_images(x, y, params, seed=4, progress=False)
    assert np.array_equal(first, second) and not np.array_equal(first, other)


def test_zero_copies_is_identity():
    x, y = digits()
    x_aug, y_aug = augment_images(x, y, DIGITS.model_copy(update={"copies": 0}), seed=0, progress=False)
    assert x_aug is x and y_aug is y


def test_serialisation_round_trips_to_the_same_transforms_and_output():
    saved = json.loads(json.dumps(pipeline_dict(PHOTOS, seed=5)))  # as pipeline.json holds it
    rebuilt = A.from_dict(saved)
    assert names(rebuilt) == names(build_pipeline(PHOTOS, seed=5))
    assert json.loads(json.dumps(A.to_dict(rebuilt))) == saved
    rebuilt.set_random_seed(5)  # the seed is not part of the dict: meta.json records it
    original = build_pipeline(PHOTOS, seed=5)
    for image in photos()[0].transpose(0, 2, 3, 1):
        assert np.array_equal(rebuilt(image=image)["image"], original(image=image)["image"])


def test_describe_lists_the_active_transforms_with_their_ranges():
    assert describe(DIGITS) == ["affine: rotate +-15 deg, translate +-0.1, scale 0.9-1.1, shear +-10 deg"]
    lines = describe(PHOTOS)
    assert "horizontal flip p=0.5" in lines and "stretch p=0.5: x 1-1.3, y 1-1.3" in lines
    assert "brightness +-0.2, contrast +-0.2 p=0.5" in lines and not any("vertical" in line for line in lines)
    assert describe(NOTHING) == []


@pytest.mark.parametrize(
    ("params", "data", "source"), [(DIGITS, digits, "mnist_5k"), (PHOTOS, photos, "cifar10")], ids=["digits", "photos"]
)
def test_preview_is_a_png(tmp_path, params, data, source):
    x, y = data()
    save_preview(x, y, params, seed=0, target=tmp_path / "preview.png", source=source)
    assert (tmp_path / "preview.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _project(root: Path, source: str, params: AugmentParams = PARAMS) -> SimpleNamespace:
    """The augment stage's inputs, without the rest of a project: raw photos and their meta.json."""
    paths = Paths(root)
    paths.raw_images.mkdir(parents=True)
    x, y = photos()
    digest = save_split(paths.raw_images, "train", x, y)
    write_json(paths.meta(paths.raw_images), {"source": source, "split_sha256": {"train": digest}})
    return SimpleNamespace(params=SimpleNamespace(augment=params, seed=7), paths=paths)


def test_stage_writes_data_pipeline_json_and_resolved_settings(tmp_path):
    config = _project(tmp_path, "cifar10")
    meta = stages.augment(config)
    out = config.paths.augmented
    assert sorted(path.name for path in out.iterdir()) == ["meta.json", PIPELINE_FILE, "train.npz"]
    assert json.loads(config.paths.meta(out).read_text()) == meta
    assert meta["source"] == "cifar10" and meta["seed"] == 7 and meta["pipeline"] == PIPELINE_FILE
    assert meta["settings"]["hflip_p"] == 0.5 and meta["settings"]["vflip_p"] == 0.0
    assert meta["transforms"] == describe(PHOTOS)
    rebuilt = A.from_dict(json.loads((out / PIPELINE_FILE).read_text()))
    assert names(rebuilt) == ["HorizontalFlip", "Affine", "Affine", "RandomBrightnessContrast"]
    x_aug, _ = load_split(out, "train")  # sha256-verified against meta.json
    assert np.array_equal(x_aug, augment_images(*photos(), PHOTOS, seed=7, progress=False)[0])
    assert config.paths.augment_preview.is_file()
    assert [path.name for path in out.parent.iterdir() if path.name.startswith(".")] == []  # no temp leftovers


def test_stage_failure_leaves_no_partial_output(tmp_path, monkeypatch):
    config = _project(tmp_path, "cifar10")
    stages.augment(config)
    before = {path.name: path.read_bytes() for path in config.paths.augmented.iterdir()}

    def broken(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr("dlpipe.augment.pipeline_dict", broken)
    changed = SimpleNamespace(params=SimpleNamespace(augment=PARAMS, seed=8), paths=config.paths)
    with pytest.raises(RuntimeError, match="disk full"):
        stages.augment(changed)
    assert {path.name: path.read_bytes() for path in config.paths.augmented.iterdir()} == before
    assert [path.name for path in config.paths.augmented.parent.iterdir() if path.name.startswith(".")] == []


def test_stage_refuses_an_unknown_source_naming_the_meta_file(tmp_path):
    config = _project(tmp_path, "imagenet")
    with pytest.raises(DlpipeError, match=r"raw/meta\.json: source: unknown image source 'imagenet'"):
        stages.augment(config)
    assert not config.paths.augmented.exists() and not config.paths.augment_preview.exists()
