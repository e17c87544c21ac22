"""Samplers: pure step functions and one `lax.scan` sampling loop for any denoiser.

Each sampler is split in two:
  * a host-side *plan* (numpy, computed once per sampler/steps/schedule): the timestep fed to the
    model at every model call, the input scaling, and every scalar coefficient of the update, as
    float32 tables with one row per model call;
  * a pure *step function* `(state, model_output, row, noise) -> state` whose state (the sample plus
    fixed-size history buffers) travels in the scan carry.

With the same schedule and default options each sampler reproduces the matching diffusers scheduler
driven the way diffusers' Stable Diffusion pipelines drive it:

  ddpm      DDPMScheduler (variance_type="fixed_small")
  ddim      DDIMScheduler (eta)
  pndm      PNDMScheduler(skip_prk_steps=True)  -- PLMS, steps + 1 model calls
  lms       LMSDiscreteScheduler (order 4)
  euler     EulerDiscreteScheduler
  euler_a   EulerAncestralDiscreteScheduler
  heun      HeunDiscreteScheduler                -- 2 * steps - 1 model calls
  dpmpp_2m  DPMSolverMultistepScheduler (dpmsolver++, order 2, midpoint, lower_order_final)

The sigma-based samplers (lms, euler, euler_a, heun) run in the variance-exploding parametrisation
x = x0 + sigma eps: they scale the initial standard-normal noise by `init_noise_sigma` and divide the
model input by sqrt(sigma^2 + 1).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxt2i.diffusion import schedules as sch
from jaxt2i.diffusion.schedules import ScheduleConfig

SAMPLERS = ("ddpm", "ddim", "pndm", "lms", "euler", "euler_a", "heun", "dpmpp_2m")
DEFAULT_SPACING = {
    "ddpm": "leading",
    "ddim": "leading",
    "pndm": "leading",
    "lms": "linspace",
    "euler": "linspace",
    "euler_a": "linspace",
    "heun": "linspace",
    "dpmpp_2m": "linspace",
}
KARRAS_SAMPLERS = ("lms", "euler", "heun", "dpmpp_2m")
ZERO_SNR_SAMPLERS = ("ddpm", "ddim", "euler", "euler_a", "dpmpp_2m")
NO_SAMPLE_PREDICTION = ("pndm", "euler_a")
CALLS_PER_STEP = {"heun": 2}  # diffusers' `scheduler.order`, used by img2img to skip steps
_HISTORY = 4  # history buffer length of PLMS and LMS


@dataclass(frozen=True, eq=False)
class SamplingPlan:
    """Host-side tables for one sampler run, one row per model call (M calls in the full run).

    timesteps:   [M] float32  timestep given to the model at each call
    input_div:   [M] float32  the model sees x / input_div
    level_scale, level_noise: [M] float32  a sample at the noise level of call j is
                 level_scale[j] * x0 + level_noise[j] * noise (img2img start, inpaint blending)
    table:       name -> [M] or [M, k] float32 update coefficients for the step function
    call_start:  first model call of this run (img2img skips the earlier ones); `table` rows for
                 calls before it are never used.
    """

    sampler: str
    steps: int
    prediction_type: str
    clip_sample_range: float | None
    init_noise_sigma: float
    timesteps: np.ndarray
    input_div: np.ndarray
    level_scale: np.ndarray
    level_noise: np.ndarray
    table: dict
    call_start: int = 0

    @property
    def num_calls(self) -> int:
        """Model calls in the full run (from step 0)."""
        return len(self.timesteps)


# ----------------------------------------------------------------------------------------------
# Plans
# ----------------------------------------------------------------------------------------------


def _validate(sampler: str, schedule: ScheduleConfig, karras: bool) -> None:
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; choose one of {SAMPLERS}.")
    if karras and sampler not in KARRAS_SAMPLERS:
        raise ValueError(f"use_karras_sigmas is supported by {KARRAS_SAMPLERS}, not by sampler {sampler!r}.")
    if schedule.rescale_betas_zero_snr and sampler not in ZERO_SNR_SAMPLERS:
        raise ValueError(
            f"rescale_betas_zero_snr is supported by {ZERO_SNR_SAMPLERS}, not by sampler {sampler!r} "
            "(diffusers' scheduler has no such option); pick one of those samplers."
        )
    if schedule.prediction_type == "sample" and sampler in NO_SAMPLE_PREDICTION:
        raise ValueError(f"sampler {sampler!r} does not support prediction_type='sample' (neither does diffusers).")


def make_plan(
    sampler: str,
    steps: int,
    schedule: ScheduleConfig = ScheduleConfig(),
    *,
    use_karras_sigmas: bool = False,
    start_step: int = 0,
) -> SamplingPlan:
    """Builds the host-side tables of `sampler` for `steps` inference steps.

    start_step: first scheduler step to run (img2img); model calls before it are skipped and the
    history of multistep samplers starts empty there, as in diffusers' img2img pipeline.
    """
    karras = bool(use_karras_sigmas or schedule.use_karras_sigmas)
    _validate(sampler, schedule, karras)
    if not 0 <= start_step < steps:
        raise ValueError(f"start_step={start_step} must be in [0, steps={steps}).")
    spacing = schedule.timestep_spacing or DEFAULT_SPACING[sampler]
    call_start = start_step * CALLS_PER_STEP.get(sampler, 1)
    builder = {
        "ddpm": _plan_ddpm,
        "ddim": _plan_ddim,
        "pndm": _plan_pndm,
        "lms": _plan_lms,
        "euler": _plan_euler,
        "euler_a": _plan_euler_a,
        "heun": _plan_heun,
        "dpmpp_2m": _plan_dpmpp_2m,
    }[sampler]
    fields = builder(schedule, steps, spacing, karras, call_start)
    table = {k: np.asarray(v, np.float32) for k, v in fields.pop("table").items()}
    clip = schedule.clip_sample_range if schedule.clip_sample and sampler in ("ddpm", "ddim", "heun") else None
    return SamplingPlan(
        sampler=sampler,
        steps=steps,
        prediction_type=schedule.prediction_type,
        clip_sample_range=clip,
        table=table,
        call_start=call_start,
        **{k: (np.asarray(v, np.float32) if isinstance(v, np.ndarray) else float(v)) for k, v in fields.items()},
    )


def _vp_levels(abar_at_calls: np.ndarray):
    abar = np.asarray(abar_at_calls, np.float32)
    return abar ** np.float32(0.5), (np.float32(1) - abar) ** np.float32(0.5)


def _discrete_common(abar: np.ndarray, ts: np.ndarray) -> dict:
    scale, noise = _vp_levels(abar[ts])
    ones = np.ones(len(ts), np.float32)
    return dict(
        init_noise_sigma=1.0, timesteps=ts.astype(np.float32), input_div=ones, level_scale=scale, level_noise=noise
    )


def _plan_ddim(cfg, steps, spacing, karras, call_start):
    abar = sch.alphas_cumprod(cfg)
    final = sch.final_alpha_cumprod(cfg)
    ts = sch.discrete_timesteps(cfg, steps, spacing)
    prev = ts - cfg.num_train_timesteps // steps
    a_t = abar[ts].astype(np.float64)
    a_prev = np.where(prev >= 0, abar[np.maximum(prev, 0)], final).astype(np.float64)
    var = (1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)
    return dict(_discrete_common(abar, ts), table=dict(a_t=a_t, a_prev=a_prev, var=var))


def _plan_ddpm(cfg, steps, spacing, karras, call_start):
    abar = sch.alphas_cumprod(cfg)
    ts = sch.discrete_timesteps(cfg, steps, spacing)
    prev = np.concatenate([ts[1:], [-1]])  # diffusers steps to the next timestep of the list
    a_t = abar[ts].astype(np.float64)
    a_prev = np.where(prev >= 0, abar[np.maximum(prev, 0)], 1.0).astype(np.float64)
    alpha = a_t / a_prev
    beta = 1 - alpha
    c_x0 = a_prev**0.5 * beta / (1 - a_t)
    c_x = alpha**0.5 * (1 - a_prev) / (1 - a_t)
    var = np.maximum((1 - a_prev) / (1 - a_t) * beta, 1e-20)
    std = np.where(ts > 0, var**0.5, 0.0)
    return dict(_discrete_common(abar, ts), table=dict(a_t=a_t, c_x0=c_x0, c_x=c_x, std=std))


_PLMS_WEIGHTS = {
    1: (1.0,),
    2: (3 / 2, -1 / 2),
    3: (23 / 12, -16 / 12, 5 / 12),
    4: (55 / 24, -59 / 24, 37 / 24, -9 / 24),
}


def pndm_call_timesteps(cfg: ScheduleConfig, steps: int, spacing: str) -> np.ndarray:
    """PLMS model-call timesteps: the first step is re-evaluated once (steps + 1 calls).  # [steps + 1] int64"""
    up = sch.discrete_timesteps(cfg, steps, spacing)[::-1]  # ascending
    return np.concatenate([up[:-1], up[-2:-1], up[-1:]])[::-1].copy()


def _plan_pndm(cfg, steps, spacing, karras, call_start):
    abar = sch.alphas_cumprod(cfg)
    final = sch.final_alpha_cumprod(cfg)
    calls = pndm_call_timesteps(cfg, steps, spacing)
    ratio = cfg.num_train_timesteps // steps
    m = len(calls)
    w_out, w_hist = np.zeros(m), np.zeros((m, _HISTORY))
    push, store_cur, use_cur = np.zeros(m), np.zeros(m), np.zeros(m)
    t_coef, t_prev = np.zeros(m, np.int64), np.zeros(m, np.int64)
    n_hist = 0
    for j in range(call_start, m):  # diffusers' counter restarts at the first call that runs
        counter = j - call_start
        if counter == 1:  # second look at the first step: average the two slopes, redo from x_start
            w_out[j], w_hist[j, 0], use_cur[j] = 0.5, 0.5, 1
            t_coef[j], t_prev[j] = calls[j] + ratio, calls[j]
            continue
        push[j] = 1
        n_hist = min(n_hist + 1, _HISTORY)
        w_hist[j, :n_hist] = _PLMS_WEIGHTS[n_hist]
        store_cur[j] = counter == 0
        t_coef[j], t_prev[j] = calls[j], calls[j] - ratio
    a_t = abar[np.clip(t_coef, 0, len(abar) - 1)].astype(np.float64)
    a_prev = np.where(t_prev >= 0, abar[np.clip(t_prev, 0, len(abar) - 1)], final).astype(np.float64)
    sample_coef = (a_prev / a_t) ** 0.5
    denom = a_t * (1 - a_prev) ** 0.5 + (a_t * (1 - a_t) * a_prev) ** 0.5
    eps_coef = (a_prev - a_t) / denom
    table = dict(
        w_out=w_out, w_hist=w_hist, push=push, store_cur=store_cur, use_cur=use_cur,
        a_t=a_t, sample_coef=sample_coef, eps_coef=eps_coef,
    )  # fmt: skip
    return dict(_discrete_common(abar, calls), table=table)


def _sigma_schedule(cfg, steps, spacing, karras):
    """Timesteps (float) and sigmas (+ final 0) of the Euler/LMS/Heun family."""
    train = sch.sigmas(cfg)
    ts = sch.continuous_timesteps(cfg, steps, spacing)
    sig = sch.interp_sigmas(train, ts)
    if karras:
        sig = sch.karras_sigmas(sig[0], sig[-1], steps)
        ts = sch.sigma_to_t(sig, train)
    sig = np.concatenate([sig, [0.0]]).astype(np.float32)
    return ts.astype(np.float32), sig


def _init_sigma(sig: np.ndarray, spacing: str) -> float:
    smax = np.float32(sig.max())
    return float(smax if spacing in ("linspace", "trailing") else (smax**2 + np.float32(1)) ** np.float32(0.5))


def _ve_common(ts, sig_calls, spacing, sig_all):
    s = np.asarray(sig_calls, np.float32)
    return dict(
        init_noise_sigma=_init_sigma(sig_all, spacing),
        timesteps=ts,
        input_div=(s**2 + np.float32(1)) ** np.float32(0.5),
        level_scale=np.ones(len(s), np.float32),
        level_noise=s,
    )


def _euler_table(s_from: np.ndarray, s_to: np.ndarray) -> dict:
    """x_next = x + d (s_to - s_from) with d = (x - x0) / s_from, also as r x + (1 - r) x0."""
    r = s_to / s_from
    return dict(sigma=s_from, dt=s_to - s_from, c_x=r, c_x0=1 - r)


def _plan_euler(cfg, steps, spacing, karras, call_start):
    ts, sig = _sigma_schedule(cfg, steps, spacing, karras)
    s = sig.astype(np.float64)
    return dict(_ve_common(ts, sig[:-1], spacing, sig), table=_euler_table(s[:-1], s[1:]))


def _plan_euler_a(cfg, steps, spacing, karras, call_start):
    ts, sig = _sigma_schedule(cfg, steps, spacing, karras)
    s_from, s_to = sig[:-1].astype(np.float64), sig[1:].astype(np.float64)
    s_up = (s_to**2 * (s_from**2 - s_to**2) / s_from**2) ** 0.5
    s_down = (s_to**2 - s_up**2) ** 0.5
    table = dict(_euler_table(s_from, s_down), sigma_up=s_up)
    return dict(_ve_common(ts, sig[:-1], spacing, sig), table=table)


def _lms_coefficient(sig: np.ndarray, order: int, k: int, j: int) -> float:
    """Integral over [sigma_k, sigma_{k+1}] of the Lagrange basis polynomial of node sigma_{k-j}
    through the nodes sigma_k, ..., sigma_{k-order+1} (exact: it is a polynomial)."""
    nodes = [float(sig[k - m]) for m in range(order)]
    poly = np.polynomial.Polynomial([1.0])
    for m in range(order):
        if m != j:
            poly = poly * np.polynomial.Polynomial([-nodes[m], 1.0]) / (nodes[j] - nodes[m])
    antiderivative = poly.integ()
    return float(antiderivative(float(sig[k + 1])) - antiderivative(float(sig[k])))


def _plan_lms(cfg, steps, spacing, karras, call_start):
    ts, sig = _sigma_schedule(cfg, steps, spacing, karras)
    coef = np.zeros((steps, _HISTORY))
    for k in range(call_start, steps):
        order = min(k + 1, _HISTORY)  # diffusers' order counts from step 0 ...
        available = min(k - call_start + 1, _HISTORY)  # ... but only the derivatives seen so far exist
        for j in range(min(order, available)):
            coef[k, j] = _lms_coefficient(sig, order, k, j)
    return dict(_ve_common(ts, sig[:-1], spacing, sig), table=dict(sigma=sig[:-1].astype(np.float64), coef=coef))


def _plan_heun(cfg, steps, spacing, karras, call_start):
    ts, sig = _sigma_schedule(cfg, steps, spacing, karras)
    # calls: first-order at sigma_0; then for every later sigma a correction and a new first-order
    # step, each evaluated at that sigma; the last step (to sigma = 0) has no correction.
    call_ts = np.concatenate([ts[:1], np.repeat(ts[1:], 2)])
    call_sig = np.concatenate([sig[:1], np.repeat(sig[1:-1], 2)])
    s = sig.astype(np.float64)
    first = np.ones(len(call_ts))
    first[1::2] = 0
    step_of_call = np.arange(len(call_ts)) // 2  # call 2m - 1 corrects step m - 1, call 2m starts step m
    dt = s[step_of_call + 1] - s[step_of_call]
    table = dict(first=first, sigma=call_sig.astype(np.float64), dt=dt)
    return dict(_ve_common(call_ts, call_sig, spacing, sig), table=table)


def _plan_dpmpp_2m(cfg, steps, spacing, karras, call_start):
    train = sch.sigmas(cfg)
    if karras:
        sig = sch.karras_sigmas(float(train[-1]), float(train[0]), steps)
        ts = sch.sigma_to_t(sig, train)
        if cfg.beta_schedule != "squaredcos_cap_v2":
            ts = ts.round()
    else:
        ts = sch.dpm_timesteps(cfg, steps, spacing)
        sig = sch.interp_sigmas(train, ts)
    sig = np.concatenate([sig, [0.0]]).astype(np.float32)
    s = sig.astype(np.float64)
    alpha = 1 / (s**2 + 1) ** 0.5
    sigma_vp = s * alpha
    with np.errstate(divide="ignore"):
        lam = np.log(alpha) - np.log(sigma_vp)
    a_t, s_t, s_s0 = alpha[1:], sigma_vp[1:], sigma_vp[:-1]
    h = lam[1:] - lam[:-1]
    with np.errstate(invalid="ignore"):
        x_coef = s_t / s_s0
        d_coef = -a_t * np.expm1(-h)
        r0 = np.concatenate([[np.nan], (lam[1:-1] - lam[:-2])]) / h
    k = np.arange(steps)
    second = (k > call_start) & (k < steps - 1)
    d1_coef = np.where(second, 0.5 * d_coef / np.where(second, r0, 1.0), 0.0)
    table = dict(alpha=alpha[:-1], sigma=sigma_vp[:-1], x_coef=x_coef, d_coef=d_coef, d1_coef=d1_coef)
    levels = dict(level_scale=alpha[:-1], level_noise=sigma_vp[:-1])
    ones = np.ones(steps, np.float32)
    return dict(init_noise_sigma=1.0, timesteps=ts.astype(np.float32), input_div=ones, table=table, **levels)


# ----------------------------------------------------------------------------------------------
# Step functions: (state, model_output, row, noise) -> state
# ----------------------------------------------------------------------------------------------


def _clip(x0, plan: SamplingPlan):
    r = plan.clip_sample_range
    return x0 if r is None else jnp.clip(x0, -r, r)


def _step_ddim(plan, eta):
    def step(state, out, row, noise):
        x = state["x"]
        x0, eps = sch.vp_to_x0_eps(out, x, row["a_t"], plan.prediction_type)
        x0 = _clip(x0, plan)
        std = eta * row["var"] ** 0.5
        x_new = row["a_prev"] ** 0.5 * x0 + (1 - row["a_prev"] - std**2) ** 0.5 * eps
        if noise is not None:
            x_new = x_new + std * noise
        return {"x": x_new}

    return step


def _step_ddpm(plan):
    def step(state, out, row, noise):
        x = state["x"]
        x0, _ = sch.vp_to_x0_eps(out, x, row["a_t"], plan.prediction_type)
        x0 = _clip(x0, plan)
        return {"x": row["c_x0"] * x0 + row["c_x"] * x + row["std"] * noise}

    return step


def _step_pndm(plan):
    def step(state, out, row, noise):
        x, cur, ets = state["x"], state["cur"], state["ets"]
        pushed = jnp.concatenate([out[None], ets[:-1]])
        ets = jnp.where(row["push"] > 0, pushed, ets)
        combined = row["w_out"] * out + jnp.tensordot(row["w_hist"], ets, axes=1)
        base = jnp.where(row["use_cur"] > 0, cur, x)
        if plan.prediction_type == "v_prediction":
            combined = row["a_t"] ** 0.5 * combined + (1 - row["a_t"]) ** 0.5 * base
        x_new = row["sample_coef"] * base - row["eps_coef"] * combined
        cur = jnp.where(row["store_cur"] > 0, x, cur)
        return {"x": x_new, "cur": cur, "ets": ets}

    return step


def _ve_derivative(out, x, sigma, plan):
    """dx/dsigma = (x - x0) / sigma; for epsilon prediction that is the model output itself."""
    if plan.prediction_type == "epsilon" and plan.clip_sample_range is None:
        return out
    x0 = _clip(sch.ve_to_x0(out, x, sigma, plan.prediction_type), plan)
    return (x - x0) / sigma


def _euler_update(out, x, row, plan):
    """One Euler step in sigma. Written as r x + (1 - r) x0 unless x0 must be formed from eps: at
    large sigma (zero-terminal-SNR schedules reach sigma = 4096) x + d dt cancels catastrophically
    in float32 while the two forms are equal in exact arithmetic."""
    if plan.prediction_type == "epsilon":
        return x + out * row["dt"]
    x0 = sch.ve_to_x0(out, x, row["sigma"], plan.prediction_type)
    return row["c_x"] * x + row["c_x0"] * x0


def _step_lms(plan):
    def step(state, out, row, noise):
        x, hist = state["x"], state["hist"]
        hist = jnp.concatenate([_ve_derivative(out, x, row["sigma"], plan)[None], hist[:-1]])
        return {"x": x + jnp.tensordot(row["coef"], hist, axes=1), "hist": hist}

    return step


def _step_euler(plan):
    def step(state, out, row, noise):
        return {"x": _euler_update(out, state["x"], row, plan)}

    return step


def _step_euler_a(plan):
    def step(state, out, row, noise):
        return {"x": _euler_update(out, state["x"], row, plan) + noise * row["sigma_up"]}

    return step


def _step_heun(plan):
    def step(state, out, row, noise):
        x, saved, d_prev = state["x"], state["saved"], state["d_prev"]
        d = _ve_derivative(out, x, row["sigma"], plan)
        first = row["first"] > 0
        base = jnp.where(first, x, saved)
        slope = jnp.where(first, d, (d_prev + d) / 2)
        return {"x": base + slope * row["dt"], "saved": base, "d_prev": d}

    return step


def _step_dpmpp_2m(plan):
    def step(state, out, row, noise):
        x, m_prev = state["x"], state["m_prev"]
        m, _ = sch.vp_convert(out, x, row["alpha"], row["sigma"], plan.prediction_type)
        x_new = row["x_coef"] * x + row["d_coef"] * m + row["d1_coef"] * (m - m_prev)
        return {"x": x_new, "m_prev": m}

    return step


def _initial_state(sampler: str, x: jnp.ndarray) -> dict:
    zeros = jnp.zeros_like(x)
    hist = jnp.zeros((_HISTORY,) + x.shape, x.dtype)
    extra = {
        "pndm": {"cur": zeros, "ets": hist},
        "lms": {"hist": hist},
        "heun": {"saved": zeros, "d_prev": zeros},
        "dpmpp_2m": {"m_prev": zeros},
    }.get(sampler, {})
    return {"x": x, **extra}


def _step_fn(plan: SamplingPlan, eta):
    if plan.sampler == "ddim":
        return _step_ddim(plan, eta)
    return {
        "ddpm": _step_ddpm,
        "pndm": _step_pndm,
        "lms": _step_lms,
        "euler": _step_euler,
        "euler_a": _step_euler_a,
        "heun": _step_heun,
        "dpmpp_2m": _step_dpmpp_2m,
    }[plan.sampler](plan)


# ----------------------------------------------------------------------------------------------
# The sampling loop
# ----------------------------------------------------------------------------------------------


def _is_static_zero(v) -> bool:
    return isinstance(v, (int, float)) and v == 0


def sample(
    denoise_fn: Callable[[jnp.ndarray, jnp.ndarray], jnp.ndarray],
    x_T: jnp.ndarray,
    *,
    sampler: str = "ddim",
    steps: int = 50,
    schedule: ScheduleConfig = ScheduleConfig(),
    key: jax.Array | None = None,
    noise: jnp.ndarray | None = None,
    eta=0.0,
    use_karras_sigmas: bool = False,
    start_step: int = 0,
    init_is_noised: bool | None = None,
    post_step_fn: Callable[[jnp.ndarray, jnp.ndarray], jnp.ndarray] | None = None,
    return_trajectory: bool = False,
):
    """Runs `sampler` for `steps` steps with ONE `lax.scan` over the model calls.

    denoise_fn(x, t) -> model output shaped like x; x: [B, ...] (any rank, NHWC for images), t: [B]
        float32 timesteps (fractional for some samplers). The output is read per
        `schedule.prediction_type`. Wrap a conditional model with `guidance.cfg_denoise_fn`.
    x_T: [B, ...] standard-normal noise; the sampler scales it by its initial noise sigma, as
        diffusers pipelines do. For img2img pass the output of `img2img_start` (already noised).
    key / noise: randomness of the stochastic samplers (ddpm, euler_a, ddim with eta > 0): either a
        PRNG key (step i uses fold_in(key, i)) or the noise itself, [num_calls, *x_T.shape], row i
        used at model call i (rows before the start call are ignored).
    eta: DDIM noise scale (traced). With a traced eta, pass key or noise.
    start_step: first scheduler step to run (static; see `img2img_start`).
    init_is_noised: whether x_T is already at the noise level of `start_step` (default: start_step > 0).
    post_step_fn(x, i) -> x: applied after model call i (absolute index), e.g. inpaint blending.
    Static: sampler, steps, schedule, use_karras_sigmas, start_step; everything else may be traced.

    Returns x_0 (float32 or wider), or (x_0, trajectory [calls_run, *x_T.shape]) when
    return_trajectory is set; the trajectory holds the sample after every model call.
    """
    run = prepare_run(x_T, sampler=sampler, steps=steps, schedule=schedule, key=key, noise=noise, eta=eta,
                      use_karras_sigmas=use_karras_sigmas, start_step=start_step, init_is_noised=init_is_noised)
    state, traj = run_calls(denoise_fn, run.state, run.xs, sampler=sampler, steps=steps, schedule=schedule, key=key,
                            eta=eta, use_karras_sigmas=use_karras_sigmas, start_step=start_step,
                            post_step_fn=post_step_fn, return_trajectory=bool(return_trajectory))
    return (state["x"], traj) if return_trajectory else state["x"]


@dataclass(frozen=True, eq=False)
class PreparedRun:
    """The scan inputs of a sampling run, for running its model calls in segments (see :func:`run_calls`).

    state: the initial scan carry (``state["x"]`` is the sample); xs: per-call inputs with leading axis
    [calls_run]; slice both ``jax.tree.map(lambda a: a[i:j], xs)`` to run calls i..j-1 of the run.
    """

    state: dict
    xs: dict


def _is_stochastic(sampler: str, eta) -> bool:
    return sampler in ("ddpm", "euler_a") or (sampler == "ddim" and not _is_static_zero(eta))


def prepare_run(
    x_T: jnp.ndarray,
    *,
    sampler: str = "ddim",
    steps: int = 50,
    schedule: ScheduleConfig = ScheduleConfig(),
    key: jax.Array | None = None,
    noise: jnp.ndarray | None = None,
    eta=0.0,
    use_karras_sigmas: bool = False,
    start_step: int = 0,
    init_is_noised: bool | None = None,
) -> PreparedRun:
    """The initial carry and per-call inputs of :func:`sample` (same arguments), without running anything."""
    plan = make_plan(sampler, steps, schedule, use_karras_sigmas=use_karras_sigmas, start_step=start_step)
    x = jnp.asarray(x_T)
    dtype = jnp.promote_types(x.dtype, jnp.float32)
    x = x.astype(dtype)
    if init_is_noised is None:
        init_is_noised = start_step > 0
    if not init_is_noised:
        x = x * plan.init_noise_sigma
    stochastic = _is_stochastic(sampler, eta)
    if stochastic and key is None and noise is None:
        raise ValueError(
            f"sampler {sampler!r} (eta={eta!r}) draws noise: pass key=jax.random.key(seed) or noise of shape "
            f"[{plan.num_calls}, *x_T.shape]."
        )
    s = plan.call_start
    xs = {"i": jnp.arange(s, plan.num_calls), "t": jnp.asarray(plan.timesteps[s:]),
          "div": jnp.asarray(plan.input_div[s:])}
    xs["row"] = {k: jnp.asarray(v[s:]) for k, v in plan.table.items()}
    if stochastic and noise is not None:
        noise = jnp.asarray(noise)
        expected = (plan.num_calls,) + x.shape
        if noise.shape != expected:
            raise ValueError(f"noise has shape {noise.shape}; sampler {sampler!r} with {steps} steps needs {expected}.")
        xs["noise"] = noise[s:].astype(dtype)
    return PreparedRun(_initial_state(sampler, x), xs)


def run_calls(
    denoise_fn: Callable[[jnp.ndarray, jnp.ndarray], jnp.ndarray],
    state: dict,
    xs: dict,
    *,
    sampler: str = "ddim",
    steps: int = 50,
    schedule: ScheduleConfig = ScheduleConfig(),
    key: jax.Array | None = None,
    eta=0.0,
    use_karras_sigmas: bool = False,
    start_step: int = 0,
    post_step_fn: Callable[[jnp.ndarray, jnp.ndarray], jnp.ndarray] | None = None,
    return_trajectory: bool | None = None,
):
    """Runs the model calls in ``xs`` (all of a :class:`PreparedRun` or a slice of it) with one ``lax.scan``.

    Returns the new carry, or (carry, trajectory) when ``return_trajectory`` is not None. Static arguments as
    in :func:`sample`; running the slices of a run one after another gives exactly the result of one scan.
    """
    plan = make_plan(sampler, steps, schedule, use_karras_sigmas=use_karras_sigmas, start_step=start_step)
    dtype = state["x"].dtype
    stochastic = _is_stochastic(sampler, eta)
    step = _step_fn(plan, eta)
    batch = state["x"].shape[0]

    def body(state, inp):
        x_in = state["x"] / inp["div"].astype(dtype)
        t = jnp.broadcast_to(inp["t"], (batch,))
        out = jnp.asarray(denoise_fn(x_in, t)).astype(dtype)
        if not stochastic:
            n = None
        elif "noise" in inp:
            n = inp["noise"]
        else:
            n = jax.random.normal(jax.random.fold_in(key, inp["i"]), state["x"].shape, dtype)
        row = {k: v.astype(dtype) for k, v in inp["row"].items()}
        state = step(state, out, row, n)
        if post_step_fn is not None:
            state = {**state, "x": post_step_fn(state["x"], inp["i"])}
        return state, (state["x"] if return_trajectory else None)

    state, traj = jax.lax.scan(body, state, xs)
    return state if return_trajectory is None else (state, traj)


# ----------------------------------------------------------------------------------------------
# Helpers for pipelines: progress, img2img, inpainting
# ----------------------------------------------------------------------------------------------


def sampler_timesteps(
    sampler: str,
    steps: int,
    schedule: ScheduleConfig = ScheduleConfig(),
    *,
    use_karras_sigmas: bool = False,
    start_step: int = 0,
) -> tuple[np.ndarray, int]:
    """The timesteps the model will see and the number of model calls of a run.

    Returns (timesteps [calls] float32, calls). calls = steps for most samplers, steps + 1 for
    pndm, 2 * steps - 1 for heun (fewer when start_step > 0).
    """
    plan = make_plan(sampler, steps, schedule, use_karras_sigmas=use_karras_sigmas, start_step=start_step)
    ts = plan.timesteps[plan.call_start :]
    return ts, len(ts)


def strength_start_step(steps: int, strength: float) -> int:
    """The first step img2img runs for ``strength`` in (0, 1]: the last ``int(steps * strength)`` steps are run
    (diffusers' semantics)."""
    start_step = max(steps - min(int(steps * strength), steps), 0)
    if start_step >= steps:
        raise ValueError(f"strength={strength} with steps={steps} runs no step; raise strength or steps.")
    return start_step


def img2img_start(
    x0: jnp.ndarray,
    noise: jnp.ndarray,
    *,
    sampler: str,
    steps: int,
    strength: float,
    schedule: ScheduleConfig = ScheduleConfig(),
    use_karras_sigmas: bool = False,
) -> tuple[jnp.ndarray, int]:
    """Noises clean latents x0 [B, ...] to where img2img starts, with diffusers' strength semantics.

    strength in (0, 1]: the last int(steps * strength) steps are run. Returns (x_start, start_step);
    continue with `sample(..., x_start, start_step=start_step, init_is_noised=True)`. The noise level
    is the sampler's own (sqrt(abar) x0 + sqrt(1 - abar) noise, or x0 + sigma noise, ...).
    `strength` and `steps` are static (they pick the start step).
    """
    start_step = strength_start_step(steps, strength)
    plan = make_plan(sampler, steps, schedule, use_karras_sigmas=use_karras_sigmas, start_step=start_step)
    j = plan.call_start
    x0 = jnp.asarray(x0)
    dtype = jnp.promote_types(x0.dtype, jnp.float32)
    x = plan.level_scale[j].astype(dtype) * x0.astype(dtype) + plan.level_noise[j].astype(dtype) * noise.astype(dtype)
    return x, start_step


def noisy_known_latents(plan: SamplingPlan, x0_known: jnp.ndarray, noise: jnp.ndarray, i) -> jnp.ndarray:
    """The known (unmasked) latents at the noise level the sample has after model call i.

    After the last call they are x0_known itself; before, they are noised to the level of call i + 1
    with the same `noise` that started the run (diffusers' inpainting for 4-channel U-Nets).
    i may be traced.
    """
    scale = jnp.asarray(np.concatenate([plan.level_scale[1:], [1.0]]).astype(np.float32))[i]
    sigma = jnp.asarray(np.concatenate([plan.level_noise[1:], [0.0]]).astype(np.float32))[i]
    return scale * x0_known + sigma * noise


def inpaint_post_step_fn(
    x0_known: jnp.ndarray,
    noise: jnp.ndarray,
    mask: jnp.ndarray,
    *,
    sampler: str,
    steps: int,
    schedule: ScheduleConfig = ScheduleConfig(),
    use_karras_sigmas: bool = False,
    start_step: int = 0,
) -> Callable[[jnp.ndarray, jnp.ndarray], jnp.ndarray]:
    """A `post_step_fn` that keeps the known region: x <- (1 - mask) * known_i + mask * x.

    x0_known: [B, ...] clean latents of the image; noise: [B, ...] the noise the run started from;
    mask: broadcastable to x0_known, 1 where the image is repainted (diffusers' convention).
    """
    plan = make_plan(sampler, steps, schedule, use_karras_sigmas=use_karras_sigmas, start_step=start_step)

    def blend(x, i):
        known = noisy_known_latents(plan, x0_known.astype(x.dtype), noise.astype(x.dtype), i)
        return (1 - mask) * known + mask * x

    return blend


__all__ = [
    "SAMPLERS",
    "PreparedRun",
    "prepare_run",
    "run_calls",
    "strength_start_step",
    "SamplingPlan",
    "make_plan",
    "sample",
    "sampler_timesteps",
    "img2img_start",
    "noisy_known_latents",
    "inpaint_post_step_fn",
    "pndm_call_timesteps",
]
