"""Noise schedules: betas, cumulative alphas, sigmas, inference timesteps, forward noising.

Everything that depends only on the schedule and the number of steps is computed on the host in
numpy and handed to the sampling loop as small float32 tables. The tables follow the numerics of
diffusers' PyTorch schedulers (float32 betas and cumulative products, float64 interpolation rounded
to float32) so that the same config gives the same trajectory in both libraries.

Two parametrisations of the forward process appear:
  variance preserving (VP):  x_t = sqrt(abar_t) * x0 + sqrt(1 - abar_t) * eps
  variance exploding (VE):   x   = x0 + sigma * eps,   sigma = sqrt((1 - abar) / abar)
The VE form is the VP form divided by sqrt(abar); the sigma-based samplers (lms, euler, heun, ...)
run in it and scale the model input back by 1 / sqrt(sigma^2 + 1).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Mapping

import jax.numpy as jnp
import numpy as np

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")


@dataclass(frozen=True)
class ScheduleConfig:
    """The diffusion schedule a denoiser was trained with, plus how inference steps are spaced.

    Defaults are Stable Diffusion 1.x (the PNDM config shipped with it). `timestep_spacing=None`
    means "the default of the diffusers scheduler that matches the chosen sampler" (leading for
    ddpm/ddim/pndm, linspace for lms/euler/euler_a/heun/dpmpp_2m), which is what diffusers does
    when a scheduler_config.json has no `timestep_spacing` key.
    """

    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: str = "scaled_linear"
    trained_betas: tuple[float, ...] | None = None
    prediction_type: str = "epsilon"
    timestep_spacing: str | None = None
    steps_offset: int = 1
    set_alpha_to_one: bool = False
    clip_sample: bool = False
    clip_sample_range: float = 1.0
    rescale_betas_zero_snr: bool = False
    use_karras_sigmas: bool = False

    def __post_init__(self):
        if self.beta_schedule not in BETA_SCHEDULES:
            raise ValueError(
                f"ScheduleConfig.beta_schedule={self.beta_schedule!r} is not supported; use one of {BETA_SCHEDULES} "
                "or pass trained_betas."
            )
        if self.prediction_type not in PREDICTION_TYPES:
            raise ValueError(
                f"ScheduleConfig.prediction_type={self.prediction_type!r} is not supported; "
                f"use one of {PREDICTION_TYPES}."
            )
        if self.timestep_spacing is not None and self.timestep_spacing not in TIMESTEP_SPACINGS:
            raise ValueError(
                f"ScheduleConfig.timestep_spacing={self.timestep_spacing!r} is not supported; use one of "
                f"{TIMESTEP_SPACINGS} or None (the sampler's default)."
            )
        if self.trained_betas is not None:
            object.__setattr__(self, "trained_betas", tuple(float(b) for b in self.trained_betas))
            if len(self.trained_betas) != self.num_train_timesteps:
                raise ValueError(
                    f"trained_betas has {len(self.trained_betas)} values but num_train_timesteps="
                    f"{self.num_train_timesteps}; they must agree."
                )

    @classmethod
    def sd15(cls) -> "ScheduleConfig":
        """Stable Diffusion 1.x (epsilon prediction)."""
        return cls()

    @classmethod
    def sd2_v(cls) -> "ScheduleConfig":
        """Stable Diffusion 2.x 768-v models (v-prediction)."""
        return cls(prediction_type="v_prediction")

    @classmethod
    def from_diffusers(cls, config: Mapping[str, Any]) -> "ScheduleConfig":
        """Reads a diffusers `scheduler_config.json` dict (any of the SD-family scheduler classes).

        Keys that do not change the maths we implement (`_class_name`, `skip_prk_steps`, ...) are
        ignored; settings we do not implement (thresholding, learned variances, SDE solvers, ...) raise
        a ValueError naming the key, so a config is never silently sampled with different maths.
        """
        _reject_unsupported(config)
        fields = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in config.items() if k in fields and v is not None}
        if "trained_betas" in kwargs:
            kwargs["trained_betas"] = tuple(kwargs["trained_betas"])
        return cls(**kwargs)


# key -> predicate telling whether the value is one we implement
_SUPPORTED_VALUES = {
    "thresholding": lambda v: not v,
    "variance_type": lambda v: v in (None, "fixed_small"),
    "timestep_type": lambda v: v in (None, "discrete"),
    "interpolation_type": lambda v: v in (None, "linear"),
    "final_sigmas_type": lambda v: v in (None, "zero"),
    "use_exponential_sigmas": lambda v: not v,
    "use_beta_sigmas": lambda v: not v,
    "use_lu_lambdas": lambda v: not v,
    "use_flow_sigmas": lambda v: not v,
    "use_dynamic_shifting": lambda v: not v,
    "algorithm_type": lambda v: v in (None, "dpmsolver++"),
    "solver_order": lambda v: v in (None, 2),
    "solver_type": lambda v: v in (None, "midpoint"),
    "euler_at_final": lambda v: not v,
    "lower_order_final": lambda v: v in (None, True),
    "lambda_min_clipped": lambda v: v is None or v == -float("inf"),
}


def _reject_unsupported(config: Mapping[str, Any]) -> None:
    for key, ok in _SUPPORTED_VALUES.items():
        if key in config and not ok(config[key]):
            raise ValueError(
                f"scheduler config has {key}={config[key]!r}, which jaxt2i does not implement. "
                f"Remove the key or set it to its default to sample with jaxt2i."
            )
    for key, allowed in (
        ("beta_schedule", BETA_SCHEDULES),
        ("prediction_type", PREDICTION_TYPES),
        ("timestep_spacing", TIMESTEP_SPACINGS),
    ):
        if key in config and config[key] not in allowed:
            raise ValueError(f"scheduler config has {key}={config[key]!r}; jaxt2i supports {allowed}.")


# ----------------------------------------------------------------------------------------------
# Training schedule tables (host side, numpy)
# ----------------------------------------------------------------------------------------------


def _torch_linspace_f32(start: float, end: float, n: int) -> np.ndarray:
    """float32 linspace with torch's rounding (float32 step, fused multiply-add, symmetric halves)."""
    start32, end32 = np.float32(start), np.float32(end)
    step = np.float32((end32 - start32) / np.float32(n - 1))
    i = np.arange(n)
    front = np.float64(start32) + np.float64(step) * i
    back = np.float64(end32) - np.float64(step) * (n - 1 - i)
    return np.where(i < n // 2, front, back).astype(np.float32)


def _cosine_betas(n: int, max_beta: float = 0.999) -> np.ndarray:
    """Glide's squared-cosine schedule: betas from abar(t) = cos^2((t + 0.008) / 1.008 * pi / 2)."""

    def abar(t):
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    return np.array([min(1 - abar((i + 1) / n) / abar(i / n), max_beta) for i in range(n)], np.float32)


def rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    """Shifts and scales sqrt(abar) so the last timestep has zero SNR (Lin et al. 2023, Alg. 1)."""
    betas = np.asarray(betas, np.float32)
    abar_sqrt = np.sqrt(np.cumprod((np.float32(1.0) - betas).astype(np.float64)).astype(np.float32))
    first, last = abar_sqrt[0], abar_sqrt[-1]
    abar_sqrt = (abar_sqrt - last) * (first / (first - last))
    abar = abar_sqrt**2
    alphas = np.concatenate([abar[:1], abar[1:] / abar[:-1]])
    return (1.0 - alphas).astype(np.float32)


def betas(cfg: ScheduleConfig) -> np.ndarray:
    """Per-step noise variances beta_t.  # [T] float32"""
    n = cfg.num_train_timesteps
    if cfg.trained_betas is not None:
        b = np.asarray(cfg.trained_betas, np.float32)
    elif cfg.beta_schedule == "linear":
        b = _torch_linspace_f32(cfg.beta_start, cfg.beta_end, n)
    elif cfg.beta_schedule == "scaled_linear":
        b = _torch_linspace_f32(cfg.beta_start**0.5, cfg.beta_end**0.5, n) ** 2
    else:
        b = _cosine_betas(n)
    if cfg.rescale_betas_zero_snr:
        b = rescale_zero_terminal_snr(b)
    return b


def alphas_cumprod(cfg: ScheduleConfig, *, clamp_zero_snr: bool = False) -> np.ndarray:
    """abar_t = prod_{s<=t} (1 - beta_s).  # [T] float32

    clamp_zero_snr: the sigma-based samplers cannot use abar_T = 0 (sigma would be infinite); like
    diffusers they replace it by 2^-24 when the schedule is rescaled to zero terminal SNR.
    """
    alphas = np.float32(1.0) - betas(cfg)  # float32, then a float64 running product, like torch
    abar = np.cumprod(alphas.astype(np.float64)).astype(np.float32)
    if clamp_zero_snr and cfg.rescale_betas_zero_snr:
        abar[-1] = 2.0**-24
    return abar


def sigmas(cfg: ScheduleConfig, *, clamp_zero_snr: bool = True) -> np.ndarray:
    """VE noise levels of the training timesteps, sigma_t = sqrt((1 - abar_t) / abar_t).  # [T] float32"""
    abar = alphas_cumprod(cfg, clamp_zero_snr=clamp_zero_snr)
    return ((1.0 - abar) / abar) ** np.float32(0.5)


def final_alpha_cumprod(cfg: ScheduleConfig) -> np.float32:
    """abar used after the last DDIM/PNDM step: 1, or abar_0 when set_alpha_to_one is False."""
    return np.float32(1.0) if cfg.set_alpha_to_one else alphas_cumprod(cfg)[0]


# ----------------------------------------------------------------------------------------------
# Inference timesteps
# ----------------------------------------------------------------------------------------------


def _check_steps(cfg: ScheduleConfig, steps: int) -> None:
    if not 1 <= steps <= cfg.num_train_timesteps:
        raise ValueError(f"steps={steps} must be between 1 and num_train_timesteps={cfg.num_train_timesteps}.")


def discrete_timesteps(cfg: ScheduleConfig, steps: int, spacing: str) -> np.ndarray:
    """Integer timesteps, descending, as DDPM/DDIM/PNDM space them.  # [steps] int64"""
    _check_steps(cfg, steps)
    n_train = cfg.num_train_timesteps
    if spacing == "linspace":
        return np.linspace(0, n_train - 1, steps).round()[::-1].astype(np.int64)
    if spacing == "leading":
        ratio = n_train // steps
        return (np.arange(steps) * ratio).round()[::-1].astype(np.int64) + cfg.steps_offset
    if spacing == "trailing":
        return np.round(np.arange(n_train, 0, -n_train / steps)).astype(np.int64) - 1
    raise ValueError(f"unknown timestep_spacing {spacing!r}; use one of {TIMESTEP_SPACINGS}.")


def continuous_timesteps(cfg: ScheduleConfig, steps: int, spacing: str) -> np.ndarray:
    """Float timesteps, descending, as the sigma-based samplers space them (linspace is not
    rounded, so the model sees fractional timesteps).  # [steps] float32"""
    _check_steps(cfg, steps)
    n_train = cfg.num_train_timesteps
    if spacing == "linspace":
        return np.linspace(0, n_train - 1, steps, dtype=np.float32)[::-1].copy()
    if spacing == "leading":
        ratio = n_train // steps
        return (np.arange(steps) * ratio).round()[::-1].astype(np.float32) + np.float32(cfg.steps_offset)
    if spacing == "trailing":
        return np.arange(n_train, 0, -n_train / steps).round().astype(np.float32) - np.float32(1)
    raise ValueError(f"unknown timestep_spacing {spacing!r}; use one of {TIMESTEP_SPACINGS}.")


def dpm_timesteps(cfg: ScheduleConfig, steps: int, spacing: str) -> np.ndarray:
    """Integer timesteps as DPM-Solver++ spaces them (steps + 1 points, the last dropped).  # [steps] int64"""
    _check_steps(cfg, steps)
    last = cfg.num_train_timesteps
    if spacing == "linspace":
        return np.linspace(0, last - 1, steps + 1).round()[::-1][:-1].astype(np.int64)
    if spacing == "leading":
        ratio = last // (steps + 1)
        return (np.arange(steps + 1) * ratio).round()[::-1][:-1].astype(np.int64) + cfg.steps_offset
    if spacing == "trailing":
        return np.arange(last, 0, -cfg.num_train_timesteps / steps).round().astype(np.int64) - 1
    raise ValueError(f"unknown timestep_spacing {spacing!r}; use one of {TIMESTEP_SPACINGS}.")


def interp_sigmas(train_sigmas: np.ndarray, timesteps: np.ndarray) -> np.ndarray:
    """Sigmas at (possibly fractional) timesteps by linear interpolation of the training table.  # [N] float64"""
    return np.interp(np.asarray(timesteps), np.arange(len(train_sigmas)), train_sigmas)


def karras_sigmas(sigma_max: float, sigma_min: float, steps: int, rho: float = 7.0) -> np.ndarray:
    """Karras et al. (2022) noise levels: uniform in sigma^(1/rho), from sigma_max to sigma_min.  # [steps] float64"""
    ramp = np.linspace(0, 1, steps)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (hi + ramp * (lo - hi)) ** rho


def sigma_to_t(sigma: np.ndarray, train_sigmas: np.ndarray) -> np.ndarray:
    """Fractional timestep whose log-sigma interpolates to `sigma` in the training table.  # [N] float64"""
    log_sigmas = np.log(train_sigmas)
    sigma = np.asarray(sigma, np.float64)
    log_sigma = np.log(np.maximum(sigma, 1e-10))
    dists = log_sigma[None, :] - log_sigmas[:, None]
    low = np.cumsum(dists >= 0, axis=0).argmax(axis=0).clip(max=len(log_sigmas) - 2)
    w = np.clip((log_sigmas[low] - log_sigma) / (log_sigmas[low] - log_sigmas[low + 1]), 0, 1)
    return (1 - w) * low + w * (low + 1)


# ----------------------------------------------------------------------------------------------
# Forward process and prediction conversions (jax, traced)
# ----------------------------------------------------------------------------------------------


def _per_sample(v: jnp.ndarray, x: jnp.ndarray) -> jnp.ndarray:
    """Reshapes a scalar or [B] coefficient to broadcast against x [B, ...]."""
    v = jnp.asarray(v, x.dtype)
    return v.reshape(v.shape + (1,) * (x.ndim - v.ndim)) if v.ndim else v


def add_noise(x0: jnp.ndarray, noise: jnp.ndarray, t, cfg: ScheduleConfig) -> jnp.ndarray:
    """Forward diffusion to integer timestep t (scalar or [B]): sqrt(abar_t) x0 + sqrt(1 - abar_t) noise.

    x0, noise: [B, ...] (any layout).  This is the VP form DDPM/DDIM/PNDM and training use; the
    sigma-based samplers start from `img2img_start` in samplers.py, which uses their own noise level.
    """
    abar = jnp.asarray(alphas_cumprod(cfg))[jnp.asarray(t, jnp.int32)]
    return _per_sample(abar**0.5, x0) * x0 + _per_sample((1 - abar) ** 0.5, x0) * noise


def velocity(x0: jnp.ndarray, noise: jnp.ndarray, t, cfg: ScheduleConfig) -> jnp.ndarray:
    """The v-prediction target sqrt(abar_t) noise - sqrt(1 - abar_t) x0 at integer timestep t."""
    abar = jnp.asarray(alphas_cumprod(cfg))[jnp.asarray(t, jnp.int32)]
    return _per_sample(abar**0.5, x0) * noise - _per_sample((1 - abar) ** 0.5, x0) * x0


def vp_to_x0_eps(model_output, x, alpha_prod, prediction_type: str):
    """Model output at a VP sample x_t (noise level abar_t = alpha_prod) -> (x0, eps).

    alpha_prod: scalar or broadcastable to x. Returns two arrays shaped like x.
    """
    return vp_convert(model_output, x, alpha_prod**0.5, (1 - alpha_prod) ** 0.5, prediction_type)


def vp_convert(model_output, x, alpha, sigma, prediction_type: str):
    """Like `vp_to_x0_eps` with x = alpha x0 + sigma eps given by its two coefficients."""
    if prediction_type == "epsilon":
        return (x - sigma * model_output) / alpha, model_output
    if prediction_type == "v_prediction":
        return alpha * x - sigma * model_output, alpha * model_output + sigma * x
    if prediction_type == "sample":
        return model_output, (x - alpha * model_output) / sigma
    raise ValueError(f"unknown prediction_type {prediction_type!r}; use one of {PREDICTION_TYPES}.")


def ve_to_x0(model_output, x, sigma, prediction_type: str):
    """Model output at a VE sample x = x0 + sigma eps -> x0 (the model saw x / sqrt(sigma^2 + 1))."""
    if prediction_type == "epsilon":
        return x - sigma * model_output
    if prediction_type == "v_prediction":
        return model_output * (-sigma / (sigma**2 + 1) ** 0.5) + x / (sigma**2 + 1)
    if prediction_type == "sample":
        return model_output
    raise ValueError(f"unknown prediction_type {prediction_type!r}; use one of {PREDICTION_TYPES}.")
