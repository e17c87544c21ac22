"""Timestep embeddings and fixed 2-D sine-cosine position tables."""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np


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


def sincos_position_table_2d(
    dim: int, height: int, width: int, *, base_size: int | None = None, interpolation_scale: float = 1.0,
) -> np.ndarray:
    """Fixed 2-D sine-cosine position embeddings of a ``height x width`` token grid (MAE / DiT / PixArt).

    Token ``h * width + w`` gets ``[sin(w * f), cos(w * f), sin(h * f), cos(h * f)]`` with the ``dim / 4``
    frequencies ``f_i = 10000 ** (-i / (dim / 4))``. Positions along each side are rescaled so the side spans
    ``base_size`` units, divided by ``interpolation_scale``: ``pos = arange(n) / (n / base_size) / scale``
    (``base_size=None``: no rescaling). A grid other than the one a model was trained on thus covers the same range
    of positions, as diffusers' ``PatchEmbed`` does.

    Args:
      dim: embedding width, a multiple of 4.
      height, width: grid size in tokens.
      base_size: the grid side the model was trained for (latent size // patch size).
      interpolation_scale: extra divisor of the positions.

    Returns:
      ``[height * width, dim]`` float32 (computed in float64 from float32 positions).
    """
    if dim % 4:
        raise ValueError(f"sincos_position_table_2d: dim={dim} must be a multiple of 4.")

    def positions(n: int) -> np.ndarray:
        pos = np.arange(n, dtype=np.float32)
        if base_size is not None:
            pos = pos / np.float32(n / base_size)
        return (pos / np.float32(interpolation_scale)).astype(np.float64)

    pos_h, pos_w = np.meshgrid(positions(height), positions(width), indexing="ij")  # [H, W] each
    omega = 1.0 / 10000.0 ** (np.arange(dim // 4, dtype=np.float64) / (dim / 4.0))

    def one_axis(pos: np.ndarray) -> np.ndarray:
        angles = np.outer(pos.reshape(-1), omega)
        return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)

    return np.concatenate([one_axis(pos_w), one_axis(pos_h)], axis=1).astype(np.float32)
