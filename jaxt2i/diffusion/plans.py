"""Sampling plans: everything a sampler computes on the host before sampling, as float32 tables.

A plan (numpy, computed once per sampler / steps / schedule) holds the timestep fed to the model at every model
call, the input scaling, and every scalar coefficient of the update, one row per model call; the pure step
functions of :mod:`jaxt2i.diffusion.samplers` read one row per call inside the ``lax.scan`` loop. The tables follow
the diffusers schedulers the samplers reproduce (see that module's docstring).
"""

from __future__ import annotations

from dataclasses import dataclass

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
HISTORY = 4  # history buffer length of PLMS and LMS


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
    w_out, w_hist = np.zeros(m), np.zeros((m, HISTORY))
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
        n_hist = min(n_hist + 1, HISTORY)
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
    coef = np.zeros((steps, HISTORY))
    for k in range(call_start, steps):
        order = min(k + 1, HISTORY)  # diffusers' order counts from step 0 ...
        available = min(k - call_start + 1, HISTORY)  # ... but only the derivatives seen so far exist
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
