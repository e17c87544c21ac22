"""Spreading an evaluation over the local devices and over processes, and merging what each part gathered.

* Devices: a batch is split over a 1-D mesh ``("batch",)`` of ``jax.local_devices()`` (:mod:`jaxt2i.devices`). Its
  size is rounded up to a multiple of the device count; the rows added to fill it are dropped before anything is
  counted.
* Processes: batch ``k`` of a run belongs to process ``k % process_count`` (``process_batches``), so every process
  draws a disjoint share and the shares cover the run. Each process gathers statistics of its own batches;
  ``gather`` hands every process the statistics of all processes (in process order) to merge. With one process
  ``gather`` returns ``[tree]`` and nothing leaves the process.

Statistics travel bit for bit: ``process_allgather`` moves JAX arrays, which hold no float64 unless ``jax_enable_x64``
is on, so the numbers are sent as their raw bytes (uint32 words) and read back as float64.
"""

from __future__ import annotations

from typing import Any, Iterator

import jax
import numpy as np
from jax.experimental import multihost_utils


def process_batches(n_items: int, batch_size: int, index: int = 0, count: int = 1) -> Iterator[tuple[int, int, int]]:
    """This process's batches of ``n_items`` items in batches of ``batch_size``: ``(k, start, stop)`` for every batch
    ``k`` with ``k % count == index``, in order. Over all ``count`` processes the batches are disjoint and cover
    every item once."""
    if not 0 <= index < count:
        raise ValueError(f"process index {index} must lie in [0, {count})")
    for k, start in enumerate(range(0, n_items, batch_size)):
        if k % count == index:
            yield k, start, min(start + batch_size, n_items)


def this_process() -> tuple[int, int]:
    """``(jax.process_index(), jax.process_count())``."""
    return jax.process_index(), jax.process_count()


def gather(tree: Any) -> list[Any]:
    """Every process's ``tree`` (numeric leaves of the same shapes on every process: numpy arrays or Python
    numbers), in process order, bit for bit. A collective: every process must call it, in the same order. With one
    process: ``[tree]``."""
    if jax.process_count() == 1:
        return [tree]
    leaves, treedef = jax.tree.flatten(tree)
    arrays = [np.asarray(leaf) for leaf in leaves]
    flat = np.concatenate([a.astype(np.float64).ravel() for a in arrays]) if arrays else np.zeros(0)
    words = np.asarray(multihost_utils.process_allgather(flat.view(np.uint32)))  # [P, 2 * size]
    out = []
    for row in words:
        values, offset, rebuilt = np.ascontiguousarray(row).view(np.float64), 0, []
        for leaf, a in zip(leaves, arrays):
            part = values[offset:offset + a.size].reshape(a.shape).astype(a.dtype)
            offset += a.size
            rebuilt.append(part if isinstance(leaf, np.ndarray) else part.item())
        out.append(jax.tree.unflatten(treedef, rebuilt))
    return out


def all_processes(flag: bool) -> bool:
    """Whether ``flag`` holds on every process (a collective with several processes)."""
    return all(bool(f) for f in gather(np.asarray(bool(flag))))
