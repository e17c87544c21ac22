"""A synthetic captioned image set for tests and benchmarks, built on the shapes world.

Example ``i`` is ``jaxt2i.shapes.world``' scene ``(seed, i, split)``: a 64x64 image of one or two
coloured shapes and several captions of it (the world's own caption followed by paraphrases drawn
from the same scene), so the pipeline's "draw one caption per use" path is exercised too. Nothing
is stored: every example is regenerated from its index.
"""

from __future__ import annotations

import numpy as np

from jaxt2i.shapes import world as shapes
from jaxt2i.data.pipeline import Example

_PARAPHRASE_STREAM = 0xC2B2AE35


class SyntheticSource:
    """``num_examples`` shapes-world examples; ``example(i)`` -> uint8 ``[64, 64, 3]`` image + captions.

    ``two_object_probability``: the odds of drawing a two-object scene (``shapes.scene``; 0.5 is the world's own).
    """

    def __init__(self, seed: int = 0, num_examples: int = 1024, split: str = "train", captions_per_image: int = 3,
                 two_object_probability: float = shapes.TWO_OBJECT_PROBABILITY):
        if num_examples < 1:
            raise ValueError(f"num_examples must be >= 1, got {num_examples}")
        self.seed = int(seed)
        self.num_examples = int(num_examples)
        self.split = split
        self.captions_per_image = max(1, int(captions_per_image))
        self.two_object_probability = float(two_object_probability)

    def __len__(self) -> int:
        return self.num_examples

    def captions(self, index: int) -> tuple[str, ...]:
        """All captions of example ``index`` (the first is ``shapes.example_caption``)."""
        return self._captions(index, self._scene(index))

    def example(self, index: int) -> Example:
        if not 0 <= index < self.num_examples:
            raise IndexError(f"synthetic example {index} is outside 0..{self.num_examples - 1}")
        sc = self._scene(index)
        return Example(image=shapes.render(sc), captions=self._captions(index, sc), index=index)  # [64, 64, 3] uint8

    def _scene(self, index: int) -> shapes.Scene:
        return shapes.scene(self.seed, index, self.split, two_object_probability=self.two_object_probability)

    def _captions(self, index: int, sc: shapes.Scene) -> tuple[str, ...]:
        first = shapes.caption_of_example(sc, self.seed, index, self.split)
        extra = [
            shapes.caption(sc, np.random.default_rng([self.seed, index, k, _PARAPHRASE_STREAM]))
            for k in range(1, self.captions_per_image)
        ]
        return (first, *extra)
