"""Renders with known answers for validating the detector: the world's shapes, distorted in controlled ways, and
shapes that are not the world's.

Every case draws one object of a palette color on black at 64x64 (anti-aliased: 8x8 samples per pixel, so sub-pixel
positions and rotations show as edge intensities) and states the verdicts the detector may give. ``validation_table``
runs the detector over every case and extent; ``python -m jaxt2i.shapes.distortions`` prints it.

    python -m jaxt2i.shapes.distortions [SEED]     # the table: case, extents, images, share of allowed verdicts
"""

from __future__ import annotations

import dataclasses
import sys
from typing import Callable

import numpy as np
from scipy import ndimage

from jaxt2i.shapes import detector, world

SUPERSAMPLE = 8
EXTENTS: tuple[int, ...] = tuple(range(10, 25))  # small 10..14 and large 20..24, and the sizes between
LARGE_EXTENTS: tuple[int, ...] = tuple(range(20, 25))
NOT_A_WORLD_SHAPE = frozenset({detector.UNKNOWN})
SMALL_SHARE = 0.8  # right verdicts expected, at least, below a case's resolved_from

Region = Callable[[np.ndarray, np.ndarray, float], np.ndarray]  # (dx, dy, half) -> inside (bool, broadcast)


def rotated(shape: str, degrees: float) -> Region:
    """The world's ``shape`` rotated by ``degrees`` about its center (the world's own geometry otherwise)."""
    t = np.deg2rad(degrees)
    c, s = np.cos(t), np.sin(t)
    return lambda dx, dy, half: world.shape_inside(shape, c * dx + s * dy, -s * dx + c * dy, half)


def rounded_square(radius: float, degrees: float = 0.0) -> Region:
    """A square whose corners are rounded with ``radius`` (a fraction of the side), rotated by ``degrees``."""
    t = np.deg2rad(degrees)
    c, s = np.cos(t), np.sin(t)

    def region(dx, dy, half):
        u, v = np.abs(c * dx + s * dy), np.abs(-s * dx + c * dy)
        r = radius * 2 * half
        qx, qy = np.maximum(u - (half - r), 0.0), np.maximum(v - (half - r), 0.0)
        return (u < half) & (v < half) & (qx * qx + qy * qy < r * r)

    return region


def concave_square(depth: float) -> Region:
    """An axis-aligned square whose four sides bow inwards by ``depth`` (a fraction of the side) at their middles
    (parabolic sides; the corners stay where the square's are)."""
    def region(dx, dy, half):
        u, v = np.abs(dx) / half, np.abs(dy) / half
        sag = 2 * depth
        return (u < 1 - sag * (1 - np.minimum(v, 1) ** 2)) & (v < 1 - sag * (1 - np.minimum(u, 1) ** 2))

    return region


def star(points: int, inner: float) -> Region:
    """A ``points``-pointed star, one point up, outer radius ``half`` and inner radius ``inner * half`` (straight
    edges from each point to the notches beside it)."""
    sector = np.pi / points
    px, py = 1.0, 0.0  # a point, in a frame whose x axis runs through it
    nx, ny = inner * np.cos(sector), inner * np.sin(sector)  # the next notch

    def region(dx, dy, half):
        phi = np.arctan2(dx, -dy) % (2 * sector)
        phi = np.minimum(phi, 2 * sector - phi)  # the angle from the nearest point, 0..sector
        ex, ey = nx - px, ny - py
        reach = (px * ey - py * ex) / (np.cos(phi) * ey - np.sin(phi) * ex)  # where the ray meets the edge
        return np.hypot(dx, dy) < reach * half

    return region


def ellipse(aspect: float) -> Region:
    """An axis-aligned ellipse ``aspect`` times as wide as it is high (its width is the extent)."""
    return lambda dx, dy, half: (dx / half) ** 2 + (dy * aspect / half) ** 2 < 1


def rectangle(aspect: float) -> Region:
    """An axis-aligned rectangle ``aspect`` times as wide as it is high (its width is the extent)."""
    return lambda dx, dy, half: (np.abs(dx) < half) & (np.abs(dy) * aspect < half)


def coverage(region: Region, center: tuple[float, float], extent: float, size: int = world.IMAGE_SIZE) -> np.ndarray:
    """The share [size, size] in [0, 1] of each pixel inside ``region`` of ``extent`` at ``center`` (x, y)."""
    n = size * SUPERSAMPLE
    ys, xs = (np.mgrid[0:n, 0:n].astype(np.float64) + 0.5) / SUPERSAMPLE
    inside = region(xs - center[0], ys - center[1], extent / 2).astype(np.float64)
    return inside.reshape(size, SUPERSAMPLE, size, SUPERSAMPLE).mean(axis=(1, 3))


def paint(cover: np.ndarray, color: str) -> np.ndarray:
    """An image [H, W, 3] float in [0, 1]: ``color`` with opacity ``cover`` [H, W] on the black background."""
    return cover[..., None] * (np.asarray(world.PALETTE[color], np.float64) / 255.0)


def blur(image: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian blur of ``sigma`` pixels, per channel."""
    return ndimage.gaussian_filter(image, (sigma, sigma, 0))


def noise(image: np.ndarray, std: float, rng: np.random.Generator) -> np.ndarray:
    """Independent Gaussian noise of ``std`` on every pixel and channel, clipped to [0, 1]."""
    return np.clip(image + rng.normal(0.0, std, image.shape), 0.0, 1.0)


@dataclasses.dataclass(frozen=True)
class Case:
    """A distortion: ``region(shape)`` draws it; ``allowed(shape)`` is the set of verdicts that are right;
    ``post`` (image, rng) -> image is applied after painting (blur, noise); ``extents`` the sizes it is drawn at.
    ``resolved_from``: the smallest extent from which every image is expected right; below it the distortion is
    at the limit of what 64x64 pixels show (e.g. a 5-degree turn of a 10 px square moves its corners < 1 px), and
    at least ``SMALL_SHARE`` of the images are."""

    name: str
    shapes: tuple[str, ...]
    region: Callable[[str], Region]
    allowed: Callable[[str], frozenset]
    post: Callable[[np.ndarray, np.random.Generator], np.ndarray] | None = None
    extents: tuple[int, ...] = EXTENTS
    resolved_from: int = EXTENTS[0]


def _itself(shape: str) -> frozenset:
    return frozenset({shape})


def _not_world(shape: str) -> frozenset:
    return NOT_A_WORLD_SHAPE


CASES: tuple[Case, ...] = (
    Case("world shape, anti-aliased, sub-pixel position", world.SHAPES, lambda s: rotated(s, 0), _itself),
    Case("blur sigma 0.5 px", world.SHAPES, lambda s: rotated(s, 0), _itself, lambda im, r: blur(im, 0.5)),
    Case("blur sigma 1.0 px", world.SHAPES, lambda s: rotated(s, 0), _itself, lambda im, r: blur(im, 1.0),
         resolved_from=11),
    Case("noise std 0.05", world.SHAPES, lambda s: rotated(s, 0), _itself, lambda im, r: noise(im, 0.05, r)),
    Case("noise std 0.1", world.SHAPES, lambda s: rotated(s, 0), _itself, lambda im, r: noise(im, 0.1, r)),
    Case("blur 1.0 px + noise 0.05", world.SHAPES, lambda s: rotated(s, 0), _itself,
         lambda im, r: noise(blur(im, 1.0), 0.05, r), resolved_from=12),
    Case("rotated 5 degrees", ("square", "triangle"), lambda s: rotated(s, 5), _itself, resolved_from=16),
    Case("rounded corners, radius 15% of the side", ("square",), lambda s: rounded_square(0.15), _itself,
         resolved_from=11),
    Case("concave sides, 5% of the side", ("square",), lambda s: concave_square(0.05), _itself),
    Case("diamond (square rotated 45 degrees)", ("square",), lambda s: rotated(s, 45), _not_world),
    Case("diamond, blur 1.0 px", ("square",), lambda s: rotated(s, 45), _not_world, lambda im, r: blur(im, 1.0)),
    Case("rounded square (radius 25%) rotated 45 degrees", ("square",), lambda s: rounded_square(0.25, 45),
         _not_world, resolved_from=11),
    Case("triangle rotated 90 degrees", ("triangle",), lambda s: rotated(s, 90), _not_world),
    Case("triangle rotated 180 degrees (apex down)", ("triangle",), lambda s: rotated(s, 180), _not_world),
    Case("ellipse 2:1", ("circle",), lambda s: ellipse(2.0), _not_world),
    Case("rectangle 2:1", ("square",), lambda s: rectangle(2.0), _not_world),
    Case("concave sides, 25% of the side", ("square",), lambda s: concave_square(0.25), _not_world,
         extents=LARGE_EXTENTS),
    Case("4-point star", ("square",), lambda s: star(4, 0.45), _not_world, extents=LARGE_EXTENTS),
    Case("5-point star", ("circle",), lambda s: star(5, 0.45), _not_world, extents=LARGE_EXTENTS),
)


def case_images(case: Case, extent: int, seed: int = 0) -> list[tuple[np.ndarray, str]]:
    """The images of one case at one extent: one per shape of the case and color (``len(world.COLORS)``), each at a
    random sub-pixel center, as (image [64, 64, 3] float in [0, 1], shape drawn)."""
    rng = np.random.default_rng([seed, extent, CASES.index(case) if case in CASES else 0])
    out = []
    for shape in case.shapes:
        for color in world.COLORS:
            lo, hi = extent / 2 + 4, world.IMAGE_SIZE - extent / 2 - 4
            center = (float(rng.uniform(lo, hi)), float(rng.uniform(lo, hi)))
            image = paint(coverage(case.region(shape), center, extent), color)
            if case.post is not None:
                image = case.post(image, rng)
            out.append((image, shape))
    return out


def verdicts(case: Case, extent: int, seed: int = 0) -> list[tuple[str, bool]]:
    """For each image of ``case_images``: the detector's verdict (its shape, ``"none"`` without exactly one object
    of the painted color) and whether it is allowed."""
    out = []
    for (image, shape), color in zip(case_images(case, extent, seed), world.COLORS * len(case.shapes)):
        found = detector.detect(image)
        verdict = found[0].shape if len(found) == 1 and found[0].color == color else "none"
        out.append((verdict, verdict in case.allowed(shape)))
    return out


def validation_table(seed: int = 0) -> list[dict]:
    """Every case of ``CASES`` over its extents: {"case", "extents", "n", "right", "verdicts": {verdict: count}}."""
    rows = []
    for case in CASES:
        counts: dict[str, int] = {}
        right = n = 0
        for extent in case.extents:
            for verdict, ok in verdicts(case, extent, seed):
                counts[verdict] = counts.get(verdict, 0) + 1
                right += ok
                n += 1
        rows.append({"case": case.name, "extents": f"{case.extents[0]}..{case.extents[-1]}", "n": n,
                     "right": right, "verdicts": counts})
    return rows


def markdown_table(rows: list[dict]) -> str:
    lines = ["| case | extents (px) | images | right | verdicts |", "|---|---|---|---|---|"]
    for r in rows:
        found = ", ".join(f"{k} {v}" for k, v in sorted(r["verdicts"].items(), key=lambda kv: (-kv[1], kv[0])))
        lines.append(f"| {r['case']} | {r['extents']} | {r['n']} | {100 * r['right'] / r['n']:.1f}% | {found} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(markdown_table(validation_table(int(sys.argv[1]) if len(sys.argv) > 1 else 0)), end="")
