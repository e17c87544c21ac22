"""Image files in and out: reading inputs for img2img/inpainting, writing PNGs and grids with metadata."""

from __future__ import annotations

import math
import os
import uuid
from typing import Mapping

import numpy as np
from PIL import Image, PngImagePlugin, UnidentifiedImageError


class ImageError(ValueError):
    """An input image or mask cannot be used."""


def load_image(path: str | os.PathLike, size: tuple[int, int] | None = None) -> np.ndarray:
    """Reads an image file as RGB float32 ``[H, W, 3]`` in [0, 1], resized to ``size=(width, height)`` if given."""
    image = _open(path).convert("RGB")
    if size is not None and image.size != tuple(size):
        image = image.resize(tuple(size), Image.Resampling.LANCZOS)
    return np.asarray(image, np.float32) / 255.0


def load_mask(path: str | os.PathLike, size: tuple[int, int]) -> np.ndarray:
    """Reads an inpainting mask as float32 ``[H, W, 1]`` in {0, 1}: 1 (white) marks the region to repaint.

    The mask must already have the image's size ``(width, height)``; a mismatch is an error, not a silent resize.
    """
    image = _open(path).convert("L")
    if image.size != tuple(size):
        raise ImageError(f"{path}: mask is {image.size[0]}x{image.size[1]} but the image is {size[0]}x{size[1]}; "
                         "give a mask of the same size.")
    return (np.asarray(image, np.float32)[..., None] >= 128).astype(np.float32)


def _open(path: str | os.PathLike) -> Image.Image:
    try:
        image = Image.open(path)
        image.load()
        return image
    except FileNotFoundError:
        raise ImageError(f"{path}: no such image file.") from None
    except (UnidentifiedImageError, OSError) as e:
        raise ImageError(f"{path}: cannot read this image ({e}).") from None


def to_uint8(images: np.ndarray) -> np.ndarray:
    """float images in [0, 1] ``[..., H, W, 3]`` -> uint8 (rounded, clipped)."""
    return np.clip(np.round(np.asarray(images, np.float32) * 255.0), 0, 255).astype(np.uint8)


def make_grid(images: np.ndarray, columns: int | None = None) -> np.ndarray:
    """``[N, H, W, 3]`` -> one ``[rows*H, cols*W, 3]`` image, filled row by row (black where empty)."""
    n, h, w, c = images.shape
    columns = columns or math.ceil(math.sqrt(n))
    rows = math.ceil(n / columns)
    grid = np.zeros((rows * h, columns * w, c), images.dtype)
    for i, image in enumerate(images):
        r, col = divmod(i, columns)
        grid[r * h:(r + 1) * h, col * w:(col + 1) * w] = image
    return grid


def save_png(path: str | os.PathLike, images: np.ndarray, metadata: Mapping[str, str] | None = None,
             columns: int | None = None) -> str:
    """Writes float ``[N, H, W, 3]`` (or ``[H, W, 3]``) images in [0, 1] as one PNG (a grid when N > 1).

    ``metadata`` goes into PNG text chunks (generation parameters). The file appears complete or not at all (a
    failed write, e.g. a full disk, raises OSError naming ``path`` and leaves nothing). Returns the path written.
    """
    images = np.asarray(images)
    if images.ndim == 3:
        images = images[None]
    pixels = to_uint8(make_grid(images, columns) if len(images) > 1 else images[0])
    info = PngImagePlugin.PngInfo()
    for key, value in (metadata or {}).items():
        info.add_text(str(key), str(value))
    image_format = Image.registered_extensions().get(os.path.splitext(os.fspath(path))[1].lower())
    if image_format is None:
        raise ImageError(f"{path}: unknown image file extension; use .png.")
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    # Written next to the target and renamed when complete: a failed write (a full disk) leaves no partial file.
    # (open(..., "xb") rather than mkstemp: the file gets the usual permissions, not 0600.)
    tmp = os.path.join(directory, f".{os.path.basename(os.fspath(path))}.{uuid.uuid4().hex[:12]}.tmp")
    try:
        with open(tmp, "xb") as f:
            Image.fromarray(pixels).save(f, format=image_format, pnginfo=info)
        os.replace(tmp, path)
    except OSError as e:
        _remove(tmp)
        raise OSError(e.errno, f"cannot write {path}: {e.strerror or e}") from e
    except BaseException:
        _remove(tmp)
        raise
    return os.fspath(path)



def _remove(path: str) -> None:
    if os.path.exists(path):
        os.unlink(path)
