"""Sampler parity against diffusers' PyTorch schedulers, trajectory by trajectory.

The diffusers loop runs in float64 (its scheduler tables are float32, as in real use); ours runs in
float32. Both drive the same synthetic denoiser, so any difference in timesteps, input scaling,
coefficients, history handling or final steps shows up in the trajectory.
"""

import contextlib
import dataclasses
import logging

import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from jaxt2i.diffusion import plans, samplers as smp  # noqa: E402
from jaxt2i.diffusion.schedules import ScheduleConfig  # noqa: E402

logging.getLogger("diffusers").setLevel(logging.ERROR)

SHAPE = (2, 8, 8, 4)
STEPS = 10
TOL = 1e-5

CLASSES = {
    "ddpm": "DDPMScheduler",
    "ddim": "DDIMScheduler",
    "pndm": "PNDMScheduler",
    "lms": "LMSDiscreteScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler_a": "EulerAncestralDiscreteScheduler",
    "heun": "HeunDiscreteScheduler",
    "dpmpp_2m": "DPMSolverMultistepScheduler",
}
# the diffusers module of each class: randn_tensor is looked up there at call time
MODULES = {
    "ddpm": "scheduling_ddpm",
    "euler_a": "scheduling_euler_ancestral_discrete",
}


def denoiser_np(x, t):
    """A smooth nonlinear function of x and t (numpy / torch / jax alike)."""
    lib = jnp if isinstance(x, jnp.ndarray) else (torch if isinstance(x, torch.Tensor) else np)
    c = lib.cos(t / 1000.0 * 1.3)
    return 0.8 * x * c + 0.1 * lib.sin(2.0 * x) + 0.05 * (t / 1000.0)


def jax_denoiser(x, t):
    t = t.reshape((-1,) + (1,) * (x.ndim - 1))
    return denoiser_np(x, t)


def diffusers_scheduler(sampler, cfg: ScheduleConfig, karras=False):
    d = dataclasses.asdict(cfg)
    d["timestep_spacing"] = cfg.timestep_spacing or plans.DEFAULT_SPACING[sampler]
    d["skip_prk_steps"] = True
    d["use_karras_sigmas"] = karras or cfg.use_karras_sigmas
    if d["trained_betas"] is None:
        d.pop("trained_betas")
    cls = getattr(diffusers, CLASSES[sampler])
    return cls.from_config(d)


@contextlib.contextmanager
def injected_randn(sampler, draws):
    """Makes diffusers' randn_tensor return our pre-drawn noise, in order."""
    if sampler not in MODULES:
        yield
        return
    module = getattr(diffusers.schedulers, MODULES[sampler])
    original = module.randn_tensor
    it = iter(draws)

    def fake(shape, generator=None, device=None, dtype=None, layout=None):
        n = next(it)
        assert tuple(n.shape) == tuple(shape)
        return n.to(dtype)

    module.randn_tensor = fake
    try:
        yield
    finally:
        module.randn_tensor = original


def run_diffusers(sampler, cfg, x_T, *, karras=False, noise=None, eta=0.0, start_step=0, x_start=None):
    """diffusers' pipeline loop: returns the trajectory [calls, *shape] as float64 numpy."""
    sched = diffusers_scheduler(sampler, cfg, karras)
    sched.set_timesteps(STEPS)
    timesteps = sched.timesteps
    if start_step:
        timesteps = timesteps[start_step * sched.order :]
        if hasattr(sched, "set_begin_index"):
            sched.set_begin_index(start_step * sched.order)
        lat = torch.from_numpy(np.asarray(x_start, np.float64))
    else:
        lat = torch.from_numpy(np.asarray(x_T, np.float64)) * sched.init_noise_sigma
    draws = [] if noise is None else [torch.from_numpy(np.asarray(n, np.float64)) for n in noise[start_step:]]
    traj = []
    with injected_randn(sampler, draws):
        for i, t in enumerate(timesteps):
            inp = sched.scale_model_input(lat, t)
            out = denoiser_np(inp, t.to(torch.float64))
            kwargs = {}
            if sampler == "ddim":
                kwargs["eta"] = eta
                if eta > 0:
                    kwargs["variance_noise"] = draws[i]
            lat = sched.step(out, t, lat, **kwargs).prev_sample
            traj.append(lat.double().numpy())
    return np.stack(traj), sched


def rel_err(ours, ref):
    ours = np.asarray(ours, np.float64)
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    errs = [np.abs(a - b).max() / np.abs(b).max() for a, b in zip(ours, ref)]
    return max(errs)


def check(sampler, cfg, *, karras=False, stochastic=False, eta=0.0):
    rng = np.random.default_rng(0)
    x_T = rng.standard_normal(SHAPE).astype(np.float32)
    _, calls = smp.sampler_timesteps(sampler, STEPS, cfg, use_karras_sigmas=karras)
    noise = rng.standard_normal((calls,) + SHAPE).astype(np.float32) if stochastic else None
    ref, sched = run_diffusers(sampler, cfg, x_T, karras=karras, noise=noise, eta=eta)
    assert len(sched.timesteps) == calls
    ts, _ = smp.sampler_timesteps(sampler, STEPS, cfg, use_karras_sigmas=karras)
    np.testing.assert_allclose(ts, sched.timesteps.double().numpy(), rtol=1e-6)
    x0, traj = smp.sample(
        jax_denoiser, jnp.asarray(x_T), sampler=sampler, steps=STEPS, schedule=cfg,
        use_karras_sigmas=karras, noise=None if noise is None else jnp.asarray(noise), eta=eta,
        return_trajectory=True,
    )  # fmt: skip
    err = rel_err(traj, ref)
    assert err <= TOL, f"{sampler} {cfg} karras={karras}: relative trajectory error {err:.2e}"
    np.testing.assert_array_equal(np.asarray(x0), np.asarray(traj[-1]))


def grid(*fast, slow=()):
    """pytest params: `fast` ones run by default, `slow` ones only with -m slow."""
    return list(fast) + [pytest.param(*(p if isinstance(p, tuple) else (p,)), marks=pytest.mark.slow) for p in slow]


PREDICTIONS = {
    "ddpm": ("epsilon", "v_prediction", "sample"),
    "ddim": ("epsilon", "v_prediction", "sample"),
    "pndm": ("epsilon", "v_prediction"),
    "lms": ("epsilon", "v_prediction", "sample"),
    "euler": ("epsilon", "v_prediction", "sample"),
    "euler_a": ("epsilon", "v_prediction"),
    "heun": ("epsilon", "v_prediction", "sample"),
    "dpmpp_2m": ("epsilon", "v_prediction", "sample"),
}
DETERMINISTIC = ("ddim", "pndm", "lms", "euler", "heun", "dpmpp_2m")
KARRAS = ("lms", "euler", "heun", "dpmpp_2m")
SPACINGS = ("leading", "trailing", "linspace")


# By default each prediction type runs at one spacing (epsilon/leading, v/trailing, sample/linspace);
# the full cross product is in the slow run.
_ROTATION = {"epsilon": "leading", "v_prediction": "trailing", "sample": "linspace"}
_FAST = [(s, p, _ROTATION[p]) for s in DETERMINISTIC for p in PREDICTIONS[s]]
_SLOW = [(s, p, sp) for s in DETERMINISTIC for p in PREDICTIONS[s] for sp in SPACINGS if sp != _ROTATION[p]]


@pytest.mark.parametrize("sampler,prediction,spacing", grid(*_FAST, slow=_SLOW))
def test_deterministic_matches_diffusers(sampler, prediction, spacing):
    check(sampler, ScheduleConfig(prediction_type=prediction, timestep_spacing=spacing))


@pytest.mark.parametrize("sampler", tuple(CLASSES))
def test_sd_default_config(sampler):
    """ScheduleConfig() (SD 1.x, each sampler's default spacing) and a diffusers SD config dict agree."""
    sd = {
        "_class_name": "PNDMScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear",
        "beta_start": 0.00085, "num_train_timesteps": 1000, "set_alpha_to_one": False,
        "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None, "clip_sample": False,
    }  # fmt: skip
    assert ScheduleConfig.from_diffusers(sd) == ScheduleConfig()
    check(sampler, ScheduleConfig(), stochastic=sampler in ("ddpm", "euler_a"))


@pytest.mark.parametrize(
    "sampler,prediction",
    grid(*[(s, "epsilon") for s in KARRAS], slow=[(s, "v_prediction") for s in KARRAS]),
)
def test_karras_sigmas(sampler, prediction):
    check(sampler, ScheduleConfig(prediction_type=prediction), karras=True)


_STOCH_FAST = [("ddpm", "v_prediction", "trailing"), ("euler_a", "v_prediction", "linspace")]
_STOCH_SLOW = [
    (s, p, sp) for s in ("ddpm", "euler_a") for p in PREDICTIONS[s] for sp in SPACINGS if (s, p, sp) not in _STOCH_FAST
]


@pytest.mark.parametrize("sampler,prediction,spacing", grid(*_STOCH_FAST, slow=_STOCH_SLOW))
def test_stochastic_with_injected_noise(sampler, prediction, spacing):
    check(sampler, ScheduleConfig(prediction_type=prediction, timestep_spacing=spacing), stochastic=True)


@pytest.mark.parametrize(
    "prediction,spacing",
    grid(("epsilon", "leading"), slow=[(p, sp) for p in ("epsilon", "v_prediction") for sp in SPACINGS][1:]),
)
def test_ddim_eta_with_injected_noise(prediction, spacing):
    check("ddim", ScheduleConfig(prediction_type=prediction, timestep_spacing=spacing), stochastic=True, eta=0.7)


ZERO_SNR_MODULES = {
    "ddim": "scheduling_ddim",
    "ddpm": "scheduling_ddpm",
    "euler": "scheduling_euler_discrete",
    "euler_a": "scheduling_euler_ancestral_discrete",
    "dpmpp_2m": "scheduling_dpmsolver_multistep",
}


def test_rescale_zero_terminal_snr_matches_diffusers():
    """The rescaled tables agree to float32 rounding. They cannot agree bit for bit: torch's float32
    sqrt on this CPU is not correctly rounded (about 1 in 5 results is 1 ulp off), and the last step
    of the algorithm, beta = 1 - abar_t / abar_{t-1}, cancels catastrophically."""
    from diffusers.schedulers.scheduling_ddim import rescale_zero_terminal_snr

    from jaxt2i.diffusion import schedules as sch

    for cfg in (ScheduleConfig(), ScheduleConfig(beta_schedule="linear", beta_start=1e-4, beta_end=0.02)):
        ours = sch.rescale_zero_terminal_snr(sch.betas(cfg))
        ref = rescale_zero_terminal_snr(torch.from_numpy(sch.betas(cfg))).numpy()
        assert ours[-1] == ref[-1] == 1.0  # zero terminal SNR
        abar_ours = np.cumprod(1 - ours.astype(np.float64))[:-1]
        abar_ref = np.cumprod(1 - ref.astype(np.float64))[:-1]
        np.testing.assert_allclose(abar_ours, abar_ref, rtol=2e-5)


@pytest.mark.parametrize("sampler", grid("ddim", "euler", slow=("ddpm", "euler_a", "dpmpp_2m")))
def test_zero_terminal_snr(sampler, monkeypatch):
    """Sampling with rescale_betas_zero_snr; diffusers is handed our rescaled betas (see the test
    above for why the tables themselves differ in the last float32 bit)."""
    from jaxt2i.diffusion import schedules as sch

    module = getattr(diffusers.schedulers, ZERO_SNR_MODULES[sampler])
    monkeypatch.setattr(
        module, "rescale_zero_terminal_snr", lambda b: torch.from_numpy(sch.rescale_zero_terminal_snr(b.numpy()))
    )
    cfg = ScheduleConfig(prediction_type="v_prediction", timestep_spacing="trailing", rescale_betas_zero_snr=True)
    check(sampler, cfg, stochastic=sampler in ("ddpm", "euler_a"))


@pytest.mark.parametrize("sampler", grid("ddim", slow=("ddpm", "heun")))
def test_clip_sample(sampler):
    cfg = ScheduleConfig(beta_schedule="linear", beta_start=0.0001, beta_end=0.02, clip_sample=True)
    check(sampler, cfg, stochastic=sampler == "ddpm")


@pytest.mark.parametrize("sampler", grid("pndm", slow=("ddim", "euler", "dpmpp_2m")))
def test_cosine_schedule(sampler):
    check(sampler, ScheduleConfig(beta_schedule="squaredcos_cap_v2", steps_offset=0))


# ---- img2img and inpainting -----------------------------------------------------------------


@pytest.mark.parametrize("sampler", grid("ddim", "euler", "heun", "pndm", slow=("lms", "dpmpp_2m")))
def test_img2img_matches_diffusers(sampler):
    cfg = ScheduleConfig()
    rng = np.random.default_rng(1)
    x0 = rng.standard_normal(SHAPE).astype(np.float32)
    noise = rng.standard_normal(SHAPE).astype(np.float32)
    strength = 0.55
    x_start, start = smp.img2img_start(
        jnp.asarray(x0), jnp.asarray(noise), sampler=sampler, steps=STEPS, strength=strength, schedule=cfg
    )
    # diffusers' StableDiffusionImg2ImgPipeline: get_timesteps + add_noise at the first kept timestep
    sched = diffusers_scheduler(sampler, cfg)
    sched.set_timesteps(STEPS)
    t_start = max(STEPS - min(int(STEPS * strength), STEPS), 0)
    assert start == t_start
    kept = sched.timesteps[t_start * sched.order :]
    if hasattr(sched, "set_begin_index"):
        sched.set_begin_index(t_start * sched.order)
    ref_start = sched.add_noise(torch.from_numpy(x0), torch.from_numpy(noise), kept[:1].repeat(SHAPE[0]))
    np.testing.assert_allclose(np.asarray(x_start), ref_start.numpy(), rtol=1e-6, atol=1e-6)

    ref, _ = run_diffusers(sampler, cfg, None, start_step=start, x_start=ref_start.numpy())
    _, traj = smp.sample(
        jax_denoiser, x_start, sampler=sampler, steps=STEPS, schedule=cfg, start_step=start, return_trajectory=True
    )
    assert rel_err(traj, ref) <= TOL


@pytest.mark.parametrize("sampler", grid("ddim", "euler", slow=("heun", "dpmpp_2m")))
@pytest.mark.parametrize("strength", (1.0, 0.6))
def test_inpaint_blending_matches_diffusers(sampler, strength):
    """StableDiffusionInpaintPipeline's loop for 4-channel U-Nets: blend known latents after every step."""
    cfg = ScheduleConfig()
    rng = np.random.default_rng(2)
    known = rng.standard_normal(SHAPE).astype(np.float32)
    noise = rng.standard_normal(SHAPE).astype(np.float32)
    mask = (rng.uniform(size=SHAPE[:3] + (1,)) > 0.5).astype(np.float32)

    sched = diffusers_scheduler(sampler, cfg)
    sched.set_timesteps(STEPS)
    t_start = max(STEPS - min(int(STEPS * strength), STEPS), 0)
    timesteps = sched.timesteps[t_start * sched.order :]
    if hasattr(sched, "set_begin_index"):
        sched.set_begin_index(t_start * sched.order)
    tk, tn, tm = (torch.from_numpy(a).double() for a in (known, noise, mask))
    if strength == 1.0:
        lat = tn * sched.init_noise_sigma
    else:
        lat = sched.add_noise(tk, tn, timesteps[:1].repeat(SHAPE[0]))
    ref = []
    for i, t in enumerate(timesteps):
        out = denoiser_np(sched.scale_model_input(lat, t), t.to(torch.float64))
        lat = sched.step(out, t, lat).prev_sample.double()
        proper = tk
        if i < len(timesteps) - 1:
            proper = sched.add_noise(tk, tn, torch.tensor([timesteps[i + 1]])).double()
        lat = (1 - tm) * proper + tm * lat
        ref.append(lat.numpy())
    ref = np.stack(ref)

    if strength == 1.0:
        x_init, start, noised = jnp.asarray(noise), 0, False
    else:
        x_init, start = smp.img2img_start(
            jnp.asarray(known), jnp.asarray(noise), sampler=sampler, steps=STEPS, strength=strength, schedule=cfg
        )
        noised = True
    blend = smp.inpaint_post_step_fn(
        jnp.asarray(known), jnp.asarray(noise), jnp.asarray(mask), sampler=sampler, steps=STEPS, schedule=cfg,
        start_step=start,
    )  # fmt: skip
    _, traj = smp.sample(
        jax_denoiser, x_init, sampler=sampler, steps=STEPS, schedule=cfg, start_step=start, init_is_noised=noised,
        post_step_fn=blend, return_trajectory=True,
    )  # fmt: skip
    assert rel_err(traj, ref) <= TOL
