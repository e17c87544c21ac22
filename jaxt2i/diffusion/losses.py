"""Denoising training objective: noisy inputs, regression targets, min-SNR-gamma weights, condition dropout.

All maths here runs in float32 whatever the model's compute dtype is. With abar_t the cumulative product of
alphas at integer timestep t (see :mod:`jaxt2i.diffusion.schedules`):

    x_t   = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps
    SNR_t = abar_t / (1 - abar_t)

Targets: ``"epsilon"`` -> eps; ``"v_prediction"`` -> sqrt(abar_t) eps - sqrt(1 - abar_t) x0; ``"sample"`` -> x0.

Min-SNR-gamma (Hang et al., 2023) caps the weight of low-noise timesteps. Expressed as a multiplier on the
plain MSE of each parametrisation it is ``min(SNR, gamma) / SNR`` for epsilon, ``min(SNR, gamma) / (SNR + 1)``
for v and ``min(SNR, gamma)`` for x0.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp

PREDICTION_TARGETS = ("epsilon", "v_prediction", "sample")


@dataclass(frozen=True)
class LossConfig:
    """What the U-Net is trained to predict and how examples are weighted.

    prediction_target: "epsilon", "v_prediction" or "sample" (x0); must match the schedule the model samples with.
    min_snr_gamma: gamma of min-SNR weighting (5.0 is the paper's choice); None trains with plain MSE.
    cond_dropout: probability of replacing an example's text conditioning by the empty-prompt embedding, so the
        model also learns the unconditional prediction that classifier-free guidance needs.
    vlb_weight: weight of the variational bound that trains a learned variance (a DiT with ``learn_sigma``; DiT
        uses 1); ignored for models without one.
    """

    prediction_target: str = "epsilon"
    min_snr_gamma: float | None = None
    cond_dropout: float = 0.1
    vlb_weight: float = 1.0

    def __post_init__(self):
        if self.prediction_target not in PREDICTION_TARGETS:
            raise ValueError(
                f"LossConfig.prediction_target={self.prediction_target!r}; use one of {PREDICTION_TARGETS}."
            )
        if self.min_snr_gamma is not None and not self.min_snr_gamma > 0:
            raise ValueError(f"LossConfig.min_snr_gamma={self.min_snr_gamma} must be > 0, or None to disable it.")
        if not 0.0 <= self.cond_dropout <= 1.0:
            raise ValueError(f"LossConfig.cond_dropout={self.cond_dropout} must be a probability in [0, 1].")
        if not self.vlb_weight >= 0:
            raise ValueError(f"LossConfig.vlb_weight={self.vlb_weight} must be >= 0.")


def _per_sample(v: jax.Array, x: jax.Array) -> jax.Array:
    """[B] -> [B, 1, ..., 1] broadcastable against x [B, ...]."""
    return v.reshape(v.shape + (1,) * (x.ndim - v.ndim))


def snr(abar: jax.Array) -> jax.Array:
    """Signal-to-noise ratio abar / (1 - abar).  # [B] -> [B] float32"""
    abar = jnp.asarray(abar, jnp.float32)
    return abar / (1.0 - abar)


def noisy_sample(x0: jax.Array, noise: jax.Array, abar: jax.Array) -> jax.Array:
    """x_t = sqrt(abar) x0 + sqrt(1 - abar) noise.  x0, noise: [B, ...]; abar: [B] -> [B, ...] float32"""
    a = _per_sample(jnp.sqrt(abar), x0)
    s = _per_sample(jnp.sqrt(1.0 - abar), x0)
    return a * x0 + s * noise


def training_target(x0: jax.Array, noise: jax.Array, abar: jax.Array, prediction_target: str) -> jax.Array:
    """Regression target of the chosen parametrisation.  x0, noise: [B, ...]; abar: [B] -> [B, ...]"""
    if prediction_target == "epsilon":
        return noise
    if prediction_target == "v_prediction":
        return _per_sample(jnp.sqrt(abar), x0) * noise - _per_sample(jnp.sqrt(1.0 - abar), x0) * x0
    if prediction_target == "sample":
        return x0
    raise ValueError(f"unknown prediction_target {prediction_target!r}; use one of {PREDICTION_TARGETS}.")


def min_snr_weights(abar: jax.Array, gamma: float | None, prediction_target: str) -> jax.Array:
    """Per-example loss weights of min-SNR-gamma weighting (ones when gamma is None).  # [B] -> [B] float32"""
    s = snr(abar)
    if gamma is None:
        return jnp.ones_like(s)
    capped = jnp.minimum(s, jnp.float32(gamma))
    if prediction_target == "epsilon":
        return capped / s
    if prediction_target == "v_prediction":
        return capped / (s + 1.0)
    if prediction_target == "sample":
        return capped
    raise ValueError(f"unknown prediction_target {prediction_target!r}; use one of {PREDICTION_TARGETS}.")


def dropout_mask(keys: jax.Array, p: float) -> jax.Array:
    """True where an example's conditioning is dropped; one key per example.  keys: [B] keys -> [B] bool"""
    u = jax.vmap(lambda k: jax.random.uniform(k, (), jnp.float32))(keys)
    return u < p


def drop_condition(context: jax.Array, uncond: jax.Array, mask: jax.Array) -> jax.Array:
    """Replaces the context of examples where mask is True by the empty-prompt embedding.

    context: [B, L, D]; uncond: [L, D], [1, L, D] or [B, L, D]; mask: [B] bool -> [B, L, D]
    """
    uncond = jnp.broadcast_to(jnp.asarray(uncond, context.dtype), context.shape)
    return jnp.where(mask[:, None, None], uncond, context)


def per_example_mse(prediction: jax.Array, target: jax.Array) -> jax.Array:
    """Mean squared error over all but the batch axis, in float32.  [B, ...] x2 -> [B]"""
    err = jnp.square(prediction.astype(jnp.float32) - target.astype(jnp.float32))
    return err.reshape(err.shape[0], -1).mean(axis=1)
