"""The discrete VAE of DALL-E (OpenAI's released ``dall_e`` architecture), NHWC.

The encoder maps images ``[B, H, W, C]`` to logits over a vocabulary of image tokens on a grid
``[B, H/f, W/f, vocab_size]`` (``f = 2 ** (group_count - 1)``, 8 for OpenAI's model: 256x256 -> 32x32); the decoder
maps one-hot tokens (or any distribution over them, e.g. a Gumbel-softmax relaxation) back to the parameters of a
logit-Laplace distribution per pixel: ``2 * C`` channels, ``mu`` first, then the log-scale.

Both are a 1x1 (decoder) or 7x7 (encoder) convolution in, ``group_count`` groups of ``n_blk_per_group`` bottleneck
residual blocks (ReLU before every convolution; the residual branch is scaled by ``1 / n_layers ** 2`` with
``n_layers = group_count * n_blk_per_group``), and a ReLU plus 1x1 convolution out. The encoder's group ``g`` has
``n_hid * 2**g`` channels and max-pools by 2 after every group but the last; the decoder's groups go the other way
with nearest-neighbour 2x upsampling.

Pixels are modelled in ``[eps, 1 - eps]`` (:func:`map_pixels` / :func:`unmap_pixels`, ``eps = 0.1``): the encoder
sees mapped pixels, and :func:`decode` returns ``unmap_pixels(sigmoid(mu))``, as OpenAI's usage notebook does.

Parameter trees (names follow the ``dall_e`` modules so the key table stays readable)::

    encoder: input, group_{g}/block_{i}/{id_path (only where the width changes), conv_1, ..., conv_4}, output
    decoder: input, group_{g}/block_{i}/{...}, output                  (g, i count from 1)

each leaf a ``{"kernel": [kh, kw, in, out], "bias": [out]}`` convolution.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Mapping

import einops
import flax.linen as nn
import jax
import jax.numpy as jnp

LOGIT_LAPLACE_EPS = 0.1
ENCODER_KERNELS = (3, 3, 3, 1)  # the four convolutions of an encoder block's residual branch
DECODER_KERNELS = (1, 3, 3, 3)
# dall_e's initialisation: weights N(0, 1 / fan_in), fan_in = in_channels * kh * kw; biases zero.
_KERNEL_INIT = nn.initializers.variance_scaling(1.0, "fan_in", "normal")


@dataclasses.dataclass(frozen=True)
class DVAEConfig:
    """Architecture of a dVAE; the defaults are OpenAI's released model (``dall_e.Encoder()``, ``dall_e.Decoder()``).

    Attributes:
      vocab_size: number of image tokens.
      n_hid: channels of the first encoder group (and of the last decoder group); group ``g`` has
        ``n_hid * 2**g``. A multiple of 4 (each block's bottleneck has a quarter of its channels).
      n_blk_per_group: bottleneck residual blocks per group.
      group_count: groups; images are ``2 ** (group_count - 1)`` times larger than the token grid.
      n_init: channels the decoder's input convolution maps the tokens to.
      input_channels: image channels the encoder reads.
      output_channels: image channels the decoder models (it outputs twice as many: mu and log-scale).
      image_size: the side of the images the model is made for (metadata: any multiple of the
        downsampling factor works).
    """

    vocab_size: int = 8192
    n_hid: int = 256
    n_blk_per_group: int = 2
    group_count: int = 4
    n_init: int = 128
    input_channels: int = 3
    output_channels: int = 3
    image_size: int = 256

    def __post_init__(self):
        if self.n_hid < 4 or self.n_hid % 4:
            raise ValueError(f"DVAEConfig.n_hid must be a positive multiple of 4, got {self.n_hid}.")
        for field in ("vocab_size", "n_blk_per_group", "group_count", "n_init", "input_channels",
                      "output_channels"):
            if getattr(self, field) < 1:
                raise ValueError(f"DVAEConfig.{field} must be >= 1, got {getattr(self, field)}.")
        if self.image_size % self.downsample_factor:
            raise ValueError(f"DVAEConfig.image_size={self.image_size} must be a multiple of the downsampling "
                             f"factor 2**(group_count-1) = {self.downsample_factor}.")

    @property
    def downsample_factor(self) -> int:
        """Image pixels per token along each side (8 for OpenAI's model)."""
        return 2 ** (self.group_count - 1)

    @property
    def token_grid(self) -> int:
        """Tokens along each side for ``image_size`` images (32 for OpenAI's model)."""
        return self.image_size // self.downsample_factor

    @property
    def post_gain(self) -> float:
        """The scale of every block's residual branch: ``1 / n_layers ** 2``."""
        return 1.0 / (self.group_count * self.n_blk_per_group) ** 2

    def group_width(self, group: int) -> int:
        """Channels of encoder group ``group`` (0-based); decoder group ``g`` has ``group_width(group_count-1-g)``."""
        return self.n_hid * 2 ** group


PRESETS: dict[str, DVAEConfig] = {
    # OpenAI's released encoder.pkl / decoder.pkl: 8192 tokens, 256x256 images -> 32x32 tokens.
    "openai": DVAEConfig(),
    # The shapes world: 64x64 images -> 16x16 tokens (three groups), or 8x8 tokens (four groups).
    "shapes": DVAEConfig(vocab_size=512, n_hid=32, n_blk_per_group=2, group_count=3, n_init=32, image_size=64),
    "shapes_8x8": DVAEConfig(vocab_size=512, n_hid=32, n_blk_per_group=2, group_count=4, n_init=32, image_size=64),
    # For tests: 16x16 images -> 8x8 tokens.
    "tiny": DVAEConfig(vocab_size=64, n_hid=8, n_blk_per_group=1, group_count=2, n_init=8, image_size=16),
}


def get_config(name: str) -> DVAEConfig:
    """A preset by name (``openai``, ``shapes``, ``shapes_8x8``, ``tiny``)."""
    if name not in PRESETS:
        raise ValueError(f"Unknown dVAE preset {name!r}; choose one of {', '.join(PRESETS)}.")
    return PRESETS[name]


def map_pixels(x: jax.Array) -> jax.Array:
    """Pixels in [0, 1] -> [eps, 1 - eps], the range the logit-Laplace likelihood models."""
    return (1.0 - 2.0 * LOGIT_LAPLACE_EPS) * x + LOGIT_LAPLACE_EPS


def unmap_pixels(x: jax.Array) -> jax.Array:
    """Inverse of :func:`map_pixels`, clipped to [0, 1]."""
    return jnp.clip((x - LOGIT_LAPLACE_EPS) / (1.0 - 2.0 * LOGIT_LAPLACE_EPS), 0.0, 1.0)


def _conv(features: int, kernel: int, name: str, dtype, param_dtype) -> nn.Conv:
    pad = (kernel - 1) // 2
    return nn.Conv(features, (kernel, kernel), padding=((pad, pad), (pad, pad)), kernel_init=_KERNEL_INIT,
                   dtype=dtype, param_dtype=param_dtype, name=name)


class BottleneckBlock(nn.Module):
    """``id_path(x) + post_gain * res_path(x)``: [B, H, W, C_in] -> [B, H, W, features].

    ``res_path`` is four (ReLU, conv) pairs with ``kernels`` sizes, through ``features // 4`` channels;
    ``id_path`` is a 1x1 convolution where ``C_in != features``, else the identity.
    """

    features: int
    kernels: tuple[int, int, int, int]
    post_gain: float
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        hidden = self.features // 4
        shortcut = x
        if x.shape[-1] != self.features:
            shortcut = _conv(self.features, 1, "id_path", self.dtype, self.param_dtype)(x)
        widths = (hidden, hidden, hidden, self.features)
        h = x
        for i, (width, kernel) in enumerate(zip(widths, self.kernels), start=1):
            h = _conv(width, kernel, f"conv_{i}", self.dtype, self.param_dtype)(nn.relu(h))
        return shortcut + self.post_gain * h


class Group(nn.Module):
    """``blocks`` bottleneck blocks to ``features`` channels, then ``resample``: "pool" (max-pool by 2),
    "upsample" (nearest-neighbour x2) or None. [B, H, W, C] -> [B, H', W', features]."""

    features: int
    blocks: int
    kernels: tuple[int, int, int, int]
    post_gain: float
    resample: str | None = None
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for i in range(1, self.blocks + 1):
            x = BottleneckBlock(self.features, self.kernels, self.post_gain, self.dtype, self.param_dtype,
                                name=f"block_{i}")(x)
        if self.resample == "pool":
            return nn.max_pool(x, (2, 2), strides=(2, 2), padding="VALID")
        if self.resample == "upsample":
            return einops.repeat(x, "b h w c -> b (h i) (w j) c", i=2, j=2)
        return x


class Encoder(nn.Module):
    """Mapped pixels [B, H, W, input_channels] -> token logits [B, H/f, W/f, vocab_size] (float32).

    The output convolution computes in float32 whatever ``dtype`` is (as ``dall_e`` keeps it out of float16).
    """

    config: DVAEConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        h = _conv(cfg.n_hid, 7, "input", self.dtype, self.param_dtype)(x.astype(self.dtype))
        for g in range(cfg.group_count):
            resample = "pool" if g < cfg.group_count - 1 else None
            h = Group(cfg.group_width(g), cfg.n_blk_per_group, ENCODER_KERNELS, cfg.post_gain, resample,
                      self.dtype, self.param_dtype, name=f"group_{g + 1}")(h)
        h = nn.relu(h).astype(jnp.float32)
        return _conv(cfg.vocab_size, 1, "output", jnp.float32, self.param_dtype)(h)


class TokenInput(nn.Module):
    """The decoder's 1x1 input convolution from ``vocab_size`` channels to ``features``, in float32.

    Takes integer tokens [B, h, w] (a row lookup: the same result as the convolution of their one-hot vectors,
    without building them) or a distribution over tokens [B, h, w, vocab_size]. Parameters as a 1x1 ``nn.Conv``.
    """

    vocab_size: int
    features: int
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.param("kernel", _KERNEL_INIT, (1, 1, self.vocab_size, self.features), self.param_dtype)
        bias = self.param("bias", nn.initializers.zeros, (self.features,), self.param_dtype)
        weight = kernel[0, 0].astype(jnp.float32)  # [V, F]
        if jnp.issubdtype(x.dtype, jnp.integer):
            h = jnp.take(weight, x, axis=0)
        else:
            h = jnp.einsum("bhwv,vf->bhwf", x.astype(jnp.float32), weight)
        return h + bias.astype(jnp.float32)


class Decoder(nn.Module):
    """Tokens [B, h, w] (int) or token probabilities [B, h, w, vocab_size] -> logit-Laplace statistics
    [B, h*f, w*f, 2 * output_channels] (float32): ``mu`` then the log-scale along channels."""

    config: DVAEConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, tokens: jax.Array) -> jax.Array:
        cfg = self.config
        h = TokenInput(cfg.vocab_size, cfg.n_init, self.param_dtype, name="input")(tokens).astype(self.dtype)
        for g in range(cfg.group_count):
            resample = "upsample" if g < cfg.group_count - 1 else None
            h = Group(cfg.group_width(cfg.group_count - 1 - g), cfg.n_blk_per_group, DECODER_KERNELS,
                      cfg.post_gain, resample, self.dtype, self.param_dtype, name=f"group_{g + 1}")(h)
        h = _conv(2 * cfg.output_channels, 1, "output", self.dtype, self.param_dtype)(nn.relu(h))
        return h.astype(jnp.float32)


def init_encoder(config: DVAEConfig, key: jax.Array, param_dtype: Any = jnp.float32) -> dict:
    """Randomly initialised encoder parameters (the tree under ``"params"``)."""
    side = config.downsample_factor
    x = jnp.zeros((1, side, side, config.input_channels), jnp.float32)
    return Encoder(config, param_dtype=param_dtype).init(key, x)["params"]


def init_decoder(config: DVAEConfig, key: jax.Array, param_dtype: Any = jnp.float32) -> dict:
    """Randomly initialised decoder parameters (the tree under ``"params"``)."""
    return Decoder(config, param_dtype=param_dtype).init(key, jnp.zeros((1, 1, 1), jnp.int32))["params"]


def encoder_abstract_params(config: DVAEConfig, param_dtype: Any = jnp.float32) -> dict:
    """The encoder's parameter tree as ``jax.ShapeDtypeStruct`` leaves, without initialising anything."""
    return jax.eval_shape(functools.partial(init_encoder, config, param_dtype=param_dtype), jax.random.key(0))


def decoder_abstract_params(config: DVAEConfig, param_dtype: Any = jnp.float32) -> dict:
    """The decoder's parameter tree as ``jax.ShapeDtypeStruct`` leaves, without initialising anything."""
    return jax.eval_shape(functools.partial(init_decoder, config, param_dtype=param_dtype), jax.random.key(0))


def encode(params: Mapping[str, Any], images: jax.Array, config: DVAEConfig, *,
           dtype: Any = jnp.float32) -> jax.Array:
    """Images [B, H, W, input_channels] in [0, 1] -> token logits [B, H/f, W/f, vocab_size] float32.

    ``params`` is the encoder's tree. To jit, close over ``config`` and ``dtype`` or mark them static.
    """
    x = map_pixels(jnp.asarray(images, jnp.float32))
    return Encoder(config, dtype=dtype).apply({"params": params}, x)


def decoder_stats(params: Mapping[str, Any], tokens: jax.Array, config: DVAEConfig, *,
                  dtype: Any = jnp.float32) -> jax.Array:
    """Tokens [B, h, w] (int) or token probabilities [B, h, w, vocab_size] -> the decoder's raw logit-Laplace
    statistics [B, h*f, w*f, 2 * output_channels] float32 (``mu`` channels first, then the log-scales)."""
    return Decoder(config, dtype=dtype).apply({"params": params}, jnp.asarray(tokens))


def stats_to_images(stats: jax.Array) -> jax.Array:
    """Logit-Laplace statistics [..., 2C] -> the distribution's mean pixel, unmapped: [..., C] in [0, 1]."""
    mu = stats[..., : stats.shape[-1] // 2]
    return unmap_pixels(jax.nn.sigmoid(mu.astype(jnp.float32)))


def decode(params: Mapping[str, Any], tokens: jax.Array, config: DVAEConfig, *,
           dtype: Any = jnp.float32) -> jax.Array:
    """Tokens [B, h, w] (int) or token probabilities [B, h, w, vocab_size] (soft one-hots, e.g. a Gumbel-softmax
    sample) -> images [B, h*f, w*f, output_channels] float32 in [0, 1]: ``unmap_pixels(sigmoid(mu))``."""
    return stats_to_images(decoder_stats(params, tokens, config, dtype=dtype))
