"""The shapes world as a training data source (``data.source: shapes``, see ``jaxt2i.data.sources``).

Example ``i`` is ``jaxt2i.shapes.world``'s scene ``(seed, i, split)``: a 64x64 image of one or two coloured shapes
and several captions of it (the world's own caption followed by paraphrases drawn from the same scene), of which
the pipeline draws one per use. Nothing is stored: every example is regenerated from its index. Batches may also
carry the chosen captions' parse labels (``parse_<target>``, :mod:`jaxt2i.shapes.parse`) for a caption-parsing
loss.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from jaxt2i.data.example import Example
from jaxt2i.shapes import world as shapes
from jaxt2i.shapes.parse import PARSE_TARGETS, caption_parse_targets

_PARAPHRASE_STREAM = 0xC2B2AE35
FIELD_PREFIX = "parse_"


class ShapesSource:
    """``num_examples`` shapes-world examples; ``example(i)`` -> uint8 ``[64, 64, 3]`` image + captions.

    ``two_object_probability``: the odds of drawing a two-object scene (``shapes.scene``; 0.5 is the world's own;
    the split's filter redraws some draws, so the train split keeps ~41% two-object scenes at 0.5).
    """

    def __init__(self, seed: int = 0, num_examples: int = 1024, split: str = "train", captions_per_image: int = 3,
                 two_object_probability: float = shapes.TWO_OBJECT_PROBABILITY):
        if num_examples < 1:
            raise ValueError(f"num_examples must be >= 1, got {num_examples}")
        if not 0.0 <= two_object_probability <= 1.0:
            raise ValueError(f"two_object_probability={two_object_probability!r}; use a probability in [0, 1]")
        self.seed = int(seed)
        self.num_examples = int(num_examples)
        self.split = split
        self.captions_per_image = max(1, int(captions_per_image))
        self.two_object_probability = float(two_object_probability)

    @classmethod
    def from_config(cls, cfg) -> "ShapesSource":
        """From a ``DataConfig``: ``num_examples``, ``split`` (default "train") and ``options`` (``seed``,
        ``captions_per_image``, ``two_object_probability``)."""
        options = dict(cfg.options or {})
        unknown = sorted(set(options) - {"seed", "captions_per_image", "two_object_probability"})
        if unknown:
            raise ValueError(f"data.options {unknown} are not shapes-source options; use seed, captions_per_image, "
                             "two_object_probability.")
        return cls(num_examples=cfg.num_examples, split=cfg.split or "train", **options)

    def __len__(self) -> int:
        return self.num_examples

    def captions(self, index: int) -> tuple[str, ...]:
        """All captions of example ``index`` (the first is ``shapes.caption_of_example``)."""
        return self._captions(index, self._scene(index))

    def example(self, index: int) -> Example:
        if not 0 <= index < self.num_examples:
            raise IndexError(f"shapes example {index} is outside 0..{self.num_examples - 1}")
        sc = self._scene(index)
        return Example(image=shapes.render(sc), captions=self._captions(index, sc), index=index)  # [64, 64, 3] uint8

    def label_classes(self, field: str) -> tuple[str, ...]:
        """Class names of batch field ``field`` (``parse_<target>``, a key of ``shapes.parse.PARSE_TARGETS``)."""
        target = field[len(FIELD_PREFIX):] if field.startswith(FIELD_PREFIX) else None
        if target not in PARSE_TARGETS:
            raise ValueError(f"the shapes source has no batch field {field!r}; it has "
                             f"{[FIELD_PREFIX + t for t in PARSE_TARGETS]}.")
        return PARSE_TARGETS[target]

    def batch_fields(self, captions: Sequence[str], fields: Sequence[str], tokenizer, length: int
                     ) -> dict[str, np.ndarray]:
        """``{field: int32 [B, length]}``: the parse labels (-1: none) of ``captions`` as ``tokenizer`` lays them
        out, for each of ``fields`` (``parse_<target>``)."""
        for field in fields:
            self.label_classes(field)
        targets = caption_parse_targets(tokenizer, list(captions), length)
        return {field: targets[field[len(FIELD_PREFIX):]] for field in fields}

    def _scene(self, index: int) -> shapes.Scene:
        return shapes.scene(self.seed, index, self.split, two_object_probability=self.two_object_probability)

    def _captions(self, index: int, sc: shapes.Scene) -> tuple[str, ...]:
        first = shapes.caption_of_example(sc, self.seed, index, self.split)
        extra = [
            shapes.caption(sc, np.random.default_rng([self.seed, index, k, _PARAPHRASE_STREAM]))
            for k in range(1, self.captions_per_image)
        ]
        return (first, *extra)
