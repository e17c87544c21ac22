"""A deterministic object detector for the shapes world (``jaxt2i.shapes.world``) that decides shapes by geometry.

Steps, for an image [H, W, 3] (uint8, or float in [0, 1]):

1. Every pixel is classified to the nearest palette color or the black background (RGB distance).
2. Foreground pixels (not background) form 8-connected components; components smaller than ``min_area`` (noise
   specks) are dropped, and holes smaller than ``min_area`` inside a component are filled.
3. A component's color is the palette color nearest to the median RGB of its interior (the component eroded by one
   pixel), which ignores blurred or off-color rims. A component in which a second color holds a large share of the
   interior (two touching objects) is split by color.
4. Shape: the component's mask is compared with ideal shapes drawn by the world's own geometry
   (``world.shape_inside``) -- a circle, and squares and triangles at every orientation in steps of
   ``ANGLE_STEP`` degrees -- each fitted (center and extent) to maximise the intersection over union (IoU) with the
   mask. The best fit names the shape when (a) it is a circle, or a square or triangle in the world's orientation
   (standing on an edge within +-ANGLE_STEP/2 degrees of horizontal: axis-aligned squares, triangles apex up), (b)
   its IoU is at least
   ``MATCH_IOU``, and (c) it beats the best fit of every other kind of shape by at least ``MARGIN``. Otherwise the
   shape is ``"unknown"``: a diamond (a square rotated 45 degrees) fits a rotated square best, an apex-down triangle
   a rotated triangle, a star or an ellipse nothing well, a shape halfway between a rounded diamond and a disc
   two kinds equally -- none of them is counted as a world shape.
5. Size: ``large`` when the longer bounding-box side is at least ``SIZE_THRESHOLD`` (17 px at 64x64; small objects
   span 10..14 px, large ones 20..24 px). Thresholds scale with image width.
6. ``relation(a, b)`` compares bounding-box centers along the dominant axis.

``MATCH_IOU`` and ``MARGIN`` come from renders with known answers only (``tests/test_detector.py``: the world's
shapes under blur, noise, small rotations, rounded corners and concave sides must pass; diamonds, rotated rounded
squares, stars, rotated triangles, ellipses and rectangles must not).
"""

from __future__ import annotations

import dataclasses

import numpy as np
from scipy import ndimage

from jaxt2i.shapes import world

SIZE_THRESHOLD = 17.0  # px at 64x64: between small (<= 14) and large (>= 20)
MIN_AREA = 24  # px at 64x64; the smallest object (a 10 px triangle) covers 60
SPLIT_SHARE = 0.3  # a second color owning this share of a component's interior splits it
UNKNOWN = "unknown"
ANGLE_STEP = 15  # degrees between the orientations fitted; the world's orientation is 0
MATCH_IOU = 0.85  # the best fit must cover the mask at least this well
MARGIN = 0.03  # ... and beat every other kind of shape by this much IoU
_FILL = {"circle": np.pi / 4, "square": 1.0, "triangle": 0.5}  # area / extent^2 of the world's shapes
_PERIOD = {"circle": ANGLE_STEP, "square": 90, "triangle": 360}  # rotational symmetry (degrees)
FAMILY: tuple[tuple[str, int], ...] = tuple(
    (shape, angle) for shape in world.SHAPES for angle in range(0, _PERIOD[shape], ANGLE_STEP))


def _bottom_edge_tilt(shape: str, angle: float) -> float:
    """Degrees (0..90) between the horizontal and the lowest edge of ``shape`` rotated by ``angle`` (0 for a
    circle): the edge whose midpoint lies lowest, with the shape's interior above it."""
    if shape == "circle":
        return 0.0
    corners = {"square": [(-1, -1), (1, -1), (1, 1), (-1, 1)], "triangle": [(0, -1), (1, 1), (-1, 1)]}[shape]
    t = np.deg2rad(angle)
    c, s = np.cos(t), np.sin(t)
    points = [(c * u - s * v, s * u + c * v) for u, v in corners]  # shape frame -> image offsets (y down)
    edges = list(zip(points, points[1:] + points[:1]))
    (x0, y0), (x1, y1) = max(edges, key=lambda e: e[0][1] + e[1][1])
    tilt = abs(np.degrees(np.arctan2(y1 - y0, x1 - x0))) % 180
    return float(min(tilt, 180 - tilt))


# the members drawn in the world's orientation: a circle, squares and triangles standing on a horizontal edge (within
# half an angle step). The world's triangle (base = height) is nearly equilateral: turned by 120 or 240 degrees it
# still stands on a near-horizontal edge, apex up, and counts as upright.
WORLD_ORIENTED: frozenset[tuple[str, int]] = frozenset(
    m for m in FAMILY if _bottom_edge_tilt(*m) <= ANGLE_STEP / 2)
_CLASS_NAMES: tuple[str, ...] = ("background",) + world.COLORS
_CLASS_RGB = np.array([world.BACKGROUND] + [world.PALETTE[c] for c in world.COLORS], np.float32) / 255.0
_EIGHT_CONNECTED = np.ones((3, 3), bool)
_PAD = 4  # px around a mask's bounding box in which ideal shapes are drawn


@dataclasses.dataclass(frozen=True)
class Fit:
    """An ideal shape fitted to a mask: ``angle`` in degrees (0 = the world's orientation), ``center`` (x, y) and
    ``extent`` in pixels, ``iou`` its intersection over union with the mask."""

    shape: str
    angle: int
    iou: float
    center: tuple[float, float]
    extent: float

    @property
    def in_world_orientation(self) -> bool:
        return (self.shape, self.angle) in WORLD_ORIENTED


@dataclasses.dataclass(frozen=True)
class Detection:
    """One detected object. ``center`` is (x, y) of the bounding box; ``bbox`` is (y0, x0, y1, x1), end-exclusive.

    ``shape`` is one of ``world.SHAPES`` or ``"unknown"``; ``fit`` is the best-fitting ideal shape (``shape@angle``)
    and ``iou`` its IoU with the object's mask."""

    color: str
    shape: str
    size: str
    center: tuple[float, float]
    bbox: tuple[int, int, int, int]
    area: int
    fit: str
    iou: float
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
    """Nearest class per pixel: [H, W] int, 0 = background, k = world.COLORS[k - 1]."""
    d2 = ((image[:, :, None, :] - _CLASS_RGB[None, None]) ** 2).sum(-1)  # [H, W, classes]
    return np.argmin(d2, axis=-1)


def nearest_color(rgb: np.ndarray) -> tuple[str, float]:
    """Nearest palette color (never background) to one RGB triple in [0, 1], and its distance."""
    d = np.sqrt(((_CLASS_RGB[1:] - rgb[None]) ** 2).sum(-1))
    k = int(np.argmin(d))
    return world.COLORS[k], float(d[k])


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


def fill_small_holes(mask: np.ndarray, max_hole: float) -> np.ndarray:
    """``mask`` [H, W] bool with its holes (background enclosed by it) smaller than ``max_hole`` pixels filled."""
    holes, n = ndimage.label(ndimage.binary_fill_holes(mask) & ~mask)
    if n == 0:
        return mask
    sizes = np.bincount(holes.ravel(), minlength=n + 1)
    small = sizes < max_hole
    small[0] = False
    return mask | small[holes]


def _search(crop: np.ndarray, gx: np.ndarray, gy: np.ndarray, shape: str, angle: int, cx: np.ndarray,
            cy: np.ndarray, extents: np.ndarray) -> tuple[float, float, float, float]:
    """Best (iou, cx, cy, extent) over the grid cx x cy x extents (1-D arrays) of ``shape`` rotated by ``angle``."""
    cxs, cys, es = (a.reshape(-1, 1, 1).astype(np.float32) for a in np.meshgrid(cx, cy, extents, indexing="ij"))
    t = np.deg2rad(angle)
    c, s = np.float32(np.cos(t)), np.float32(np.sin(t))
    dx, dy = gx[None] - cxs, gy[None] - cys
    u, v = (dx, dy) if angle == 0 else (c * dx + s * dy, c * dy - s * dx)
    ideal = world.shape_inside(shape, u, v, es / 2)  # [K, h, w]
    inter = np.count_nonzero(ideal & crop, axis=(1, 2))
    union = np.count_nonzero(ideal | crop, axis=(1, 2))
    k = int(np.argmax(inter / union))
    return float(inter[k] / union[k]), float(cxs.ravel()[k]), float(cys.ravel()[k]), float(es.ravel()[k])


_COARSE_OFFSETS, _COARSE_EXTENTS = np.arange(-1.0, 1.1, 1.0), np.arange(-2.0, 2.1, 1.0)  # px around the guess
_FINE_OFFSETS, _FINE_EXTENTS = np.arange(-0.5, 0.6, 0.25), np.arange(-0.5, 0.6, 0.25)  # px around the coarse best
_REFINED = 4  # members of the family refined after the coarse search (the best ones)


def fit_shapes(mask: np.ndarray) -> list[Fit]:
    """Every member of ``FAMILY`` fitted to ``mask`` [H, W] bool, best first: center and extent by a coarse grid
    search for maximum IoU around a guess from the mask's area and centroid, then a finer one for the best
    ``_REFINED`` members. Coordinates are pixels of ``mask``, (x, y) with y down."""
    ys, xs = np.nonzero(mask)
    if len(ys) == 0:
        raise ValueError("the mask is empty; fit_shapes needs at least one pixel")
    y0, x0 = ys.min() - _PAD, xs.min() - _PAD
    crop = np.zeros((ys.max() - y0 + 1 + _PAD, xs.max() - x0 + 1 + _PAD), bool)
    crop[ys - y0, xs - x0] = True
    gy, gx = (np.mgrid[0:crop.shape[0], 0:crop.shape[1]] + 0.5).astype(np.float32)
    mx, my = xs.mean() + 0.5 - x0, ys.mean() + 0.5 - y0
    coarse = []
    for shape, angle in FAMILY:
        e0 = np.sqrt(len(ys) / _FILL[shape])
        t = np.deg2rad(angle)
        lift = e0 / 6 if shape == "triangle" else 0.0  # a triangle's centroid lies e/6 below its box center
        cx, cy = mx + np.sin(t) * lift, my - np.cos(t) * lift
        coarse.append(((shape, angle), _search(crop, gx, gy, shape, angle, cx + _COARSE_OFFSETS,
                                               cy + _COARSE_OFFSETS, e0 + _COARSE_EXTENTS)))
    coarse.sort(key=lambda r: (-r[1][0], FAMILY.index(r[0])))
    fits = []
    for rank, ((shape, angle), (iou, cx, cy, e)) in enumerate(coarse):
        if rank < _REFINED:
            iou, cx, cy, e = _search(crop, gx, gy, shape, angle, cx + _FINE_OFFSETS, cy + _FINE_OFFSETS,
                                     e + _FINE_EXTENTS)
        fits.append(Fit(shape, angle, iou, (cx + x0, cy + y0), e))
    return sorted(fits, key=lambda f: (-f.iou, FAMILY.index((f.shape, f.angle))))


def decide_shape(fits: list[Fit]) -> str:
    """The world shape that ``fits`` (``fit_shapes``' output, best first) name, or ``"unknown"``: the best fit must
    be in the world's orientation, reach ``MATCH_IOU`` and beat every other kind of shape by ``MARGIN``."""
    best = fits[0]
    other = max((f.iou for f in fits if f.shape != best.shape), default=0.0)
    if best.in_world_orientation and best.iou >= MATCH_IOU and best.iou - other >= MARGIN:
        return best.shape
    return UNKNOWN


def _describe(image: np.ndarray, mask: np.ndarray, scale: float, min_area: float) -> Detection:
    ys, xs = np.nonzero(mask)
    y0, y1, x0, x1 = int(ys.min()), int(ys.max()) + 1, int(xs.min()), int(xs.max()) + 1
    color, err = nearest_color(np.median(image[_interior(mask)], axis=0))
    fits = fit_shapes(fill_small_holes(mask, min_area))
    return Detection(
        color=color,
        shape=decide_shape(fits),
        size="large" if max(y1 - y0, x1 - x0) >= SIZE_THRESHOLD * scale else "small",
        center=((x0 + x1) / 2, (y0 + y1) / 2),
        bbox=(y0, x0, y1, x1),
        area=len(ys),
        fit=f"{fits[0].shape}@{fits[0].angle}",
        iou=round(fits[0].iou, 4),
        color_error=err,
    )


def detect(image: np.ndarray, min_area: float | None = None) -> list[Detection]:
    """Objects in one image [H, W, 3] (uint8 or float in [0, 1]), largest first; every object found is listed,
    including those whose shape is ``"unknown"``.

    ``min_area`` (pixels) defaults to ``MIN_AREA`` scaled by (W / 64)^2.
    """
    image = to_float_image(image)
    scale = image.shape[1] / world.IMAGE_SIZE
    min_area = MIN_AREA * scale**2 if min_area is None else min_area
    classes = classify_pixels(image)
    labels, n = ndimage.label(classes > 0, structure=_EIGHT_CONNECTED)
    areas = np.bincount(labels.ravel(), minlength=n + 1)
    found = []
    for i in range(1, n + 1):
        if areas[i] < min_area:
            continue
        for part in _split_by_color(image, classes, labels == i, min_area):
            found.append(_describe(image, part, scale, min_area))
    return sorted(found, key=lambda d: (-d.area, d.bbox))


def relation(a: Detection | world.Obj, b: Detection | world.Obj) -> str:
    """Where ``a`` is relative to ``b``: 'left of', 'right of', 'above' or 'below' (dominant axis)."""
    dx = b.center[0] - a.center[0]
    dy = b.center[1] - a.center[1]  # y grows downwards
    if abs(dx) >= abs(dy):
        return "left of" if dx > 0 else "right of"
    return "above" if dy > 0 else "below"
