"""A deterministic object detector for the shapes world (``jaxt2i.shapes.world``).

Steps, for an image [H, W, 3] (uint8, or float in [0, 1]):

1. Every pixel is classified to the nearest palette color or the black background (RGB distance).
2. Foreground pixels (not background) form 8-connected components; components smaller than
   ``min_area`` (noise specks) are dropped.
3. A component's color is the palette color nearest to the median RGB of its interior (the
   component eroded by one pixel), which ignores blurred or off-color rims. A component in which a
   second color holds a large share of the interior (two touching objects) is split by color.
4. Shape comes from three invariants of the mask. The fill ratio (area / bounding-box area: square 1,
   circle pi/4, triangle 1/2) and the share of the area in the top half of the bounding box (1/2 for
   circle and square, ~1/4 for the upright triangle) tell the triangle from the other two: nearest
   prototype. Square or circle is then decided by the corner reach -- how far the mask extends along
   the two diagonals, relative to its bounding box: 1 when it reaches all four corners (square),
   1/sqrt(2) for a disc; the midpoint splits them. (The fill ratio alone reads a square with slightly
   concave sides, which the U-Net draws for small squares, as a circle: its fill is ~0.8, a disc's, but
   its corners still reach the bounding box.)
5. Size: ``large`` when the longer bounding-box side is at least ``SIZE_THRESHOLD`` (17 px at
   64x64; small objects span 10..14 px, large ones 20..24 px). Thresholds scale with image width.
6. ``relation(a, b)`` compares bounding-box centers along the dominant axis.

Generated images are tolerated: noise is averaged out by the median and dropped by ``min_area``,
slightly-off colors still go to the nearest palette entry, and blurred edges are cut at about
half intensity (where the nearest class flips to background).
"""

from __future__ import annotations

import dataclasses

import numpy as np
from scipy import ndimage

from jaxt2i.shapes import world as shapes

SIZE_THRESHOLD = 17.0  # px at 64x64: between small (<= 14) and large (>= 20)
MIN_AREA = 24  # px at 64x64; the smallest object (a 10 px triangle) covers 60
SPLIT_SHARE = 0.3  # a second color owning this share of a component's interior splits it

# (fill ratio, top-half share) of the ideal shapes: finds triangles
SHAPE_PROTOTYPES: dict[str, tuple[float, float]] = {
    "square": (1.0, 0.5),
    "circle": (np.pi / 4, 0.5),
    "triangle": (0.5, 0.25),
}
# corner reach of a square (1) and of a disc (1 / sqrt(2)); square above the midpoint
SQUARE_CORNER_REACH = (1.0 + 1.0 / np.sqrt(2.0)) / 2
_CLASS_NAMES: tuple[str, ...] = ("background",) + shapes.COLORS
_CLASS_RGB = np.array([shapes.BACKGROUND] + [shapes.PALETTE[c] for c in shapes.COLORS], np.float32) / 255.0
_EIGHT_CONNECTED = np.ones((3, 3), bool)


@dataclasses.dataclass(frozen=True)
class Detection:
    """One detected object. ``center`` is (x, y) of the bounding box; ``bbox`` is (y0, x0, y1, x1), end-exclusive."""

    color: str
    shape: str
    size: str
    center: tuple[float, float]
    bbox: tuple[int, int, int, int]
    area: int
    fill: float  # area / bounding-box area
    top_share: float  # share of the area in the top half of the bounding box
    corner_reach: float  # diagonal extent / bounding-box extent (see shape_features)
    color_error: float  # RGB distance (0..sqrt(3)) from the median color to its palette entry


def to_float_image(image: np.ndarray) -> np.ndarray:
    """[H, W, 3] uint8 or float -> float32 in [0, 1] (floats are clipped, not rescaled)."""
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"expected one RGB image [H, W, 3], got shape {image.shape}; pass images one at a time")
    if np.issubdtype(image.dtype, np.integer):
        return image.astype(np.float32) / 255.0
    return np.clip(image.astype(np.float32), 0.0, 1.0)


def classify_pixels(image: np.ndarray) -> np.ndarray:
    """Nearest class per pixel: [H, W] int, 0 = background, k = shapes.COLORS[k - 1]."""
    d2 = ((image[:, :, None, :] - _CLASS_RGB[None, None]) ** 2).sum(-1)  # [H, W, classes]
    return np.argmin(d2, axis=-1)


def nearest_color(rgb: np.ndarray) -> tuple[str, float]:
    """Nearest palette color (never background) to one RGB triple in [0, 1], and its distance."""
    d = np.sqrt(((_CLASS_RGB[1:] - rgb[None]) ** 2).sum(-1))
    k = int(np.argmin(d))
    return shapes.COLORS[k], float(d[k])


def _interior(mask: np.ndarray) -> np.ndarray:
    inner = ndimage.binary_erosion(mask, structure=_EIGHT_CONNECTED)
    return inner if inner.sum() >= 4 else mask


def _split_by_color(image: np.ndarray, classes: np.ndarray, mask: np.ndarray, min_area: float) -> list[np.ndarray]:
    """Masks of the objects in one component: itself, or its parts when several colors own large shares."""
    inner = _interior(mask)
    counts = np.bincount(classes[inner], minlength=len(_CLASS_NAMES))
    counts[0] = 0
    dominant = [k for k in np.argsort(-counts) if counts[k] >= max(SPLIT_SHARE * inner.sum(), min_area / 2)]
    if len(dominant) <= 1:
        return [mask]
    d2 = ((image[mask][:, None, :] - _CLASS_RGB[dominant][None]) ** 2).sum(-1)  # [pixels, dominant]
    owner = np.full(mask.shape, -1)
    owner[mask] = np.argmin(d2, axis=-1)
    parts = []
    for k in range(len(dominant)):
        labels, n = ndimage.label(owner == k, structure=_EIGHT_CONNECTED)
        parts += [labels == i for i in range(1, n + 1) if (labels == i).sum() >= min_area]
    return parts


def shape_features(mask: np.ndarray) -> tuple[tuple[int, int, int, int], float, float, float]:
    """bbox (y0, x0, y1, x1), fill ratio, share of the area in the top half of the bbox, and corner reach.

    Corner reach: the mask's extent along the two diagonals (x + y and x - y, each pixel a unit square),
    summed, over the same extents of its bounding box (2 (w + h)). It is 1 exactly when the mask reaches all
    four corners of its bounding box, and falls by how far each corner is cut off: 1/sqrt(2) for a disc, 3/4
    for an upright isosceles triangle (apex at the top middle, both bottom corners reached).
    """
    ys, xs = np.nonzero(mask)
    y0, y1, x0, x1 = int(ys.min()), int(ys.max()) + 1, int(xs.min()), int(xs.max()) + 1
    h, w = y1 - y0, x1 - x0
    area = len(ys)
    rows = np.bincount(ys - y0, minlength=h).astype(np.float64)  # [h]
    weight = np.clip(h / 2 - np.arange(h), 0.0, 1.0)  # 1 above the middle, 0.5 on an odd middle row
    diagonal_extent = sum(int(d.max() - d.min()) + 2 for d in (xs + ys, xs - ys))  # a pixel spans 2 along each
    return (y0, x0, y1, x1), area / (h * w), float((rows * weight).sum() / area), diagonal_extent / (2 * (h + w))


def classify_shape(fill: float, top_share: float, corner_reach: float) -> str:
    """Triangle when (fill, top-half share) is nearest the triangle's prototype; otherwise square when the corner
    reach is past the midpoint between a disc's and a square's, else circle."""
    nearest = min(
        SHAPE_PROTOTYPES,
        key=lambda s: (fill - SHAPE_PROTOTYPES[s][0]) ** 2 + (top_share - SHAPE_PROTOTYPES[s][1]) ** 2,
    )
    if nearest == "triangle":
        return "triangle"
    return "square" if corner_reach >= SQUARE_CORNER_REACH else "circle"


def _describe(image: np.ndarray, mask: np.ndarray, scale: float) -> Detection:
    bbox, fill, top_share, corner_reach = shape_features(mask)
    color, err = nearest_color(np.median(image[_interior(mask)], axis=0))
    y0, x0, y1, x1 = bbox
    return Detection(
        color=color,
        shape=classify_shape(fill, top_share, corner_reach),
        size="large" if max(y1 - y0, x1 - x0) >= SIZE_THRESHOLD * scale else "small",
        center=((x0 + x1) / 2, (y0 + y1) / 2),
        bbox=bbox,
        area=int(mask.sum()),
        fill=float(fill),
        top_share=top_share,
        corner_reach=float(corner_reach),
        color_error=err,
    )


def detect(image: np.ndarray, min_area: float | None = None) -> list[Detection]:
    """Objects in one image [H, W, 3] (uint8 or float in [0, 1]), largest first.

    ``min_area`` (pixels) defaults to ``MIN_AREA`` scaled by (W / 64)^2.
    """
    image = to_float_image(image)
    scale = image.shape[1] / shapes.IMAGE_SIZE
    min_area = MIN_AREA * scale**2 if min_area is None else min_area
    classes = classify_pixels(image)
    labels, n = ndimage.label(classes > 0, structure=_EIGHT_CONNECTED)
    areas = np.bincount(labels.ravel(), minlength=n + 1)
    found = []
    for i in range(1, n + 1):
        if areas[i] < min_area:
            continue
        for part in _split_by_color(image, classes, labels == i, min_area):
            found.append(_describe(image, part, scale))
    return sorted(found, key=lambda d: (-d.area, d.bbox))


def relation(a: Detection | shapes.Obj, b: Detection | shapes.Obj) -> str:
    """Where ``a`` is relative to ``b``: 'left of', 'right of', 'above' or 'below' (dominant axis)."""
    dx = b.center[0] - a.center[0]
    dy = b.center[1] - a.center[1]  # y grows downwards
    if abs(dx) >= abs(dy):
        return "left of" if dx > 0 else "right of"
    return "above" if dy > 0 else "below"
