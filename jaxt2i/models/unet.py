"""The conditional U-Net of Stable Diffusion 1.x / 2.x (NHWC), laid out like diffusers' UNet2DConditionModel.

Data flow: ``conv_in`` -> down blocks (ResNet blocks, optional spatial transformers, stride-2 downsample), each
output kept as a skip -> mid block (ResNet, transformer, ResNet) -> up blocks (skip concatenated on channels before
each ResNet, optional transformers, nearest x2 upsample) -> GroupNorm, SiLU, ``conv_out``. A sinusoidal timestep
embedding, passed through a two-layer MLP, shifts every ResNet block; the text context enters through the
cross-attention of every transformer block.

Parameter tree (module names mirror diffusers' keys, dots replaced by underscores where needed)::

    conv_in, time_embedding/{linear_1,linear_2},
    down_blocks_{i}/{resnets_{j}, attentions_{j}, downsamplers_0/conv},
    mid_block/{resnets_0, attentions_0, resnets_1},
    up_blocks_{i}/{resnets_{j}, attentions_{j}, upsamplers_0/conv},
    conv_norm_out, conv_out

A transformer (``attentions_{j}``) holds ``norm, proj_in, transformer_blocks_{k}/{norm1, attn1, norm2, attn2, norm3,
ff/{proj, out}}, proj_out``; ``proj_in``/``proj_out`` are always Dense (a 1x1 convolution on NHWC is the same map;
the key table converts SD1's 1x1-conv weights).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Mapping

import einops
import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxt2i.nn.attention import MultiHeadAttention
from jaxt2i.nn.embeddings import TimestepMLP, sinusoidal_embedding
from jaxt2i.nn.resnet import Downsample, ResnetBlock, Upsample, conv3x3

CROSS_DOWN = "CrossAttnDownBlock2D"
PLAIN_DOWN = "DownBlock2D"
CROSS_UP = "CrossAttnUpBlock2D"
PLAIN_UP = "UpBlock2D"
MID_BLOCK = "UNetMidBlock2DCrossAttn"

# Epsilon of the GroupNorm in front of every spatial transformer (fixed in diffusers and in the original code).
TRANSFORMER_GROUPNORM_EPS = 1e-6
# Epsilon of the LayerNorms inside each transformer block.
TRANSFORMER_LAYERNORM_EPS = 1e-5


@dataclasses.dataclass(frozen=True)
class UNetConfig:
    """Architecture of a Stable-Diffusion-style conditional U-Net (the fields of diffusers' config.json).

    ``attention_head_dim`` keeps diffusers' historical meaning: unless ``num_attention_heads`` is given, it is the
    NUMBER of heads per block (SD1: 8 heads everywhere; SD2: (5, 10, 20, 20) heads, i.e. 64-wide heads). Each
    transformer's head width is its channel count divided by its head count.
    """

    sample_size: int = 64
    in_channels: int = 4
    out_channels: int = 4
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    layers_per_block: int = 2
    down_block_types: tuple[str, ...] = (CROSS_DOWN, CROSS_DOWN, CROSS_DOWN, PLAIN_DOWN)
    up_block_types: tuple[str, ...] = (PLAIN_UP, CROSS_UP, CROSS_UP, CROSS_UP)
    attention_head_dim: int | tuple[int, ...] = 8
    num_attention_heads: int | tuple[int, ...] | None = None
    cross_attention_dim: int = 768
    use_linear_projection: bool = False
    # Recorded for round-tripping; our attention always forms scores and softmax in float32, i.e. upcast.
    upcast_attention: bool = False
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    transformer_layers_per_block: int | tuple[int, ...] = 1
    dropout: float = 0.0
    only_cross_attention: bool = False
    dual_cross_attention: bool = False
    class_embed_type: str | None = None

    def __post_init__(self):
        for name in ("block_out_channels", "down_block_types", "up_block_types", "attention_head_dim",
                     "num_attention_heads", "transformer_layers_per_block"):
            value = getattr(self, name)
            if isinstance(value, list):
                object.__setattr__(self, name, tuple(value))
        self._validate()

    def _validate(self) -> None:
        n = len(self.block_out_channels)
        if len(self.down_block_types) != n or len(self.up_block_types) != n:
            raise ValueError(
                f"UNetConfig: block_out_channels {self.block_out_channels}, down_block_types {self.down_block_types} "
                f"and up_block_types {self.up_block_types} must have the same length.")
        for kind in self.down_block_types:
            if kind not in (CROSS_DOWN, PLAIN_DOWN):
                raise ValueError(f"UNetConfig: unsupported down block {kind!r}; use {CROSS_DOWN} or {PLAIN_DOWN}.")
        for kind in self.up_block_types:
            if kind not in (CROSS_UP, PLAIN_UP):
                raise ValueError(f"UNetConfig: unsupported up block {kind!r}; use {CROSS_UP} or {PLAIN_UP}.")
        if not isinstance(self.layers_per_block, int) or self.layers_per_block < 1:
            raise ValueError(
                f"UNetConfig: layers_per_block must be one positive int (got {self.layers_per_block!r}); "
                "per-block counts are not supported.")
        if not isinstance(self.cross_attention_dim, int):
            raise ValueError(
                f"UNetConfig: cross_attention_dim must be one int (got {self.cross_attention_dim!r}); "
                "per-block context widths are not supported.")
        for name in ("attention_head_dim", "num_attention_heads", "transformer_layers_per_block"):
            value = getattr(self, name)
            if isinstance(value, tuple) and len(value) != n:
                raise ValueError(f"UNetConfig: {name} {value} needs one entry per block ({n}).")
            if isinstance(value, tuple) and not all(isinstance(v, int) for v in value):
                raise ValueError(f"UNetConfig: {name} must be an int or a tuple of ints, got {value!r}.")
        for i, channels in enumerate(self.block_out_channels):
            if channels % self.norm_num_groups:
                raise ValueError(f"UNetConfig: block_out_channels[{i}]={channels} is not divisible by "
                                 f"norm_num_groups={self.norm_num_groups}.")
            heads = self.heads(i)
            if channels % heads:
                raise ValueError(f"UNetConfig: block {i} has {channels} channels, not divisible by {heads} heads.")
        unsupported = {
            "only_cross_attention": (self.only_cross_attention, False),
            "dual_cross_attention": (self.dual_cross_attention, False),
            "class_embed_type": (self.class_embed_type, None),
        }
        for name, (value, allowed) in unsupported.items():
            if value != allowed:
                raise ValueError(f"UNetConfig: {name}={value!r} is not supported (only {allowed!r}); "
                                 "Stable Diffusion 1.x/2.x U-Nets do not use it.")

    # -- derived quantities ------------------------------------------------------------------------------------------

    @property
    def num_blocks(self) -> int:
        return len(self.block_out_channels)

    @property
    def time_embed_dim(self) -> int:
        """Width of the timestep MLP output (4x the first block's channels)."""
        return 4 * self.block_out_channels[0]

    def heads(self, block: int) -> int:
        """Attention heads of down block ``block`` (and of the up block at the same resolution; -1: mid block)."""
        value = self.num_attention_heads if self.num_attention_heads is not None else self.attention_head_dim
        return value if isinstance(value, int) else value[block]

    def transformer_depth(self, block: int) -> int:
        """BasicTransformerBlocks per transformer in down block ``block`` (-1: mid block)."""
        value = self.transformer_layers_per_block
        return value if isinstance(value, int) else value[block]

    def down_has_attention(self, block: int) -> bool:
        return self.down_block_types[block] == CROSS_DOWN

    def up_has_attention(self, up_index: int) -> bool:
        """``up_index`` counts up blocks from the lowest resolution (diffusers' order)."""
        return self.up_block_types[up_index] == CROSS_UP

    # -- diffusers config.json ---------------------------------------------------------------------------------------

    @classmethod
    def from_diffusers(cls, config: Mapping[str, Any]) -> "UNetConfig":
        """Reads a diffusers ``UNet2DConditionModel`` config.json dict; rejects features we do not implement."""
        config = dict(config)
        class_name = config.get("_class_name", "UNet2DConditionModel")
        if class_name != "UNet2DConditionModel":
            raise ValueError(f"UNetConfig.from_diffusers: expected a UNet2DConditionModel config, got {class_name}.")
        for key, expected in _DIFFUSERS_FIXED.items():
            if key in config and config[key] != expected and not (
                    isinstance(expected, (list, tuple)) and list(config[key]) == list(expected)):
                raise ValueError(
                    f"UNetConfig.from_diffusers: {key}={config[key]!r} is not supported (only {expected!r}).")
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(k for k in config if k not in fields and k not in _DIFFUSERS_FIXED
                         and not k.startswith("_"))
        if unknown:
            raise ValueError(f"UNetConfig.from_diffusers: unknown config entries {unknown}; "
                             "this U-Net variant is not supported.")
        kwargs = {k: v for k, v in config.items() if k in fields}
        if isinstance(kwargs.get("sample_size"), (list, tuple)):
            kwargs["sample_size"] = int(kwargs["sample_size"][0])
        for key in ("cross_attention_dim", "layers_per_block"):
            value = kwargs.get(key)
            if isinstance(value, (list, tuple)) and len(set(value)) == 1:
                kwargs[key] = value[0]
        return cls(**kwargs)

    def to_diffusers(self) -> dict[str, Any]:
        """The diffusers ``UNet2DConditionModel`` config.json dict of this architecture."""
        out: dict[str, Any] = {"_class_name": "UNet2DConditionModel"}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name] = list(value) if isinstance(value, tuple) else value
        out.update({k: (list(v) if isinstance(v, tuple) else v) for k, v in _DIFFUSERS_FIXED.items()})
        return out


# diffusers config entries whose value is fixed in the architectures we implement (value: the only one accepted).
_DIFFUSERS_FIXED: dict[str, Any] = {
    "mid_block_type": MID_BLOCK,
    "center_input_sample": False,
    "downsample_padding": 1,
    "mid_block_scale_factor": 1,
    "act_fn": "silu",
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "addition_embed_type": None,
    "addition_time_embed_dim": None,
    "num_class_embeds": None,
    "resnet_time_scale_shift": "default",
    "resnet_skip_time_act": False,
    "resnet_out_scale_factor": 1.0,
    "time_embedding_type": "positional",
    "time_embedding_dim": None,
    "time_embedding_act_fn": None,
    "timestep_post_act": None,
    "time_cond_proj_dim": None,
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
    "projection_class_embeddings_input_dim": None,
    "attention_type": "default",
    "class_embeddings_concat": False,
    "mid_block_only_cross_attention": None,
    "cross_attention_norm": None,
    "addition_embed_type_num_heads": 64,
    "reverse_transformer_layers_per_block": None,
}


sd15 = UNetConfig()
sd15_inpaint = dataclasses.replace(sd15, in_channels=9)
# diffusers' stable-diffusion-2-1 (768-v): upcast_attention=True there (fp16 overflow); 96x96 latents.
sd21 = UNetConfig(
    sample_size=96, attention_head_dim=(5, 10, 20, 20), cross_attention_dim=1024, use_linear_projection=True,
    upcast_attention=True,
)
sd2_inpaint = dataclasses.replace(sd21, in_channels=9, sample_size=64, upcast_attention=False)
tiny_sd1 = UNetConfig(
    sample_size=16, block_out_channels=(32, 64), layers_per_block=1,
    down_block_types=(CROSS_DOWN, PLAIN_DOWN), up_block_types=(PLAIN_UP, CROSS_UP),
    attention_head_dim=2, cross_attention_dim=32,
)
tiny_sd2 = UNetConfig(
    sample_size=16, block_out_channels=(32, 64), layers_per_block=2,
    down_block_types=(CROSS_DOWN, CROSS_DOWN), up_block_types=(CROSS_UP, CROSS_UP),
    attention_head_dim=(2, 4), cross_attention_dim=32, use_linear_projection=True,
)
tiny = tiny_sd1

PRESETS: dict[str, UNetConfig] = {
    "sd15": sd15,
    "sd15_inpaint": sd15_inpaint,
    "sd21": sd21,
    "sd2_inpaint": sd2_inpaint,
    "tiny_sd1": tiny_sd1,
    "tiny_sd2": tiny_sd2,
    "tiny": tiny,
}


# -- transformer -----------------------------------------------------------------------------------------------------


class GEGLUFeedForward(nn.Module):
    """``out(a * gelu(b))`` with ``[a, b] = proj(x)``, inner width ``mult * dim``: [B, L, dim] -> [B, L, dim]."""

    mult: int = 4
    dropout: float = 0.0
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
        dim = x.shape[-1]
        dense = functools.partial(nn.Dense, dtype=self.dtype, param_dtype=self.param_dtype)
        value, gate = jnp.split(dense(2 * self.mult * dim, name="proj")(x), 2, axis=-1)
        h = value * nn.gelu(gate, approximate=False)
        h = nn.Dropout(self.dropout)(h, deterministic=deterministic)
        return dense(dim, name="out")(h)


class BasicTransformerBlock(nn.Module):
    """Pre-LayerNorm self-attention, cross-attention and GEGLU feed-forward, each with a residual.

    ``x``: [B, L, C]; ``context``: [B, Lc, Dctx]; returns [B, L, C].
    """

    num_heads: int
    head_dim: int
    dropout: float = 0.0
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array, deterministic: bool = True) -> jax.Array:
        layer_norm = functools.partial(nn.LayerNorm, epsilon=TRANSFORMER_LAYERNORM_EPS, dtype=self.dtype,
                                       param_dtype=self.param_dtype)
        attention = functools.partial(MultiHeadAttention, self.num_heads, self.head_dim, qkv_bias=False,
                                      out_bias=True, dtype=self.dtype, param_dtype=self.param_dtype)
        drop = lambda h: nn.Dropout(self.dropout)(h, deterministic=deterministic)
        x = x + drop(attention(name="attn1")(layer_norm(name="norm1")(x)))
        x = x + drop(attention(name="attn2")(layer_norm(name="norm2")(x), context))
        ff = GEGLUFeedForward(dropout=self.dropout, dtype=self.dtype, param_dtype=self.param_dtype, name="ff")
        return x + ff(layer_norm(name="norm3")(x), deterministic)


class Transformer2D(nn.Module):
    """Spatial transformer: GroupNorm, proj_in, ``depth`` transformer blocks on the H*W tokens, proj_out, residual.

    ``x``: [B, H, W, C]; ``context``: [B, Lc, Dctx]; returns [B, H, W, C].
    """

    num_heads: int
    depth: int = 1
    groups: int = 32
    dropout: float = 0.0
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array, deterministic: bool = True) -> jax.Array:
        _, height, width, channels = x.shape
        dense = functools.partial(nn.Dense, dtype=self.dtype, param_dtype=self.param_dtype)
        h = nn.GroupNorm(num_groups=self.groups, epsilon=TRANSFORMER_GROUPNORM_EPS, dtype=self.dtype,
                         param_dtype=self.param_dtype, name="norm")(x)
        h = einops.rearrange(h, "b h w c -> b (h w) c")
        h = dense(channels, name="proj_in")(h)
        for k in range(self.depth):
            h = BasicTransformerBlock(self.num_heads, channels // self.num_heads, dropout=self.dropout,
                                      dtype=self.dtype, param_dtype=self.param_dtype,
                                      name=f"transformer_blocks_{k}")(h, context, deterministic)
        h = dense(channels, name="proj_out")(h)
        return x + einops.rearrange(h, "b (h w) c -> b h w c", h=height, w=width)


# -- U-Net -----------------------------------------------------------------------------------------------------------


def _make_resnet(config: UNetConfig, out_channels: int, remat: bool, dtype, param_dtype, name: str):
    cls = nn.remat(ResnetBlock, static_argnums=(3,)) if remat else ResnetBlock
    return cls(out_channels, groups=config.norm_num_groups, eps=config.norm_eps, dropout=config.dropout,
               dtype=dtype, param_dtype=param_dtype, name=name)


def _make_transformer(config: UNetConfig, block: int, remat: bool, dtype, param_dtype, name: str):
    cls = nn.remat(Transformer2D, static_argnums=(3,)) if remat else Transformer2D
    return cls(config.heads(block), depth=config.transformer_depth(block), groups=config.norm_num_groups,
               dropout=config.dropout, dtype=dtype, param_dtype=param_dtype, name=name)


class DownBlock(nn.Module):
    """Down block ``index``: ``layers_per_block`` x (ResNet [+ transformer]), then a stride-2 conv unless last.

    Returns the new hidden state [B, H', W', C] and the skips it contributes (one per layer, one per downsample).
    """

    config: UNetConfig
    index: int
    remat: bool = False
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, h, temb, context, deterministic: bool = True):
        cfg, i = self.config, self.index
        channels = cfg.block_out_channels[i]
        skips = []
        for j in range(cfg.layers_per_block):
            h = _make_resnet(cfg, channels, self.remat, self.dtype, self.param_dtype, f"resnets_{j}")(
                h, temb, deterministic)
            if cfg.down_has_attention(i):
                h = _make_transformer(cfg, i, self.remat, self.dtype, self.param_dtype, f"attentions_{j}")(
                    h, context, deterministic)
            skips.append(h)
        if i < cfg.num_blocks - 1:
            h = Downsample(channels, asymmetric=False, dtype=self.dtype, param_dtype=self.param_dtype,
                           name="downsamplers_0")(h)
            skips.append(h)
        return h, skips


class MidBlock(nn.Module):
    """ResNet, transformer, ResNet at the lowest resolution: [B, h, w, C] -> [B, h, w, C]."""

    config: UNetConfig
    remat: bool = False
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, h, temb, context, deterministic: bool = True):
        cfg = self.config
        channels = cfg.block_out_channels[-1]
        h = _make_resnet(cfg, channels, self.remat, self.dtype, self.param_dtype, "resnets_0")(h, temb, deterministic)
        h = _make_transformer(cfg, -1, self.remat, self.dtype, self.param_dtype, "attentions_0")(
            h, context, deterministic)
        return _make_resnet(cfg, channels, self.remat, self.dtype, self.param_dtype, "resnets_1")(
            h, temb, deterministic)


class UpBlock(nn.Module):
    """Up block ``index`` (0 = lowest resolution): ``layers_per_block + 1`` x (concat skip, ResNet [+ transformer]),
    then nearest x2 upsample + conv unless last. ``skips`` are this block's skips in down order; consumed last-first.
    """

    config: UNetConfig
    index: int
    remat: bool = False
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, h, skips, temb, context, deterministic: bool = True):
        cfg, u = self.config, self.index
        channels = cfg.block_out_channels[cfg.num_blocks - 1 - u]
        for j in range(cfg.layers_per_block + 1):
            h = jnp.concatenate([h, skips[-1 - j]], axis=-1)
            h = _make_resnet(cfg, channels, self.remat, self.dtype, self.param_dtype, f"resnets_{j}")(
                h, temb, deterministic)
            if cfg.up_has_attention(u):
                # Heads follow the down block at the same resolution (diffusers reverses the per-block list).
                h = _make_transformer(cfg, cfg.num_blocks - 1 - u, self.remat, self.dtype, self.param_dtype,
                                      f"attentions_{j}")(h, context, deterministic)
        if u < cfg.num_blocks - 1:
            h = Upsample(channels, dtype=self.dtype, param_dtype=self.param_dtype, name="upsamplers_0")(h)
        return h


class UNet(nn.Module):
    """Noise (or v / x0) predictor ``eps(x_t, t, context)``.

    ``sample``: [B, H, W, in_channels] latents, H and W divisible by 2**(num_blocks - 1);
    ``timesteps``: [B] or a scalar, float (fractional allowed) or int; ``context``: [B, L, cross_attention_dim];
    returns [B, H, W, out_channels] in ``dtype``.
    ``remat=True`` recomputes each ResNet/transformer block in the backward pass (same outputs, less memory).
    """

    config: UNetConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    remat: bool = False

    @nn.compact
    def __call__(self, sample: jax.Array, timesteps: jax.Array, context: jax.Array,
                 deterministic: bool = True) -> jax.Array:
        cfg = self.config
        _check_inputs(cfg, sample, context)
        blocks = dict(config=cfg, remat=self.remat, dtype=self.dtype, param_dtype=self.param_dtype)
        batch = sample.shape[0]
        timesteps = jnp.broadcast_to(jnp.asarray(timesteps, jnp.float32).reshape(-1), (batch,))
        t_features = sinusoidal_embedding(timesteps, cfg.block_out_channels[0], flip_sin_to_cos=cfg.flip_sin_to_cos,
                                          freq_shift=cfg.freq_shift)  # [B, C0] float32
        temb = TimestepMLP(cfg.time_embed_dim, dtype=self.dtype, param_dtype=self.param_dtype,
                           name="time_embedding")(t_features.astype(self.dtype))  # [B, 4 * C0]
        context = context.astype(self.dtype)

        h = conv3x3(cfg.block_out_channels[0], self.dtype, self.param_dtype, "conv_in")(sample.astype(self.dtype))
        skips = [h]
        for i in range(cfg.num_blocks):
            h, block_skips = DownBlock(index=i, name=f"down_blocks_{i}", **blocks)(h, temb, context, deterministic)
            skips.extend(block_skips)

        h = MidBlock(name="mid_block", **blocks)(h, temb, context, deterministic)

        per_block = cfg.layers_per_block + 1
        for u in range(cfg.num_blocks):
            block_skips, skips = skips[-per_block:], skips[:-per_block]
            h = UpBlock(index=u, name=f"up_blocks_{u}", **blocks)(h, block_skips, temb, context, deterministic)

        h = nn.GroupNorm(num_groups=cfg.norm_num_groups, epsilon=cfg.norm_eps, dtype=self.dtype,
                         param_dtype=self.param_dtype, name="conv_norm_out")(h)
        return conv3x3(cfg.out_channels, self.dtype, self.param_dtype, "conv_out")(nn.silu(h))


def _check_inputs(cfg: UNetConfig, sample: jax.Array, context: jax.Array) -> None:
    if sample.ndim != 4 or sample.shape[-1] != cfg.in_channels:
        raise ValueError(f"UNet: sample must be NHWC [B, H, W, {cfg.in_channels}], got shape {sample.shape}.")
    factor = 2 ** (cfg.num_blocks - 1)
    if sample.shape[1] % factor or sample.shape[2] % factor:
        raise ValueError(f"UNet: latent height and width must be multiples of {factor} (the U-Net's downsampling, "
                         f"2**(num_blocks - 1)), got {sample.shape[1:3]}; image sides must be positive multiples of "
                         f"the VAE's factor x {factor} pixels.")
    if context.ndim != 3 or context.shape[-1] != cfg.cross_attention_dim or context.shape[0] != sample.shape[0]:
        raise ValueError(f"UNet: context must be [B={sample.shape[0]}, L, {cfg.cross_attention_dim}], "
                         f"got shape {context.shape}.")


def abstract_params(config: UNetConfig, param_dtype: Any = jnp.float32, height: int = 8, width: int = 8) -> dict:
    """The U-Net's parameter tree as ``jax.ShapeDtypeStruct`` leaves, without allocating anything.

    ``height``/``width`` only shape the dummy input; they must be multiples of 2**(num_blocks - 1).
    """
    factor = 2 ** (config.num_blocks - 1)
    height, width = max(height, factor), max(width, factor)
    model = UNet(config, param_dtype=param_dtype)
    sample = jax.ShapeDtypeStruct((1, height, width, config.in_channels), jnp.float32)
    timesteps = jax.ShapeDtypeStruct((1,), jnp.float32)
    context = jax.ShapeDtypeStruct((1, 1, config.cross_attention_dim), jnp.float32)
    return jax.eval_shape(model.init, jax.random.PRNGKey(0), sample, timesteps, context)["params"]
