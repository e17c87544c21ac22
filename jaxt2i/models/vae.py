"""The KL-regularised autoencoder of latent diffusion (Stable Diffusion's VAE), NHWC.

Images ``[B, H, W, in_channels]`` in [-1, 1] are encoded to a diagonal Gaussian posterior over latents
``[B, H/f, W/f, latent_channels]`` (``f = 2 ** (len(block_out_channels) - 1)``, 8 for Stable Diffusion); the
decoder maps latents back to images. The diffusion model works on *scaled* latents
``(z - shift_factor) * scaling_factor``; :func:`encode_to_latents` and :func:`decode_latents` do that scaling and
the [0, 1] <-> [-1, 1] image mapping, so a pipeline need not know about either.

The parameter tree (names follow diffusers' AutoencoderKL so that the key table stays readable)::

    encoder/conv_in, encoder/down_blocks_{i}/resnets_{j}, encoder/down_blocks_{i}/downsample/conv,
    encoder/mid_block/{resnets_0, attentions_0/{group_norm, attention/{query,key,value,out}}, resnets_1},
    encoder/conv_norm_out, encoder/conv_out, quant_conv, post_quant_conv,
    decoder/conv_in, decoder/mid_block/..., decoder/up_blocks_{i}/resnets_{j}, decoder/up_blocks_{i}/upsample/conv,
    decoder/conv_norm_out, decoder/conv_out

``decoder/up_blocks_0`` is the lowest-resolution block (the order the decoder runs them, as in diffusers).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Mapping

import einops
import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import struct

from jaxt2i.nn.attention import MultiHeadAttention
from jaxt2i.nn.resnet import Downsample, ResnetBlock, Upsample, conv3x3

# diffusers' AutoencoderKL hard-codes this epsilon for every GroupNorm of the encoder and decoder.
NORM_EPS = 1e-6
# diffusers clamps the posterior log-variance to this range before exponentiating it.
LOGVAR_RANGE = (-30.0, 20.0)

_DOWN_BLOCK = "DownEncoderBlock2D"
_UP_BLOCK = "UpDecoderBlock2D"


@dataclasses.dataclass(frozen=True)
class VAEConfig:
    """Architecture of a KL autoencoder; the defaults are Stable Diffusion 1.x/2.x's VAE.

    Attributes:
      in_channels: image channels fed to the encoder.
      out_channels: image channels produced by the decoder.
      latent_channels: channels of the latent ``z``.
      block_out_channels: channels of each resolution level, highest resolution first.
      layers_per_block: resnet blocks per encoder level (the decoder has one more per level).
      norm_num_groups: GroupNorm groups everywhere.
      scaling_factor: latents seen by the diffusion model are ``(z - shift_factor) * scaling_factor``.
      shift_factor: see ``scaling_factor``; ``None`` means no shift (SD1/SD2/SDXL).
      use_quant_conv: a 1x1 conv on the encoder's moments.
      use_post_quant_conv: a 1x1 conv on ``z`` before the decoder.
      mid_block_add_attention: whether the middle blocks have a self-attention layer.
      sample_size: the image size the VAE was trained at (metadata kept for a faithful config round trip).
      force_upcast: diffusers' hint that this VAE overflows in float16 and should run in float32 (metadata).
    """

    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 4
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    norm_num_groups: int = 32
    scaling_factor: float = 0.18215
    shift_factor: float | None = None
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True
    sample_size: int = 512
    force_upcast: bool = True

    def __post_init__(self):
        object.__setattr__(self, "block_out_channels", tuple(int(c) for c in self.block_out_channels))
        if not self.block_out_channels:
            raise ValueError("VAEConfig.block_out_channels must name at least one level.")
        bad = [c for c in self.block_out_channels if c % self.norm_num_groups]
        if bad:
            raise ValueError(f"VAEConfig: every entry of block_out_channels must be divisible by norm_num_groups="
                             f"{self.norm_num_groups}; {bad} are not.")
        if self.layers_per_block < 1:
            raise ValueError(f"VAEConfig.layers_per_block must be >= 1, got {self.layers_per_block}.")

    @property
    def downsample_factor(self) -> int:
        """Image pixels per latent pixel along each side (8 for Stable Diffusion)."""
        return 2 ** (len(self.block_out_channels) - 1)

    @classmethod
    def from_diffusers(cls, config: Mapping[str, Any]) -> "VAEConfig":
        """Builds a config from a diffusers ``AutoencoderKL`` ``config.json`` dict.

        Raises:
          ValueError: for another model class, block types other than DownEncoderBlock2D/UpDecoderBlock2D, an
            activation other than SiLU, per-channel ``latents_mean``/``latents_std``, or keys we do not know.
        """
        config = dict(config)
        class_name = config.get("_class_name", "AutoencoderKL")
        if class_name != "AutoencoderKL":
            raise ValueError(f"Expected an AutoencoderKL config, got _class_name={class_name!r}. Only the KL "
                             "autoencoder of Stable Diffusion is supported by jaxt2i.models.vae.")
        fields = {f.name for f in dataclasses.fields(cls)}
        handled = fields | {"down_block_types", "up_block_types", "act_fn", "latents_mean", "latents_std"}
        # Keys starting with "_" are bookkeeping (_diffusers_version, _name_or_path, ...), not architecture.
        unknown = sorted(k for k in config if k not in handled and not k.startswith("_"))
        if unknown:
            raise ValueError(f"AutoencoderKL config has options jaxt2i does not support: {', '.join(unknown)}. "
                             "Remove them if they are at their defaults, or use a supported VAE.")
        levels = len(config.get("block_out_channels", cls.block_out_channels))
        for key, expected in (("down_block_types", _DOWN_BLOCK), ("up_block_types", _UP_BLOCK)):
            types = list(config.get(key, [expected] * levels))
            if len(types) != levels or any(t != expected for t in types):
                raise ValueError(f"AutoencoderKL config: {key}={types} is not supported; jaxt2i needs {levels} "
                                 f"x {expected!r} (one per entry of block_out_channels).")
        act = config.get("act_fn", "silu")
        if act not in ("silu", "swish"):
            raise ValueError(f"AutoencoderKL config: act_fn={act!r} is not supported; only 'silu' is.")
        for key in ("latents_mean", "latents_std"):
            if config.get(key) is not None:
                raise ValueError(f"AutoencoderKL config: {key} (per-channel latent statistics) is not supported; "
                                 "only scaling_factor/shift_factor are.")
        sample_size = config.get("sample_size", cls.sample_size)
        if isinstance(sample_size, (list, tuple)):
            if len(set(sample_size)) != 1:
                raise ValueError(f"AutoencoderKL config: non-square sample_size={sample_size} is not supported.")
            sample_size = sample_size[0]
        kwargs = {k: config[k] for k in fields if k in config}
        kwargs["sample_size"] = int(sample_size)
        if "block_out_channels" in kwargs:
            kwargs["block_out_channels"] = tuple(kwargs["block_out_channels"])
        return cls(**kwargs)

    def to_diffusers(self) -> dict[str, Any]:
        """The diffusers ``AutoencoderKL`` config dict (``AutoencoderKL(**d)`` builds the same architecture)."""
        levels = len(self.block_out_channels)
        return {
            "_class_name": "AutoencoderKL",
            "in_channels": self.in_channels,
            "out_channels": self.out_channels,
            "down_block_types": [_DOWN_BLOCK] * levels,
            "up_block_types": [_UP_BLOCK] * levels,
            "block_out_channels": list(self.block_out_channels),
            "layers_per_block": self.layers_per_block,
            "act_fn": "silu",
            "latent_channels": self.latent_channels,
            "norm_num_groups": self.norm_num_groups,
            "sample_size": self.sample_size,
            "scaling_factor": self.scaling_factor,
            "shift_factor": self.shift_factor,
            "latents_mean": None,
            "latents_std": None,
            "force_upcast": self.force_upcast,
            "use_quant_conv": self.use_quant_conv,
            "use_post_quant_conv": self.use_post_quant_conv,
            "mid_block_add_attention": self.mid_block_add_attention,
        }


PRESETS: dict[str, VAEConfig] = {
    # Stable Diffusion 1.x / 2.x.
    "sd": VAEConfig(),
    # SDXL: same architecture, different latent scale, trained at 1024.
    "sdxl": VAEConfig(scaling_factor=0.13025, sample_size=1024),
    # For tests: two levels (factor 2), one resnet per level, 8 groups so GroupNorm really groups channels.
    "tiny": VAEConfig(block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8, sample_size=32),
}


def get_config(name: str) -> VAEConfig:
    """A preset by name (``sd``, ``sdxl``, ``tiny``)."""
    if name not in PRESETS:
        raise ValueError(f"Unknown VAE preset {name!r}; choose one of {', '.join(PRESETS)}.")
    return PRESETS[name]


@struct.dataclass
class DiagonalGaussian:
    """The encoder's posterior ``N(mean, exp(logvar))``, independent per element.

    ``mean`` and ``logvar`` are ``[B, h, w, C]``. Build it with :meth:`from_moments` (which clips ``logvar`` to
    ``LOGVAR_RANGE`` as diffusers does). Reductions (``kl``, ``nll``) sum over all non-batch axes in float32.
    """

    mean: jax.Array
    logvar: jax.Array

    @classmethod
    def from_moments(cls, moments: jax.Array) -> "DiagonalGaussian":
        """``moments``: [B, h, w, 2C], mean first then log-variance along channels."""
        mean, logvar = jnp.split(moments, 2, axis=-1)
        return cls(mean=mean, logvar=jnp.clip(logvar, *LOGVAR_RANGE))

    @property
    def std(self) -> jax.Array:
        return jnp.exp(0.5 * self.logvar)

    @property
    def var(self) -> jax.Array:
        return jnp.exp(self.logvar)

    def sample(self, key: jax.Array) -> jax.Array:
        """A reparameterised draw ``mean + std * eps``: [B, h, w, C] in the dtype of ``mean``."""
        noise = jax.random.normal(key, self.mean.shape, self.mean.dtype)
        return self.mean + self.std * noise

    def mode(self) -> jax.Array:
        return self.mean

    def kl(self, other: "DiagonalGaussian | None" = None) -> jax.Array:
        """KL(self || other) per example: [B] float32; ``other=None`` is the standard normal."""
        mean, logvar = self.mean.astype(jnp.float32), self.logvar.astype(jnp.float32)
        if other is None:
            terms = jnp.square(mean) + jnp.exp(logvar) - 1.0 - logvar
        else:
            o_mean, o_logvar = other.mean.astype(jnp.float32), other.logvar.astype(jnp.float32)
            o_var = jnp.exp(o_logvar)
            terms = jnp.square(mean - o_mean) / o_var + jnp.exp(logvar) / o_var - 1.0 - logvar + o_logvar
        return 0.5 * _sum_non_batch(terms)

    def nll(self, x: jax.Array) -> jax.Array:
        """Negative log-likelihood of ``x`` [B, h, w, C] per example: [B] float32."""
        mean, logvar = self.mean.astype(jnp.float32), self.logvar.astype(jnp.float32)
        x = x.astype(jnp.float32)
        terms = math.log(2.0 * math.pi) + logvar + jnp.square(x - mean) / jnp.exp(logvar)
        return 0.5 * _sum_non_batch(terms)


def _sum_non_batch(x: jax.Array) -> jax.Array:
    return jnp.sum(x, axis=tuple(range(1, x.ndim)))


def _group_norm(config: VAEConfig, dtype, param_dtype, name: str) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=config.norm_num_groups, epsilon=NORM_EPS, dtype=dtype,
                        param_dtype=param_dtype, name=name)


class SpatialSelfAttention(nn.Module):
    """GroupNorm, then one-head self-attention over the H*W positions, plus the input: [B, H, W, C] -> same.

    Names: ``group_norm``, ``attention`` (a :class:`MultiHeadAttention` with biased query/key/value/out).
    """

    config: VAEConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        height = x.shape[1]
        channels = x.shape[-1]
        h = _group_norm(self.config, self.dtype, self.param_dtype, "group_norm")(x)
        tokens = einops.rearrange(h, "b h w c -> b (h w) c")
        out = MultiHeadAttention(num_heads=1, head_dim=channels, qkv_bias=True, out_bias=True, dtype=self.dtype,
                                 param_dtype=self.param_dtype, name="attention")(tokens)
        return x + einops.rearrange(out, "b (h w) c -> b h w c", h=height)


class MidBlock(nn.Module):
    """Resnet, optional attention, resnet at constant width: [B, H, W, C] -> same.

    Names: resnets_0, attentions_0, resnets_1.
    """

    config: VAEConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        channels = x.shape[-1]
        resnet = functools.partial(ResnetBlock, channels, groups=self.config.norm_num_groups, eps=NORM_EPS,
                                   dtype=self.dtype, param_dtype=self.param_dtype)
        x = resnet(name="resnets_0")(x)
        if self.config.mid_block_add_attention:
            x = SpatialSelfAttention(self.config, self.dtype, self.param_dtype, name="attentions_0")(x)
        return resnet(name="resnets_1")(x)


class Encoder(nn.Module):
    """Image [B, H, W, in_channels] -> moments [B, H/f, W/f, 2 * latent_channels] (before quant_conv)."""

    config: VAEConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = conv3x3(cfg.block_out_channels[0], name="conv_in", **kw)(x.astype(self.dtype))
        last = len(cfg.block_out_channels) - 1
        for i, channels in enumerate(cfg.block_out_channels):
            h = DownEncoderBlock(cfg, channels, add_downsample=i != last, name=f"down_blocks_{i}", **kw)(h)
        h = MidBlock(cfg, name="mid_block", **kw)(h)
        h = nn.silu(_group_norm(cfg, self.dtype, self.param_dtype, "conv_norm_out")(h))
        return conv3x3(2 * cfg.latent_channels, name="conv_out", **kw)(h)


class DownEncoderBlock(nn.Module):
    """``layers_per_block`` resnets to ``channels``, then an optional stride-2 conv (bottom/right padded)."""

    config: VAEConfig
    channels: int
    add_downsample: bool
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for j in range(self.config.layers_per_block):
            x = ResnetBlock(self.channels, groups=self.config.norm_num_groups, eps=NORM_EPS, dtype=self.dtype,
                            param_dtype=self.param_dtype, name=f"resnets_{j}")(x)
        if self.add_downsample:
            x = Downsample(self.channels, asymmetric=True, dtype=self.dtype, param_dtype=self.param_dtype,
                           name="downsample")(x)
        return x


class UpDecoderBlock(nn.Module):
    """``layers_per_block + 1`` resnets to ``channels``, then an optional nearest x2 upsample and conv."""

    config: VAEConfig
    channels: int
    add_upsample: bool
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for j in range(self.config.layers_per_block + 1):
            x = ResnetBlock(self.channels, groups=self.config.norm_num_groups, eps=NORM_EPS, dtype=self.dtype,
                            param_dtype=self.param_dtype, name=f"resnets_{j}")(x)
        if self.add_upsample:
            x = Upsample(self.channels, dtype=self.dtype, param_dtype=self.param_dtype, name="upsample")(x)
        return x


class Decoder(nn.Module):
    """Latent [B, h, w, latent_channels] (after post_quant_conv) -> image [B, h*f, w*f, out_channels]."""

    config: VAEConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, z: jax.Array) -> jax.Array:
        cfg = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        widths = cfg.block_out_channels[::-1]
        h = conv3x3(widths[0], name="conv_in", **kw)(z.astype(self.dtype))
        h = MidBlock(cfg, name="mid_block", **kw)(h)
        last = len(widths) - 1
        for i, channels in enumerate(widths):
            h = UpDecoderBlock(cfg, channels, add_upsample=i != last, name=f"up_blocks_{i}", **kw)(h)
        h = nn.silu(_group_norm(cfg, self.dtype, self.param_dtype, "conv_norm_out")(h))
        return conv3x3(cfg.out_channels, name="conv_out", **kw)(h)


class AutoencoderKL(nn.Module):
    """Encoder + decoder with the 1x1 (post-)quantisation convs.

    ``encode``: images [B, H, W, in_channels] in [-1, 1] -> :class:`DiagonalGaussian` over [B, H/f, W/f, C].
    ``decode``: latents z [B, h, w, C] (unscaled) -> images [B, h*f, w*f, out_channels], roughly in [-1, 1].
    ``__call__(x, key=None)``: (decode(sample or mode), posterior); used for ``init`` and for training.
    """

    config: VAEConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def setup(self):
        cfg, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.encoder = Encoder(cfg, **kw)
        self.decoder = Decoder(cfg, **kw)
        if cfg.use_quant_conv:
            self.quant_conv = nn.Conv(2 * cfg.latent_channels, (1, 1), **kw)
        if cfg.use_post_quant_conv:
            self.post_quant_conv = nn.Conv(cfg.latent_channels, (1, 1), **kw)

    def encode(self, x: jax.Array) -> DiagonalGaussian:
        moments = self.encoder(x)
        if self.config.use_quant_conv:
            moments = self.quant_conv(moments)
        return DiagonalGaussian.from_moments(moments)

    def decode(self, z: jax.Array) -> jax.Array:
        z = z.astype(self.dtype)
        if self.config.use_post_quant_conv:
            z = self.post_quant_conv(z)
        return self.decoder(z)

    def __call__(self, x: jax.Array, key: jax.Array | None = None) -> tuple[jax.Array, DiagonalGaussian]:
        posterior = self.encode(x)
        z = posterior.mode() if key is None else posterior.sample(key)
        return self.decode(z), posterior


def _variables(params: Mapping[str, Any]) -> dict:
    """Accepts either the parameter tree or ``{"params": tree}``."""
    return dict(params) if set(params) == {"params"} else {"params": params}


def init_params(config: VAEConfig, key: jax.Array, param_dtype: Any = jnp.float32) -> dict:
    """Randomly initialised parameters (the tree under ``"params"``)."""
    model = AutoencoderKL(config, param_dtype=param_dtype)
    side = config.downsample_factor
    x = jnp.zeros((1, side, side, config.in_channels), jnp.float32)
    return model.init(key, x)["params"]


def abstract_params(config: VAEConfig, param_dtype: Any = jnp.float32) -> dict:
    """The parameter tree as ``jax.ShapeDtypeStruct`` leaves, without allocating or initialising anything."""
    return jax.eval_shape(functools.partial(init_params, config, param_dtype=param_dtype), jax.random.key(0))


def scale_latents(z: jax.Array, config: VAEConfig) -> jax.Array:
    """VAE latents -> the latents a diffusion model sees: ``(z - shift) * scaling_factor``."""
    shift = config.shift_factor or 0.0
    return (z - shift) * config.scaling_factor


def unscale_latents(latents: jax.Array, config: VAEConfig) -> jax.Array:
    """Inverse of :func:`scale_latents`."""
    shift = config.shift_factor or 0.0
    return latents / config.scaling_factor + shift


def encode_to_latents(
    params: Mapping[str, Any],
    images: jax.Array,
    config: VAEConfig,
    *,
    key: jax.Array | None = None,
    dtype: Any = jnp.float32,
) -> jax.Array:
    """Images [B, H, W, in_channels] in [0, 1] -> scaled latents [B, H/f, W/f, latent_channels] float32.

    With ``key`` the latent is a posterior sample (what Stable Diffusion training and diffusers' img2img use),
    without it the posterior mean. ``params`` is the VAE's parameter tree (or ``{"params": tree}``). To jit,
    close over ``config`` and ``dtype`` or mark them static.
    """
    model = AutoencoderKL(config, dtype=dtype)
    x = 2.0 * jnp.asarray(images, jnp.float32) - 1.0
    posterior = model.apply(_variables(params), x, method=AutoencoderKL.encode)
    z = posterior.mode() if key is None else posterior.sample(key)
    return scale_latents(z.astype(jnp.float32), config)


def decode_latents(
    params: Mapping[str, Any],
    latents: jax.Array,
    config: VAEConfig,
    *,
    dtype: Any = jnp.float32,
) -> jax.Array:
    """Scaled latents [B, h, w, latent_channels] (as the diffusion model produces them) -> images
    [B, h*f, w*f, out_channels] float32 in [0, 1] (clipped).
    """
    model = AutoencoderKL(config, dtype=dtype)
    z = unscale_latents(jnp.asarray(latents, jnp.float32), config)
    x = model.apply(_variables(params), z, method=AutoencoderKL.decode)
    return jnp.clip((x.astype(jnp.float32) + 1.0) / 2.0, 0.0, 1.0)
