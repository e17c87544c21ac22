"""Sampling image tokens from DALL-E's transformer: one ``lax.scan`` over image positions with a key/value cache.

The text is run once (:meth:`DalleTransformer.prefill`); each scan step samples one image token from the current
logits and feeds it (:meth:`DalleTransformer.decode`). Only the image head is sampled, so every token lies in the
image vocabulary. The logits filters are pure functions on ``[..., V]`` logits: :func:`guide_logits`
(classifier-free guidance against an empty caption, the conditional and unconditional rows run as one batch),
:func:`top_k_filter`, :func:`top_p_filter`; :func:`sample_logits` applies temperature and both filters and draws.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxt2i.models.dalle import DalleTransformer, empty_caption

__all__ = ["guide_logits", "sample_image_tokens", "sample_logits", "teacher_forced_logits", "top_k_filter",
           "top_p_filter"]


def top_k_filter(logits: jax.Array, k: int | None) -> jax.Array:
    """Keeps the ``k`` largest logits of the last axis (and any tied with the k-th), the rest become -inf.

    ``k`` is static; None or ``k >= V`` keeps everything. [..., V] -> [..., V] float32.
    """
    logits = jnp.asarray(logits, jnp.float32)
    if k is None or k >= logits.shape[-1]:
        return logits
    if k < 1:
        raise ValueError(f"top_k must be >= 1 (or None to keep every token), got {k}.")
    kth = jax.lax.top_k(logits, k)[0][..., -1:]
    return jnp.where(logits >= kth, logits, -jnp.inf)


def top_p_filter(logits: jax.Array, p: float | jax.Array | None) -> jax.Array:
    """Nucleus filtering: keeps the fewest most-likely tokens whose probabilities sum to at least ``p``.

    A token is kept when the probability of the tokens ranked above it is below ``p``, so the most likely token is
    always kept; tokens tied with the last kept one are kept too. None keeps everything. [..., V] -> [..., V].
    """
    logits = jnp.asarray(logits, jnp.float32)
    if p is None:
        return logits
    ranked = -jnp.sort(-logits, axis=-1)  # descending
    probs = jax.nn.softmax(ranked, axis=-1)
    mass_above = jnp.cumsum(probs, axis=-1) - probs
    kept = mass_above < p
    threshold = jnp.min(jnp.where(kept, ranked, jnp.inf), axis=-1, keepdims=True)
    return jnp.where(logits >= threshold, logits, -jnp.inf)


def guide_logits(cond: jax.Array, uncond: jax.Array, scale: float | jax.Array) -> jax.Array:
    """Classifier-free guidance on logits: ``uncond + scale * (cond - uncond)``, float32 (scale 1: ``cond``)."""
    cond, uncond = jnp.asarray(cond, jnp.float32), jnp.asarray(uncond, jnp.float32)
    return uncond + scale * (cond - uncond)


def sample_logits(key: jax.Array, logits: jax.Array, *, temperature: float | jax.Array = 1.0,
                  top_k: int | None = None, top_p: float | jax.Array | None = None) -> jax.Array:
    """Draws one token per row: logits / temperature, then top-k, then top-p. [..., V] -> int32 [...]."""
    scaled = jnp.asarray(logits, jnp.float32) / temperature
    filtered = top_p_filter(top_k_filter(scaled, top_k), top_p)
    return jax.random.categorical(key, filtered, axis=-1).astype(jnp.int32)


def _always_guided(scale: Any) -> bool:
    """Whether a guidance scale forces the doubled batch: a traced scale, or any value other than 1."""
    return isinstance(scale, jax.core.Tracer) or float(np.asarray(scale)) != 1.0


def _with_uncond(model: DalleTransformer, text_tokens: jax.Array, uncond_tokens: Any) -> jax.Array:
    """[2B, T]: the captions, then the unconditional captions (broadcast from [T] or [1, T] if given so)."""
    batch, length = text_tokens.shape
    if uncond_tokens is None:
        uncond_tokens = empty_caption(model.config, batch)
    uncond = jnp.broadcast_to(jnp.asarray(uncond_tokens, text_tokens.dtype).reshape(-1, length), (batch, length))
    return jnp.concatenate([text_tokens, uncond], axis=0)


def sample_image_tokens(model: DalleTransformer, params: Any, text_tokens: jax.Array, key: jax.Array, *,
                        temperature: float | jax.Array = 1.0, top_k: int | None = None,
                        top_p: float | jax.Array | None = None, guidance_scale: float | jax.Array = 1.0,
                        uncond_tokens: Any = None) -> jax.Array:
    """Samples the image tokens of each caption: int32 ``[B, image_height, image_width]``.

    Args:
      model: the :class:`DalleTransformer` (its ``dtype`` is the compute dtype).
      params: its parameter tree (what ``init`` returns under ``"params"``).
      text_tokens: int ``[B, text_length]`` (:func:`jaxt2i.models.dalle.prepare_text_tokens`).
      key: PRNG key; image position ``i`` draws with ``jax.random.split(key, N)[i]``.
      temperature: divides the logits (> 0; may be traced).
      top_k: keep the k most likely tokens (static int; None: all).
      top_p: nucleus mass (may be traced; None: no nucleus filtering).
      guidance_scale: classifier-free guidance ("super-conditioning") against ``uncond_tokens``; with a Python
        value of 1 and no ``uncond_tokens`` the unconditional batch is not run at all.
      uncond_tokens: the unconditional caption, int ``[T]``, ``[1, T]`` or ``[B, T]``; default
        :func:`jaxt2i.models.dalle.empty_caption` (a pad at every position).

    Jit it with ``model`` and ``top_k`` static (and ``guidance_scale`` too, to skip the unconditional batch at 1).
    """
    cfg = model.config
    text_tokens = jnp.asarray(text_tokens, jnp.int32)
    batch = text_tokens.shape[0]
    guided = uncond_tokens is not None or _always_guided(guidance_scale)
    tokens_in = _with_uncond(model, text_tokens, uncond_tokens) if guided else text_tokens
    variables = {"params": params}

    def choose(logits, step_key):  # logits [B or 2B, V] -> tokens [B], and what to feed back [B or 2B]
        if guided:
            logits = guide_logits(logits[:batch], logits[batch:], guidance_scale)
        token = sample_logits(step_key, logits, temperature=temperature, top_k=top_k, top_p=top_p)
        return token, jnp.concatenate([token, token]) if guided else token

    keys = jax.random.split(key, cfg.image_length)
    logits, cache = model.apply(variables, tokens_in, method=DalleTransformer.prefill)
    first, fed = choose(logits, keys[0])

    def step(carry, inputs):
        fed, cache = carry
        index, step_key = inputs
        logits, cache = model.apply(variables, fed, index, cache, method=DalleTransformer.decode)
        token, fed = choose(logits, step_key)
        return (fed, cache), token

    indices = jnp.arange(cfg.image_length - 1, dtype=jnp.int32)
    _, rest = jax.lax.scan(step, (fed, cache), (indices, keys[1:]))  # [N - 1, B]
    tokens = jnp.concatenate([first[None], rest], axis=0)  # [N, B]
    return tokens.T.reshape(batch, cfg.image_height, cfg.image_width)


def teacher_forced_logits(model: DalleTransformer, params: Any, text_tokens: jax.Array,
                          image_tokens: jax.Array) -> jax.Array:
    """The image logits of given tokens through the cache (prefill, then one scan step per token).

    text_tokens [B, T], image_tokens [B, h, w] -> float32 [B, h*w, image_vocab_size]; equals the image logits of
    the full forward pass (what it checks) at the cost of cached decoding (what benchmarks time).
    """
    variables = {"params": params}
    flat = jnp.reshape(jnp.asarray(image_tokens, jnp.int32), (image_tokens.shape[0], -1))
    logits, cache = model.apply(variables, jnp.asarray(text_tokens, jnp.int32), method=DalleTransformer.prefill)

    def step(cache, inputs):
        index, tokens = inputs
        next_logits, cache = model.apply(variables, tokens, index, cache, method=DalleTransformer.decode)
        return cache, next_logits

    indices = jnp.arange(flat.shape[1] - 1, dtype=jnp.int32)
    _, rest = jax.lax.scan(step, cache, (indices, flat[:, :-1].T))  # [N - 1, B, V]
    return jnp.concatenate([logits[:, None], jnp.swapaxes(rest, 0, 1)], axis=1)
