"""Image files to pixels, and pixels to what an exported classifier takes: one code path for the folder
data source, evaluation and serving, so a served image reaches the graph exactly as a test image does.

numpy and Pillow only (no torch: serving imports this).
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np

from dlpipe.errors import DlpipeError

# Larger images are refused before they are decoded: a small file can claim (and decompress to) gigabytes.
MAX_IMAGE_PIXELS = 4096 * 4096
PIXEL_SCALE = np.float32(255.0)


class UnreadableImage(DlpipeError):
    """The bytes are not an image this project can use; the message says why, in a few words."""


def unit_float(pixels: np.ndarray) -> np.ndarray:
    """uint8 pixels -> float32 in [0, 1]: the input contract of every exported classifier (the graph
    standardises)."""
    return pixels.astype(np.float32) / PIXEL_SCALE


def open_image(source: bytes | Path, max_pixels: int = MAX_IMAGE_PIXELS, formats: tuple[str, ...] | None = None):
    """A fully decoded PIL image from a file or bytes, refused with `UnreadableImage` when it is empty,
    truncated, not an image (of `formats`, e.g. ("PNG", "JPEG"), when given), or over `max_pixels` by its
    header (checked before any pixel is decoded)."""
    from PIL import Image, UnidentifiedImageError

    if isinstance(source, bytes | bytearray) and not source:
        raise UnreadableImage("empty file")
    stream = io.BytesIO(source) if isinstance(source, bytes | bytearray) else source
    try:
        with warnings.catch_warnings():
            # Pillow only warns between its limit and twice it; here any image over `max_pixels` is refused.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(stream, formats=formats) as image:
                if image.width * image.height > max_pixels:
                    raise UnreadableImage(f"{image.width}x{image.height} pixels, over {max_pixels}")
                image.load()  # a truncated file fails here, not later
                return image.copy()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise UnreadableImage(f"over {max_pixels} pixels (refused before decoding)") from None
    except UnidentifiedImageError:
        what = f"{' or '.join(formats)} image" if formats else "image (UnidentifiedImageError)"
        raise UnreadableImage(f"not a readable {what}") from None
    except (OSError, ValueError, SyntaxError) as exc:  # truncated data, bad chunk CRCs, a broken header
        raise UnreadableImage(f"not a readable image ({' '.join(str(exc).split()) or type(exc).__name__})") from None


def image_layout(pixels: np.ndarray) -> np.ndarray:
    """(C, H, W) pixels as an image file holds them: (H, W) grayscale or (H, W, C); `image_pixels`' inverse."""
    return pixels[0] if pixels.shape[0] == 1 else pixels.transpose(1, 2, 0)


def image_pixels(image, channels: int) -> np.ndarray:
    """uint8 (C, H, W) pixels of a PIL image in `channels` (1: grayscale "L", 3: "RGB"), converted as the
    folder source converts them."""
    if channels not in (1, 3):
        raise DlpipeError(f"images have 1 or 3 channels, not {channels}")
    pixels = np.asarray(image.convert("L" if channels == 1 else "RGB"), dtype=np.uint8)
    return pixels[None] if channels == 1 else pixels.transpose(2, 0, 1)


def to_uint8(pixels: np.ndarray) -> np.ndarray:
    """float pixels in [0, 1] (a generator's output) -> uint8, rounded, values outside clipped."""
    return np.clip(np.rint(np.asarray(pixels, dtype=np.float32) * PIXEL_SCALE), 0, 255).astype(np.uint8)


def image_grid(pixels: np.ndarray, columns: int = 8, gap: int = 2) -> np.ndarray:
    """uint8 images (N, C, H, W) tiled row by row into one uint8 image (H', W') or (H', W', C), with a
    `gap`-pixel white border between them."""
    count, channels, height, width = pixels.shape
    rows = -(-count // columns)
    grid = np.full((channels, rows * (height + gap) + gap, columns * (width + gap) + gap), 255, dtype=np.uint8)
    for index in range(count):
        top, left = gap + (index // columns) * (height + gap), gap + (index % columns) * (width + gap)
        grid[:, top : top + height, left : left + width] = pixels[index]
    return image_layout(grid)


def png_bytes(image: np.ndarray) -> bytes:
    """A uint8 (H, W) or (H, W, C) image as PNG bytes (lossless)."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()
