"""Host-side random weights for tests: numpy draws shaped like an abstract parameter tree, so no model init is
compiled or run op by op."""

from __future__ import annotations

import jax
import numpy as np


def random_params(abstract, seed: int):
    """Deterministic host-side params for an abstract tree (``jax.ShapeDtypeStruct`` leaves, e.g. from
    ``jax.eval_shape`` of an init): kernels ~ N(0, 1/fan_in), norm scales 1, biases and embeddings small."""
    rng = np.random.default_rng(seed)

    def one(path, leaf):
        name = path[-1].key if hasattr(path[-1], "key") else str(path[-1])
        shape = tuple(leaf.shape)
        if name == "scale":
            return np.ones(shape, np.float32)
        if name == "kernel":
            fan_in = int(np.prod(shape[:-1]))
            return (rng.standard_normal(shape) / np.sqrt(fan_in)).astype(np.float32)
        return (0.02 * rng.standard_normal(shape)).astype(np.float32)

    return jax.tree_util.tree_map_with_path(one, abstract)
