"""What every family's pipeline shares: the persistent compilation cache, progress reporting, parameter casts, one
seed per image, placing a batch on devices, and the checks of the sampling arguments."""

from __future__ import annotations

import functools
import os
import sys
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import tqdm

from jaxt2i.diffusion.samplers import SAMPLERS


# --------------------------------------------------------------------------------------- compilation cache
def enable_compilation_cache(path: str | None = None) -> str | None:
    """Turns on JAX's persistent compilation cache so a second process does not compile again.

    ``path`` defaults to ``$JAXT2I_CACHE_DIR`` or ``~/.cache/jaxt2i/xla``; ``JAXT2I_CACHE_DIR=off`` disables it.
    Returns the directory used, or None when disabled.
    """
    path = path or os.environ.get("JAXT2I_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "jaxt2i", "xla")
    if path.lower() in ("off", "0", "none", ""):
        return None
    os.makedirs(path, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return path


ProgressFn = Callable[[int, int], None]  # (model calls done, total model calls)


class ProgressBar:
    """``progress=True``: a tqdm bar (stderr) over the model calls of one sampling run."""

    def __init__(self):
        self.bar = None

    def __call__(self, done: int, total: int) -> None:
        if self.bar is None:
            self.bar = tqdm.tqdm(total=total, desc="sampling", unit="call", file=sys.stderr)
        self.bar.update(done - self.bar.n)
        if done == total:
            self.bar.close()


def cast_floats(tree, dtype):
    """Floating leaves of ``tree`` as numpy arrays of ``dtype``; other leaves (integers) unchanged."""
    return jax.tree.map(lambda a: np.asarray(a, dtype) if np.issubdtype(np.asarray(a).dtype, np.floating) else a, tree)


# ------------------------------------------------------------------------------------- one seed per image
def example_seeds(seed, batch: int) -> np.ndarray | None:
    """``seed`` as one seed per image: None for a single int (the whole batch is drawn from it), else int64 [B].

    A sequence (or array) of seeds must have one entry per image; image ``i`` is then drawn as a call with the
    single prompt ``i`` and ``seed=seeds[i]`` draws it (see :func:`map_examples`).
    """
    if isinstance(seed, (int, np.integer)) and not isinstance(seed, bool):
        return None
    seeds = np.asarray(seed)
    if seeds.ndim != 1 or not np.issubdtype(seeds.dtype, np.integer):
        raise ValueError(f"seed must be an int or a sequence of ints (one per image); got {seed!r}.")
    if len(seeds) != batch:
        raise ValueError(f"{len(seeds)} seeds for {batch} images; give one seed, or one per image.")
    return seeds.astype(np.int64)


def seed_keys(seeds: np.ndarray) -> jax.Array:
    """Seeds [B] -> PRNG keys [B], ``jax.random.key(seed)`` of each."""
    return jnp.stack([jax.random.key(int(s)) for s in seeds])


def example_keys(seeds: np.ndarray) -> tuple[jax.Array, jax.Array]:
    """Seeds [B] -> (noise keys [B], program keys [B]): ``jax.random.split(jax.random.key(seed))`` of each seed,
    the two keys a single-seed call draws its start noise and its sampling randomness from."""
    pairs = jax.vmap(jax.random.split)(seed_keys(seeds))
    return pairs[:, 0], pairs[:, 1]


@functools.partial(jax.jit, static_argnums=1)
def normal_per_example(keys: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """Keys [B] -> float32 [B, *shape]: row ``i`` is ``jax.random.normal(keys[i], (1, *shape))[0]``, the noise a
    batch-1 call draws from that key."""
    return jax.vmap(lambda key: jax.random.normal(key, (1, *shape), jnp.float32)[0])(keys)


def map_examples(fn: Callable, batched, keys: jax.Array):
    """Runs ``fn(example, key)`` on every example of ``batched`` as a batch of one (vmapped, so it stays one
    batched program): ``batched`` is a tree of [B, ...] arrays, ``keys`` [B]; ``fn`` takes the tree with a
    leading axis of 1 and returns a tree of [1, ...] arrays. Returns the tree of [B, ...] outputs."""
    def one(example, key):
        out = fn(jax.tree.map(lambda a: a[None], example), key)
        return jax.tree.map(lambda a: a[0], out)

    return jax.vmap(one)(batched, keys)


def check_sampling_args(*, steps=None, guidance_scale=None, strength=None, sampler=None) -> None:
    """Raises ValueError naming the first bad sampling argument (None: not checked): ``steps`` not an integer >= 1,
    ``guidance_scale`` not a finite number >= 0 (<= 1 turns guidance off), ``strength`` outside (0, 1], ``sampler``
    not one of :data:`jaxt2i.diffusion.samplers.SAMPLERS`. The pipelines and the command line both call it."""
    if sampler is not None and sampler not in SAMPLERS:
        raise ValueError(f"Unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}.")
    if steps is not None and (isinstance(steps, bool) or int(steps) != steps or steps < 1):
        raise ValueError(f"steps must be an integer >= 1; got {steps}.")
    if guidance_scale is not None and not (np.isfinite(guidance_scale) and guidance_scale >= 0):
        raise ValueError(f"guidance scale must be a finite number >= 0 (<= 1 turns guidance off); got "
                         f"{guidance_scale}.")
    if strength is not None and not 0.0 < float(strength) <= 1.0:
        raise ValueError(f"strength must be in (0, 1]; got {strength}.")
