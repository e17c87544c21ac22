"""Learned-variance diffusion maths (Nichol & Dhariwal's IDDPM, as DiT trains and samples it).

A learned-sigma denoiser outputs 2C channels, NHWC: the noise prediction eps in the first C channels and a
variance value v in the last C. v in [-1, 1] interpolates the log variance of the reverse step p(x_{t-1} | x_t)
between the two natural choices,

    log var = frac * log beta_t + (1 - frac) * log sigma~_t^2,   frac = (v + 1) / 2,

where sigma~_t^2 = beta_t (1 - abar_{t-1}) / (1 - abar_t) is the variance of the forward-process posterior
q(x_{t-1} | x_t, x_0); its log is "clipped" at t = 0 (where it is 0) by taking the t = 1 value instead.

Training uses the hybrid objective: the plain noise MSE plus the variational bound term L_t in bits per
dimension, KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t)) for t > 0 and the discretized-Gaussian decoder NLL at
t = 0. The bound's model mean is formed from a stop-gradient copy of eps, so the bound trains only v.

All maths runs in float32; the schedule tables are computed in float64 on the host from
:mod:`jaxt2i.diffusion.schedules` and rounded to float32, as DiT does with its numpy tables.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.special import ndtr

from jaxt2i.diffusion import schedules as sch
from jaxt2i.diffusion.losses import per_example_mse
from jaxt2i.diffusion.schedules import ScheduleConfig

# half a bin of 8-bit data rescaled to [-1, 1]; values beyond +-0.999 fall in the open-ended edge bins
_HALF_BIN = 1.0 / 255.0
_EDGE = 0.999
_LOG_FLOOR = 1e-12  # probabilities are floored here before the log
_VARIANCE_FLOOR = 1e-20  # diffusers' floor on the posterior variance before its log


# ----------------------------------------------------------------------------------------------
# Schedule tables (host side)
# ----------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=16)
def posterior_tables(cfg: ScheduleConfig) -> dict[str, np.ndarray]:
    """Per-timestep tables of the forward-process posterior q(x_{t-1} | x_t, x_0).  name -> [T] float32

    mean_coef_x0, mean_coef_xt: posterior mean = mean_coef_x0[t] * x_0 + mean_coef_xt[t] * x_t
    variance:                   beta_t (1 - abar_{t-1}) / (1 - abar_t)  (0 at t = 0)
    log_variance_clipped:       log variance, with the t = 0 entry replaced by the t = 1 one
    log_beta:                   log beta_t (the upper end of the learned range)
    abar:                       alphas_cumprod of the schedule (float64 product, then rounded)
    """
    if cfg.num_train_timesteps < 2:
        raise ValueError(f"num_train_timesteps={cfg.num_train_timesteps}: the posterior needs at least 2 timesteps.")
    beta = sch.betas(cfg).astype(np.float64)
    # the float64 product of the schedule's betas, not the float32 abar table: 1 - abar_t at small t would
    # keep only three or four digits after the float32 rounding, and the posterior divides by it
    abar = np.cumprod(1.0 - beta)
    abar_prev = np.concatenate([[1.0], abar[:-1]])
    variance = beta * (1.0 - abar_prev) / (1.0 - abar)
    tables = {
        "mean_coef_x0": beta * np.sqrt(abar_prev) / (1.0 - abar),
        "mean_coef_xt": (1.0 - abar_prev) * np.sqrt(1.0 - beta) / (1.0 - abar),
        "variance": variance,
        "log_variance_clipped": np.log(np.concatenate([variance[1:2], variance[1:]])),
        "log_beta": np.log(beta),
        "abar": abar,
    }
    return {k: v.astype(np.float32) for k, v in tables.items()}


def _at(cfg: ScheduleConfig, name: str, t: jax.Array, x: jax.Array) -> jax.Array:
    """Table `name` at integer timesteps t [B], shaped [B, 1, ..., 1] to broadcast against x [B, ...]."""
    v = jnp.asarray(posterior_tables(cfg)[name])[jnp.asarray(t, jnp.int32)]
    return v.reshape(v.shape + (1,) * (x.ndim - v.ndim))


def _per_sample(v, x: jax.Array) -> jax.Array:
    """A scalar or [B] coefficient as float32, shaped to broadcast against x [B, ...]."""
    v = jnp.asarray(v, jnp.float32)
    return v.reshape(v.shape + (1,) * (x.ndim - v.ndim)) if v.ndim else v


# ----------------------------------------------------------------------------------------------
# Posterior and model distributions (training timesteps)
# ----------------------------------------------------------------------------------------------


def q_posterior(x_start: jax.Array, x_t: jax.Array, t: jax.Array, cfg: ScheduleConfig):
    """Mean and clipped log variance of q(x_{t-1} | x_t, x_0).

    x_start, x_t: [B, ...]; t: [B] integer training timesteps.
    Returns (mean [B, ...], log_variance [B, 1, ..., 1]) in float32.
    """
    x_start = jnp.asarray(x_start, jnp.float32)
    x_t = jnp.asarray(x_t, jnp.float32)
    mean = _at(cfg, "mean_coef_x0", t, x_t) * x_start + _at(cfg, "mean_coef_xt", t, x_t) * x_t
    return mean, _at(cfg, "log_variance_clipped", t, x_t)


def learned_range_log_variance(v: jax.Array, t: jax.Array, cfg: ScheduleConfig) -> jax.Array:
    """The model's log variance from its variance output: frac log beta_t + (1 - frac) log sigma~_t^2 (clipped).

    v: [B, ...] in [-1, 1] (not clipped: values outside extrapolate, as in DiT); t: [B] integer timesteps.
    Returns [B, ...] float32. frac = (v + 1) / 2; v = -1 gives the posterior variance, v = 1 gives beta_t.
    """
    v = jnp.asarray(v, jnp.float32)
    frac = (v + 1.0) / 2.0
    return frac * _at(cfg, "log_beta", t, v) + (1.0 - frac) * _at(cfg, "log_variance_clipped", t, v)


def p_mean_log_variance(model_eps: jax.Array, model_v: jax.Array, x_t: jax.Array, t: jax.Array,
                        cfg: ScheduleConfig):
    """Mean and log variance of the reverse step p(x_{t-1} | x_t) of a learned-range epsilon model.

    The mean is the posterior mean at the predicted x_0 = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t), unclipped
    (DiT's training setting). model_eps, model_v, x_t: [B, ...]; t: [B]. Returns (mean, log_variance), [B, ...].
    """
    x_t = jnp.asarray(x_t, jnp.float32)
    abar = _at(cfg, "abar", t, x_t)
    x0, _ = sch.vp_to_x0_eps(jnp.asarray(model_eps, jnp.float32), x_t, abar, "epsilon")
    mean, _ = q_posterior(x0, x_t, t, cfg)
    return mean, learned_range_log_variance(model_v, t, cfg)


# ----------------------------------------------------------------------------------------------
# Gaussian KL and the discretized decoder likelihood
# ----------------------------------------------------------------------------------------------


def normal_kl(mean1, logvar1, mean2, logvar2) -> jax.Array:
    """KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))) elementwise, in nats (arguments broadcast).  float32"""
    mean1, logvar1, mean2, logvar2 = (jnp.asarray(a, jnp.float32) for a in (mean1, logvar1, mean2, logvar2))
    return 0.5 * (-1.0 + logvar2 - logvar1 + jnp.exp(logvar1 - logvar2) + jnp.square(mean1 - mean2) * jnp.exp(-logvar2))


def approx_standard_normal_cdf(x: jax.Array) -> jax.Array:
    """The tanh approximation of the standard normal CDF that IDDPM and DiT use in the decoder likelihood."""
    return 0.5 * (1.0 + jnp.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def discretized_gaussian_log_likelihood(x: jax.Array, means: jax.Array, log_scales: jax.Array, *,
                                        exact_cdf: bool = False) -> jax.Array:
    """Log probability (nats) of x under N(means, exp(log_scales)^2) integrated over 255-level bins.

    x: [B, ...], nominally 8-bit data rescaled to [-1, 1]: each value owns the bin x +- 1/255, and values below
    -0.999 / above 0.999 own everything below / above (the edge bins). means, log_scales: like x.
    Latent diffusion (DiT) applies it to VAE latents as they are, with the same bins and edges.
    exact_cdf: use the exact normal CDF instead of IDDPM/DiT's tanh approximation (the default matches DiT).
    Returns [B, ...] float32; probabilities are floored at 1e-12 before the log.
    """
    x, means, log_scales = (jnp.asarray(a, jnp.float32) for a in (x, means, log_scales))
    cdf = ndtr if exact_cdf else approx_standard_normal_cdf
    centered = x - means
    inv_std = jnp.exp(-log_scales)
    cdf_plus = cdf(inv_std * (centered + _HALF_BIN))
    cdf_min = cdf(inv_std * (centered - _HALF_BIN))
    log_cdf_plus = jnp.log(jnp.maximum(cdf_plus, _LOG_FLOOR))
    log_one_minus_cdf_min = jnp.log(jnp.maximum(1.0 - cdf_min, _LOG_FLOOR))
    log_delta = jnp.log(jnp.maximum(cdf_plus - cdf_min, _LOG_FLOOR))
    return jnp.where(x < -_EDGE, log_cdf_plus, jnp.where(x > _EDGE, log_one_minus_cdf_min, log_delta))


def _mean_bits(x: jax.Array) -> jax.Array:
    """Mean over all but the batch axis, converted from nats to bits.  [B, ...] -> [B]"""
    return x.reshape(x.shape[0], -1).mean(axis=1) / math.log(2.0)


# ----------------------------------------------------------------------------------------------
# Training objective
# ----------------------------------------------------------------------------------------------


def vlb_terms(model_eps: jax.Array, model_v: jax.Array, x_start: jax.Array, x_t: jax.Array, t: jax.Array,
              schedule: ScheduleConfig, *, freeze_mean: bool = True) -> jax.Array:
    """Per-example variational-bound term L_t in bits per dimension.  -> [B] float32

    model_eps, model_v: [B, ...] the two halves of the model output; x_start: [B, ...] clean data (latents);
    x_t: [B, ...] its noised version at integer timesteps t [B]. L_t is the decoder NLL
    -log p(x_0 | x_1) where t == 0 and KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t)) elsewhere.
    freeze_mean: form the model mean from stop_gradient(model_eps), so the term trains only the variance
    (the hybrid objective); False gives the bound's gradient with respect to both halves.
    """
    if freeze_mean:
        model_eps = jax.lax.stop_gradient(model_eps)
    x_start = jnp.asarray(x_start, jnp.float32)
    true_mean, true_log_var = q_posterior(x_start, x_t, t, schedule)
    mean, log_var = p_mean_log_variance(model_eps, model_v, x_t, t, schedule)
    kl = _mean_bits(normal_kl(true_mean, true_log_var, mean, log_var))
    decoder_nll = _mean_bits(-discretized_gaussian_log_likelihood(x_start, mean, 0.5 * log_var))
    return jnp.where(jnp.asarray(t) == 0, decoder_nll, kl)


def split_learned_sigma(model_output: jax.Array) -> tuple[jax.Array, jax.Array]:
    """[B, ..., 2C] model output -> (eps [B, ..., C], v [B, ..., C]): eps first along the channel axis."""
    channels = model_output.shape[-1]
    if channels % 2:
        raise ValueError(
            f"a learned-sigma model output needs 2C channels (eps then variance), got {channels}; "
            "build the denoiser with learned sigma (out_channels = 2 * latent channels)."
        )
    return model_output[..., : channels // 2], model_output[..., channels // 2 :]


def hybrid_loss(model_output: jax.Array, x_start: jax.Array, noise: jax.Array, x_t: jax.Array, t: jax.Array,
                schedule: ScheduleConfig, vlb_weight: float = 1.0) -> dict[str, jax.Array]:
    """IDDPM's hybrid objective as DiT trains it: per-example eps MSE + vlb_weight * L_t (bits/dim).

    model_output: [B, H, W, 2C] NHWC, eps then v along channels; x_start, noise, x_t: [B, H, W, C] with
    x_t = sqrt(abar_t) x_start + sqrt(1 - abar_t) noise; t: [B] integer timesteps.
    vlb_weight: DiT's training (LossType.MSE) adds the term with weight 1. IDDPM's RESCALED_MSE multiplies it by
    num_train_timesteps / 1000 (its lambda = 0.001 on the full bound, a sum of T terms); pass that for IDDPM.
    Returns {"loss", "mse", "vb"}, each [B] float32; the gradient of "vb" reaches only the v channels.
    """
    if schedule.prediction_type != "epsilon":
        raise ValueError(
            f"hybrid_loss trains an epsilon-prediction model; schedule.prediction_type={schedule.prediction_type!r}. "
            "Use ScheduleConfig(prediction_type='epsilon')."
        )
    eps, v = split_learned_sigma(model_output)
    if eps.shape != x_start.shape:
        raise ValueError(f"model output {model_output.shape} must have twice the channels of x_start {x_start.shape}.")
    mse = per_example_mse(eps, noise)
    vb = vlb_terms(eps, v, x_start, x_t, t, schedule, freeze_mean=True)
    return {"loss": mse + jnp.float32(vlb_weight) * vb, "mse": mse, "vb": vb}


# ----------------------------------------------------------------------------------------------
# Sampling: one ancestral DDPM step with the learned-range variance
# ----------------------------------------------------------------------------------------------


def ddpm_learned_range_step(model_output: jax.Array, x: jax.Array, a_t, a_prev, noise: jax.Array | None, *,
                            add_noise=True, prediction_type: str = "epsilon",
                            clip_sample_range: float | None = None) -> tuple[jax.Array, jax.Array]:
    """x_{t-1} from x_t as diffusers' DDPMScheduler(variance_type="learned_range").step computes it.

    model_output: [B, ..., 2C] (prediction then variance value v, channels last); x: [B, ..., C] the sample at t.
    a_t, a_prev: alphas_cumprod at t and at the step's previous timestep (1.0 after the last step), scalars or [B].
    The step's beta is 1 - a_t / a_prev, so the same function serves spaced (fewer-step) schedules.
    noise: [B, ..., C] standard normal (None only with add_noise=False); add_noise: bool or traced bool
    scalar/[B], diffusers' `t > 0` (no noise at timestep 0).
    The log variance interpolates log(max(posterior variance, 1e-20)) and log beta with frac = (v + 1) / 2
    (diffusers floors the variance where IDDPM's training tables clip it: they differ only at the last step).
    Returns (x_prev, predicted x_0), [B, ..., C] float32.
    """
    pred, v = split_learned_sigma(jnp.asarray(model_output, jnp.float32))
    x = jnp.asarray(x, jnp.float32)
    a_t, a_prev = _per_sample(a_t, x), _per_sample(a_prev, x)
    alpha = a_t / a_prev
    beta = 1.0 - alpha
    x0, _ = sch.vp_to_x0_eps(pred, x, a_t, prediction_type)
    if clip_sample_range is not None:
        x0 = jnp.clip(x0, -clip_sample_range, clip_sample_range)
    mean = (a_prev**0.5 * beta) / (1.0 - a_t) * x0 + alpha**0.5 * (1.0 - a_prev) / (1.0 - a_t) * x
    variance = jnp.maximum((1.0 - a_prev) / (1.0 - a_t) * beta, _VARIANCE_FLOOR)
    frac = (v + 1.0) / 2.0
    log_var = frac * jnp.log(beta) + (1.0 - frac) * jnp.log(variance)
    if isinstance(add_noise, (bool, np.bool_)) and not add_noise:
        return mean, x0
    if noise is None:
        raise ValueError("ddpm_learned_range_step: pass noise (shaped like x) or add_noise=False.")
    noisy = _per_sample(jnp.asarray(add_noise, jnp.float32), x) > 0
    return jnp.where(noisy, mean + jnp.exp(0.5 * log_var) * jnp.asarray(noise, jnp.float32), mean), x0


__all__ = [
    "approx_standard_normal_cdf",
    "ddpm_learned_range_step",
    "discretized_gaussian_log_likelihood",
    "hybrid_loss",
    "learned_range_log_variance",
    "normal_kl",
    "p_mean_log_variance",
    "posterior_tables",
    "q_posterior",
    "split_learned_sigma",
    "vlb_terms",
]
