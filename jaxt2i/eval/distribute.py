"""Spreading an evaluation over the local devices and over processes, and merging what each part gathered.

* Devices: a batch is split over a 1-D mesh ``("batch",)`` of ``jax.local_devices()`` (data parallelism). Its size is
  rounded up to a multiple of the device count (``device_batch_size``); the rows added to fill it
  (``pad_rows``) are dropped before anything is counted.
* Processes: batch ``k`` of a run belongs to process ``k % process_count`` (``process_batches``), so every process
  draws a disjoint share and the shares cover the run. Each process gathers statistics of its own batches;
  ``gather`` hands every process the statistics of all processes (in process order) to merge. With one process
  ``gather`` returns ``[tree]`` and nothing leaves the process.

Statistics travel bit for bit: ``process_allgather`` moves JAX arrays, which hold no float64 unless ``jax_enable_x64``
is on, so the numbers are sent as their raw bytes (uint32 words) and read back as float64.
"""

from __future__ import annotations

from typing import Any, Iterator, Sequence

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec


def batch_sharding(devices: Sequence[jax.Device]) -> NamedSharding | None:
    """The leading (batch) axis split over a 1-D mesh ``("batch",)`` of ``devices``; None for a single device
    (arrays then go where JAX puts them by default)."""
    devices = list(devices)
    if len(devices) < 2:
        return None
    return NamedSharding(Mesh(np.asarray(devices), ("batch",)), PartitionSpec("batch"))


def replicate(tree, sharding: NamedSharding | None):
    """``tree`` (e.g. parameters) copied to every device of ``sharding``'s mesh, or put on the default device when
    ``sharding`` is None."""
    if sharding is None:
        return jax.device_put(tree)
    return jax.device_put(tree, NamedSharding(sharding.mesh, PartitionSpec()))


def place(x: np.ndarray, sharding: NamedSharding | None) -> jax.Array:
    """A batch ``x`` [B, ...] split over ``sharding`` (B a multiple of its device count), or on the default device."""
    return jax.device_put(x) if sharding is None else jax.device_put(x, sharding)


def device_batch_size(batch_size: int, device_count: int) -> int:
    """``batch_size`` rounded up to a multiple of ``device_count`` (at least one row per device)."""
    if batch_size < 1 or device_count < 1:
        raise ValueError(f"batch size and device count must be >= 1, got {batch_size} and {device_count}")
    return -(-batch_size // device_count) * device_count


def pad_rows(x, size: int):
    """``x`` [B, ...] (an array or a list) filled up to ``size`` rows with copies of its last row (B >= 1)."""
    if len(x) == 0 or len(x) > size:
        raise ValueError(f"cannot pad {len(x)} rows to {size}; need 1 <= rows <= size")
    if isinstance(x, list):
        return x + [x[-1]] * (size - len(x))
    x = np.asarray(x)
    return np.concatenate([x, np.repeat(x[-1:], size - len(x), axis=0)])


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
