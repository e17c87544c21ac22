"""Learned-variance maths: posterior, learned range, KL, discretized likelihood, hybrid loss, DDPM step.

References are written here from the formulas (float64 torch/numpy): the posterior by conditioning the joint
Gaussian of (x_{t-1}, x_t) given x_0, the KL with torch.distributions, the likelihood from Normal.cdf. The DDPM
step is compared with diffusers' DDPMScheduler(variance_type="learned_range") fed the same noise.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler
from diffusers.schedulers import scheduling_ddpm

from jaxt2i.diffusion import schedules as sch
from jaxt2i.diffusion import variance as var
from jaxt2i.diffusion.schedules import ScheduleConfig

DIT = ScheduleConfig(beta_schedule="linear", beta_start=1e-4, beta_end=0.02)  # DiT's training schedule
COSINE = ScheduleConfig(beta_schedule="squaredcos_cap_v2")
SHAPE = (6, 4, 4, 3)  # [B, H, W, C]
T_BATCH = np.array([0, 1, 2, 250, 731, 999])


def rng_normal(*shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape)


def ref_schedule(cfg):
    """float64 beta_t, abar_t, abar_{t-1} from the schedule's betas (abar_{-1} = 1)."""
    beta = sch.betas(cfg).astype(np.float64)
    abar = np.cumprod(1.0 - beta)
    return beta, abar, np.concatenate([[1.0], abar[:-1]])


def ref_posterior(cfg, t):
    """Posterior of x_{t-1} given (x_t, x_0) by Gaussian conditioning of
    x_{t-1} = sqrt(abar_{t-1}) x0 + sqrt(1 - abar_{t-1}) e1,  x_t = sqrt(1 - beta_t) x_{t-1} + sqrt(beta_t) e2.
    Returns (coef_x0, coef_xt, variance) at t [B], float64."""
    beta, abar, abar_prev = ref_schedule(cfg)
    b, a, ap = beta[t], abar[t], abar_prev[t]
    cov = np.sqrt(1.0 - b) * (1.0 - ap)  # Cov(x_{t-1}, x_t | x0)
    gain = cov / (1.0 - a)  # Var(x_t | x0) = 1 - abar_t
    return np.sqrt(ap) - gain * np.sqrt(a), gain, (1.0 - ap) - cov**2 / (1.0 - a)


def bcast(v, ndim=4):
    return v.reshape(v.shape + (1,) * (ndim - v.ndim))


def ref_model_gaussian(cfg, eps, v, x_t, t):
    """float64 mean and log variance of p(x_{t-1} | x_t) for a learned-range epsilon model."""
    beta, abar, _ = ref_schedule(cfg)
    c0, ct, post_var = ref_posterior(cfg, t)
    _, _, var1 = ref_posterior(cfg, np.array([1]))
    a = bcast(abar[t])
    x0 = (x_t - np.sqrt(1.0 - a) * eps) / np.sqrt(a)
    mean = bcast(c0) * x0 + bcast(ct) * x_t
    min_log = np.log(np.where(t == 0, var1[0], post_var))
    frac = (v + 1.0) / 2.0
    return mean, frac * bcast(np.log(beta[t])) + (1.0 - frac) * bcast(min_log)


def ref_log_likelihood(x, mean, log_scale, cdf):
    """float64 log mass of the 255-level bin of x (edge bins below -0.999 / above 0.999)."""
    x, mean, log_scale = (torch.as_tensor(np.asarray(a, np.float64)) for a in (x, mean, log_scale))
    normal = torch.distributions.Normal(mean, log_scale.exp())
    upper, lower = cdf(normal, x + 1.0 / 255.0), cdf(normal, x - 1.0 / 255.0)
    mass = torch.where(x < -0.999, upper, torch.where(x > 0.999, 1.0 - lower, upper - lower))
    return torch.log(mass.clamp(min=1e-12)).numpy()


def exact_cdf(normal, x):
    return normal.cdf(x)


def tanh_cdf(normal, x):
    """IDDPM's approximation Phi(z) ~ (1 + tanh(sqrt(2 / pi) (z + 0.044715 z^3))) / 2, z standardised."""
    z = (x - normal.loc) / normal.scale
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (z + 0.044715 * z**3)))


def vlb_inputs(seed=0, t=T_BATCH, eps_error=0.3):
    """x_start (latent-like, some beyond +-1), noise, x_t, a model eps near the noise, v in [-1, 1]."""
    x_start = 0.8 * rng_normal(*SHAPE, seed=seed)
    noise = rng_normal(*SHAPE, seed=seed + 1)
    _, abar, _ = ref_schedule(DIT)
    a = bcast(abar[t])
    x_t = np.sqrt(a) * x_start + np.sqrt(1.0 - a) * noise
    eps = noise + eps_error * rng_normal(*SHAPE, seed=seed + 2)
    v = np.tanh(rng_normal(*SHAPE, seed=seed + 3))
    return x_start, noise, x_t, eps, v


def ref_vlb_bits(cfg, x_start, x_t, eps, v, t):
    """float64 L_t in bits/dim: decoder NLL at t == 0, KL(q || p) elsewhere."""
    c0, ct, _ = ref_posterior(cfg, t)
    _, _, var1 = ref_posterior(cfg, np.array([1]))
    _, _, post_var = ref_posterior(cfg, t)
    true_mean = bcast(c0) * x_start + bcast(ct) * x_t
    true_log_var = bcast(np.log(np.where(t == 0, var1[0], post_var)))
    mean, log_var = ref_model_gaussian(cfg, eps, v, x_t, t)
    q = torch.distributions.Normal(torch.tensor(true_mean), torch.tensor(np.exp(0.5 * true_log_var)))
    p = torch.distributions.Normal(torch.tensor(mean), torch.tensor(np.exp(0.5 * log_var)))
    kl = torch.distributions.kl_divergence(q, p).numpy()
    nll = -ref_log_likelihood(x_start, mean, 0.5 * log_var, tanh_cdf)
    per_dim = np.where(bcast(t) == 0, nll, kl)
    return per_dim.reshape(len(t), -1).mean(axis=1) / math.log(2.0), kl, nll


# ----------------------------------------------------------------------------------------------
# Posterior and learned range
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cfg", [DIT, COSINE], ids=["linear", "cosine"])
def test_q_posterior_matches_gaussian_conditioning(cfg):
    x_start, x_t = rng_normal(*SHAPE, seed=1), rng_normal(*SHAPE, seed=2)
    mean, log_var = var.q_posterior(jnp.asarray(x_start, jnp.float32), jnp.asarray(x_t, jnp.float32),
                                    jnp.asarray(T_BATCH), cfg)
    c0, ct, post_var = ref_posterior(cfg, T_BATCH)
    np.testing.assert_allclose(np.asarray(mean), bcast(c0) * x_start + bcast(ct) * x_t, rtol=1e-5, atol=1e-6)
    assert c0[0] == 1.0 and ct[0] == 0.0 and post_var[0] == 0.0  # t = 0: the posterior is x_0 itself
    clipped = np.log(np.where(T_BATCH == 0, post_var[1], post_var))  # t = 0 takes the t = 1 variance
    np.testing.assert_allclose(np.asarray(log_var).reshape(-1), clipped, rtol=1e-5)
    assert log_var.shape == (len(T_BATCH), 1, 1, 1) and mean.dtype == jnp.float32


def test_learned_range_log_variance_interpolates_in_log_space():
    beta, _, _ = ref_schedule(DIT)
    _, _, post_var = ref_posterior(DIT, T_BATCH)
    min_log = np.log(np.where(T_BATCH == 0, ref_posterior(DIT, np.array([1]))[2][0], post_var))
    t = jnp.asarray(T_BATCH)
    lo = var.learned_range_log_variance(-jnp.ones(SHAPE), t, DIT)
    hi = var.learned_range_log_variance(jnp.ones(SHAPE), t, DIT)
    np.testing.assert_allclose(np.asarray(lo)[:, 0, 0, 0], min_log, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(hi)[:, 0, 0, 0], np.log(beta[T_BATCH]), rtol=1e-5)
    v = np.tanh(rng_normal(*SHAPE, seed=3))
    got = var.learned_range_log_variance(jnp.asarray(v, jnp.float32), t, DIT)
    _, want = ref_model_gaussian(DIT, np.zeros(SHAPE), v, np.zeros(SHAPE), T_BATCH)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5)


# ----------------------------------------------------------------------------------------------
# KL and discretized likelihood
# ----------------------------------------------------------------------------------------------


def test_normal_kl_matches_torch_distributions():
    m1, m2 = rng_normal(5, 7, seed=1), rng_normal(5, 7, seed=2)
    lv1, lv2 = 2.0 * rng_normal(5, 7, seed=3), 2.0 * rng_normal(5, 7, seed=4)
    got = var.normal_kl(*(jnp.asarray(a, jnp.float32) for a in (m1, lv1, m2, lv2)))
    want = torch.distributions.kl_divergence(
        torch.distributions.Normal(torch.tensor(m1), torch.tensor(np.exp(0.5 * lv1))),
        torch.distributions.Normal(torch.tensor(m2), torch.tensor(np.exp(0.5 * lv2))),
    ).numpy()
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-6)
    assert np.allclose(np.asarray(var.normal_kl(m1, lv1, m1, lv1)), 0.0, atol=1e-6)


def likelihood_inputs():
    """Bin centres of 8-bit data in [-1, 1] (edges included), means within 1.5 scales of them.

    Further out a bin's mass is the difference of two float32 CDF values near 1 and keeps few digits (in DiT's
    float32 maths too), so a float64 reference says nothing there."""
    gen = np.random.default_rng(0)
    x = gen.integers(0, 256, size=(4, 64)) / 127.5 - 1.0
    x[:, 0], x[:, 1] = -1.0, 1.0
    scales = 0.005 + 0.03 * gen.random((4, 64))
    means = x + 1.5 * scales * gen.uniform(-1.0, 1.0, (4, 64))
    return x, means, np.log(scales)


def test_discretized_likelihood_exact_cdf_matches_normal_cdf():
    x, means, log_scales = likelihood_inputs()
    got = var.discretized_gaussian_log_likelihood(*(jnp.asarray(a, jnp.float32) for a in (x, means, log_scales)),
                                                  exact_cdf=True)
    np.testing.assert_allclose(np.asarray(got), ref_log_likelihood(x, means, log_scales, exact_cdf),
                               rtol=1e-4, atol=1e-5)


def test_discretized_likelihood_default_is_the_tanh_approximation():
    x, means, log_scales = likelihood_inputs()
    got = var.discretized_gaussian_log_likelihood(*(jnp.asarray(a, jnp.float32) for a in (x, means, log_scales)))
    np.testing.assert_allclose(np.asarray(got), ref_log_likelihood(x, means, log_scales, tanh_cdf),
                               rtol=1e-4, atol=1e-5)
    exact = ref_log_likelihood(x, means, log_scales, exact_cdf)
    assert not np.allclose(np.asarray(got), exact, rtol=1e-4, atol=1e-5)  # the two CDFs are told apart


def test_discretized_likelihood_bins_sum_to_one():
    centres = jnp.asarray(np.arange(256) / 127.5 - 1.0, jnp.float32)[None]  # every 8-bit value once
    for mean, log_scale in ((0.3, np.log(0.05)), (-0.97, np.log(0.2)), (0.0, np.log(2.0))):
        logp = var.discretized_gaussian_log_likelihood(centres, jnp.full_like(centres, mean),
                                                       jnp.full_like(centres, log_scale), exact_cdf=True)
        assert abs(float(jnp.exp(logp).sum()) - 1.0) < 1e-5


# ----------------------------------------------------------------------------------------------
# Variational bound and hybrid loss
# ----------------------------------------------------------------------------------------------


def test_vlb_terms_match_reference():
    x_start, _, x_t, eps, v = vlb_inputs()
    got = var.vlb_terms(*(jnp.asarray(a, jnp.float32) for a in (eps, v, x_start, x_t)), jnp.asarray(T_BATCH), DIT)
    want, _, _ = ref_vlb_bits(DIT, x_start, x_t, eps, v, T_BATCH)
    assert got.shape == (len(T_BATCH),) and got.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-5)


def test_vlb_at_t0_is_the_decoder_nll():
    t = np.zeros(SHAPE[0], np.int64)
    x_start, _, x_t, eps, v = vlb_inputs(seed=5, t=t)
    got = np.asarray(var.vlb_terms(*(jnp.asarray(a, jnp.float32) for a in (eps, v, x_start, x_t)), jnp.asarray(t), DIT))
    _, kl, nll = ref_vlb_bits(DIT, x_start, x_t, eps, v, t)
    bits = lambda a: a.reshape(len(t), -1).mean(axis=1) / math.log(2.0)  # noqa: E731
    np.testing.assert_allclose(got, bits(nll), rtol=1e-4, atol=1e-5)
    assert not np.allclose(got, bits(kl), rtol=1e-2)


def model_output_and_batch(seed=0):
    x_start, noise, x_t, eps, v = vlb_inputs(seed=seed)
    out = jnp.asarray(np.concatenate([eps, v], axis=-1), jnp.float32)  # [B, H, W, 2C], eps first
    return out, *(jnp.asarray(a, jnp.float32) for a in (x_start, noise, x_t)), jnp.asarray(T_BATCH)


def test_hybrid_loss_is_mse_plus_weighted_vb():
    out, x_start, noise, x_t, t = model_output_and_batch()
    terms = var.hybrid_loss(out, x_start, noise, x_t, t, DIT, vlb_weight=0.25)
    c = SHAPE[-1]
    mse = ((np.asarray(out)[..., :c] - np.asarray(noise)) ** 2).reshape(SHAPE[0], -1).mean(axis=1)
    want_vb, _, _ = ref_vlb_bits(DIT, *(np.asarray(a, np.float64) for a in (x_start, x_t, out[..., :c], out[..., c:])),
                                 T_BATCH)
    np.testing.assert_allclose(np.asarray(terms["mse"]), mse, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(terms["vb"]), want_vb, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.asarray(terms["loss"]), mse + 0.25 * want_vb, rtol=1e-4, atol=1e-5)


def test_hybrid_loss_gradients_vb_trains_only_the_variance():
    out, x_start, noise, x_t, t = model_output_and_batch(seed=3)
    c = SHAPE[-1]

    def grad_of(term, **kw):
        return jax.grad(lambda o: var.hybrid_loss(o, x_start, noise, x_t, t, DIT, **kw)[term].sum())(out)

    g_vb, g_mse = grad_of("vb"), grad_of("mse")
    assert np.all(np.asarray(g_vb[..., :c]) == 0.0) and np.abs(np.asarray(g_vb[..., c:])).min(axis=(1, 2, 3)).max() > 0
    assert np.all(np.asarray(g_mse[..., c:]) == 0.0) and np.all(np.abs(np.asarray(g_mse[..., :c])).sum((1, 2, 3)) > 0)
    g_full = jax.grad(lambda o: var.vlb_terms(o[..., :c], o[..., c:], x_start, x_t, t, DIT, freeze_mean=False).sum())(out)
    assert np.abs(np.asarray(g_full[..., :c])).sum() > 0  # unfrozen, the bound reaches eps


def test_hybrid_loss_jits():
    out, x_start, noise, x_t, t = model_output_and_batch(seed=7)
    eager = var.hybrid_loss(out, x_start, noise, x_t, t, DIT)
    jitted = jax.jit(var.hybrid_loss, static_argnames=("schedule",))(out, x_start, noise, x_t, t, schedule=DIT)
    for k in ("loss", "mse", "vb"):
        np.testing.assert_allclose(np.asarray(jitted[k]), np.asarray(eager[k]), rtol=1e-6, atol=1e-7)


def test_hybrid_loss_errors_name_the_fix():
    out, x_start, noise, x_t, t = model_output_and_batch()
    with pytest.raises(ValueError, match="twice the channels"):
        var.hybrid_loss(out[..., :4], x_start, noise, x_t, t, DIT)
    with pytest.raises(ValueError, match="2C channels"):
        var.hybrid_loss(out[..., :5], x_start, noise, x_t, t, DIT)
    with pytest.raises(ValueError, match="prediction_type='epsilon'"):
        var.hybrid_loss(out, x_start, noise, x_t, t, ScheduleConfig(prediction_type="v_prediction"))


# ----------------------------------------------------------------------------------------------
# DDPM ancestral step with the learned range, against diffusers
# ----------------------------------------------------------------------------------------------


def diffusers_step(scheduler, out_nhwc, x_nhwc, t, noise_nhwc, monkeypatch):
    """One diffusers step (NCHW) with its variance noise replaced by ours; back to NHWC."""
    to_nchw = lambda a: torch.tensor(np.asarray(a, np.float32)).permute(0, 3, 1, 2).contiguous()  # noqa: E731
    noise = to_nchw(noise_nhwc)
    monkeypatch.setattr(scheduling_ddpm, "randn_tensor", lambda shape, **kw: noise.reshape(shape))
    res = scheduler.step(to_nchw(out_nhwc), int(t), to_nchw(x_nhwc))
    return res.prev_sample.permute(0, 2, 3, 1).numpy(), res.pred_original_sample.permute(0, 2, 3, 1).numpy()


@pytest.mark.parametrize(
    "steps,spacing,prediction_type,clip",
    [(None, None, "epsilon", False), (10, "leading", "epsilon", False), (7, "linspace", "epsilon", True),
     (10, "trailing", "v_prediction", False)],
)
def test_ddpm_learned_range_step_matches_diffusers(steps, spacing, prediction_type, clip, monkeypatch):
    cfg = ScheduleConfig(beta_schedule="linear", beta_start=1e-4, beta_end=0.02, prediction_type=prediction_type,
                         timestep_spacing=spacing, steps_offset=1, clip_sample=clip)
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02,
                              variance_type="learned_range", prediction_type=prediction_type, clip_sample=clip,
                              timestep_spacing=spacing or "leading", steps_offset=1)
    abar = sch.alphas_cumprod(cfg)
    if steps is None:  # the full chain: diffusers steps from t to t - 1
        ts = np.array([999, 500, 17, 1, 0])
        prev = ts - 1
    else:
        scheduler.set_timesteps(steps)
        ts = sch.discrete_timesteps(cfg, steps, spacing)
        np.testing.assert_array_equal(ts, scheduler.timesteps.numpy())
        prev = np.concatenate([ts[1:], [-1]])
    step = jax.jit(var.ddpm_learned_range_step, static_argnames=("prediction_type", "clip_sample_range"))
    for i, (t, p) in enumerate(zip(ts, prev)):
        x = rng_normal(2, 4, 4, 3, seed=10 * i)
        out = np.concatenate([rng_normal(2, 4, 4, 3, seed=10 * i + 1), np.tanh(rng_normal(2, 4, 4, 3, seed=10 * i + 2))],
                             axis=-1)
        noise = rng_normal(2, 4, 4, 3, seed=10 * i + 3)
        want, want_x0 = diffusers_step(scheduler, out, x, t, noise, monkeypatch)
        a_prev = abar[p] if p >= 0 else np.float32(1.0)
        got, got_x0 = step(jnp.asarray(out, jnp.float32), jnp.asarray(x, jnp.float32), abar[t], a_prev,
                           jnp.asarray(noise, jnp.float32), add_noise=t > 0, prediction_type=prediction_type,
                           clip_sample_range=1.0 if clip else None)
        np.testing.assert_allclose(np.asarray(got_x0), want_x0, rtol=1e-5, atol=1e-5, err_msg=f"x0 at t={t}")
        assert np.abs(np.asarray(got) - want).max() <= 1e-5, f"t={t} prev={p}"
        if t > 0:  # the noise really enters the step
            no_noise, _ = step(jnp.asarray(out, jnp.float32), jnp.asarray(x, jnp.float32), abar[t], a_prev,
                               jnp.asarray(noise, jnp.float32), add_noise=False, prediction_type=prediction_type,
                               clip_sample_range=1.0 if clip else None)
            assert np.abs(np.asarray(no_noise) - want).max() > 1e-3


def test_ddpm_learned_range_step_per_example_coefficients():
    cfg = DIT
    abar = sch.alphas_cumprod(cfg)
    x, noise = rng_normal(3, 2, 2, 4, seed=1), rng_normal(3, 2, 2, 4, seed=2)
    out = np.concatenate([rng_normal(3, 2, 2, 4, seed=3), np.tanh(rng_normal(3, 2, 2, 4, seed=4))], axis=-1)
    t = np.array([900, 300, 5])
    batched, _ = var.ddpm_learned_range_step(jnp.asarray(out, jnp.float32), jnp.asarray(x, jnp.float32), abar[t],
                                             abar[t - 1], jnp.asarray(noise, jnp.float32),
                                             add_noise=jnp.array([True, False, True]))
    for b in range(3):
        one, _ = var.ddpm_learned_range_step(jnp.asarray(out[b:b + 1], jnp.float32), jnp.asarray(x[b:b + 1], jnp.float32),
                                             abar[t[b]], abar[t[b] - 1], jnp.asarray(noise[b:b + 1], jnp.float32),
                                             add_noise=b != 1)
        np.testing.assert_allclose(np.asarray(batched[b:b + 1]), np.asarray(one), rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="pass noise"):
        var.ddpm_learned_range_step(jnp.asarray(out, jnp.float32), jnp.asarray(x, jnp.float32), abar[t], abar[t - 1],
                                    None)
