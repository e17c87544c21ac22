"""DALL-E's transformer: a decoder-only sparse transformer over [text tokens; image tokens].

The sequence is ``text_length`` text tokens (BPE ids; a caption shorter than ``text_length`` is padded with a
distinct pad token per position, ids ``text_vocab_size + position``, as in the paper) followed by the
``image_height x image_width`` image tokens of a dVAE (:mod:`jaxt2i.models.dvae`) in raster order. Text and image
tokens have separate embedding tables; text positions are learned, image positions are a row plus a column
embedding. Each layer is a pre-LayerNorm block (attention, then a 4x GELU MLP) whose attention mask is data
(:mod:`jaxt2i.models.attention_masks`): ``DalleConfig.layer_kinds`` names one kind per layer, the paper's schedule
by default. Attention goes through the library's one :func:`jaxt2i.nn.attention.attention`.

Position ``i`` predicts token ``i + 1``: two heads read the final states, a text head (over text tokens and pads)
at positions ``0 .. text_length - 2`` and an image head (over image tokens only) from position ``text_length - 1``
on, so ``DalleTransformer(...)(text, image)`` returns logits aligned with their targets: ``text[:, 1:]`` and every
image token. The first text token (the tokenizer's BOS) is never predicted. :func:`weighted_loss` is the paper's
loss: cross-entropy on text and image tokens, each averaged over its tokens, weighted 1/8 and 7/8.

Decoding with a key/value cache: :meth:`DalleTransformer.prefill` runs the text and returns the logits of the first
image token and a cache (one ``{"key", "value"}`` pair of ``[B, L, heads, head_dim]`` per layer); each
:meth:`DalleTransformer.decode` feeds one image token and returns the next one's logits
(:mod:`jaxt2i.models.dalle_sampling` runs the loop).

Parameter tree::

    text_embed/embedding, text_positions, image_embed/embedding, image_rows, image_columns,
    blocks_{i}/{ln_1, attn/{query, key, value, out}, ln_2, mlp/{fc, proj}}, ln_f, text_head, image_head

Large kernels carry logical axis names ("embed", "heads", "mlp", "vocab"; :mod:`jaxt2i.train.sharding`):
``module.init`` returns them boxed; :func:`abstract_params` unboxes unless asked not to.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import einops
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxt2i.models.attention_masks import KINDS, PATTERNS, attention_mask, layer_kinds
from jaxt2i.nn.attention import attention

__all__ = ["DalleConfig", "DalleTransformer", "PRESETS", "abstract_params", "dummy_inputs", "empty_caption",
           "get_config", "init_cache", "prepare_text_tokens", "weighted_loss"]

TEXT_LOSS_WEIGHT = 1.0 / 8.0
IMAGE_LOSS_WEIGHT = 7.0 / 8.0


@dataclasses.dataclass(frozen=True)
class DalleConfig:
    """Architecture of the transformer; the defaults are the paper's 12-billion-parameter model.

    Attributes:
      text_vocab_size: BPE vocabulary size (without the pad tokens, which follow it).
      text_length: text token positions; captions are padded to it with per-position pad tokens.
      image_vocab_size: the dVAE's number of image tokens.
      image_height, image_width: the image token grid.
      num_layers, num_heads, head_dim: depth, attention heads per layer, width of a head; the model width is
        ``num_heads * head_dim``.
      mlp_ratio: MLP hidden width over model width.
      layer_kinds: one mask kind per layer (``"full"``, ``"row"``, ``"column"``, ``"conv"``) or a named schedule
        (``"dalle"``, ``"full"``; resolved to the tuple of kinds on construction).
      conv_kernel: side of the causal convolutional kernel (odd).
      dropout: dropout on the embeddings and on every residual branch when training.
      norm_eps: LayerNorm epsilon.
      text_loss_weight, image_loss_weight: weights of the text and image cross-entropies in the loss.
    """

    text_vocab_size: int = 16384
    text_length: int = 256
    image_vocab_size: int = 8192
    image_height: int = 32
    image_width: int = 32
    num_layers: int = 64
    num_heads: int = 62
    head_dim: int = 64
    mlp_ratio: int = 4
    layer_kinds: tuple[str, ...] | str = "dalle"
    conv_kernel: int = 11
    dropout: float = 0.0
    norm_eps: float = 1e-5
    text_loss_weight: float = TEXT_LOSS_WEIGHT
    image_loss_weight: float = IMAGE_LOSS_WEIGHT

    def __post_init__(self):
        for name in ("text_vocab_size", "text_length", "image_vocab_size", "image_height", "image_width",
                     "num_layers", "num_heads", "head_dim", "mlp_ratio"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"DalleConfig.{name}={value!r} must be a positive int.")
        if self.text_length < 2:
            raise ValueError(f"DalleConfig.text_length={self.text_length} must be >= 2 (a BOS and one more token).")
        if self.conv_kernel < 1 or self.conv_kernel % 2 == 0:
            raise ValueError(f"DalleConfig.conv_kernel={self.conv_kernel} must be a positive odd number.")
        kinds = self.layer_kinds
        if isinstance(kinds, str):
            kinds = layer_kinds(kinds, self.num_layers)
        kinds = tuple(kinds)
        unknown = sorted(set(kinds) - set(KINDS))
        if unknown or len(kinds) != self.num_layers:
            raise ValueError(f"DalleConfig.layer_kinds={self.layer_kinds!r}: give a schedule name of {PATTERNS} "
                             f"or {self.num_layers} kinds (one per layer) from {KINDS}.")
        object.__setattr__(self, "layer_kinds", kinds)
        if not (0.0 <= self.dropout < 1.0):
            raise ValueError(f"DalleConfig.dropout={self.dropout} must be in [0, 1).")

    @property
    def width(self) -> int:
        """Model width: heads x head dim."""
        return self.num_heads * self.head_dim

    @property
    def image_length(self) -> int:
        """Image tokens per image (``image_height * image_width``)."""
        return self.image_height * self.image_width

    @property
    def sequence_length(self) -> int:
        """Positions of the whole sequence: text then image tokens."""
        return self.text_length + self.image_length

    @property
    def text_vocab_total(self) -> int:
        """Rows of the text table and outputs of the text head: the BPE vocabulary plus one pad per position."""
        return self.text_vocab_size + self.text_length

    def mask(self, kind: str) -> np.ndarray:
        """The attention mask of kind ``kind`` for this layout: bool ``[L, L]``."""
        return attention_mask(kind, self.text_length, self.image_height, self.image_width, self.conv_kernel)


PRESETS: dict[str, DalleConfig] = {
    # The paper: 64 layers, 62 heads of 64, 256 BPE tokens over 16384 ids, 32x32 image tokens over 8192.
    "dalle_12b": DalleConfig(),
    # The shapes world: captions of the shipped CLIP tokenizer (49408 ids) in 32 positions; 64x64 images as the
    # 16x16 tokens of the dVAE "shapes" preset (512 ids), or 8x8 tokens of "shapes_8x8".
    "shapes": DalleConfig(text_vocab_size=49408, text_length=32, image_vocab_size=512, image_height=16,
                          image_width=16, num_layers=8, num_heads=4, head_dim=32, conv_kernel=5),
    "shapes_8x8": DalleConfig(text_vocab_size=49408, text_length=32, image_vocab_size=512, image_height=8,
                              image_width=8, num_layers=8, num_heads=4, head_dim=32, conv_kernel=5),
    # For tests: every mask kind in four layers (row, row, column, conv).
    "tiny": DalleConfig(text_vocab_size=40, text_length=6, image_vocab_size=24, image_height=4, image_width=4,
                        num_layers=4, num_heads=2, head_dim=8, conv_kernel=3),
}


def get_config(name: str) -> DalleConfig:
    """A preset by name (``dalle_12b``, ``shapes``, ``shapes_8x8``, ``tiny``)."""
    if name not in PRESETS:
        raise ValueError(f"Unknown DALL-E transformer preset {name!r}; choose one of {', '.join(PRESETS)}.")
    return PRESETS[name]


# -- text tokens -----------------------------------------------------------------------------------------------------


def prepare_text_tokens(ids: Any, eos_id: int, config: DalleConfig) -> np.ndarray:
    """Tokenizer ids -> the model's text tokens: everything after the first ``eos_id`` becomes per-position pads.

    ``ids``: int ``[B, text_length]`` (BOS, tokens, EOS, then anything: the tokenizer's padding). A row without
    ``eos_id`` (a truncated caption) is kept whole. Returns int32 ``[B, text_length]`` with pad ids
    ``text_vocab_size + position``.
    """
    ids = np.asarray(ids)
    if ids.ndim != 2 or ids.shape[1] != config.text_length:
        raise ValueError(f"prepare_text_tokens: expected ids [B, {config.text_length}] (tokenize with max_length="
                         f"text_length), got shape {ids.shape}.")
    positions = np.arange(config.text_length)
    is_eos = ids == eos_id
    first_eos = np.where(is_eos.any(axis=1), is_eos.argmax(axis=1), config.text_length)
    pads = config.text_vocab_size + positions
    return np.where(positions[None] > first_eos[:, None], pads[None], ids).astype(np.int32)


def empty_caption(config: DalleConfig, batch: int = 1) -> np.ndarray:
    """The empty caption: a pad token at every position, int32 ``[batch, text_length]``.

    This is the unconditional input of classifier-free guidance; training drops captions to it.
    """
    pads = config.text_vocab_size + np.arange(config.text_length, dtype=np.int32)
    return np.broadcast_to(pads, (batch, config.text_length)).copy()


# -- layers ----------------------------------------------------------------------------------------------------------


def _dense(features: int, axes: tuple[str | None, str | None], name: str, dtype, param_dtype,
           stddev: float = 0.02) -> nn.Dense:
    init = nn.with_logical_partitioning(nn.initializers.normal(stddev), axes)
    return nn.Dense(features, dtype=dtype, param_dtype=param_dtype, kernel_init=init, name=name)


def _layer_norm(config: DalleConfig, param_dtype, name: str) -> nn.LayerNorm:
    return nn.LayerNorm(epsilon=config.norm_eps, dtype=jnp.float32, param_dtype=param_dtype, name=name)


def _residual_stddev(config: DalleConfig) -> float:
    """Init scale of the projections that write into the residual stream (GPT-2's 1/sqrt(2 * depth))."""
    return 0.02 / math.sqrt(2 * config.num_layers)


class _Layer(nn.Module):
    """What every layer takes: the config, the compute dtype and the parameter (storage) dtype."""

    config: DalleConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @property
    def dtypes(self) -> dict[str, Any]:
        return dict(dtype=self.dtype, param_dtype=self.param_dtype)


class SelfAttention(_Layer):
    """Masked self-attention; ``__call__`` over a whole sequence, ``step`` for one new token against a cache."""

    def setup(self):
        cfg, kw = self.config, self.dtypes
        inner = cfg.num_heads * cfg.head_dim
        self.query = _dense(inner, ("embed", "heads"), "query", **kw)
        self.key = _dense(inner, ("embed", "heads"), "key", **kw)
        self.value = _dense(inner, ("embed", "heads"), "value", **kw)
        self.out = _dense(cfg.width, ("heads", "embed"), "out", stddev=_residual_stddev(cfg), **kw)

    def _split(self, t: jax.Array) -> jax.Array:
        return einops.rearrange(t, "b l (h d) -> b l h d", h=self.config.num_heads)

    def _merge(self, t: jax.Array) -> jax.Array:
        return self.out(einops.rearrange(t, "b l h d -> b l (h d)"))

    def __call__(self, x: jax.Array, mask: jax.Array) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
        """x [B, L, D], mask bool [1, 1, L, L] -> (out [B, L, D], (keys, values) [B, L, heads, head_dim])."""
        q, k, v = (self._split(proj(x)) for proj in (self.query, self.key, self.value))
        return self._merge(attention(q, k, v, mask=mask)), (k, v)

    def step(self, x: jax.Array, mask_row: jax.Array, cache: dict, position: jax.Array) -> tuple[jax.Array, dict]:
        """x [B, 1, D] at sequence position ``position``; mask_row bool [1, 1, 1, L]; cache
        ``{"key", "value"}`` [B, L, heads, head_dim] -> (out [B, 1, D], the cache with this position written)."""
        q, k, v = (self._split(proj(x)) for proj in (self.query, self.key, self.value))
        start = (0, position, 0, 0)
        keys = jax.lax.dynamic_update_slice(cache["key"], k.astype(cache["key"].dtype), start)
        values = jax.lax.dynamic_update_slice(cache["value"], v.astype(cache["value"].dtype), start)
        return self._merge(attention(q, keys, values, mask=mask_row)), {"key": keys, "value": values}


class MLP(_Layer):
    """Linear to ``mlp_ratio * D``, GELU, linear back: [B, L, D] -> [B, L, D]."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg, kw = self.config, self.dtypes
        h = nn.gelu(_dense(cfg.mlp_ratio * cfg.width, ("embed", "mlp"), "fc", **kw)(x))
        return _dense(cfg.width, ("mlp", "embed"), "proj", stddev=_residual_stddev(cfg), **kw)(h)


class Block(_Layer):
    """Pre-LayerNorm block: ``x + attn(ln_1(x))``, then ``x + mlp(ln_2(x))``."""

    def setup(self):
        cfg, kw = self.config, self.dtypes
        self.ln_1 = _layer_norm(cfg, self.param_dtype, "ln_1")
        self.attn = SelfAttention(cfg, name="attn", **kw)
        self.ln_2 = _layer_norm(cfg, self.param_dtype, "ln_2")
        self.mlp = MLP(cfg, name="mlp", **kw)
        self.drop = nn.Dropout(cfg.dropout)

    def __call__(self, x: jax.Array, mask: jax.Array, deterministic: bool = True):
        """x [B, L, D], mask bool [1, 1, L, L] -> (x [B, L, D], this layer's (keys, values))."""
        h, kv = self.attn(self.ln_1(x), mask)
        x = x + self.drop(h, deterministic=deterministic).astype(x.dtype)
        return self._feed_forward(x, deterministic), kv

    def step(self, x: jax.Array, mask_row: jax.Array, cache: dict, position: jax.Array):
        """One token: x [B, 1, D] -> (x [B, 1, D], updated cache); see :meth:`SelfAttention.step`."""
        h, cache = self.attn.step(self.ln_1(x), mask_row, cache, position)
        return self._feed_forward(x + h.astype(x.dtype), True), cache

    def _feed_forward(self, x: jax.Array, deterministic: bool) -> jax.Array:
        h = self.mlp(self.ln_2(x))
        return x + self.drop(h, deterministic=deterministic).astype(x.dtype)


# -- the model -------------------------------------------------------------------------------------------------------


class DalleTransformer(_Layer):
    """The transformer; see the module docstring. ``remat=True`` recomputes each block in the backward pass.

    Calls (through ``apply``; ``method=`` for the others):

    * ``__call__(text_tokens [B, T], image_tokens [B, h, w] or [B, h*w], *, deterministic=True)``
      -> ``(text_logits [B, T-1, text_vocab_total], image_logits [B, h*w, image_vocab_size])``, float32.
    * ``states(text_tokens, image_tokens, *, deterministic=True)`` -> final states float32 [B, L, D].
    * ``prefill(text_tokens [B, T])`` -> ``(logits of image token 0 [B, image_vocab_size], cache)``.
    * ``decode(tokens [B], index, cache)``: image token ``index`` (scalar int) -> ``(logits of image token
      index + 1 [B, image_vocab_size], cache)``.
    """

    remat: bool = False

    def setup(self):
        cfg, kw = self.config, self.dtypes
        table = nn.with_logical_partitioning(nn.initializers.normal(0.02), ("vocab", "embed"))
        positions = nn.with_logical_partitioning(nn.initializers.normal(0.02), (None, "embed"))
        self.text_embed = nn.Embed(cfg.text_vocab_total, cfg.width, embedding_init=table, **kw)
        self.text_positions = self.param("text_positions", positions, (cfg.text_length, cfg.width),
                                         self.param_dtype)
        self.image_embed = nn.Embed(cfg.image_vocab_size, cfg.width, embedding_init=table, **kw)
        self.image_rows = self.param("image_rows", positions, (cfg.image_height, cfg.width), self.param_dtype)
        self.image_columns = self.param("image_columns", positions, (cfg.image_width, cfg.width), self.param_dtype)
        block = nn.remat(Block, static_argnums=(3,)) if self.remat else Block
        self.blocks = [block(cfg, name=f"blocks_{i}", **kw) for i in range(cfg.num_layers)]
        self.ln_f = _layer_norm(cfg, self.param_dtype, "ln_f")
        self.text_head = _dense(cfg.text_vocab_total, ("embed", "vocab"), "text_head", **kw)
        self.image_head = _dense(cfg.image_vocab_size, ("embed", "vocab"), "image_head", **kw)
        self.drop = nn.Dropout(cfg.dropout)

    # -- embeddings --------------------------------------------------------------------------------------------------

    def _embed_text(self, text_tokens: jax.Array) -> jax.Array:  # [B, T] -> [B, T, D]
        cfg = self.config
        if text_tokens.ndim != 2 or text_tokens.shape[1] != cfg.text_length:
            raise ValueError(f"DalleTransformer: text_tokens must be [B, {cfg.text_length}] (prepare_text_tokens), "
                             f"got shape {text_tokens.shape}.")
        return self.text_embed(text_tokens) + self.text_positions.astype(self.dtype)[None]

    def _embed_image(self, tokens: jax.Array, indices: jax.Array) -> jax.Array:  # [B, n], [n] -> [B, n, D]
        rows, columns = jnp.divmod(indices, self.config.image_width)
        place = jnp.take(self.image_rows, rows, axis=0) + jnp.take(self.image_columns, columns, axis=0)
        return self.image_embed(tokens) + place.astype(self.dtype)[None]

    def _flat_image(self, image_tokens: jax.Array) -> jax.Array:  # [B, h, w] or [B, N] -> [B, N]
        cfg = self.config
        if image_tokens.ndim == 3 and image_tokens.shape[1:] == (cfg.image_height, cfg.image_width):
            return einops.rearrange(image_tokens, "b h w -> b (h w)")
        if image_tokens.ndim == 2 and image_tokens.shape[1] == cfg.image_length:
            return image_tokens
        raise ValueError(f"DalleTransformer: image_tokens must be [B, {cfg.image_height}, {cfg.image_width}] or "
                         f"[B, {cfg.image_length}], got shape {image_tokens.shape}.")

    # -- the trunk ---------------------------------------------------------------------------------------------------

    def _masks(self, length: int) -> dict[str, jax.Array]:
        """Each used kind's mask over the first ``length`` positions: bool [1, 1, length, length]."""
        return {kind: jnp.asarray(self.config.mask(kind)[:length, :length])[None, None]
                for kind in sorted(set(self.config.layer_kinds))}

    def _trunk(self, x: jax.Array, deterministic: bool) -> tuple[jax.Array, list]:
        """Blocks over a sequence prefix x [B, l, D] -> (normalised states float32 [B, l, D], per-layer (k, v))."""
        masks = self._masks(x.shape[1])
        kvs = []
        for kind, block in zip(self.config.layer_kinds, self.blocks):
            x, kv = block(x, masks[kind], deterministic)
            kvs.append(kv)
        return self.ln_f(x), kvs

    def states(self, text_tokens: jax.Array, image_tokens: jax.Array, *, deterministic: bool = True) -> jax.Array:
        """Final (normalised) states of every position, float32 [B, L, D]."""
        image = self._flat_image(image_tokens)
        x = jnp.concatenate([self._embed_text(text_tokens),
                             self._embed_image(image, jnp.arange(self.config.image_length))], axis=1)
        x = self.drop(x, deterministic=deterministic)
        return self._trunk(x, deterministic)[0]

    def __call__(self, text_tokens: jax.Array, image_tokens: jax.Array, *, deterministic: bool = True):
        """-> (text_logits [B, T-1, text_vocab_total] for ``text[:, 1:]``, image_logits [B, h*w, image_vocab_size]
        for every image token), float32."""
        h = self.states(text_tokens, image_tokens, deterministic=deterministic)
        last_text = self.config.text_length - 1
        text_logits = self.text_head(h[:, :last_text])
        image_logits = self.image_head(h[:, last_text:-1])
        return text_logits.astype(jnp.float32), image_logits.astype(jnp.float32)

    # -- cached decoding ---------------------------------------------------------------------------------------------

    def prefill(self, text_tokens: jax.Array) -> tuple[jax.Array, tuple[dict, ...]]:
        """Runs the text: -> (logits of image token 0, float32 [B, image_vocab_size]; cache with the text)."""
        h, kvs = self._trunk(self._embed_text(text_tokens), True)
        cache = init_cache(self.config, text_tokens.shape[0], self.dtype)
        cache = tuple({"key": jax.lax.dynamic_update_slice(c["key"], k.astype(c["key"].dtype), (0, 0, 0, 0)),
                       "value": jax.lax.dynamic_update_slice(c["value"], v.astype(c["value"].dtype), (0, 0, 0, 0))}
                      for c, (k, v) in zip(cache, kvs))
        return self.image_head(h[:, -1]).astype(jnp.float32), cache

    def decode(self, tokens: jax.Array, index: jax.Array, cache: tuple[dict, ...]):
        """Feeds image token ``index`` (raster order; tokens int [B]) -> (logits of image token ``index + 1``,
        float32 [B, image_vocab_size]; the cache with its keys and values written)."""
        cfg = self.config
        index = jnp.asarray(index, jnp.int32)
        position = cfg.text_length + index
        x = self._embed_image(tokens[:, None], index[None])
        masks = self._masks(cfg.sequence_length)
        new_cache = []
        for kind, block, layer_cache in zip(cfg.layer_kinds, self.blocks, cache):
            row = jax.lax.dynamic_slice_in_dim(masks[kind], position, 1, axis=2)  # [1, 1, 1, L]
            x, layer_cache = block.step(x, row, layer_cache, position)
            new_cache.append(layer_cache)
        return self.image_head(self.ln_f(x)[:, 0]).astype(jnp.float32), tuple(new_cache)


def init_cache(config: DalleConfig, batch: int, dtype: Any = jnp.float32) -> tuple[dict, ...]:
    """An empty key/value cache: per layer ``{"key", "value"}`` zeros [batch, L, num_heads, head_dim]."""
    shape = (batch, config.sequence_length, config.num_heads, config.head_dim)
    return tuple({"key": jnp.zeros(shape, dtype), "value": jnp.zeros(shape, dtype)}
                 for _ in range(config.num_layers))


# -- loss ------------------------------------------------------------------------------------------------------------


def weighted_loss(text_logits: jax.Array, image_logits: jax.Array, text_tokens: jax.Array, image_tokens: jax.Array,
                  *, text_weight: float = TEXT_LOSS_WEIGHT,
                  image_weight: float = IMAGE_LOSS_WEIGHT) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The paper's loss: ``text_weight * CE_text + image_weight * CE_image``, each averaged over its tokens.

    ``text_logits`` [B, T-1, Vt] and ``image_logits`` [B, N, Vi] as :class:`DalleTransformer` returns them;
    ``text_tokens`` [B, T] (targets ``text_tokens[:, 1:]``), ``image_tokens`` [B, h, w] or [B, N].
    Returns ``(loss, {"text_loss", "image_loss"})``, float32 scalars.
    """
    text_targets = text_tokens[:, 1:]
    image_targets = jnp.reshape(image_tokens, (image_tokens.shape[0], -1))
    if text_targets.shape != text_logits.shape[:2] or image_targets.shape != image_logits.shape[:2]:
        raise ValueError(f"weighted_loss: logits {text_logits.shape[:2]} / {image_logits.shape[:2]} do not match "
                         f"the targets {text_targets.shape} / {image_targets.shape} (text[:, 1:], flat image).")
    ce = optax.softmax_cross_entropy_with_integer_labels
    text_loss = jnp.mean(ce(text_logits.astype(jnp.float32), text_targets))
    image_loss = jnp.mean(ce(image_logits.astype(jnp.float32), image_targets))
    loss = text_weight * text_loss + image_weight * image_loss
    return loss, {"text_loss": text_loss, "image_loss": image_loss}


# -- shapes ----------------------------------------------------------------------------------------------------------


def dummy_inputs(config: DalleConfig, batch: int = 1) -> tuple[jax.ShapeDtypeStruct, jax.ShapeDtypeStruct]:
    """Abstract ``(text_tokens [B, T], image_tokens [B, h, w])`` for eval_shape / init."""
    return (jax.ShapeDtypeStruct((batch, config.text_length), jnp.int32),
            jax.ShapeDtypeStruct((batch, config.image_height, config.image_width), jnp.int32))


def abstract_params(config: DalleConfig, param_dtype: Any = jnp.float32, *, boxed: bool = False) -> dict:
    """The parameter tree as ``jax.ShapeDtypeStruct`` leaves, without allocating anything.

    ``boxed=True`` keeps the ``LogicallyPartitioned`` boxes of the annotated parameters (for
    :func:`jaxt2i.train.sharding.param_shardings`); the default returns plain leaves (for conversion).
    """
    model = DalleTransformer(config, param_dtype=param_dtype)
    params = jax.eval_shape(model.init, jax.random.PRNGKey(0), *dummy_inputs(config))["params"]
    return params if boxed else nn.unbox(params)
