"""Convolutional building blocks shared by the VAE and the U-Net (NHWC)."""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp


def conv3x3(features: int, dtype, param_dtype, name: str, stride: int = 1, padding=((1, 1), (1, 1))) -> nn.Conv:
    """A 3x3 convolution with PyTorch's symmetric padding of 1 (``padding`` may override it)."""
    return nn.Conv(features, (3, 3), strides=(stride, stride), padding=padding, dtype=dtype,
                   param_dtype=param_dtype, name=name)


class ResnetBlock(nn.Module):
    """GroupNorm-SiLU-Conv twice with a residual; optional time-embedding shift.

    ``x``: [B, H, W, Cin]; ``temb``: optional [B, T]; returns [B, H, W, out_channels].
    Parameter names: norm1, conv1, time_emb_proj, norm2, conv2, conv_shortcut (1x1, only when Cin != Cout).
    """

    out_channels: int
    groups: int = 32
    eps: float = 1e-6
    dropout: float = 0.0
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, temb: jax.Array | None = None, deterministic: bool = True) -> jax.Array:
        group_norm = functools.partial(nn.GroupNorm, num_groups=self.groups, epsilon=self.eps,
                                       dtype=self.dtype, param_dtype=self.param_dtype)
        h = nn.silu(group_norm(name="norm1")(x))
        h = conv3x3(self.out_channels, self.dtype, self.param_dtype, "conv1")(h)
        if temb is not None:
            shift = nn.Dense(self.out_channels, dtype=self.dtype, param_dtype=self.param_dtype,
                             name="time_emb_proj")(nn.silu(temb))
            h = h + shift[:, None, None, :]
        h = nn.silu(group_norm(name="norm2")(h))
        h = nn.Dropout(self.dropout)(h, deterministic=deterministic)
        h = conv3x3(self.out_channels, self.dtype, self.param_dtype, "conv2")(h)
        if x.shape[-1] != self.out_channels:
            x = nn.Conv(self.out_channels, (1, 1), dtype=self.dtype, param_dtype=self.param_dtype,
                        name="conv_shortcut")(x)
        return x + h


class Downsample(nn.Module):
    """Stride-2 3x3 convolution: [B, H, W, C] -> [B, H/2, W/2, C].

    ``asymmetric=True`` pads only bottom/right by one (the KL-VAE encoder); otherwise one on every side (U-Net).
    """

    channels: int
    asymmetric: bool = False
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        padding = ((0, 1), (0, 1)) if self.asymmetric else ((1, 1), (1, 1))
        return conv3x3(self.channels, self.dtype, self.param_dtype, "conv", stride=2, padding=padding)(x)


class Upsample(nn.Module):
    """Nearest-neighbour x2 then a 3x3 convolution: [B, H, W, C] -> [B, 2H, 2W, C]."""

    channels: int
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
        return conv3x3(self.channels, self.dtype, self.param_dtype, "conv")(x)
