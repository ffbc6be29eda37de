"""Albumentations pipeline built from params, applied offline to the training split, plus a preview grid.

The geometric transforms follow the course notes on augmentation (rotation, shifting, rescaling,
shearing); flips are left out on purpose because they change the meaning of digits (a flipped 2 is not a 2).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from dlpipe.config import AugmentParams

# albumentations checks PyPI for a newer version at import; that hangs without a network.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")


def build_pipeline(params: AugmentParams, seed: int):
    import albumentations as A

    return A.Compose(
        [
            A.Affine(
                rotate=(-params.rotate_deg, params.rotate_deg),
                translate_percent=(-params.translate_frac, params.translate_frac),
                scale=(params.scale_min, params.scale_max),
                shear=(-params.shear_deg, params.shear_deg),
                border_mode=0,  # cv2.BORDER_CONSTANT: fill uncovered pixels with background (0)
                fill=0,
                p=params.p,
            )
        ],
        seed=seed,
    )


def augment_images(
    x: np.ndarray, y: np.ndarray, params: AugmentParams, seed: int, progress: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """Return the originals followed by `copies` augmented versions of each image (uint8, N(1+copies))."""
    from tqdm.auto import tqdm

    if params.copies == 0:
        return x, y
    pipeline = build_pipeline(params, seed)
    hwc = x.transpose(0, 2, 3, 1)  # albumentations works on (H, W, C)
    out = [x]
    for _ in range(params.copies):
        batch = np.stack(
            [pipeline(image=image)["image"] for image in tqdm(hwc, desc="augment", disable=not progress, leave=False)]
        )
        out.append(batch.reshape(hwc.shape).transpose(0, 3, 1, 2))
    return np.concatenate(out).astype(np.uint8), np.tile(y, params.copies + 1)


def save_preview(x: np.ndarray, y: np.ndarray, params: AugmentParams, seed: int, target: Path) -> None:
    """A two-row-per-sample grid: original images above their augmented versions."""
    from dlpipe.plots import pyplot, save_figure

    plt = pyplot()
    count = min(params.preview_count, len(x))
    pipeline = build_pipeline(params, seed)
    columns = min(count, 8)
    rows = 2 * int(np.ceil(count / columns))
    figure, axes = plt.subplots(rows, columns, figsize=(1.4 * columns, 1.5 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for i in range(count):
        original = x[i].transpose(1, 2, 0)
        augmented = pipeline(image=original)["image"]
        r, c = 2 * (i // columns), i % columns
        for row, image, title in ((r, original, f"y={y[i]}"), (r + 1, augmented, "augmented")):
            axes[row][c].imshow(image.squeeze(), cmap="gray" if image.shape[-1] == 1 or image.ndim == 2 else None)
            axes[row][c].set_title(title, fontsize=7)
    figure.suptitle("Augmentation preview (originals above, augmented below)", fontsize=9)
    figure.tight_layout()
    save_figure(figure, target, bbox_inches=None)
