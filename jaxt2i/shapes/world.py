"""The "shapes world": a deterministic, synthetic captioned image set for training and checking
prompt adherence of small text-to-image models.

World
-----
* Canvas: 64x64 RGB, black background, one or two objects, NHWC. ``render`` returns uint8;
  ``batch`` returns float32 in [0, 1].
* Shapes: circle, square, triangle (upright: apex at the top, base width = height).
* Colors (saturated, pairwise >= 128 apart in 0..255 RGB): red, green, blue, yellow, purple,
  orange, white -- see ``PALETTE``.
* Sizes: small (extent 10..14 px), large (extent 20..24 px). The extent is the side of the
  object's bounding box (circle diameter, square side, triangle base = height).
* Two-object scenes carry a relation ``objects[0] <relation> objects[1]`` with relation in
  "left of", "right of", "above", "below". Objects are kept >= 3 px apart along the relation
  axis (4 px before pixel alignment), at least 2 px inside the canvas, and the offset of their
  centers along the other axis is at most half their separation along the relation axis (+1 px),
  so the relation is never ambiguous. Positions and extents are jittered; bounding boxes are
  pixel-aligned (``center - extent / 2`` is an integer).
* Coordinates: ``center = (x, y)`` in pixels, x to the right, y downwards, pixel (row i, col j)
  covering [j, j+1) x [i, i+1) and sampled at its centre (j + 0.5, i + 0.5).

A scene (``Scene`` of ``Obj``) is drawn first; the image (``render``) and the caption
(``caption``) are both produced from it. Every example is a pure function of
``(seed, index, split)``: ``scene(seed, i, split)``, ``render(...)`` and
``example_caption(seed, i, split)`` regenerate example i alone, with no state.

Captions come from several templates and paraphrases, e.g. "a red circle", "a large blue
square", "a red circle to the left of a blue square", "a blue square on the right of a red
circle" (the same scene stated from the other object), "a green triangle above a yellow
circle", "a small white triangle below a large orange square". A size word, when present, is
always the object's size; no caption mentions anything the scene does not contain.
``parse_caption`` reads any caption back.

Split
-----
``split="train"`` never contains a held-out combination; ``split="heldout"`` contains only
scenes with at least one (``heldout_reasons`` names them):

* ``HELDOUT_COLOR_SHAPES`` -- 3 of the 21 color-shape pairs (blue triangle, yellow square,
  purple circle), held out everywhere: neither alone nor inside a two-object scene in train.
* ``HELDOUT_LAYOUTS`` -- spatial shape arrangements, independent of how a caption phrases
  them: "a circle left of a triangle" (= "a triangle right of a circle") and "a square above a
  circle" (= "a circle below a square"). Stored in canonical form (left, "left of", right) /
  (top, "above", bottom).
* ``HELDOUT_COLOR_PAIRS`` -- two-object scenes whose two colors are {green, purple}, in either
  order and any arrangement.

Every color, shape, size and relation still appears in train; only the combinations are new.
``eval_prompts`` yields prompts with their target scenes per prompt type ("one_object",
"two_object") and split, for scoring with ``jaxt2i.shapes.adherence``.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Iterator, Sequence

import numpy as np

IMAGE_SIZE = 64
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
COLORS: tuple[str, ...] = ("red", "green", "blue", "yellow", "purple", "orange", "white")
SIZES: tuple[str, ...] = ("small", "large")
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
PROMPT_TYPES: tuple[str, ...] = ("one_object", "two_object")
SPLITS: tuple[str, ...] = ("train", "heldout")

PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (255, 0, 0),
    "green": (0, 255, 0),
    "blue": (0, 0, 255),
    "yellow": (255, 255, 0),
    "purple": (128, 0, 255),
    "orange": (255, 128, 0),
    "white": (255, 255, 255),
}
BACKGROUND: tuple[int, int, int] = (0, 0, 0)

EXTENT_RANGE: dict[str, tuple[int, int]] = {"small": (10, 14), "large": (20, 24)}  # inclusive
BORDER_MARGIN = 2  # px between any object and the canvas edge
MIN_GAP = 4  # px between the two objects along the relation axis
TWO_OBJECT_PROBABILITY = 0.5

INVERSE_RELATION: dict[str, str] = {
    "left of": "right of",
    "right of": "left of",
    "above": "below",
    "below": "above",
}

HELDOUT_COLOR_SHAPES: frozenset[tuple[str, str]] = frozenset(
    {("blue", "triangle"), ("yellow", "square"), ("purple", "circle")}
)
HELDOUT_LAYOUTS: frozenset[tuple[str, str, str]] = frozenset(
    {("circle", "left of", "triangle"), ("square", "above", "circle")}
)
HELDOUT_COLOR_PAIRS: frozenset[frozenset[str]] = frozenset({frozenset({"green", "purple"})})

_SPLIT_IDS = {"train": 0, "heldout": 1}
_STREAM_SCENE, _STREAM_CAPTION = 0, 1
_MAX_ATTRIBUTE_DRAWS = 10_000


@dataclasses.dataclass(frozen=True)
class Obj:
    """One object: ``center`` is (x, y) in pixels (y down); ``extent`` is its bounding-box side."""

    color: str
    shape: str
    size: str
    center: tuple[float, float]
    extent: int


@dataclasses.dataclass(frozen=True)
class Scene:
    """One or two objects; for two, ``relation`` reads ``objects[0] <relation> objects[1]``."""

    objects: tuple[Obj, ...]
    relation: str | None = None

    @property
    def prompt_type(self) -> str:
        return PROMPT_TYPES[len(self.objects) - 1]


@dataclasses.dataclass(frozen=True)
class EvalPrompt:
    """An evaluation prompt with the scene it asks for (the target of adherence scoring)."""

    prompt: str
    target: Scene
    prompt_type: str
    split: str


# ----------------------------------------------------------------------------- split


def canonical_layout(scene: Scene) -> tuple[str, str, str] | None:
    """(left shape, "left of", right shape) or (top shape, "above", bottom shape); None for one object."""
    if len(scene.objects) < 2:
        return None
    a, b = scene.objects
    if scene.relation in ("left of", "above"):
        return (a.shape, scene.relation, b.shape)
    return (b.shape, INVERSE_RELATION[scene.relation], a.shape)


def heldout_reasons(scene: Scene) -> list[str]:
    """Names of the held-out combinations a scene contains (empty for a train scene)."""
    reasons = [
        f"color-shape {o.color} {o.shape}"
        for o in scene.objects
        if (o.color, o.shape) in HELDOUT_COLOR_SHAPES
    ]
    if len(scene.objects) == 2:
        layout = canonical_layout(scene)
        if layout in HELDOUT_LAYOUTS:
            reasons.append(f"layout {layout[0]} {layout[1]} {layout[2]}")
        colors = frozenset(o.color for o in scene.objects)
        if colors in HELDOUT_COLOR_PAIRS:
            reasons.append("color pair " + "+".join(sorted(colors)))
    return reasons


def is_heldout(scene: Scene) -> bool:
    return bool(heldout_reasons(scene))


def heldout_combos() -> dict[str, list]:
    """The held-out combinations, as plain lists (for reports and configs)."""
    return {
        "color_shapes": sorted(HELDOUT_COLOR_SHAPES),
        "layouts": sorted(HELDOUT_LAYOUTS),
        "color_pairs": sorted(tuple(sorted(p)) for p in HELDOUT_COLOR_PAIRS),
    }


# ----------------------------------------------------------------------------- scenes


def _rng(seed: int, index: int, split: str, stream: int) -> np.random.Generator:
    if split not in _SPLIT_IDS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if seed < 0 or index < 0:
        raise ValueError(f"seed and index must be non-negative integers, got seed={seed}, index={index}")
    return np.random.default_rng(np.random.SeedSequence([int(seed), _SPLIT_IDS[split], int(index), stream]))


def _choice(rng: np.random.Generator, options: Sequence):
    return options[int(rng.integers(len(options)))]


def _draw_attributes(rng: np.random.Generator, n_objects: int) -> tuple[list[tuple[str, str, str]], str | None]:
    objects = []
    while len(objects) < n_objects:
        attrs = (_choice(rng, COLORS), _choice(rng, SHAPES), _choice(rng, SIZES))
        if any(attrs[:2] == o[:2] for o in objects):
            continue  # two objects never share color and shape, so a prompt names each uniquely
        objects.append(attrs)
    relation = _choice(rng, RELATIONS) if n_objects == 2 else None
    return objects, relation


def _placeholder_scene(objects: list[tuple[str, str, str]], relation: str | None) -> Scene:
    return Scene(tuple(Obj(c, s, z, (0.0, 0.0), 0) for c, s, z in objects), relation)


def _draw_extent(rng: np.random.Generator, size: str) -> int:
    lo, hi = EXTENT_RANGE[size]
    return int(rng.integers(lo, hi + 1))


def _center_range(extent: int) -> tuple[float, float]:
    half = extent / 2 + BORDER_MARGIN
    return half, IMAGE_SIZE - half


def _place_pair(
    rng: np.random.Generator, e_first: int, e_second: int
) -> tuple[tuple[float, float], tuple[float, float]]:
    """(main, off) coordinates of two objects, the first before the second along the main axis."""
    lo1, hi1 = _center_range(e_first)
    lo2, hi2 = _center_range(e_second)
    min_sep = (e_first + e_second) / 2 + MIN_GAP
    max_sep = hi2 - lo1
    sep = rng.uniform(min_sep, max_sep)
    main1 = rng.uniform(max(lo1, lo2 - sep), min(hi1, hi2 - sep))
    main2 = main1 + sep
    while True:  # the off-axis offset stays within half the separation: the relation is clear
        off1 = rng.uniform(lo1, hi1)
        off2 = off1 + rng.uniform(-sep / 2, sep / 2)
        if lo2 <= off2 <= hi2:
            return (main1, off1), (main2, off2)


def _layout(rng: np.random.Generator, objects: list[tuple[str, str, str]], relation: str | None) -> Scene:
    extents = [_draw_extent(rng, size) for _, _, size in objects]
    if relation is None:
        lo, hi = _center_range(extents[0])
        centers = [(rng.uniform(lo, hi), rng.uniform(lo, hi))]
    else:
        first_is_0 = relation in ("left of", "above")
        order = (0, 1) if first_is_0 else (1, 0)
        (m_a, o_a), (m_b, o_b) = _place_pair(rng, extents[order[0]], extents[order[1]])
        horizontal = relation in ("left of", "right of")
        placed = [(m_a, o_a), (m_b, o_b)] if horizontal else [(o_a, m_a), (o_b, m_b)]
        centers = [None, None]
        centers[order[0]], centers[order[1]] = placed
    return Scene(
        tuple(
            Obj(c, s, z, (_pixel_aligned(x, e), _pixel_aligned(y, e)), e)
            for (c, s, z), (x, y), e in zip(objects, centers, extents)
        ),
        relation,
    )


def _pixel_aligned(center: float, extent: int) -> float:
    """The nearest center whose bounding box starts on a pixel edge (keeps margins: round is monotone)."""
    return float(round(center - extent / 2) + extent / 2)


def scene(seed: int, index: int, split: str = "train", n_objects: int | None = None,
          two_object_probability: float = TWO_OBJECT_PROBABILITY) -> Scene:
    """Scene ``index`` of the stream ``(seed, split)``; a pure function of its arguments.

    ``n_objects`` (1 or 2) forces the object count; by default each draw has two objects with probability
    ``two_object_probability`` (0.5: the stream every shipped model was trained on), else one. The count is drawn
    from the same random number whatever that probability, so changing it mostly changes only which scenes have
    two objects. Held-out combinations never occur in ``split="train"``; every ``split="heldout"`` scene has one;
    draws that break this are redrawn, which lowers the two-object share of train scenes (~41% at 0.5, ~67% at
    0.75) and raises that of held-out ones (~71%, ~89%).
    """
    if n_objects not in (None, 1, 2):
        raise ValueError(f"n_objects must be None, 1 or 2, got {n_objects!r}")
    if not 0.0 <= two_object_probability <= 1.0:
        raise ValueError(f"two_object_probability must be in [0, 1], got {two_object_probability!r}")
    rng = _rng(seed, index, split, _STREAM_SCENE)
    want_heldout = split == "heldout"
    for _ in range(_MAX_ATTRIBUTE_DRAWS):
        k = n_objects or (2 if rng.random() < two_object_probability else 1)
        objects, relation = _draw_attributes(rng, k)
        if is_heldout(_placeholder_scene(objects, relation)) == want_heldout:
            return _layout(rng, objects, relation)
    raise RuntimeError(f"no {split} scene found for seed={seed} index={index}; the split definition is inconsistent")


# ----------------------------------------------------------------------------- rendering


def shape_inside(shape: str, dx: np.ndarray, dy: np.ndarray, half) -> np.ndarray:
    """Whether points at offsets ``(dx, dy)`` (any broadcastable arrays, y down) from an object's center lie inside
    the world's ``shape`` of extent ``2 * half`` in its world orientation (squares axis-aligned, triangles apex up).

    The one definition of the shapes' geometry: :func:`object_mask` draws with it and the detector fits it.
    A triangle row keeps the points within the triangle's width at the row's lower edge, so the apex row is drawn.
    """
    if shape == "circle":
        return dx * dx + dy * dy < half * half
    if shape == "square":
        return (np.abs(dx) < half) & (np.abs(dy) < half)
    if shape == "triangle":
        depth_below_row = dy + half + 0.5  # 1 for the apex row, extent for the base row
        return (dy > -half) & (dy < half) & (np.abs(dx) <= depth_below_row / 2)
    raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def object_mask(obj: Obj, size: int = IMAGE_SIZE) -> np.ndarray:
    """Boolean mask [size, size] of ``obj``: exactly ``extent`` x ``extent`` pixels of bounding box.

    Pixel (i, j) is sampled at its centre (j + 0.5, i + 0.5); scene centers keep the bounding box
    pixel-aligned, so no pixel centre ever falls on a shape's edge (geometry: :func:`shape_inside`).
    """
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float64) + 0.5
    return shape_inside(obj.shape, xs - obj.center[0], ys - obj.center[1], obj.extent / 2)


def render(scene: Scene) -> np.ndarray:
    """The scene's image, uint8 [64, 64, 3], objects in their palette colors on black."""
    image = np.zeros((IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
    image[...] = BACKGROUND
    for obj in scene.objects:
        if obj.color not in PALETTE:
            raise ValueError(f"unknown color {obj.color!r}; expected one of {COLORS}")
        image[object_mask(obj)] = PALETTE[obj.color]
    return image


# ----------------------------------------------------------------------------- captions

_RELATION_PHRASES: dict[str, tuple[str, ...]] = {
    "left of": ("to the left of", "left of", "on the left of"),
    "right of": ("to the right of", "right of", "on the right of"),
    "above": ("above", "over"),
    "below": ("below", "under", "beneath"),
}
_ONE_OBJECT_TEMPLATES: tuple[str, ...] = (
    "{a}",
    "{a} on a black background",
    "an image of {a}",
    "a picture of {a}",
    "there is {a}",
)
_TWO_OBJECT_TEMPLATES: tuple[str, ...] = (
    "{a} {rel} {b}",
    "{a} is {rel} {b}",
    "there is {a} {rel} {b}",
    "an image of {a} {rel} {b}",
)
_CANONICAL_RELATIONS = ("left of", "above")
_SIZE_WORD_PROBABILITY = 0.4
_SWAP_PROBABILITY = 0.5


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def object_phrase(obj: Obj, with_size: bool) -> str:
    """'a red circle' or 'a large red circle'."""
    words = ([obj.size] if with_size else []) + [obj.color, obj.shape]
    return f"{_article(words[0])} {' '.join(words)}"


def caption(scene: Scene, rng: np.random.Generator, name_sizes: bool = False, canonical: bool = False) -> str:
    """A caption of ``scene``; ``rng`` picks the template, paraphrase and whether sizes are named.

    ``name_sizes=True`` names every object's size (the caption then says everything the scene
    holds); otherwise each size word appears with probability 0.4. ``canonical=True`` states a
    two-object scene from its left / top object ("A left of B", "A above B"), so the order of the
    objects in the text alone gives their layout; by default either object is the subject (odds
    1/2) and the relation word is inverted to match.
    """
    def phrase(obj: Obj) -> str:
        return object_phrase(obj, rng.random() < _SIZE_WORD_PROBABILITY or name_sizes)

    if len(scene.objects) == 1:
        a = phrase(scene.objects[0])  # drawn before the template: the caption stream of every seed is unchanged
        return _choice(rng, _ONE_OBJECT_TEMPLATES).format(a=a)
    a, b = scene.objects
    relation = scene.relation
    swap = rng.random() < _SWAP_PROBABILITY  # drawn in both forms: the streams of the other draws match
    if canonical:
        swap = relation not in _CANONICAL_RELATIONS
    if swap:  # state it from the other object: same scene
        a, b, relation = b, a, INVERSE_RELATION[relation]
    return _choice(rng, _TWO_OBJECT_TEMPLATES).format(
        a=phrase(a), rel=_choice(rng, _RELATION_PHRASES[relation]), b=phrase(b)
    )


def _replace_object(scene: Scene, i: int, **changes) -> Scene:
    objects = list(scene.objects)
    objects[i] = dataclasses.replace(objects[i], **changes)
    return Scene(tuple(objects), scene.relation)


def _contradictions(scene: Scene) -> dict[str, list[tuple[Scene, bool]]]:
    """The one-step edits of ``scene``'s description that its image contradicts, by kind, as
    (edited scene, whether the caption must name sizes); kinds without an edit are left out."""
    kinds: dict[str, list[tuple[Scene, bool]]] = {"color": [], "shape": [], "size": []}
    for i, obj in enumerate(scene.objects):
        kinds["color"] += [(_replace_object(scene, i, color=c), False) for c in COLORS if c != obj.color]
        kinds["shape"] += [(_replace_object(scene, i, shape=s), False) for s in SHAPES if s != obj.shape]
        other = SIZES[1 - SIZES.index(obj.size)]
        kinds["size"].append((_replace_object(scene, i, size=other), True))  # only a named size contradicts
    if len(scene.objects) == 2:
        a, b = scene.objects
        kinds["relation"] = [(Scene(scene.objects, INVERSE_RELATION[scene.relation]), False)]
        kinds["binding"] = []
        for field, names_sizes in (("color", False), ("shape", False), ("size", True)):
            if getattr(a, field) != getattr(b, field):
                swapped = (dataclasses.replace(a, **{field: getattr(b, field)}),
                           dataclasses.replace(b, **{field: getattr(a, field)}))
                kinds["binding"].append((Scene(swapped, scene.relation), names_sizes))

    train_scene = not is_heldout(scene)

    def allowed(edited: Scene) -> bool:
        keys = [(o.color, o.shape) for o in edited.objects]
        return len(set(keys)) == len(keys) and not (train_scene and is_heldout(edited))

    kinds = {k: [e for e in edits if allowed(e[0])] for k, edits in kinds.items()}
    return {k: edits for k, edits in kinds.items() if edits}


NEGATIVE_KINDS: tuple[str, ...] = ("color", "shape", "size", "relation", "binding")


def hard_negative_caption(scene: Scene, rng: np.random.Generator, kind: str | None = None,
                          canonical: bool = False) -> str | None:
    """A caption that the image of ``scene`` contradicts in exactly one respect (contrastive training).

    The kind of edit is drawn uniformly among those that apply, then one edit of that kind: one
    object's "color", "shape" or "size" changed; for two objects also the "relation" reversed or
    the two objects' colors, shapes or sizes swapped ("binding"). Edited sizes are always named.
    The edited description of a train scene never holds a held-out combination (see
    ``heldout_reasons``), so negatives of train scenes stay in the train split. It is a description
    only: the edited scene keeps the original centers. ``kind`` (one of ``NEGATIVE_KINDS``) forces
    the kind of edit; None is returned when no edit of that kind applies (e.g. "relation" for one
    object). ``canonical`` states the edited scene in canonical form (see :func:`caption`).
    """
    kinds = _contradictions(scene)
    if kind is not None:
        if kind not in NEGATIVE_KINDS:
            raise ValueError(f"kind must be one of {NEGATIVE_KINDS} or None, got {kind!r}")
        if kind not in kinds:
            return None
        kinds = {kind: kinds[kind]}
    edited, names_sizes = _choice(rng, kinds[_choice(rng, sorted(kinds))])
    return caption(edited, rng, name_sizes=names_sizes, canonical=canonical)


def example_caption(seed: int, index: int, split: str = "train",
                    two_object_probability: float = TWO_OBJECT_PROBABILITY) -> str:
    """The caption of example ``index``: a pure function of the arguments (see :func:`scene`)."""
    return caption_of_example(scene(seed, index, split, two_object_probability=two_object_probability),
                              seed, index, split)


def caption_of_example(sc: Scene, seed: int, index: int, split: str = "train") -> str:
    """:func:`example_caption` given the example's scene ``sc`` already drawn (saves drawing it again)."""
    return caption(sc, _rng(seed, index, split, _STREAM_CAPTION))


_OBJECT_RE = re.compile(
    r"\b(?:(?P<size>{})\s+)?(?P<color>{})\s+(?P<shape>{})\b".format(
        "|".join(SIZES), "|".join(COLORS), "|".join(SHAPES)
    )
)
_PHRASE_TO_RELATION = {p: r for r, ps in _RELATION_PHRASES.items() for p in ps}
_RELATION_RE = re.compile(
    r"^\s*(?:is\s+)?(?P<rel>{})\s+(?:an?\s+)?$".format(
        "|".join(sorted(map(re.escape, _PHRASE_TO_RELATION), key=len, reverse=True))
    )
)


def object_spans(text: str) -> list[tuple[int, int]]:
    """Character spans ``(start, end)`` of the ``[size] color shape`` phrases of a caption, in text order."""
    return [m.span() for m in _OBJECT_RE.finditer(text.lower())]


def parse_caption(text: str) -> tuple[tuple[tuple[str, str, str | None], ...], str | None]:
    """Read a caption back: ((color, shape, size or None), ...) in text order and the relation.

    The relation reads ``first <relation> second`` in text order. Raises ValueError on text that is
    not a shapes-world caption.
    """
    matches = list(_OBJECT_RE.finditer(text.lower()))
    if len(matches) not in (1, 2):
        raise ValueError(f"expected one or two '<color> <shape>' phrases in {text!r}, found {len(matches)}")
    objects = tuple((m["color"], m["shape"], m["size"]) for m in matches)
    if len(matches) == 1:
        return objects, None
    between = text.lower()[matches[0].end() : matches[1].start()]
    rel = _RELATION_RE.match(between)
    if rel is None:
        raise ValueError(f"no relation phrase between the two objects in {text!r}")
    return objects, _PHRASE_TO_RELATION[rel["rel"]]


# ----------------------------------------------------------------------------- batches


def batch(seed: int, start: int, n: int, split: str = "train") -> dict:
    """Examples ``start .. start+n-1``: images float32 [n, 64, 64, 3] in [0, 1], captions, scenes."""
    scenes = [scene(seed, i, split) for i in range(start, start + n)]
    images = np.stack([render(s) for s in scenes]).astype(np.float32) / 255.0 if n else np.zeros(
        (0, IMAGE_SIZE, IMAGE_SIZE, 3), np.float32
    )
    captions = [caption(s, _rng(seed, i, split, _STREAM_CAPTION)) for i, s in zip(range(start, start + n), scenes)]
    return {"images": images, "captions": captions, "scenes": scenes}


def batches(seed: int, batch_size: int, split: str = "train", start: int = 0) -> Iterator[dict]:
    """Endless consecutive ``batch``es from example ``start``; resuming at any index is exact."""
    while True:
        yield batch(seed, start, batch_size, split)
        start += batch_size


def eval_prompts(split: str, prompt_type: str, n: int, seed: int = 0) -> list[EvalPrompt]:
    """``n`` evaluation prompts of one type ("one_object" / "two_object") from ``split``, with targets.

    Deterministic in (split, prompt_type, n, seed); uses its own scene stream, so with the same seed
    the prompts are not the training captions of the same indices.
    """
    if prompt_type not in PROMPT_TYPES:
        raise ValueError(f"prompt_type must be one of {PROMPT_TYPES}, got {prompt_type!r}")
    k = PROMPT_TYPES.index(prompt_type) + 1
    eval_seed = seed + 1_000_003  # a stream apart from the training seeds people use
    prompts = []
    for i in range(n):
        target = scene(eval_seed, i, split, n_objects=k)
        text = caption(target, _rng(eval_seed, i, split, _STREAM_CAPTION + k))
        prompts.append(EvalPrompt(text, target, prompt_type, split))
    return prompts
