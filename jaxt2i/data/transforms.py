"""Image preprocessing for training: resize the shorter side, crop a square, optional flip.

Images go in as PIL images or uint8 arrays ``[H, W, 3]`` and come out as float32 ``[S, S, 3]`` in
[-1, 1] (what the VAE encoder takes). Random choices use a numpy Generator handed in by the caller,
so they are reproducible (see ``jaxt2i.data.order.example_rng``).
"""

from __future__ import annotations

import numpy as np
from PIL import Image

CROPS = ("center", "random")


def as_pil_rgb(image) -> Image.Image:
    """PIL image or uint8/float array ``[H, W]``, ``[H, W, 1|3|4]`` -> RGB PIL image."""
    if isinstance(image, Image.Image):
        return image if image.mode == "RGB" else image.convert("RGB")
    arr = np.asarray(image)
    if arr.dtype != np.uint8:
        if np.issubdtype(arr.dtype, np.floating) and arr.size and arr.max() <= 1.0:
            arr = np.round(arr * 255.0)
        arr = np.clip(arr, 0, 255).astype(np.uint8)
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim == 3 and arr.shape[-1] == 4:
        arr = arr[..., :3]
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[-1] != 3):
        raise ValueError(f"expected an image [H, W] or [H, W, 1|3|4], got an array of shape {arr.shape}")
    return Image.fromarray(arr).convert("RGB")


def resize_shorter(image: Image.Image, size: int) -> Image.Image:
    """Scales ``image`` so that its shorter side is ``size`` (bicubic, with antialiasing when shrinking)."""
    w, h = image.size
    if min(w, h) == size:
        return image
    scale = size / min(w, h)
    new_w, new_h = max(size, round(w * scale)), max(size, round(h * scale))
    return image.resize((new_w, new_h), Image.Resampling.BICUBIC)


def crop_offset(width: int, height: int, size: int, crop: str, rng: np.random.Generator | None) -> tuple[int, int]:
    """Top-left ``(left, top)`` of a ``size`` x ``size`` crop: centred, or uniform when ``crop="random"``."""
    if crop not in CROPS:
        raise ValueError(f"crop must be one of {CROPS}, got {crop!r}")
    if crop == "random":
        if rng is None:
            raise ValueError("crop='random' needs a numpy Generator")
        return int(rng.integers(0, width - size + 1)), int(rng.integers(0, height - size + 1))
    return (width - size) // 2, (height - size) // 2


def to_model_range(image: Image.Image) -> np.ndarray:
    """RGB PIL image -> float32 ``[H, W, 3]`` in [-1, 1]."""
    return np.asarray(image, dtype=np.float32) / 127.5 - 1.0


def preprocess(
    image,
    size: int,
    *,
    crop: str = "center",
    flip: bool = False,
    rng: np.random.Generator | None = None,
) -> np.ndarray:
    """Resize (shorter side -> ``size``), crop ``size`` x ``size``, maybe flip; -> float32 ``[size, size, 3]`` in [-1, 1].

    ``flip=True`` mirrors with probability 1/2. It is off by default because captions that say
    "left" and "right" would then be wrong half of the time.
    """
    img = resize_shorter(as_pil_rgb(image), size)
    left, top = crop_offset(img.size[0], img.size[1], size, crop, rng)
    img = img.crop((left, top, left + size, top + size))
    out = to_model_range(img)
    if flip:
        if rng is None:
            raise ValueError("flip=True needs a numpy Generator")
        if rng.random() < 0.5:
            out = out[:, ::-1]
    return np.ascontiguousarray(out)
