"""Attention masks of DALL-E's sparse transformer, as data: boolean ``[L, L]`` arrays over [text; image] tokens.

The sequence is ``text_length`` text tokens followed by the ``height x width`` image tokens in raster order
(``L = text_length + height * width``). Entry ``[i, j]`` is True when position ``i`` may attend to position ``j``.
Every kind is causal (``j <= i``), text attends to earlier text, and every image token sees all text tokens; the
kinds differ only in which earlier image tokens an image token sees. With ``p`` the raster index of the query's
image token and ``q`` that of the key's (``q <= p``), and ``d = p - q`` their raster distance:

* ``"full"``: every earlier image token.
* ``"row"``: ``d <= width`` -- the previous ``width`` tokens in raster order and the token itself, so the window
  wraps onto the previous row and ends at the token above (the paper's row attention, Fig. 11a).
* ``"column"``: ``d`` a multiple of ``width`` -- the tokens above in the same column (Fig. 11b).
* ``"conv"``: ``d = dr * width + dc`` for a row offset ``0 <= dr <= k // 2`` and a column offset
  ``|dc| <= k // 2`` -- a causal ``k x k`` kernel laid out in raster order, so it wraps around the grid's left and
  right edges like the row window does (Fig. 11d; the paper uses ``k = 11``).

Layer schedules (:func:`layer_kinds`): ``"dalle"`` is the paper's -- column attention in layers ``i`` with
``(i - 2) % 4 == 0`` (``i`` counted from 0), convolutional attention in the last layer, row attention elsewhere;
``"full"`` is dense causal attention in every layer.
"""

from __future__ import annotations

import numpy as np

KINDS = ("full", "row", "column", "conv")
PATTERNS = ("dalle", "full")


def layer_kinds(pattern: str, num_layers: int) -> tuple[str, ...]:
    """The mask kind of each layer under a named schedule (``"dalle"`` or ``"full"``)."""
    if pattern not in PATTERNS:
        raise ValueError(f"Unknown attention pattern {pattern!r}; choose one of {PATTERNS} or give one kind of "
                         f"{KINDS} per layer.")
    if pattern == "full":
        return ("full",) * num_layers

    def kind(i: int) -> str:
        if i == num_layers - 1:
            return "conv"
        return "column" if (i - 2) % 4 == 0 else "row"

    return tuple(kind(i) for i in range(num_layers))


def _image_offsets_allowed(kind: str, distance: np.ndarray, width: int, kernel: int) -> np.ndarray:
    """Whether image tokens ``distance = p - q >= 0`` apart (raster order) see each other under ``kind``."""
    if kind == "full":
        return np.ones_like(distance, dtype=bool)
    if kind == "row":
        return distance <= width
    if kind == "column":
        return distance % width == 0
    half = kernel // 2
    offsets = {dr * width + dc for dr in range(half + 1) for dc in range(-half, half + 1)}
    return np.isin(distance, sorted(o for o in offsets if o >= 0))


def attention_mask(kind: str, text_length: int, height: int, width: int, conv_kernel: int = 11) -> np.ndarray:
    """The mask of one kind: bool ``[L, L]``, ``L = text_length + height * width`` (True = may attend)."""
    if kind not in KINDS:
        raise ValueError(f"Unknown attention mask kind {kind!r}; choose one of {KINDS}.")
    if conv_kernel < 1 or conv_kernel % 2 == 0:
        raise ValueError(f"conv_kernel must be a positive odd number, got {conv_kernel}.")
    length = text_length + height * width
    query, key = np.meshgrid(np.arange(length), np.arange(length), indexing="ij")
    causal = key <= query
    both_image = (query >= text_length) & (key >= text_length)
    distance = query - key
    image_ok = _image_offsets_allowed(kind, np.where(causal, distance, 0), width, conv_kernel)
    return causal & (~both_image | image_ok)


def layer_masks(kinds: tuple[str, ...], text_length: int, height: int, width: int,
                conv_kernel: int = 11) -> np.ndarray:
    """One mask per layer: bool ``[num_layers, L, L]`` for the layer kinds ``kinds``."""
    by_kind = {kind: attention_mask(kind, text_length, height, width, conv_kernel) for kind in set(kinds)}
    return np.stack([by_kind[kind] for kind in kinds])
