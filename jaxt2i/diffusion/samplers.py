"""Samplers: pure step functions and one `lax.scan` sampling loop for any denoiser.

Each sampler is split in two:
  * a host-side *plan* (:mod:`jaxt2i.diffusion.plans`): the timestep fed to the model at every model
    call, the input scaling, and every scalar coefficient of the update, as float32 tables with one row
    per model call;
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
from jaxt2i.diffusion.plans import HISTORY, SAMPLERS, SamplingPlan, make_plan, pndm_call_timesteps
from jaxt2i.diffusion.schedules import ScheduleConfig

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
    hist = jnp.zeros((HISTORY,) + x.shape, x.dtype)
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
