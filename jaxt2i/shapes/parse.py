"""Per-token parse labels of shapes-world captions: what a caption-parsing head on a text encoder learns.

``caption_parse_targets(tokenizer, captions, length)`` gives, per caption and token position, the class of each
target of :data:`PARSE_TARGETS` (-1 where a token has none):

* ``color`` / ``shape``: at each object's shape word, that object's color / shape;
* ``side``: at every word of a two-object caption's second-named object, its relation to the first ("a red circle
  above a blue square": the blue square is "below");
* ``role``: every token: no object's word, a word of the first-named object, or a word of the second-named object
  together with its side of the first.

The shapes source (:class:`jaxt2i.shapes.data.ShapesSource`) puts them in training batches as ``parse_<name>``.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from jaxt2i.shapes import world as shapes

ROLES: tuple[str, ...] = ("none", "first") + tuple(f"second, {r}" for r in shapes.RELATIONS)
"""Classes of the ``role`` target, in order."""

PARSE_TARGETS: dict[str, tuple[str, ...]] = {"color": shapes.COLORS, "shape": shapes.SHAPES,
                                              "side": shapes.RELATIONS, "role": ROLES}
"""Class names of each parse target; a ``side`` is the second-named object's relation to the first."""


def check_parse_targets(names: Sequence[str]) -> None:
    """Raises ValueError unless ``names`` is a non-empty subset of :data:`PARSE_TARGETS`' keys."""
    if not names or set(names) - set(PARSE_TARGETS):
        raise ValueError(f"parse targets must be a non-empty subset of {list(PARSE_TARGETS)}; got {list(names)}")


def _word_spans(tokenizer, text: str) -> list[tuple[int, int, int]]:
    """``(char_end, first_token, end_token)`` of each space-separated word of ``text``; token 0 is BOS."""
    spans, position, char = [], 1, 0
    for word in text.split(" "):
        n = len(tokenizer.encode(word))
        char += len(word)
        spans.append((char, position, position + n))
        position, char = position + n, char + 1
    return spans


def caption_parse_targets(tokenizer, captions: Sequence[str], length: int) -> dict[str, np.ndarray]:
    """``{name: int32 [B, length]}`` for every name of :data:`PARSE_TARGETS` (see the module docstring).

    ``tokenizer.encode(word)`` gives a word's BPE ids without BOS/EOS; positions count BOS at 0, as the tokenizer
    lays a caption out. Captions must be lower-case single-spaced shapes-world captions
    (``shapes.parse_caption``); raises ValueError for one that does not fit in ``length`` tokens.
    """
    targets = {name: np.full((len(captions), length), -1, np.int32) for name in PARSE_TARGETS}
    targets["role"][:] = ROLES.index("none")
    for row, text in enumerate(captions):
        objects, relation = shapes.parse_caption(text)
        spans = _word_spans(tokenizer, text)
        for i, ((start, end), (color, shape, _)) in enumerate(zip(shapes.object_spans(text), objects)):
            words = [s for s in spans if start < s[0] <= end]
            if words[-1][2] > length:
                raise ValueError(f"caption {text!r} does not fit in {length} tokens; raise the text length.")
            shape_token = words[-1][2] - 1
            targets["color"][row, shape_token] = shapes.COLORS.index(color)
            targets["shape"][row, shape_token] = shapes.SHAPES.index(shape)
            if i == 0:
                role = ROLES.index("first")
            else:
                side = shapes.RELATIONS.index(shapes.INVERSE_RELATION[relation])
                role = ROLES.index("second, " + shapes.RELATIONS[side])
                for _, first, stop in words:
                    targets["side"][row, first:stop] = side
            for _, first, stop in words:
                targets["role"][row, first:stop] = role
    return targets
