"""The albumentations pipeline built from params."""

from __future__ import annotations

import numpy as np

from dlpipe.augment import augment_images, build_pipeline, save_preview
from dlpipe.config import AugmentParams

PARAMS = AugmentParams(
    copies=2, p=1.0, rotate_deg=15, translate_frac=0.1, scale_min=0.9, scale_max=1.1, shear_deg=10, preview_count=4
)


def digits(n: int = 6) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    return (bunch.images[:n] * 15).astype(np.uint8)[:, None], bunch.target[:n]


def test_pipeline_reflects_params():
    pipeline = build_pipeline(PARAMS, seed=0)
    affine = pipeline.transforms[0]
    assert type(affine).__name__ == "Affine"
    assert affine.p == 1.0
    assert tuple(affine.rotate) == (-15, 15)


def test_copies_are_added_after_originals_and_differ():
    x, y = digits()
    x_aug, y_aug = augment_images(x, y, PARAMS, seed=0, progress=False)
    assert x_aug.shape == (18, 1, 8, 8) and x_aug.dtype == np.uint8
    assert np.array_equal(x_aug[:6], x) and np.array_equal(y_aug, np.tile(y, 3))
    assert not np.array_equal(x_aug[6:12], x)  # p=1: every copy transformed


def test_same_seed_same_augmentation():
    x, y = digits()
    first, _ = augment_images(x, y, PARAMS, seed=3, progress=False)
    second, _ = augment_images(x, y, PARAMS, seed=3, progress=False)
    assert np.array_equal(first, second)


def test_zero_copies_is_identity():
    x, y = digits()
    x_aug, y_aug = augment_images(x, y, PARAMS.model_copy(update={"copies": 0}), seed=0, progress=False)
    assert x_aug is x and y_aug is y


def test_preview_is_a_png(tmp_path):
    x, y = digits()
    save_preview(x, y, PARAMS, seed=0, target=tmp_path / "preview.png")
    assert (tmp_path / "preview.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
