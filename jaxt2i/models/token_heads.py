"""Linear per-token classifier heads on a text encoder's hidden states (e.g. a caption-parsing loss).

Head ``name`` maps token states ``[B, L, D]`` to logits ``[B, L, C_name]``: ``states @ kernel + bias``. Parameter
tree: ``{name: {"kernel": [D, C], "bias": [C]}}``. A model folder stores trained heads as a component of type
``token_heads`` (``jaxt2i.convert.components``; the ``clip`` kind names it ``parse_heads``), with the class names of
every head in its config.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class TokenHeadsConfig:
    """width: the hidden size D they read; names: the heads; classes: each head's class names, in order."""

    width: int
    names: tuple[str, ...]
    classes: tuple[tuple[str, ...], ...]

    def __post_init__(self):
        if len(self.names) != len(self.classes) or not self.names:
            raise ValueError(f"TokenHeadsConfig: {len(self.names)} names but {len(self.classes)} class lists; "
                             "give one list of class names per head (at least one head).")

    def classes_of(self, name: str) -> tuple[str, ...]:
        if name not in self.names:
            raise KeyError(f"no head {name!r}; the heads are {list(self.names)}")
        return self.classes[self.names.index(name)]


def init_params(config: TokenHeadsConfig, key: jax.Array) -> dict:
    """Fresh heads: kernels ``N(0, 1/D)`` (head ``i`` from ``fold_in(key, i)``), zero biases."""
    return {name: {"kernel": jax.random.normal(jax.random.fold_in(key, i), (config.width, len(classes)))
                   / np.sqrt(config.width),
                   "bias": jnp.zeros((len(classes),))}
            for i, (name, classes) in enumerate(zip(config.names, config.classes))}


def abstract_params(config: TokenHeadsConfig, param_dtype=jnp.float32) -> dict:
    """The parameter tree's shapes and dtypes, without initialising."""
    return {name: {"kernel": jax.ShapeDtypeStruct((config.width, len(classes)), param_dtype),
                   "bias": jax.ShapeDtypeStruct((len(classes),), param_dtype)}
            for name, classes in zip(config.names, config.classes)}


def logits(params: dict, states: jax.Array) -> dict[str, jax.Array]:
    """``states [B, L, D]`` -> ``{name: [B, L, C_name]}``."""
    return {name: states @ head["kernel"] + head["bias"] for name, head in params.items()}
