"""Sampling loop: plans, validation, randomness, img2img/inpaint helpers, jit behaviour.

Trajectory parity with diffusers is in tests/parity/test_samplers_diffusers.py.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxt2i.diffusion import cfg_denoise_fn, plans, samplers as smp
from jaxt2i.diffusion.schedules import ScheduleConfig


def randn(*shape, seed=0):
    """Test data from numpy (eager jax.random calls compile a PRNG kernel each, which is slow)."""
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def smooth_denoiser(x, t):
    t = jnp.reshape(t, (-1,) + (1,) * (x.ndim - 1))
    return 0.1 * x * jnp.cos(t / 1000.0) + 0.05 * jnp.sin(x)


def test_model_call_counts_and_timesteps():
    cfg = ScheduleConfig()
    for sampler in smp.SAMPLERS:
        ts, calls = smp.sampler_timesteps(sampler, 10, cfg)
        want = {"pndm": 11, "heun": 19}.get(sampler, 10)
        assert calls == want == len(ts), sampler
        assert ts.dtype == np.float32 and np.all(np.diff(ts) <= 0), sampler
    _, calls = smp.sampler_timesteps("heun", 10, cfg, start_step=4)
    assert calls == 19 - 8
    ts, _ = smp.sampler_timesteps("euler", 10, cfg)
    assert ts[0] == 999.0 and ts[1] == 888.0  # default linspace spacing for the sigma samplers
    ts, _ = smp.sampler_timesteps("ddim", 10, cfg)
    assert ts[0] == 901.0  # leading + steps_offset


def test_validation_errors():
    x = jnp.zeros((1, 4))
    with pytest.raises(ValueError, match="unknown sampler"):
        smp.sample(smooth_denoiser, x, sampler="plms", steps=5)
    with pytest.raises(ValueError, match="karras"):
        smp.sample(smooth_denoiser, x, sampler="ddim", steps=5, use_karras_sigmas=True)
    with pytest.raises(ValueError, match="prediction_type"):
        smp.sample(smooth_denoiser, x, sampler="euler_a", steps=5, schedule=ScheduleConfig(prediction_type="sample"))
    with pytest.raises(ValueError, match="rescale_betas_zero_snr"):
        plans.make_plan("lms", 5, ScheduleConfig(rescale_betas_zero_snr=True))
    with pytest.raises(ValueError, match="key"):
        smp.sample(smooth_denoiser, x, sampler="euler_a", steps=5)
    with pytest.raises(ValueError, match="key"):
        smp.sample(smooth_denoiser, x, sampler="ddim", steps=5, eta=1.0)
    with pytest.raises(ValueError, match="noise has shape"):
        smp.sample(smooth_denoiser, x, sampler="ddpm", steps=5, noise=jnp.zeros((4, 1, 4)))
    with pytest.raises(ValueError, match="strength"):
        smp.img2img_start(x, x, sampler="ddim", steps=5, strength=0.1)


@pytest.mark.parametrize("sampler", smp.SAMPLERS)
def test_any_rank_and_trajectory(sampler):
    """Works for non-image denoisers ([B, D]) and returns one trajectory entry per model call."""
    x = randn(3, 6)
    _, calls = smp.sampler_timesteps(sampler, 6)
    noise = randn(calls, 3, 6, seed=1)
    out, traj = smp.sample(smooth_denoiser, x, sampler=sampler, steps=6, noise=noise, return_trajectory=True)
    assert out.shape == x.shape and traj.shape == (calls,) + x.shape
    assert bool(jnp.all(jnp.isfinite(traj)))


def _zero_noise_output_std(plan: plans.SamplingPlan, eta: float = 0.0) -> float:
    """Exact std of the output when the model predicts zero noise (epsilon) from x_T ~ N(0, 1):
    every step is then linear, x <- c x + s z, so var <- c^2 var + s^2 (independent z)."""
    tb = {k: v.astype(np.float64) for k, v in plan.table.items()}
    var = plan.init_noise_sigma**2
    for i in range(plan.num_calls):
        if plan.sampler == "ddpm":
            c, s = tb["c_x0"][i] / np.sqrt(tb["a_t"][i]) + tb["c_x"][i], tb["std"][i]
        elif plan.sampler == "ddim":
            s = eta * np.sqrt(tb["var"][i])
            c = np.sqrt(tb["a_prev"][i]) / np.sqrt(tb["a_t"][i])
        else:  # euler_a: d = 0
            c, s = 1.0, tb["sigma_up"][i]
        var = c**2 * var + s**2
    return float(np.sqrt(var))


@pytest.mark.parametrize("sampler,eta", [("ddpm", 0.0), ("euler_a", 0.0), ("ddim", 1.0)])
def test_prng_noise_statistics(sampler, eta):
    """With their own PRNG key the stochastic samplers inject independent standard-normal noise.

    Reusing one noise draw for every step, or a wrong scale, moves the output std far outside the
    bound (5 standard errors of a std estimated from n = 32768 values: 5 / sqrt(2 n) ~ 2%).
    """
    steps = 12
    plan = plans.make_plan(sampler, steps, ScheduleConfig())
    want = _zero_noise_output_std(plan, eta)
    x_T = randn(8, 32, 32, 4)
    n = x_T.size
    run = jax.jit(
        lambda x, key: smp.sample(lambda x, t: jnp.zeros_like(x), x, sampler=sampler, steps=steps, key=key, eta=eta)
    )
    out = np.asarray(run(x_T, jax.random.key(7)), np.float64)
    bound = 5 / np.sqrt(2 * n)
    assert abs(out.std() / want - 1) < bound, (out.std(), want)
    assert abs(out.mean()) < 5 * want / np.sqrt(n)
    # neighbouring values are uncorrelated (noise is drawn per element)
    corr = np.corrcoef(out[..., 0].ravel(), out[..., 1].ravel())[0, 1]
    assert abs(corr) < 5 / np.sqrt(n / 4)
    # the same key gives the same result, another key a different one
    np.testing.assert_array_equal(np.asarray(run(x_T, jax.random.key(7))), out.astype(np.float32))
    assert not np.allclose(np.asarray(run(x_T, jax.random.key(8))), out)


def test_ddim_eta_zero_ignores_noise_and_injected_noise_is_used():
    x = randn(2, 4, 4, 3)
    det = smp.sample(smooth_denoiser, x, sampler="ddim", steps=8)
    noise = randn(8, 2, 4, 4, 3, seed=1)
    np.testing.assert_array_equal(det, smp.sample(smooth_denoiser, x, sampler="ddim", steps=8, noise=noise))
    with_eta = smp.sample(smooth_denoiser, x, sampler="ddim", steps=8, noise=noise, eta=0.5)
    assert not np.allclose(det, with_eta)


def test_jitted_sample_does_not_recompile_for_new_scale_noise_or_eta():
    traces = []

    def model_fn(x, t, ctx):
        traces.append(1)  # runs once per trace, never at execution time
        return 0.1 * x * jnp.cos(t / 1000)[:, None, None, None] + ctx.mean() * 0.01

    ctx, unc = jnp.ones((2, 5, 8)), jnp.zeros((2, 5, 8))

    @jax.jit
    def generate(x_T, noise, scale, eta):
        denoise = cfg_denoise_fn(model_fn, ctx, unc, scale)
        return smp.sample(denoise, x_T, sampler="ddim", steps=6, noise=noise, eta=eta)

    x = jnp.ones((2, 4, 4, 3))
    a = generate(x, jnp.zeros((6,) + x.shape), 7.5, 0.0)
    b = generate(x * 2, jnp.ones((6,) + x.shape), 3.0, 0.5)
    assert generate._cache_size() == 1
    assert len(traces) == 1  # one model call site in the scan body
    assert not np.allclose(a, b)


def test_img2img_start_levels():
    cfg = ScheduleConfig()
    x0 = jnp.ones((1, 2, 2, 4))
    noise = jnp.zeros_like(x0)
    x, start = smp.img2img_start(x0, noise, sampler="euler", steps=10, strength=0.5, schedule=cfg)
    assert start == 5
    np.testing.assert_allclose(x, x0)  # sigma-based: x0 + sigma * noise
    x, start = smp.img2img_start(x0, noise, sampler="ddim", steps=10, strength=0.5, schedule=cfg)
    t = int(smp.sampler_timesteps("ddim", 10, cfg)[0][5])
    from jaxt2i.diffusion.schedules import alphas_cumprod

    np.testing.assert_allclose(x, np.sqrt(alphas_cumprod(cfg)[t]) * np.ones((1, 2, 2, 4)), rtol=1e-6)


def test_inpaint_known_region_is_exact_at_the_end():
    cfg = ScheduleConfig()
    known = randn(2, 8, 8, 4)
    noise = randn(2, 8, 8, 4, seed=1)
    mask = jnp.zeros((2, 8, 8, 1)).at[:, :4].set(1.0)
    for sampler in ("ddim", "euler", "heun", "dpmpp_2m"):
        blend = smp.inpaint_post_step_fn(known, noise, mask, sampler=sampler, steps=6, schedule=cfg)
        out = smp.sample(smooth_denoiser, noise, sampler=sampler, steps=6, schedule=cfg, post_step_fn=blend)
        np.testing.assert_array_equal(np.asarray(out)[:, 4:], np.asarray(known)[:, 4:])
        assert not np.allclose(np.asarray(out)[:, :4], np.asarray(known)[:, :4])
