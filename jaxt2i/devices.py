"""Data parallelism over this process's devices: a batch split over a 1-D mesh ``("batch",)``, parameters copied to
every device, batch sizes rounded to the device count and padded up to them.

Sampling (``jaxt2i generate --prompts-file``), evaluation (``jaxt2i eval``) and the pipelines' ``sharding=`` argument
share these. With one device there is no mesh: ``batch_sharding`` is None and arrays go where JAX puts them.
"""

from __future__ import annotations

from typing import Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec


def batch_sharding(devices: Sequence[jax.Device]) -> NamedSharding | None:
    """The leading (batch) axis split over a 1-D mesh ``("batch",)`` of ``devices``; None for a single device."""
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


def place(tree, sharding: jax.sharding.Sharding | None):
    """``tree`` of [B, ...] arrays on ``sharding`` (B a multiple of its device count), or as it is when None."""
    return tree if sharding is None else jax.device_put(tree, sharding)


def device_batch_size(batch_size: int, device_count: int) -> int:
    """``batch_size`` rounded up to a multiple of ``device_count`` (every device gets the same share)."""
    if batch_size < 1 or device_count < 1:
        raise ValueError(f"batch size and device count must be >= 1, got {batch_size} and {device_count}")
    return -(-batch_size // device_count) * device_count


def pad_rows(x, size: int):
    """``x`` [B, ...] (an array or a list) filled up to ``size`` rows with copies of its last row (1 <= B <= size)."""
    if len(x) == 0 or len(x) > size:
        raise ValueError(f"cannot pad {len(x)} rows to {size}; need 1 <= rows <= size")
    if isinstance(x, list):
        return x + [x[-1]] * (size - len(x))
    x = np.asarray(x)
    return np.concatenate([x, np.repeat(x[-1:], size - len(x), axis=0)])
