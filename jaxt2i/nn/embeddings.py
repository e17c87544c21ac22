"""Timestep embeddings."""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp


def sinusoidal_embedding(
    timesteps: jax.Array, dim: int, *, flip_sin_to_cos: bool = True, freq_shift: float = 0.0,
    max_period: float = 10000.0,
) -> jax.Array:
    """Sinusoidal features of (possibly fractional) timesteps, computed in float32.

    Args:
      timesteps: [B] (or scalar) timesteps.
      dim: embedding width (even).
      flip_sin_to_cos: put cos first (Stable Diffusion's U-Net does).
      freq_shift: subtracted from the frequency denominator (0 for SD, 1 for some other models).

    Returns:
      [B, dim] float32.
    """
    timesteps = jnp.atleast_1d(jnp.asarray(timesteps, jnp.float32))
    half = dim // 2
    exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift)
    angles = timesteps[:, None] * jnp.exp(exponent)[None, :]
    sin, cos = jnp.sin(angles), jnp.cos(angles)
    emb = jnp.concatenate([cos, sin] if flip_sin_to_cos else [sin, cos], axis=-1)
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


class TimestepMLP(nn.Module):
    """Linear-SiLU-Linear on the sinusoidal features: [B, Din] -> [B, dim]. Names: linear_1, linear_2."""

    dim: int
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = nn.Dense(self.dim, dtype=self.dtype, param_dtype=self.param_dtype, name="linear_1")(x)
        return nn.Dense(self.dim, dtype=self.dtype, param_dtype=self.param_dtype, name="linear_2")(nn.silu(x))
