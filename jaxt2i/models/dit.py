"""Diffusion transformers (NHWC): DiT with adaLN-Zero (class labels) and the PixArt-alpha text layout.

One config (:mod:`jaxt2i.models.dit_config`, re-exported here), two layouts (``DiTConfig.conditioning``), both laid
out like diffusers so checkpoints convert key by key:

* ``"class"`` -- diffusers' ``DiTTransformer2DModel`` (DiT): patchify (stride-p convolution) plus a fixed 2-D
  sine-cosine position table, then adaLN-Zero blocks: a timestep MLP plus a class-label table give c, and
  ``linear(silu(c))`` the shift, scale and gate of the attention and MLP branches. diffusers keeps that embedder in
  every block (``norm1.emb``; the final layer reads block 0's), so this tree does too. Label ``num_classes`` is null.
* ``"text"`` -- diffusers' ``PixArtTransformer2DModel`` (PixArt-alpha): adaLN-single (one timestep MLP and
  ``linear`` shared by all blocks, plus each block's ``scale_shift_table``), cross-attention to the projected text
  states after self-attention, optional resolution / aspect-ratio embeddings (PixArt 1024).

Output ``[B, H, W, out_channels]``; with learned sigma (``2 * in_channels``) noise first, then variance values.

Parameter tree (``transformer_blocks_{i}`` mirror diffusers' ``transformer_blocks.{i}``)::

    class: pos_embed/proj, transformer_blocks_{i}/{norm1/{emb/{timestep_embedder, class_embedder}, linear},
           attn1/{query, key, value, out}, ff/{proj, out}}, proj_out_1, proj_out_2
    text:  pos_embed/proj, adaln_single/{emb/{timestep_embedder[, resolution_embedder, aspect_ratio_embedder]},
           linear}, caption_projection/{linear_1, linear_2}, transformer_blocks_{i}/{scale_shift_table, attn1, attn2,
           ff}, scale_shift_table, proj_out

Large kernels carry logical axis names ("embed", "heads", "mlp"; :mod:`jaxt2i.train.sharding`): ``module.init``
returns them boxed (``flax.linen.LogicallyPartitioned``); :func:`abstract_params` unboxes unless asked not to.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import einops
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxt2i.models.dit_config import CLASS, CONDITIONINGS, DIT_SIZES, PRESETS, TEXT, DiTConfig
from jaxt2i.nn.attention import attention
from jaxt2i.nn.embeddings import TimestepMLP, sincos_position_table_2d, sinusoidal_embedding

__all__ = ["CLASS", "CONDITIONINGS", "DIT_SIZES", "PRESETS", "TEXT", "DiT", "DiTConfig", "abstract_params",
           "dummy_inputs"]

TIMESTEP_CHANNELS = 256  # sinusoidal features fed to every timestep MLP (both layouts)
# Timestep frequency shift: diffusers' CombinedTimestepLabelEmbeddings uses 1 (the original DiT code uses 0);
# PixArt's uses 0. Both put cos first.
TIMESTEP_FREQ_SHIFT = {CLASS: 1.0, TEXT: 0.0}
FIXED_NORM_EPS = 1e-6  # adaLN-Zero's norm in front of attention and the final norm (fixed in diffusers)
MLP_RATIO = 4


# -- layers ----------------------------------------------------------------------------------------------------------


def _dense(features: int, axes: tuple[str | None, str | None], name: str, dtype, param_dtype, *,
           zero: bool = False, init=None) -> nn.Dense:
    """A Dense whose kernel carries logical axis names; ``zero``: zero kernel (the bias is zero anyway)."""
    init = nn.initializers.zeros_init() if zero else (init or nn.initializers.lecun_normal())
    return nn.Dense(features, dtype=dtype, param_dtype=param_dtype, name=name,
                    kernel_init=nn.with_logical_partitioning(init, axes))


def layer_norm(x: jax.Array, eps: float) -> jax.Array:
    """LayerNorm without affine parameters over the last axis, computed in float32; returns x's dtype."""
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    return ((x32 - mean) * jax.lax.rsqrt(var + eps)).astype(x.dtype)


def modulate(x: jax.Array, shift: jax.Array, scale: jax.Array) -> jax.Array:
    """``x * (1 + scale) + shift``; x [B, T, D], shift/scale broadcastable ([B, 1, D])."""
    return x * (1 + scale) + shift


class Attention(nn.Module):
    """Self- (``context=None``) or cross-attention with biased projections, through :func:`attention`.

    ``x``: [B, T, D]; ``context``: [B, L, D]; ``mask``: bool broadcastable to [B, 1, T, L] (True = attend).
    Names: ``query``, ``key``, ``value``, ``out``. ``zero_out``: zero-initialised output projection.
    """

    num_heads: int
    head_dim: int
    dropout: float = 0.0
    zero_out: bool = False
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, context=None, mask=None, deterministic: bool = True):
        context = x if context is None else context
        inner, width = self.num_heads * self.head_dim, x.shape[-1]
        proj = functools.partial(_dense, dtype=self.dtype, param_dtype=self.param_dtype)
        split = lambda t: einops.rearrange(t, "b l (h d) -> b l h d", h=self.num_heads)
        q = split(proj(inner, ("embed", "heads"), "query")(x))
        k = split(proj(inner, ("embed", "heads"), "key")(context))
        v = split(proj(inner, ("embed", "heads"), "value")(context))
        h = einops.rearrange(attention(q, k, v, mask=mask), "b l h d -> b l (h d)")
        h = proj(width, ("heads", "embed"), "out", zero=self.zero_out)(h)
        return nn.Dropout(self.dropout)(h, deterministic=deterministic)


class FeedForward(nn.Module):
    """Linear, tanh-GELU, dropout, linear; inner width ``MLP_RATIO * D``. [B, T, D] -> [B, T, D]."""

    dropout: float = 0.0
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, deterministic: bool = True):
        width = x.shape[-1]
        proj = functools.partial(_dense, dtype=self.dtype, param_dtype=self.param_dtype)
        h = nn.gelu(proj(MLP_RATIO * width, ("embed", "mlp"), "proj")(x), approximate=True)
        h = nn.Dropout(self.dropout)(h, deterministic=deterministic)
        return proj(width, ("mlp", "embed"), "out")(h)


class TimestepLabelEmbedding(nn.Module):
    """``c = timestep_mlp(t_features) + label_table[labels]``: t_features [B, 256] float32, labels [B] -> [B, D]."""

    width: int
    num_classes: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, t_features, labels):
        temb = TimestepMLP(self.width, dtype=self.dtype, param_dtype=self.param_dtype,
                           name="timestep_embedder")(t_features.astype(self.dtype))
        init = nn.with_logical_partitioning(nn.initializers.normal(0.02), (None, "embed"))
        table = nn.Embed(self.num_classes + 1, self.width, embedding_init=init, dtype=self.dtype,
                         param_dtype=self.param_dtype, name="class_embedder")
        return temb + table(labels)


class AdaLayerNormZero(nn.Module):
    """The conditioning of one adaLN-Zero block: -> (six modulations [B, 6, D], the conditioning vector c [B, D])."""

    width: int
    num_classes: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, t_features, labels):
        c = TimestepLabelEmbedding(self.width, self.num_classes, self.dtype, self.param_dtype, name="emb")(
            t_features, labels)
        mods = _dense(6 * self.width, ("embed", "mlp"), "linear", self.dtype, self.param_dtype, zero=True)(nn.silu(c))
        return einops.rearrange(mods, "b (n d) -> b n d", n=6), c


class ClassBlock(nn.Module):
    """adaLN-Zero block: x + gate * attn(modulate(norm(x))), x + gate * mlp(modulate(norm(x))).

    x [B, T, D]; t_features [B, 256]; labels [B] int -> (x [B, T, D], this block's conditioning vector [B, D]).
    """

    config: DiTConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, t_features, labels, deterministic: bool = True):
        cfg, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        mods, c = AdaLayerNormZero(cfg.width, cfg.num_classes, name="norm1", **kw)(t_features, labels)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = jnp.split(mods, 6, axis=1)  # [B, 1, D]
        attn = Attention(cfg.num_attention_heads, cfg.attention_head_dim, cfg.dropout, name="attn1", **kw)
        x = x + gate_msa * attn(modulate(layer_norm(x, FIXED_NORM_EPS), shift_msa, scale_msa),
                                deterministic=deterministic)
        ff = FeedForward(cfg.dropout, name="ff", **kw)
        x = x + gate_mlp * ff(modulate(layer_norm(x, cfg.norm_eps), shift_mlp, scale_mlp), deterministic)
        return x, c


class TextBlock(nn.Module):
    """adaLN-single block: self-attention and MLP modulated by ``scale_shift_table + t6``, cross-attention between.

    x [B, T, D]; t6 [B, 6 * D]; context [B, L, D]; mask bool [B, 1, 1, L] or None -> [B, T, D].
    """

    config: DiTConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, t6, context, mask, deterministic: bool = True):
        cfg, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        table = self.param("scale_shift_table", nn.initializers.normal(1.0 / math.sqrt(cfg.width)), (6, cfg.width),
                           self.param_dtype)
        mods = table[None].astype(self.dtype) + einops.rearrange(t6, "b (n d) -> b n d", n=6)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = jnp.split(mods, 6, axis=1)  # [B, 1, D]
        heads = (cfg.num_attention_heads, cfg.attention_head_dim, cfg.dropout)
        x = x + gate_msa * Attention(*heads, name="attn1", **kw)(
            modulate(layer_norm(x, cfg.norm_eps), shift_msa, scale_msa), deterministic=deterministic)
        x = x + Attention(*heads, zero_out=True, name="attn2", **kw)(x, context, mask, deterministic)
        ff = FeedForward(cfg.dropout, name="ff", **kw)
        return x + gate_mlp * ff(modulate(layer_norm(x, cfg.norm_eps), shift_mlp, scale_mlp), deterministic)


class AdaLayerNormSingle(nn.Module):
    """PixArt's shared timestep conditioning: -> (t6 = linear(silu(e)) [B, 6 D], e [B, D]).

    With ``use_additional_conditions``, e also holds the embedded resolution [B, 2] and aspect ratio [B, 1].
    """

    config: DiTConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, t_features, resolution=None, aspect_ratio=None):
        cfg, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        emb = _TimestepSizeEmbedding(cfg, name="emb", **kw)(t_features, resolution, aspect_ratio)
        t6 = _dense(6 * cfg.width, ("embed", "mlp"), "linear", init=nn.initializers.normal(0.02), **kw)(nn.silu(emb))
        return t6, emb


class _TimestepSizeEmbedding(nn.Module):
    config: DiTConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, t_features, resolution, aspect_ratio):
        cfg, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        emb = TimestepMLP(cfg.width, name="timestep_embedder", **kw)(t_features.astype(self.dtype))
        if not cfg.use_additional_conditions:
            return emb
        batch, size_dim = emb.shape[0], cfg.width // 3

        def embed(values, name):  # [B, k] -> [B, k * size_dim]
            features = sinusoidal_embedding(jnp.reshape(values, (-1,)), TIMESTEP_CHANNELS)
            out = TimestepMLP(size_dim, name=name, **kw)(features.astype(self.dtype))
            return out.reshape(batch, -1)

        sizes = [embed(resolution, "resolution_embedder"), embed(aspect_ratio, "aspect_ratio_embedder")]
        return emb + jnp.concatenate(sizes, axis=-1)


class CaptionProjection(nn.Module):
    """Linear, tanh-GELU, linear: text states [B, L, caption_channels] -> [B, L, D]."""

    width: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, states):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, init=nn.initializers.normal(0.02))
        h = nn.gelu(_dense(self.width, (None, "embed"), "linear_1", **kw)(states), approximate=True)
        return _dense(self.width, ("embed", None), "linear_2", **kw)(h)


class PatchEmbed(nn.Module):
    """Stride-p convolution to tokens plus the fixed position table: [B, H, W, C] -> [B, (H/p)(W/p), D].

    The table is built for the actual grid, positions scaled to ``config.base_grid`` (diffusers' PatchEmbed).
    """

    config: DiTConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, sample):
        cfg, p = self.config, self.config.patch_size
        init = nn.with_logical_partitioning(nn.initializers.lecun_normal(), (None, None, None, "embed"))
        h = nn.Conv(cfg.width, (p, p), strides=(p, p), padding="VALID", dtype=self.dtype,
                    param_dtype=self.param_dtype, kernel_init=init, name="proj")(sample.astype(self.dtype))
        grid_h, grid_w = h.shape[1], h.shape[2]
        table = sincos_position_table_2d(cfg.width, grid_h, grid_w, base_size=cfg.base_grid,
                                         interpolation_scale=cfg.interpolation_scale)  # [T, D] numpy
        tokens = einops.rearrange(h, "b h w d -> b (h w) d")
        return (tokens.astype(jnp.float32) + table[None]).astype(self.dtype)


# -- the model -------------------------------------------------------------------------------------------------------


class DiT(nn.Module):
    """Noise (and variance) predictor of either layout.

    ``sample``: [B, H, W, in_channels] latents, H and W multiples of patch_size (any size; the position table is
    rebuilt for the grid); ``timesteps``: [B] or a scalar, float or int; ``condition``: int [B] class ids (class
    layout; ``num_classes`` is the null class) or float [B, L, caption_channels] text states (text layout);
    ``condition_mask``: optional [B, L] (1 keep, 0 ignore) for the text states; ``resolution`` [B, 2] (pixel height,
    width) and ``aspect_ratio`` [B, 1] are required when ``use_additional_conditions``.
    Returns [B, H, W, out_channels] in ``dtype``. ``remat=True`` recomputes each block in the backward pass.
    """

    config: DiTConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    remat: bool = False

    @nn.compact
    def __call__(self, sample, timesteps, condition, *, condition_mask=None, resolution=None, aspect_ratio=None,
                 deterministic: bool = True):
        cfg, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        _check_inputs(cfg, sample, condition, condition_mask, resolution, aspect_ratio)
        batch, height, width = sample.shape[:3]
        timesteps = jnp.broadcast_to(jnp.asarray(timesteps, jnp.float32).reshape(-1), (batch,))
        t_features = sinusoidal_embedding(timesteps, TIMESTEP_CHANNELS, flip_sin_to_cos=True,
                                          freq_shift=TIMESTEP_FREQ_SHIFT[cfg.conditioning])  # [B, 256] float32
        x = PatchEmbed(cfg, name="pos_embed", **kw)(sample)
        if cfg.conditioning == CLASS:
            x = self._class_trunk(x, t_features, jnp.asarray(condition).astype(jnp.int32), deterministic)
        else:
            x = self._text_trunk(x, t_features, condition, condition_mask, resolution, aspect_ratio, deterministic)
        p = cfg.patch_size
        return einops.rearrange(x, "b (h w) (p q c) -> b (h p) (w q) c", h=height // p, p=p, q=p)

    def _class_trunk(self, x, t_features, labels, deterministic):
        cfg, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        block_cls = nn.remat(ClassBlock, static_argnums=(4,)) if self.remat else ClassBlock
        first_c = None
        for i in range(cfg.num_layers):
            x, c = block_cls(cfg, name=f"transformer_blocks_{i}", **kw)(x, t_features, labels, deterministic)
            first_c = c if first_c is None else first_c
        # diffusers conditions the final layer on block 0's embedding.
        shift, scale = jnp.split(_dense(2 * cfg.width, ("embed", "mlp"), "proj_out_1", zero=True, **kw)(
            nn.silu(first_c))[:, None], 2, axis=-1)
        x = modulate(layer_norm(x, FIXED_NORM_EPS), shift, scale)
        return _dense(cfg.patch_size ** 2 * cfg.out_channels, ("embed", None), "proj_out_2", zero=True, **kw)(x)

    def _text_trunk(self, x, t_features, states, mask, resolution, aspect_ratio, deterministic):
        cfg, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        t6, emb = AdaLayerNormSingle(cfg, name="adaln_single", **kw)(t_features, resolution, aspect_ratio)
        context = CaptionProjection(cfg.width, name="caption_projection", **kw)(jnp.asarray(states).astype(self.dtype))
        attn_mask = None if mask is None else (jnp.asarray(mask) > 0)[:, None, None, :]  # [B, 1, 1, L]
        block_cls = nn.remat(TextBlock, static_argnums=(5,)) if self.remat else TextBlock
        for i in range(cfg.num_layers):
            x = block_cls(cfg, name=f"transformer_blocks_{i}", **kw)(x, t6, context, attn_mask, deterministic)
        table = self.param("scale_shift_table", nn.initializers.normal(1.0 / math.sqrt(cfg.width)), (2, cfg.width),
                           self.param_dtype)
        shift, scale = jnp.split(table[None].astype(self.dtype) + emb[:, None], 2, axis=1)  # [B, 1, D] each
        x = modulate(layer_norm(x, FIXED_NORM_EPS), shift, scale)
        return _dense(cfg.patch_size ** 2 * cfg.out_channels, ("embed", None), "proj_out", zero=True, **kw)(x)


def _check_inputs(cfg: DiTConfig, sample, condition, mask, resolution, aspect_ratio) -> None:
    if sample.ndim != 4 or sample.shape[-1] != cfg.in_channels:
        raise ValueError(f"DiT: sample must be NHWC [B, H, W, {cfg.in_channels}], got shape {sample.shape}.")
    p, batch = cfg.patch_size, sample.shape[0]
    if sample.shape[1] % p or sample.shape[2] % p:
        raise ValueError(f"DiT: latent height and width must be multiples of patch_size={p}, got {sample.shape[1:3]}.")
    shape = np.shape(condition)
    if cfg.conditioning == CLASS:
        if shape not in ((batch,), ()):
            raise ValueError(f"DiT (class layout): condition must be int class ids [B={batch}], got shape {shape}.")
        return
    if len(shape) != 3 or shape[0] != batch or shape[2] != cfg.caption_channels:
        raise ValueError(f"DiT (text layout): condition must be text states [B={batch}, L, {cfg.caption_channels}], "
                         f"got shape {shape}.")
    if mask is not None and np.shape(mask) != shape[:2]:
        raise ValueError(f"DiT: condition_mask must be [B, L] = {shape[:2]}, got shape {np.shape(mask)}.")
    if cfg.use_additional_conditions and (resolution is None or aspect_ratio is None):
        raise ValueError("DiT: this model (use_additional_conditions, PixArt 1024) needs resolution=[B, 2] (pixel "
                         "height, width) and aspect_ratio=[B, 1] (height / width) keyword arguments.")


def dummy_inputs(config: DiTConfig, batch: int = 1) -> tuple[tuple, dict]:
    """Abstract ``(args, kwargs)`` of one forward at the smallest latent size (one token), for eval_shape/init."""
    p = config.patch_size
    sample = jax.ShapeDtypeStruct((batch, p, p, config.in_channels), jnp.float32)
    timesteps = jax.ShapeDtypeStruct((batch,), jnp.float32)
    if config.conditioning == CLASS:
        return (sample, timesteps, jax.ShapeDtypeStruct((batch,), jnp.int32)), {}
    states = jax.ShapeDtypeStruct((batch, 1, config.caption_channels), jnp.float32)
    kwargs = {}
    if config.use_additional_conditions:
        kwargs = {"resolution": jax.ShapeDtypeStruct((batch, 2), jnp.float32),
                  "aspect_ratio": jax.ShapeDtypeStruct((batch, 1), jnp.float32)}
    return (sample, timesteps, states), kwargs


def abstract_params(config: DiTConfig, param_dtype: Any = jnp.float32, *, boxed: bool = False) -> dict:
    """The parameter tree as ``jax.ShapeDtypeStruct`` leaves, without allocating anything.

    ``boxed=True`` keeps the ``LogicallyPartitioned`` boxes of the annotated kernels (for
    :func:`jaxt2i.train.sharding.param_shardings`); the default returns plain leaves (for conversion).
    """
    args, kwargs = dummy_inputs(config)
    model = DiT(config, param_dtype=param_dtype)
    params = jax.eval_shape(model.init, jax.random.PRNGKey(0), *args, **kwargs)["params"]
    return params if boxed else nn.unbox(params)
