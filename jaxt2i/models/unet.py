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
    context_encoder/{layers_{k}/{layer_norm1, self_attn, layer_norm2, mlp/{fc1, fc2}}, norm_out, proj_out}
        (only with ``context_encoder_layers > 0``, a jaxt2i extension; see UNetConfig)
    context_merge/{down, up}   (only with ``context_merge_rank > 0``, a jaxt2i extension; see UNetConfig)

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

from jaxt2i.models import clip
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
    # jaxt2i extension, not in diffusers' UNet2DConditionModel (0 = the diffusers architecture): bidirectional
    # CLIP encoder layers, trained with the U-Net, whose output is added to the text context (through a
    # zero-initialised projection: a fresh encoder changes nothing) before any cross-attention. A frozen causal
    # text encoder never lets an early token see what follows it ("a red circle" in "a red circle above a blue
    # square" never sees "above"); these layers do. Width cross_attention_dim. Measured results: docs/shapes_model.md
    # (session 6: 2 layers in the earlier form without the residual made the 6000-step shapes model worse).
    context_encoder_layers: int = 0
    context_encoder_heads: int = 4
    # jaxt2i extension (0 = off, the diffusers architecture): the context holds two text layers concatenated along
    # the tokens ([B, 2L, D], e.g. `text_layer: [0, -1]`: the embeddings, then the last layer) and the U-Net
    # cross-attends to L tokens: the first layer's plus a rank-r linear map of the second's at the same position,
    # ``first + up(down(second))`` with ``up`` zero-initialised (a fresh merge reads the first layer alone). The
    # narrow map lets a contextual layer tag each context-free token (which object a word belongs to, where it goes)
    # without handing the U-Net the contextual layer's whole content. See ContextMerge.
    context_merge_rank: int = 0

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
        if not isinstance(self.context_encoder_layers, int) or self.context_encoder_layers < 0:
            raise ValueError(f"UNetConfig: context_encoder_layers must be an int >= 0, got "
                             f"{self.context_encoder_layers!r}.")
        rank = self.context_merge_rank
        if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank <= self.cross_attention_dim:
            raise ValueError(f"UNetConfig: context_merge_rank must be an int in [0, cross_attention_dim="
                             f"{self.cross_attention_dim}] (0: off), got {rank!r}.")
        heads = self.context_encoder_heads
        if not isinstance(heads, int) or heads < 1 or self.cross_attention_dim % heads:
            raise ValueError(f"UNetConfig: context_encoder_heads={heads!r} must be a positive int dividing "
                             f"cross_attention_dim={self.cross_attention_dim}.")
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

    @property
    def context_layers(self) -> int:
        """How many text layers the context holds, concatenated along the tokens (2 with a context merge, else 1
        as far as the U-Net is concerned: it cross-attends to whatever tokens it is given)."""
        return 2 if self.context_merge_rank else 1

    def check_diffusers_layout(self) -> None:
        """Raises unless diffusers' ``UNet2DConditionModel`` can hold this architecture (no jaxt2i extension)."""
        extensions = {"context encoder": ("context_encoder_layers", self.context_encoder_layers),
                      "context merge": ("context_merge_rank", self.context_merge_rank)}
        for what, (name, value) in extensions.items():
            if value:
                raise ValueError(
                    f"This U-Net has a {what} ({name}={value}), a jaxt2i extension that diffusers' "
                    "UNet2DConditionModel does not have, so it cannot be written in (or read from) the diffusers or "
                    "original Stable Diffusion layout; keep it in jaxt2i's native format "
                    "(`jaxt2i convert SRC DST --to jaxt2i`).")

    def to_diffusers(self) -> dict[str, Any]:
        """The diffusers ``UNet2DConditionModel`` config.json dict of this architecture (no jaxt2i extension)."""
        self.check_diffusers_layout()
        out: dict[str, Any] = {"_class_name": "UNet2DConditionModel"}
        for f in dataclasses.fields(self):
            if f.name in _JAXT2I_ONLY:
                continue
            value = getattr(self, f.name)
            out[f.name] = list(value) if isinstance(value, tuple) else value
        out.update({k: (list(v) if isinstance(v, tuple) else v) for k, v in _DIFFUSERS_FIXED.items()})
        return out


# UNetConfig fields that diffusers' config.json does not have.
_JAXT2I_ONLY = ("context_encoder_layers", "context_encoder_heads", "context_merge_rank")

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


class ContextEncoder(nn.Module):
    """Bidirectional CLIP encoder layers over the text context, added back to it through a zero-initialised
    projection: ``context`` [B, L, D] -> ``context + proj_out(norm_out(layers(context)))`` [B, L, D].

    The layers are pre-LayerNorm self-attention + GELU MLP of width 4D (``clip.CLIPEncoderLayer``, no causal
    mask); no padding mask either, like the U-Net's cross-attention (padding tokens are part of the prompt's
    encoding). ``proj_out`` starts at zero (ControlNet's zero convolution), so a fresh encoder passes the text
    encoder's states through unchanged and training decides how much every token's view of the whole prompt adds.
    """

    num_layers: int
    num_heads: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, context: jax.Array) -> jax.Array:
        width = context.shape[-1]
        layer_cfg = clip.CLIPTextConfig(hidden_size=width, intermediate_size=4 * width, num_layers=self.num_layers,
                                        num_heads=self.num_heads, hidden_act="gelu",
                                        layer_norm_eps=TRANSFORMER_LAYERNORM_EPS)
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = context
        for k in range(self.num_layers):
            x = clip.CLIPEncoderLayer(layer_cfg, causal=False, name=f"layers_{k}", **kw)(x)
        x = clip.LayerNorm(epsilon=TRANSFORMER_LAYERNORM_EPS, name="norm_out", **kw)(x)
        zeros = nn.initializers.zeros_init()
        return context + nn.Dense(width, kernel_init=zeros, bias_init=zeros, name="proj_out", **kw)(x)


class ContextMerge(nn.Module):
    """Two text layers' tokens merged position by position through a rank-``rank`` map:
    ``context`` [B, 2L, D] (layer a's L tokens, then layer b's) -> ``a + up(down(b))`` [B, L, D].

    ``down`` (D -> rank, with bias) starts random, ``up`` (rank -> D, with bias) at zero, so a fresh merge returns
    layer a unchanged and training decides what of layer b passes through the ``rank`` numbers per token.
    """

    rank: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, context: jax.Array) -> jax.Array:
        tokens, width = context.shape[1] // 2, context.shape[-1]
        first, second = context[:, :tokens], context[:, tokens:]
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        zeros = nn.initializers.zeros_init()
        tags = nn.Dense(self.rank, name="down", **kw)(second)
        return first + nn.Dense(width, kernel_init=zeros, bias_init=zeros, name="up", **kw)(tags)


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
    ``timesteps``: [B] or a scalar, float (fractional allowed) or int; ``context``: [B, L, cross_attention_dim]
    ([B, 2L, D], two text layers, with ``context_merge_rank > 0``);
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
        if cfg.context_merge_rank:
            context = ContextMerge(cfg.context_merge_rank, dtype=self.dtype, param_dtype=self.param_dtype,
                                   name="context_merge")(context)
        if cfg.context_encoder_layers:
            context = ContextEncoder(cfg.context_encoder_layers, cfg.context_encoder_heads, dtype=self.dtype,
                                     param_dtype=self.param_dtype, name="context_encoder")(context)

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


def check_text_layers(config: UNetConfig, text_layer: int | tuple[int, ...]) -> None:
    """Raises ValueError unless ``text_layer`` (an int or a tuple, as ``clip.text_layer_setting`` keeps it) gives
    this U-Net the number of text layers it merges: exactly two with ``context_merge_rank > 0``, any otherwise."""
    count = len(text_layer) if isinstance(text_layer, tuple) else 1
    if config.context_merge_rank and count != 2:
        raise ValueError(f"text_layer {list(text_layer) if count > 1 else text_layer} gives {count} text layer(s), but "
                         f"this U-Net merges two (context_merge_rank={config.context_merge_rank}): use two layers, "
                         f"e.g. [0, -1] (the embeddings carry the content, the last layer is merged in).")


def _check_inputs(cfg: UNetConfig, sample: jax.Array, context: jax.Array) -> None:
    if sample.ndim != 4 or sample.shape[-1] != cfg.in_channels:
        raise ValueError(f"UNet: sample must be NHWC [B, H, W, {cfg.in_channels}], got shape {sample.shape}.")
    factor = 2 ** (cfg.num_blocks - 1)
    if sample.shape[1] % factor or sample.shape[2] % factor:
        raise ValueError(f"UNet: latent height and width must be multiples of {factor}, got {sample.shape[1:3]}; "
                         f"use image sizes that are multiples of {8 * factor} pixels.")
    if context.ndim != 3 or context.shape[-1] != cfg.cross_attention_dim or context.shape[0] != sample.shape[0]:
        raise ValueError(f"UNet: context must be [B={sample.shape[0]}, L, {cfg.cross_attention_dim}], "
                         f"got shape {context.shape}.")
    if cfg.context_merge_rank and context.shape[1] % 2:
        raise ValueError(f"UNet: this U-Net merges two text layers (context_merge_rank={cfg.context_merge_rank}), so "
                         f"its context must hold both, concatenated along the tokens ([B, 2L, D], e.g. text_layer "
                         f"[0, -1]); got {context.shape[1]} tokens. Encode the prompt with two text layers.")


def abstract_params(config: UNetConfig, param_dtype: Any = jnp.float32, height: int = 8, width: int = 8) -> dict:
    """The U-Net's parameter tree as ``jax.ShapeDtypeStruct`` leaves, without allocating anything.

    ``height``/``width`` only shape the dummy input; they must be multiples of 2**(num_blocks - 1).
    """
    factor = 2 ** (config.num_blocks - 1)
    height, width = max(height, factor), max(width, factor)
    model = UNet(config, param_dtype=param_dtype)
    sample = jax.ShapeDtypeStruct((1, height, width, config.in_channels), jnp.float32)
    timesteps = jax.ShapeDtypeStruct((1,), jnp.float32)
    context = jax.ShapeDtypeStruct((1, config.context_layers, config.cross_attention_dim), jnp.float32)
    return jax.eval_shape(model.init, jax.random.PRNGKey(0), sample, timesteps, context)["params"]
