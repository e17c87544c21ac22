"""Assembles training batches from a source: deterministic order, per-example randomness, skipping.

A *source* is anything with ``len(source)`` and ``source.example(index) -> Example`` that raises
``UnreadableExample`` for an example that cannot be read (``jaxt2i.data.sources``: ``ImageCaptionFolder``,
``TFDSSource``, ``CachedSource``, the shapes world's ``ShapesSource``).

``BatchIterator`` reads this host's stream (``jaxt2i.data.order``) and yields numpy batches:

* image sources: ``{"images": float32 [B, S, S, 3] in [-1, 1], "input_ids": int32 [B, L]}`` (no ``input_ids``
  without a tokenizer), plus the fields ``fields(captions)`` returns for the chosen captions (e.g. per-token labels
  from the source's ``batch_fields``);
* cached sources: ``{"latents": float32 [B, h, w, 4] (scaled), "text_states": float32 [B, 77, D] or [B, k, 77, D],
  "uncond_text_states": float32 [77, D] or [k, 77, D]}`` (the empty prompt's, for condition dropout).

One caption of an image's several is drawn each time the image is used, from
``example_rng(seed, epoch, index)``; crop and flip use the same generator. An unreadable example
is skipped (warned about once per index and counted) and the next stream item takes its place.
The iterator's whole state is ``position()`` -- ``{"consumed": k, "skipped": s}`` -- so a run
restarted from a saved position reads exactly the batches the uninterrupted run would have read.
A background thread may prepare the next batches; they are produced in order by one thread, so
prefetching never changes what is read.
"""

from __future__ import annotations

import queue
import threading
import warnings
from typing import Callable, Sequence

import numpy as np

from jaxt2i.data.cache import assemble_cached
from jaxt2i.data.example import Example, UnreadableExample
from jaxt2i.data.order import HostOrder, example_rng
from jaxt2i.data.transforms import preprocess

Tokenize = Callable[[Sequence[str]], np.ndarray]  # list of B strings -> int32 [B, L]
Fields = Callable[[Sequence[str]], dict]  # the B captions chosen -> {name: array [B, ...]}


def _choose_caption(captions: Sequence[str], rng: np.random.Generator) -> str:
    if not captions:
        return ""
    return captions[int(rng.integers(len(captions)))] if len(captions) > 1 else captions[0]


class BatchIterator:
    """This host's batches, in the order fixed by ``(seed, epoch, index)``: its block of every global batch.

    Args:
      source: see the module docstring.
      batch_size: examples per batch on this host (the global batch divided by the number of hosts).
      seed: data seed (order, caption choice, crops, flips).
      image_size: square side of the images (image sources only).
      tokenize: list of strings -> int32 ``[B, L]`` (image sources; None: no ``input_ids``).
      fields: the chosen captions -> more batch fields (image sources; None: none).
      crop: ``"center"`` or ``"random"``; flip: mirror half of the images.
      host, num_hosts: this host and how many read the same source.
      position: a ``position()`` dict saved earlier (default: the start).
      prefetch: batches prepared ahead in a background thread (0: none).
      max_skips_in_a_row: give up (with a clear error) after this many unreadable examples in a row.
    """

    def __init__(
        self,
        source,
        batch_size: int,
        *,
        seed: int = 0,
        image_size: int | None = None,
        tokenize: Tokenize | None = None,
        fields: Fields | None = None,
        crop: str = "center",
        flip: bool = False,
        host: int = 0,
        num_hosts: int = 1,
        position: dict | None = None,
        prefetch: int = 0,
        max_skips_in_a_row: int = 1000,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.source = source
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.image_size = image_size
        self.tokenize = tokenize
        self.fields = fields
        self.crop, self.flip = crop, flip
        self.order = HostOrder(seed, len(source), host, num_hosts, block=self.batch_size)
        position = position or {}
        self._consumed = int(position.get("consumed", 0))  # stream items read by the producer
        self._skipped = int(position.get("skipped", 0))
        self._position = {"consumed": self._consumed, "skipped": self._skipped}  # after the last batch returned
        self.max_skips_in_a_row = max_skips_in_a_row
        self._warned: set[int] = set()
        self._prefetch = int(prefetch)
        self._queue: queue.Queue | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ reading

    def position(self) -> dict:
        """``{"consumed": stream items read, "skipped": unreadable ones among them}`` after the last batch returned."""
        return dict(self._position)

    @property
    def skipped(self) -> int:
        """Unreadable examples skipped so far (including those before a restart)."""
        return self._position["skipped"]

    def _next_example(self) -> tuple[int, int, Example]:
        in_a_row = 0
        while True:
            k = self._consumed
            epoch, index = self.order.item(k)
            self._consumed += 1
            try:
                return epoch, index, self.source.example(index)
            except UnreadableExample as e:
                self._skipped += 1
                in_a_row += 1
                if index not in self._warned:
                    self._warned.add(index)
                    warnings.warn(f"skipping unreadable example {index}: {e}", stacklevel=2)
                if in_a_row >= self.max_skips_in_a_row:
                    raise RuntimeError(
                        f"{in_a_row} unreadable examples in a row (last: {e}); check the dataset path and files"
                    ) from e

    def _make_batch(self) -> tuple[dict, dict]:
        items = [self._next_example() for _ in range(self.batch_size)]
        batch = self._assemble(items)
        return batch, {"consumed": self._consumed, "skipped": self._skipped}

    def _assemble(self, items) -> dict:
        rngs = [example_rng(self.seed, epoch, index) for epoch, index, _ in items]
        examples = [ex for _, _, ex in items]
        if examples[0].arrays is not None:
            return assemble_cached(examples, rngs)
        if self.image_size is None:
            raise ValueError("image sources need image_size")
        captions = [_choose_caption(ex.captions, rng) for ex, rng in zip(examples, rngs)]
        images = np.stack(
            [preprocess(ex.image, self.image_size, crop=self.crop, flip=self.flip, rng=rng)
             for ex, rng in zip(examples, rngs)]
        )
        batch = {"images": images.astype(np.float32)}
        if self.tokenize is not None:
            batch["input_ids"] = np.asarray(self.tokenize(captions), dtype=np.int32)
        if self.fields is not None:
            batch.update(self.fields(captions))
        return batch

    # ------------------------------------------------------------------ iteration

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        if self._prefetch <= 0:
            batch, pos = self._make_batch()
        else:
            if self._thread is None:
                self._start_thread()
            kind, payload = self._queue.get()
            if kind == "error":
                raise payload
            batch, pos = payload
        self._position = pos
        return batch

    def _start_thread(self):
        self._queue = queue.Queue(maxsize=self._prefetch)

        def produce():
            while not self._stop.is_set():
                try:
                    item = ("batch", self._make_batch())
                except BaseException as e:  # noqa: BLE001 -- handed to the consumer, which re-raises it
                    item = ("error", e)
                while not self._stop.is_set():
                    try:
                        self._queue.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if item[0] == "error":
                    return

        self._thread = threading.Thread(target=produce, name="jaxt2i-data-prefetch", daemon=True)
        self._thread.start()

    def close(self):
        """Stops the prefetch thread (if any)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
