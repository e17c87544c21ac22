"""The shapes-world detector: exact on rendered scenes, robust to noise, blur and off colors."""

import numpy as np
import pytest
from scipy import ndimage

from jaxt2i.shapes import world as S
from jaxt2i.shapes import detector as D


def _scenes(split, n, seed=21):
    return [S.scene(seed, i, split) for i in range(n)]


def _agrees(sc, dets, check_size=True):
    """Detections equal the scene: same count, colors, shapes, sizes and relation."""
    if len(dets) != len(sc.objects):
        return False
    matched = []
    for o in sc.objects:
        m = [d for d in dets if (d.color, d.shape) == (o.color, o.shape)]
        if len(m) != 1 or (check_size and m[0].size != o.size):
            return False
        matched.append(m[0])
    return sc.relation is None or D.relation(*matched) == sc.relation


@pytest.mark.parametrize("split", S.SPLITS)
def test_exact_on_rendered_scenes(split):
    for sc in _scenes(split, 300):
        dets = D.detect(S.render(sc))
        assert _agrees(sc, dets), (sc, dets)
        for o in sc.objects:
            d = next(d for d in dets if (d.color, d.shape) == (o.color, o.shape))
            assert d.center == o.center and d.area == S.object_mask(o).sum() and d.color_error == 0.0


def test_uint8_and_float_inputs_agree():
    sc = S.scene(0, 3, "train", n_objects=2)
    image = S.render(sc)
    assert D.detect(image) == D.detect(image.astype(np.float32) / 255.0)
    with pytest.raises(ValueError, match="one RGB image"):
        D.detect(image[None])


@pytest.mark.parametrize("sigma", [0.05, 0.1])
def test_robust_to_gaussian_noise(sigma):
    rng = np.random.default_rng(0)
    scenes = _scenes("train", 150) + _scenes("heldout", 50)
    for sc in scenes:
        image = S.render(sc) / 255.0 + rng.normal(0.0, sigma, (64, 64, 3))
        dets = D.detect(image)
        assert _agrees(sc, dets), (sigma, sc, dets)


def test_robust_to_blur_dimming_and_color_shift():
    rng = np.random.default_rng(1)
    for sc in _scenes("train", 150, seed=5):
        image = S.render(sc) / 255.0
        blurred = ndimage.gaussian_filter(image, (0.8, 0.8, 0)) + rng.normal(0.0, 0.03, image.shape)
        dimmed = 0.75 * image + 0.08 + rng.uniform(-0.08, 0.08, 3)  # washed out, grey background, tinted
        for variant in (blurred, dimmed):
            dets = D.detect(variant)
            assert _agrees(sc, dets), (sc, dets)


def test_background_and_noise_alone_give_nothing():
    assert D.detect(np.zeros((64, 64, 3), np.uint8)) == []
    noise = np.random.default_rng(2).normal(0.0, 0.1, (64, 64, 3))
    assert D.detect(noise) == []
    specks = np.zeros((64, 64, 3))
    specks[10:13, 10:13] = 1.0  # 9 px, below MIN_AREA
    assert D.detect(specks) == []


def test_touching_objects_of_different_colors_are_split():
    a = S.Obj("red", "square", "large", (20.0, 32.0), 20)
    b = S.Obj("blue", "square", "large", (40.0, 32.0), 20)  # shares an edge with a
    image = S.render(S.Scene((a, b), "left of"))
    dets = D.detect(image)
    assert sorted((d.color, d.shape, d.size) for d in dets) == [("blue", "square", "large"), ("red", "square", "large")]
    red = next(d for d in dets if d.color == "red")
    blue = next(d for d in dets if d.color == "blue")
    assert D.relation(red, blue) == "left of" and D.relation(blue, red) == "right of"


def test_relation_uses_the_dominant_axis():
    def at(x, y):
        return S.Obj("red", "circle", "small", (x, y), 10)

    assert D.relation(at(10, 30), at(40, 40)) == "left of"
    assert D.relation(at(40, 40), at(10, 30)) == "right of"
    assert D.relation(at(30, 10), at(38, 50)) == "above"
    assert D.relation(at(30, 50), at(22, 10)) == "below"


def test_shape_rules_separate_the_ideal_features():
    assert D.classify_shape(1.0, 0.5, 1.0) == "square"
    assert D.classify_shape(np.pi / 4, 0.5, 1 / np.sqrt(2)) == "circle"
    assert D.classify_shape(0.55, 0.3, 0.78) == "triangle"
    assert D.classify_shape(0.93, 0.5, 0.9) == "square"  # a square with rounded-off corners
    assert D.classify_shape(0.8, 0.5, 0.95) == "square"  # a square with concave sides: a disc's fill
    assert D.classify_shape(0.85, 0.52, 0.8) == "circle"
    assert D.classify_shape(0.62, 0.35, 0.8) == "triangle"


def _disc(n, r):
    yy, xx = np.mgrid[:n, :n] + 0.5
    return (yy - n / 2) ** 2 + (xx - n / 2) ** 2 <= r**2


@pytest.mark.parametrize("side", [10, 14, 24])
def test_corner_reach_of_ideal_masks(side):
    square = np.zeros((40, 40), bool)
    square[5:5 + side, 7:7 + side] = True
    assert D.shape_features(square)[3] == 1.0
    assert D.shape_features(square)[1] == 1.0
    disc = _disc(200, 80)  # large enough for the pixel grid to matter little
    assert D.shape_features(disc)[3] == pytest.approx(1 / np.sqrt(2), abs=0.01)
    yy, xx = np.mgrid[:200, :200] + 0.5
    triangle = (yy >= 20) & (yy <= 180) & (np.abs(xx - 100) <= (yy - 20) / 2)  # apex (100, 20), base y = 180
    assert D.shape_features(triangle)[3] == pytest.approx(0.75, abs=0.01)


def test_square_with_concave_sides_is_a_square():
    """What the U-Net draws for small squares: corners reach the bounding box, the sides bow in (fill ~0.8, as a
    circle's). The fill ratio would call it a circle; the corners say square. A disc of the same size stays one."""
    n = 14
    yy, xx = (np.mgrid[:n, :n] + 0.5 - n / 2) / (n / 2)  # [-1, 1]
    bow = 0.15  # each side's middle is pushed in by 15% of the half-side (~1 px); the corners stay
    pinched = (np.abs(xx) <= 1 - bow * (1 - yy**2)) & (np.abs(yy) <= 1 - bow * (1 - xx**2))
    pinched = np.pad(pinched, 3)
    _, fill, _, reach = D.shape_features(pinched)
    assert fill < 0.8 and reach == 1.0  # the fill ratio is a circle's (pi / 4 ~ 0.785)
    image = np.zeros(pinched.shape + (3,), np.uint8)
    image[pinched] = S.PALETTE["blue"]
    (det,) = D.detect(image)
    assert (det.color, det.shape) == ("blue", "square")
    image[:] = 0
    image[np.pad(_disc(n, n / 2), 3)] = S.PALETTE["blue"]
    assert D.detect(image)[0].shape == "circle"


def test_scales_to_larger_images():
    sc = S.scene(9, 0, "train", n_objects=2)
    big = np.kron(S.render(sc), np.ones((2, 2, 1), np.uint8))  # 128x128, every pixel doubled
    assert _agrees(sc, D.detect(big))
