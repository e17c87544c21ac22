"""What a data source returns: one ``Example`` per index, or ``UnreadableExample`` for one it cannot read."""

from __future__ import annotations

import dataclasses
from typing import Any


class UnreadableExample(Exception):
    """An example whose image (or record) cannot be read; the pipeline skips it."""


@dataclasses.dataclass
class Example:
    """One example: an image (PIL or uint8 ``[H, W, 3]``) and all its captions, or cached arrays."""

    index: int
    captions: tuple[str, ...] = ()
    image: Any = None
    arrays: dict | None = None  # cached sources: already-encoded inputs, see jaxt2i.data.cache
