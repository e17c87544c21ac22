"""What every family's pipeline shares: the persistent compilation cache, progress reporting, parameter casts."""

from __future__ import annotations

import os
import sys
from typing import Callable

import jax
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
