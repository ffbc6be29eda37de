"""Albumentations pipeline built from params, applied offline to the training split, plus a preview grid.

The transforms follow the course notes on augmentation: rotation, shifting, rescaling and shearing (one
`Affine`), flipping, stretching (width and height scaled independently) and, for photos, brightness and
contrast. What suits one dataset spoils another: a mirrored 2 is not a 2, and MNIST digits are always white
ink on black, so by default digits are never flipped or relit, while photos are. A probability left at `null` in
params.yaml takes the image source's default from `SOURCE_DEFAULTS`; `resolve` fills those in, and the
augment stage records the result (meta.json) and the albumentations serialisation (pipeline.json).
"""

from __future__ import annotations

import os
import textwrap
from pathlib import Path

import numpy as np

from dlpipe.config import AugmentParams
from dlpipe.errors import DlpipeError

# albumentations checks PyPI for a newer version at import; that hangs without a network.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

# The probabilities that params.yaml may leave at null, per image source (`data.images.source`).
# Digits: no flip (a mirrored 2 is not a 2, an upside-down 6 is a 9), no stretch (MNIST normalises each
# digit into the same box) and no lighting change (white ink on a black ground in every image).
# Fashion-MNIST: a mirrored shirt is still a shirt and sizes vary, but clothes have an up, and the
# background is black in every image. Photos (CIFAR-10, a folder of pictures): mirrored, stretched and
# relit half the time; never upside down, since objects in photos have an up. A folder of scanned digits
# or of aerial photos overrides these in params.yaml.
_DIGITS = {"hflip_p": 0.0, "vflip_p": 0.0, "stretch_p": 0.0, "brightness_contrast_p": 0.0}
_PHOTOS = {"hflip_p": 0.5, "vflip_p": 0.0, "stretch_p": 0.5, "brightness_contrast_p": 0.5}
SOURCE_DEFAULTS: dict[str, dict[str, float]] = {
    "mnist_5k": _DIGITS,
    "digits": _DIGITS,
    "mnist": _DIGITS,
    "fashion_mnist": {"hflip_p": 0.5, "vflip_p": 0.0, "stretch_p": 0.5, "brightness_contrast_p": 0.0},
    "cifar10": _PHOTOS,
    "folder": _PHOTOS,
}
PER_SOURCE = tuple(_DIGITS)  # the keys of AugmentParams whose null means "the source's default"
PIPELINE_FILE = "pipeline.json"  # A.to_dict of the pipeline, beside the augmented data


def resolve(params: AugmentParams, source: str, where: str = "augment") -> AugmentParams:
    """`params` with every null probability replaced by `source`'s default; explicit values are kept."""
    if source not in SOURCE_DEFAULTS:
        raise DlpipeError(f"{where}: unknown image source {source!r}; expected one of {', '.join(SOURCE_DEFAULTS)}")
    defaults = SOURCE_DEFAULTS[source]
    return params.model_copy(update={key: defaults[key] for key in PER_SOURCE if getattr(params, key) is None})


def _active(params: AugmentParams) -> dict[str, bool]:
    """Which transforms change anything with these (resolved) params; the others are left out."""
    return {
        "affine": bool(params.rotate_deg or params.translate_frac or params.shear_deg)
        or (params.scale_min, params.scale_max) != (1.0, 1.0),
        "hflip": params.hflip_p > 0,
        "vflip": params.vflip_p > 0,
        "stretch": params.stretch_p > 0 and (params.stretch_x, params.stretch_y) != ([1.0, 1.0], [1.0, 1.0]),
        "brightness_contrast": params.brightness_contrast_p > 0
        and bool(params.brightness_limit or params.contrast_limit),
    }


def _require_resolved(params: AugmentParams) -> None:
    if unresolved := [key for key in PER_SOURCE if getattr(params, key) is None]:
        raise ValueError(f"augment params not resolved for a source: {', '.join(unresolved)} (call resolve first)")


def build_pipeline(params: AugmentParams, seed: int):
    """The albumentations pipeline of resolved `params` (see `resolve`); the same seed gives the same output.

    A copy is transformed with probability `p`; then the Affine (rotate, translate, scale, shear) always
    applies and every other transform with its own probability.
    """
    import albumentations as A

    _require_resolved(params)
    active = _active(params)
    constant_border = {"border_mode": 0, "fill": 0}  # cv2.BORDER_CONSTANT: uncovered pixels become background (0)
    transforms = []
    if active["hflip"]:
        transforms.append(A.HorizontalFlip(p=params.hflip_p))
    if active["vflip"]:
        transforms.append(A.VerticalFlip(p=params.vflip_p))
    if active["affine"]:
        transforms.append(
            A.Affine(
                rotate=(-params.rotate_deg, params.rotate_deg),
                translate_percent=(-params.translate_frac, params.translate_frac),
                scale=(params.scale_min, params.scale_max),
                shear=(-params.shear_deg, params.shear_deg),
                p=1.0,
                **constant_border,
            )
        )
    if active["stretch"]:
        transforms.append(
            A.Affine(
                scale={"x": tuple(params.stretch_x), "y": tuple(params.stretch_y)},
                keep_ratio=False,  # x and y drawn independently: that is the stretch
                p=params.stretch_p,
                **constant_border,
            )
        )
    if active["brightness_contrast"]:
        transforms.append(
            A.RandomBrightnessContrast(
                brightness_limit=params.brightness_limit,
                contrast_limit=params.contrast_limit,
                p=params.brightness_contrast_p,
            )
        )
    return A.Compose(transforms, p=params.p, seed=seed)


def describe(params: AugmentParams) -> list[str]:
    """The active transforms of resolved `params` with their ranges, one line each (for people)."""
    _require_resolved(params)
    active, lines = _active(params), []
    if active["hflip"]:
        lines.append(f"horizontal flip p={params.hflip_p:g}")
    if active["vflip"]:
        lines.append(f"vertical flip p={params.vflip_p:g}")
    if active["affine"]:
        lines.append(
            f"affine: rotate +-{params.rotate_deg:g} deg, translate +-{params.translate_frac:g}, "
            f"scale {params.scale_min:g}-{params.scale_max:g}, shear +-{params.shear_deg:g} deg"
        )
    if active["stretch"]:
        (x_min, x_max), (y_min, y_max) = params.stretch_x, params.stretch_y
        lines.append(f"stretch p={params.stretch_p:g}: x {x_min:g}-{x_max:g}, y {y_min:g}-{y_max:g}")
    if active["brightness_contrast"]:
        lines.append(
            f"brightness +-{params.brightness_limit:g}, contrast +-{params.contrast_limit:g} "
            f"p={params.brightness_contrast_p:g}"
        )
    return lines


def pipeline_dict(params: AugmentParams, seed: int) -> dict:
    """The albumentations serialisation (A.to_dict) of the pipeline; A.from_dict rebuilds it, and
    `set_random_seed(seed)` on the result reproduces the output (the seed is not part of the dict)."""
    import albumentations as A

    return A.to_dict(build_pipeline(params, seed))


def augment_images(
    x: np.ndarray, y: np.ndarray, params: AugmentParams, seed: int, progress: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """Return the originals followed by `copies` augmented versions of each image (uint8, N(1+copies)).

    `params` must be resolved for the image source (see `resolve`).
    """
    from tqdm.auto import tqdm

    if params.copies == 0:
        return x, y
    pipeline = build_pipeline(params, seed)
    hwc = x.transpose(0, 2, 3, 1)  # albumentations works on (H, W, C)
    out = [x]
    for _ in range(params.copies):
        batch = np.stack(
            # disable=None: a bar on a terminal only (not in CI or DVC logs); kept when done, so the next
            # line starts on its own.
            [pipeline(image=image)["image"] for image in tqdm(hwc, desc="augment", disable=None if progress else True)]
        )
        out.append(batch.reshape(hwc.shape).transpose(0, 3, 1, 2))
    return np.concatenate(out).astype(np.uint8), np.tile(y, params.copies + 1)


def save_preview(x: np.ndarray, y: np.ndarray, params: AugmentParams, seed: int, target: Path, source: str) -> None:
    """A two-row-per-sample grid, original images above their augmented versions, titled with the source
    and the active transforms of resolved `params`. With the same seed the augmented row shows exactly the
    first copies `augment_images` stores (a fresh pipeline, the same images in the same order)."""
    from dlpipe.plots import pyplot, save_figure

    plt = pyplot()
    count = min(params.preview_count, len(x))
    pipeline = build_pipeline(params, seed)
    columns = min(count, 8)
    rows = 2 * int(np.ceil(count / columns))
    lines = describe(params) or ["no transform active: the copies are unchanged duplicates"]
    copies = f"{params.copies} cop{'y' if params.copies == 1 else 'ies'} per image"
    subtitle = [f"source {source}: {copies}, each transformed with p={params.p:g}, then:"]
    subtitle += [wrapped for line in lines for wrapped in textwrap.wrap(line, width=14 * columns)]
    width = max(1.4 * columns, 4.5)  # wide enough for the title lines
    height = (width / columns + 0.3) * rows + 0.15 * (1 + len(subtitle))  # square cells, their titles, the title
    figure, axes = plt.subplots(rows, columns, figsize=(width, height), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for i in range(count):
        original = x[i].transpose(1, 2, 0)
        augmented = pipeline(image=original)["image"].reshape(original.shape)
        r, c = 2 * (i // columns), i % columns
        for row, image, title in ((r, original, f"y={y[i]}"), (r + 1, augmented, "augmented")):
            if image.shape[-1] == 1:  # fixed 0-255 scale, so that a brightness change shows
                axes[row][c].imshow(image[..., 0], cmap="gray", vmin=0, vmax=255)
            else:
                axes[row][c].imshow(image)
            axes[row][c].set_title(title, fontsize=7)
    figure.suptitle("Augmentation preview (originals above, augmented below)\n" + "\n".join(subtitle), fontsize=8)
    figure.tight_layout()  # leaves room for the suptitle too
    save_figure(figure, target, bbox_inches=None)
