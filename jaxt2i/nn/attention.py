"""The one attention function of jaxt2i, with interchangeable backends, and the projection module around it.

Backends (all compute ``softmax(q k^T * scale + mask) v`` with scores and softmax in float32):

* ``"xla"``: the plain formulation; materialises the [B, H, Lq, Lk] scores. Fast for short sequences.
* ``"chunked"``: memory-efficient, flash-style: keys/values are visited in blocks inside a ``lax.scan`` with an
  online (running max / running sum) softmax, and queries are processed in chunks. Memory is
  O(B * H * query_chunk * key_chunk) instead of O(B * H * Lq * Lk), in the backward pass too (a block's scores are
  recomputed there, not kept); on CPU it is also several times faster than the plain form at Stable Diffusion's
  4096-token self-attention.
* ``"cudnn"``: ``jax.nn.dot_product_attention(implementation="cudnn")`` (flash attention) on GPU, for float16 /
  bfloat16 inputs whose head dimension cuDNN supports.

``"auto"`` (the default) picks cudnn on GPU when the inputs allow it, chunked for long sequences, xla otherwise.
The default can be changed for a region of code with :func:`default_backend`, e.g. in benchmarks.
"""

from __future__ import annotations

import contextlib
import functools
import math
from typing import Iterator

import einops
import flax.linen as nn
import jax
import jax.numpy as jnp

BACKENDS = ("auto", "xla", "chunked", "cudnn")

_DEFAULT = {"backend": "auto"}

# From this many score entries per (batch, head) on, "auto" uses the chunked backend on CPU/TPU. Measured on a 2-core
# CPU (fp32, SD1.5 shapes): chunked already beats the plain form at 256x256 self-attention and at 4096x77 / 1024x77
# cross-attention, and is ~6x faster at 4096x4096 (scripts/bench_unet.py, docs/benchmarks.md).
_CHUNKED_MIN_SCORES = 256 * 256

# Block sizes of the chunked backend. 256x256 fp32 score blocks (256 KB per head) stay in the CPU's L2 cache: at
# 4096 tokens, 8 heads of 40, this measured 1.6x faster than 1024x1024 blocks and faster than torch's SDPA.
DEFAULT_QUERY_CHUNK = 256
DEFAULT_KEY_CHUNK = 256


@contextlib.contextmanager
def default_backend(name: str) -> Iterator[None]:
    """Within the ``with`` block, ``backend="auto"`` resolves to ``name`` (read at trace time)."""
    _check_backend(name)
    previous = _DEFAULT["backend"]
    _DEFAULT["backend"] = name
    try:
        yield
    finally:
        _DEFAULT["backend"] = previous


def _check_backend(name: str) -> None:
    if name not in BACKENDS:
        raise ValueError(f"Unknown attention backend {name!r}; choose one of {', '.join(BACKENDS)}.")


def cudnn_supports(q: jax.Array, k: jax.Array, mask: jax.Array | None) -> bool:
    """Whether the cuDNN flash kernel can run these inputs on the current default device."""
    if jax.default_backend() != "gpu":
        return False
    head_dim = q.shape[-1]
    return (
        q.dtype in (jnp.float16, jnp.bfloat16)
        and q.dtype == k.dtype
        and head_dim <= 128
        and head_dim % 8 == 0
        and mask is None
    )


def resolve_backend(backend: str, q: jax.Array, k: jax.Array, mask: jax.Array | None) -> str:
    """Turns ``"auto"`` (or the context default) into a concrete backend for these shapes."""
    _check_backend(backend)
    if backend == "auto":
        backend = _DEFAULT["backend"]
    if backend == "cudnn" and not cudnn_supports(q, k, mask):
        backend = "auto"  # explicit request on unsupported inputs falls back, as documented
    if backend != "auto":
        return backend
    if cudnn_supports(q, k, mask):
        return "cudnn"
    if jax.default_backend() != "gpu" and q.shape[1] * k.shape[1] >= _CHUNKED_MIN_SCORES:
        return "chunked"
    return "xla"


def attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    mask: jax.Array | None = None,
    causal: bool = False,
    scale: float | None = None,
    backend: str = "auto",
    query_chunk: int = DEFAULT_QUERY_CHUNK,
    key_chunk: int = DEFAULT_KEY_CHUNK,
) -> jax.Array:
    """Multi-head scaled dot-product attention.

    Args:
      q: queries ``[B, Lq, H, D]``.
      k: keys ``[B, Lk, H, D]``.
      v: values ``[B, Lk, H, Dv]``.
      mask: optional boolean mask broadcastable to ``[B, H, Lq, Lk]``; True means "may attend".
      causal: if True, query i attends only to keys j <= i (requires Lq == Lk).
      scale: score scale, default ``1/sqrt(D)``.
      backend: one of ``"auto"``, ``"xla"``, ``"chunked"``, ``"cudnn"``.
      query_chunk, key_chunk: block sizes of the chunked backend.

    Returns:
      ``[B, Lq, H, Dv]`` in the dtype of ``v``.
    """
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(
            f"attention expects [B, L, H, D] inputs; got q{q.shape}, k{k.shape}, v{v.shape}."
        )
    if causal and q.shape[1] != k.shape[1]:
        raise ValueError(f"causal attention needs Lq == Lk; got {q.shape[1]} and {k.shape[1]}.")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    if mask is not None:
        mask = jnp.broadcast_to(mask, mask.shape[:-2] + (q.shape[1], k.shape[1])).astype(bool)
        if mask.ndim != 4:
            raise ValueError(f"mask must have rank 4 ([B, H, Lq, Lk], broadcastable); got shape {mask.shape}.")
    chosen = resolve_backend(backend, q, k, mask)
    if chosen == "xla":
        return _attention_xla(q, k, v, mask, causal, scale)
    if chosen == "chunked":
        return _attention_chunked(q, k, v, mask, causal, scale, query_chunk, key_chunk)
    return jax.nn.dot_product_attention(
        q, k, v, scale=scale, is_causal=causal, implementation="cudnn"
    ).astype(v.dtype)


def _causal_mask(q_positions: jax.Array, k_positions: jax.Array) -> jax.Array:
    """[Lq, Lk] boolean: key position <= query position."""
    return k_positions[None, :] <= q_positions[:, None]


def _attention_xla(q, k, v, mask, causal, scale):
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * scale
    if causal:
        mask_c = _causal_mask(jnp.arange(q.shape[1]), jnp.arange(k.shape[1]))
        mask = mask_c if mask is None else (mask & mask_c)
    if mask is not None:
        scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    return jnp.einsum("bhqk,bkhd->bqhd", probs, v)


def _pad_axis(x: jax.Array, axis: int, multiple: int) -> jax.Array:
    pad = (-x.shape[axis]) % multiple
    if pad == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, pad)
    return jnp.pad(x, widths)


def _attention_chunked(q, k, v, mask, causal, scale, query_chunk, key_chunk):
    # Head-major layout and a pre-scaled q: measured ~1.5x faster on CPU than scanning the [B, L, H, D] layout.
    len_q, len_k = q.shape[1], k.shape[1]
    query_chunk = min(query_chunk, len_q)
    key_chunk = min(key_chunk, len_k)
    to_heads = lambda t, c: einops.rearrange(_pad_axis(t, 1, c), "b l h d -> b h l d")
    qh = to_heads(q * jnp.asarray(scale, q.dtype), query_chunk)  # [B, H, Lq', D]
    kh, vh = to_heads(k, key_chunk), to_heads(v, key_chunk)  # [B, H, Lk', D]
    if mask is not None:
        mask = jnp.broadcast_to(mask, (mask.shape[0], mask.shape[1], len_q, len_k))
        mask = _pad_axis(_pad_axis(mask, 2, query_chunk), 3, key_chunk)
    needs_mask = causal or mask is not None or kh.shape[2] != len_k
    num_q = qh.shape[2] // query_chunk
    # [num_k, B, H, key_chunk, D]: the scan walks the leading axis.
    k_blocks = einops.rearrange(kh, "b h (n c) d -> n b h c d", c=key_chunk)
    v_blocks = einops.rearrange(vh, "b h (n c) d -> n b h c d", c=key_chunk)

    def one_query_chunk(q_index):
        q_start = q_index * query_chunk
        q_blk = jax.lax.dynamic_slice_in_dim(qh, q_start, query_chunk, axis=2)
        q_pos = q_start + jnp.arange(query_chunk)

        def block_mask(k_start):
            k_pos = k_start + jnp.arange(key_chunk)
            valid = (k_pos < len_k)[None, None, None, :]
            if causal:
                valid = valid & _causal_mask(q_pos, k_pos)[None, None]
            if mask is not None:
                m = jax.lax.dynamic_slice_in_dim(mask, q_start, query_chunk, axis=2)
                valid = valid & jax.lax.dynamic_slice_in_dim(m, k_start, key_chunk, axis=3)
            return valid

        def visit_key_block(carry, inputs):
            acc, row_max, row_sum = carry
            k_index, k_blk, v_blk = inputs
            s = jnp.einsum("bhqd,bhkd->bhqk", q_blk, k_blk, preferred_element_type=jnp.float32)
            if needs_mask:
                s = jnp.where(block_mask(k_index * key_chunk), s, -jnp.inf)
            new_max = jnp.maximum(row_max, jnp.max(s, axis=-1))
            # Rows that have seen no visible key yet keep max -inf; shift by 0 there so exp() gives 0, not NaN.
            safe_max = jnp.where(jnp.isfinite(new_max), new_max, 0.0)
            p = jnp.exp(s - safe_max[..., None])
            correction = jnp.exp(row_max - safe_max)
            row_sum = row_sum * correction + jnp.sum(p, axis=-1)
            pv = jnp.einsum("bhqk,bhkd->bhqd", p.astype(v_blk.dtype), v_blk, preferred_element_type=jnp.float32)
            return (acc * correction[..., None] + pv, new_max, row_sum), None

        # Differentiated, the scan would keep every block's scores and probabilities for the backward pass: the whole
        # [B, H, Lq, Lk] matrix twice over, what this backend exists to avoid. Checkpointed, it keeps only the carry
        # per block and recomputes a block's scores in the backward pass (as flash attention does).
        visit_key_block = jax.checkpoint(visit_key_block, prevent_cse=False)

        batch, heads = qh.shape[:2]
        init = (
            jnp.zeros((batch, heads, query_chunk, v.shape[-1]), jnp.float32),
            jnp.full((batch, heads, query_chunk), -jnp.inf, jnp.float32),
            jnp.zeros((batch, heads, query_chunk), jnp.float32),
        )
        (acc, _, row_sum), _ = jax.lax.scan(
            visit_key_block, init, (jnp.arange(k_blocks.shape[0]), k_blocks, v_blocks)
        )
        # Rows with no visible key at all (fully masked) give zeros rather than NaN.
        return acc / jnp.where(row_sum > 0, row_sum, 1.0)[..., None]  # [B, H, q, Dv]

    if num_q == 1:
        out = one_query_chunk(0)
    else:
        out = jax.lax.map(one_query_chunk, jnp.arange(num_q))  # [num_q, B, H, chunk, Dv]
        out = einops.rearrange(out, "n b h c d -> b h (n c) d")
    return einops.rearrange(out[:, :, :len_q], "b h l d -> b l h d").astype(v.dtype)


class MultiHeadAttention(nn.Module):
    """Projections around :func:`attention`: ``out(attention(query(x), key(ctx), value(ctx)))``.

    Parameter names: ``query``, ``key``, ``value``, ``out`` (Dense kernels ``[in, out]``).
    Input ``x`` is ``[B, Lq, C]``; ``context`` is ``[B, Lk, Cc]`` (defaults to ``x``); output ``[B, Lq, out_dim]``.
    """

    num_heads: int
    head_dim: int
    out_dim: int | None = None
    qkv_bias: bool = False
    out_bias: bool = True
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        context: jax.Array | None = None,
        *,
        mask: jax.Array | None = None,
        causal: bool = False,
    ) -> jax.Array:
        context = x if context is None else context
        inner = self.num_heads * self.head_dim
        dense = functools.partial(nn.Dense, dtype=self.dtype, param_dtype=self.param_dtype)
        q = dense(inner, use_bias=self.qkv_bias, name="query")(x)
        k = dense(inner, use_bias=self.qkv_bias, name="key")(context)
        v = dense(inner, use_bias=self.qkv_bias, name="value")(context)
        split = lambda t: einops.rearrange(t, "b l (h d) -> b l h d", h=self.num_heads)
        out = attention(split(q), split(k), split(v), mask=mask, causal=causal)
        out = einops.rearrange(out, "b l h d -> b l (h d)")
        return dense(self.out_dim or x.shape[-1], use_bias=self.out_bias, name="out")(out)
