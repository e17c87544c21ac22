"""The loss maths of dVAE training (kind ``dvae``), as pure functions of arrays.

* :func:`logit_laplace_nll`: DALL-E's reconstruction likelihood. A pixel ``x`` in ``(0, 1)`` (mapped by
  :func:`jaxt2i.models.dvae.map_pixels` into ``[eps, 1 - eps]``) has the density
  ``f(x | mu, b) = exp(-|logit(x) - mu| / b) / (2 b x (1 - x))`` (a Laplace variable pushed through a sigmoid);
  the decoder outputs ``mu`` and ``log b`` per channel. The negative log-density is in nats per pixel value.
* :func:`gumbel_softmax`: the relaxed categorical sample ``softmax((logits + g) / tau)``, ``g ~ Gumbel(0, 1)``.
* :func:`kl_to_uniform`: ``KL(softmax(logits) || Uniform(V))`` per token position, in nats.
* :func:`cosine_schedule`: the paper's cosine annealing of the relaxation temperature (1 -> 1/16) and the KL
  weight (0 -> beta).
* :func:`vq_losses`: VQ-VAE's codebook and commitment terms.
* :func:`token_counts`, :func:`perplexity`, :func:`codes_used`, :func:`psnr`: codebook usage and reconstruction
  quality.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp


def logit_laplace_nll(stats: jax.Array, x: jax.Array) -> jax.Array:
    """Negative log-density of mapped pixels under the decoder's logit-Laplace distributions.

    Args:
      stats: [..., 2C] decoder statistics, ``mu`` channels first, then ``log b``.
      x: [..., C] pixels in the open interval (0, 1) -- ``map_pixels`` of images in [0, 1].
    Returns:
      [..., C] float32 nats per pixel value: ``log 2 + log b + log x + log(1 - x) + |logit(x) - mu| / b``.
    """
    stats = stats.astype(jnp.float32)
    x = x.astype(jnp.float32)
    channels = stats.shape[-1] // 2
    mu, log_b = stats[..., :channels], stats[..., channels:]
    log_x, log_1mx = jnp.log(x), jnp.log1p(-x)
    return math.log(2.0) + log_b + log_x + log_1mx + jnp.abs(log_x - log_1mx - mu) * jnp.exp(-log_b)


def gumbel_softmax(keys: jax.Array, logits: jax.Array, temperature: jax.Array | float) -> jax.Array:
    """Relaxed one-hot samples, one key per example: [B] keys, logits [B, ..., V] -> probabilities [B, ..., V]
    float32, ``softmax((logits + g) / temperature)`` with ``g ~ Gumbel(0, 1)`` drawn from each example's key."""
    logits = logits.astype(jnp.float32)
    noise = jax.vmap(lambda k: jax.random.gumbel(k, logits.shape[1:], jnp.float32))(keys)
    return jax.nn.softmax((logits + noise) / temperature, axis=-1)


def kl_to_uniform(logits: jax.Array) -> jax.Array:
    """``KL(q || Uniform(V))`` with ``q = softmax(logits)``: [..., V] -> [...] float32 nats
    (``sum_k q_k log q_k + log V``; 0 for a uniform ``q``, ``log V`` for a one-hot one)."""
    log_q = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return jnp.sum(jnp.exp(log_q) * log_q, axis=-1) + math.log(logits.shape[-1])


def cosine_schedule(step: jax.Array | int, start: float, end: float, steps: int) -> jax.Array:
    """``start`` at step 0, ``end`` from step ``steps`` on, half a cosine in between (float32 scalar):
    ``start + (end - start) * (1 - cos(pi * min(step / steps, 1))) / 2``; ``steps <= 0`` gives ``end`` at once."""
    if steps <= 0:
        return jnp.asarray(end, jnp.float32)
    t = jnp.clip(jnp.asarray(step, jnp.float32) / steps, 0.0, 1.0)
    return jnp.asarray(start + (end - start) * 0.5 * (1.0 - jnp.cos(jnp.pi * t)), jnp.float32)


def vq_losses(z_e: jax.Array, z_q: jax.Array) -> tuple[jax.Array, jax.Array]:
    """VQ-VAE's two auxiliary terms, means over every element of ``[..., D]`` encoder outputs ``z_e`` and their
    nearest codebook vectors ``z_q``: (codebook loss ``|sg(z_e) - z_q|^2``, which moves the codes; commitment loss
    ``|z_e - sg(z_q)|^2``, which holds the encoder to them)."""
    z_e, z_q = z_e.astype(jnp.float32), z_q.astype(jnp.float32)
    codebook = jnp.mean(jnp.square(jax.lax.stop_gradient(z_e) - z_q))
    commitment = jnp.mean(jnp.square(z_e - jax.lax.stop_gradient(z_q)))
    return codebook, commitment


def token_counts(tokens: jax.Array, vocab_size: int) -> jax.Array:
    """Integer tokens of any shape -> how often each of the ``vocab_size`` codes occurs: [vocab_size] float32."""
    return jnp.bincount(tokens.reshape(-1), length=vocab_size).astype(jnp.float32)


def perplexity(counts: jax.Array) -> jax.Array:
    """``exp(entropy)`` of the histogram ``counts`` [V] (float32 scalar): the number of equally used codes that
    would give the same entropy (1 when one code takes everything, V when all are used equally)."""
    p = counts / jnp.maximum(jnp.sum(counts), 1.0)
    return jnp.exp(-jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0)))


def codes_used(counts: jax.Array) -> jax.Array:
    """The fraction of the codes with a nonzero count in ``counts`` [V] (float32 scalar)."""
    return jnp.mean((counts > 0).astype(jnp.float32))


def psnr(mse: jax.Array) -> jax.Array:
    """Peak signal-to-noise ratio in dB of a mean squared error of images in [0, 1]."""
    return -10.0 * jnp.log10(jnp.maximum(mse, 1e-12))
