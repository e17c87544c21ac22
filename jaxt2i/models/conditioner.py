"""A learned map between a text encoder's hidden states and a denoiser's context (its own model-folder component).

The "merge" conditioner reads two hidden states of the text encoder at every token position -- ``a`` (e.g. the
context-free token embeddings, layer 0) and ``b`` (e.g. the last layer) -- and returns ``a`` plus a rank-``r``
linear map of ``b``::

    states [B, 2, L, D] -> a + up(down(b))   [B, L, D]      down: D -> r (random init), up: r -> D (zero init)

A fresh conditioner is the identity on ``a``; training decides what of ``b`` passes through the ``r`` numbers per
token. The narrow map lets a contextual layer tag each context-free token (which object a word belongs to, where
it goes) without handing the denoiser the contextual layer's whole content. Which hidden states feed it is the
model folder's ``text_layer`` (two of them, in ``(a, b)`` order).

Parameter tree: ``down/{kernel [D, r], bias [r]}``, ``up/{kernel [r, D], bias [D]}``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class ConditionerConfig:
    """Width ``D`` of the text states (and of the context), rank ``r`` of the map, number of text states read."""

    width: int = 768
    rank: int = 8
    num_inputs: int = 2

    def __post_init__(self):
        for name in ("width", "rank"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"ConditionerConfig.{name} must be a positive int, got {value!r}.")
        if self.rank > self.width:
            raise ValueError(f"ConditionerConfig.rank={self.rank} exceeds width={self.width}.")
        if self.num_inputs != 2:
            raise ValueError(f"ConditionerConfig.num_inputs={self.num_inputs!r}: the merge conditioner reads exactly "
                             "two text states (e.g. text_layer [0, -1]).")


PRESETS: dict[str, ConditionerConfig] = {
    "tiny": ConditionerConfig(width=32, rank=4),
}


class Conditioner(nn.Module):
    """``states`` [B, 2, L, D] (two text hidden states per token) -> context [B, L, D]; see the module docstring."""

    config: ConditionerConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, states: jax.Array) -> jax.Array:
        cfg = self.config
        if states.ndim != 4 or states.shape[1] != cfg.num_inputs or states.shape[-1] != cfg.width:
            raise ValueError(f"Conditioner: states must be [B, {cfg.num_inputs}, L, {cfg.width}] (the text encoder's "
                             f"hidden states at the model's {cfg.num_inputs} text layers), got {states.shape}.")
        states = states.astype(self.dtype)
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        zeros = nn.initializers.zeros_init()
        tags = nn.Dense(cfg.rank, name="down", **kw)(states[:, 1])
        return states[:, 0] + nn.Dense(cfg.width, kernel_init=zeros, bias_init=zeros, name="up", **kw)(tags)


def abstract_params(config: ConditionerConfig, param_dtype: Any = jnp.float32) -> dict:
    """The parameter tree as ``jax.ShapeDtypeStruct`` leaves (nothing allocated)."""
    states = jax.ShapeDtypeStruct((1, config.num_inputs, 1, config.width), jnp.float32)
    model = Conditioner(config, param_dtype=param_dtype)
    return jax.eval_shape(model.init, jax.random.PRNGKey(0), states)["params"]
