"""VQ-VAE's codebook on the dVAE's encoder and decoder: nearest-code quantisation, the straight-through estimator,
moving-average codebook updates, and folding a trained codebook into a plain dVAE.

The VQ variant of :mod:`jaxt2i.models.dvae` uses the same ``Encoder`` / ``Decoder`` classes with
``vocab_size = code_dim``: the encoder's last 1x1 convolution outputs ``code_dim`` channels ``z_e``, and the
decoder's first 1x1 convolution (``TokenInput``, which accepts any vector per position) reads ``code_dim``-channel
code vectors. A codebook ``E`` [K, code_dim] sits in between::

    k = argmin_j |z_e - E_j|^2,   z_q = E_k,   decoder input = z_e + stop_gradient(z_q - z_e)

Both 1x1 convolutions are linear, so a trained VQ model *is* a dVAE with ``vocab_size = K``
(:func:`fold_into_dvae`): ``argmin_j |z_e - E_j|^2 = argmax_j (2 E_j . z_e - |E_j|^2)``, which is a 1x1
convolution of the encoder's last hidden layer with kernel ``2 W E^T`` and bias ``2 E b - |E|^2`` (logits whose
softmax is ``softmax(-|z_e - E_j|^2)``), and decoding token ``k`` computes ``E_k W' + b'``, the ``TokenInput``
row ``k`` of kernel ``E W'``. Its model folder holds the two plain dVAE components; ``jaxt2i.load_dvae`` reads it.

Codebook trees: ``{"embedding": [K, D]}`` (trained by gradients), plus ``"cluster_size"`` [K] and ``"embed_sum"``
[K, D] with moving-average updates (:func:`ema_update`, van den Oord et al. 2017, appendix A.1).
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np


def init_codebook(key: jax.Array, vocab_size: int, code_dim: int, *, ema: bool) -> dict:
    """A fresh codebook: ``embedding`` [K, D] ~ N(0, 1 / D), vectors of unit expected norm (the scale of the
    freshly initialised encoder's outputs); with ``ema``, the moving averages start as if every code
    had been assigned once, to itself (``cluster_size = 1``, ``embed_sum = embedding``), so a code no batch
    chooses keeps its vector while its count decays."""
    embedding = jax.random.normal(key, (vocab_size, code_dim), jnp.float32) / np.sqrt(code_dim)
    if not ema:
        return {"embedding": embedding}
    return {"embedding": embedding, "cluster_size": jnp.ones((vocab_size,), jnp.float32), "embed_sum": embedding}


def squared_distances(z: jax.Array, embedding: jax.Array) -> jax.Array:
    """``|z - E_j|^2`` for every code: z [..., D], embedding [K, D] -> [..., K] float32."""
    z = z.astype(jnp.float32)
    cross = jnp.einsum("...d,kd->...k", z, embedding, precision=jax.lax.Precision.HIGHEST)
    return jnp.sum(jnp.square(z), -1, keepdims=True) - 2.0 * cross + jnp.sum(jnp.square(embedding), -1)


def nearest_codes(z: jax.Array, embedding: jax.Array) -> jax.Array:
    """The nearest code of every vector: z [..., D], embedding [K, D] -> [...] int32."""
    return jnp.argmin(squared_distances(z, embedding), axis=-1).astype(jnp.int32)


def straight_through(z_e: jax.Array, z_q: jax.Array) -> jax.Array:
    """``z_q`` in the forward pass, the identity's gradient to ``z_e`` in the backward pass (no gradient to
    ``z_q``): ``z_e + stop_gradient(z_q - z_e)``."""
    return z_e + jax.lax.stop_gradient(z_q - z_e)


def quantize(z_e: jax.Array, embedding: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """z_e [..., D] -> (decoder input [..., D] (straight-through), codes [...] int32, code vectors z_q [..., D]);
    the gradient reaches ``embedding`` only through ``z_q``."""
    codes = nearest_codes(jax.lax.stop_gradient(z_e), embedding)
    z_q = jnp.take(embedding, codes, axis=0)
    return straight_through(z_e.astype(jnp.float32), z_q), codes, z_q


def ema_update(codebook: Mapping[str, jax.Array], vectors: jax.Array, codes: jax.Array, decay: float,
               epsilon: float) -> dict:
    """One moving-average codebook update from a batch's encoder outputs and their codes.

    Args:
      codebook: ``{"embedding" [K, D], "cluster_size" [K], "embed_sum" [K, D]}``.
      vectors: [N, D] encoder outputs (every position of the global batch); codes: [N] their nearest codes.
      decay: the averages' decay (0.99); epsilon: Laplace smoothing of the counts (1e-5).
    Returns:
      The new codebook: ``N_k <- decay N_k + (1 - decay) n_k``, ``m_k <- decay m_k + (1 - decay) sum_{i: k} z_i``,
      ``E_k = m_k / N~_k`` with ``N~_k = (N_k + epsilon) / (sum N + K epsilon) * sum N`` (no code divides by 0).
    """
    vectors = jax.lax.stop_gradient(vectors.astype(jnp.float32))
    k = codebook["cluster_size"].shape[0]
    counts = jnp.bincount(codes, length=k).astype(jnp.float32)
    sums = jax.ops.segment_sum(vectors, codes, num_segments=k)
    cluster_size = decay * codebook["cluster_size"] + (1.0 - decay) * counts
    embed_sum = decay * codebook["embed_sum"] + (1.0 - decay) * sums
    total = jnp.sum(cluster_size)
    smoothed = (cluster_size + epsilon) / (total + k * epsilon) * total
    return {"embedding": embed_sum / smoothed[:, None], "cluster_size": cluster_size, "embed_sum": embed_sum}


def fold_into_dvae(encoder: Mapping[str, Any], decoder: Mapping[str, Any], embedding: Any) -> tuple[dict, dict]:
    """VQ encoder/decoder trees (``vocab_size = code_dim``) and their codebook [K, D] -> the trees of the plain dVAE
    with ``vocab_size = K`` that computes the same tokens and images (see the module docstring). The products are
    taken in float64 and stored as float32."""
    e = np.asarray(embedding, np.float64)  # [K, D]
    out_kernel = np.asarray(encoder["output"]["kernel"], np.float64)  # [1, 1, C, D]
    out_bias = np.asarray(encoder["output"]["bias"], np.float64)  # [D]
    in_kernel = np.asarray(decoder["input"]["kernel"], np.float64)  # [1, 1, D, F]
    output = {"kernel": (2.0 * np.einsum("abcd,kd->abck", out_kernel, e)).astype(np.float32),
              "bias": (2.0 * e @ out_bias - np.sum(e * e, axis=-1)).astype(np.float32)}
    token_input = {"kernel": np.einsum("kd,abdf->abkf", e, in_kernel).astype(np.float32),
                   "bias": np.asarray(decoder["input"]["bias"], np.float32)}
    return {**encoder, "output": output}, {**decoder, "input": token_input}
