"""Classifier-free guidance: combine, rescale, and the one-batched-call wrapper."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxt2i.diffusion import guidance


def _rand(*shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def test_combine_matches_formula():
    cond, uncond = _rand(2, 4, 4, 3), _rand(2, 4, 4, 3, seed=1)
    np.testing.assert_allclose(guidance.combine(cond, uncond, 7.5), uncond + 7.5 * (cond - uncond), rtol=1e-6)
    per_sample = np.array([1.0, 3.0], np.float32)
    want = uncond + per_sample[:, None, None, None] * (cond - uncond)
    np.testing.assert_allclose(guidance.combine(cond, uncond, per_sample), want, rtol=1e-6)
    np.testing.assert_allclose(guidance.combine(cond, uncond, 1.0), cond, rtol=1e-6, atol=1e-6)


def _rescale_reference(guided, cond, r):
    axes = tuple(range(1, guided.ndim))
    std_c = np.std(cond.astype(np.float64), axis=axes, keepdims=True, ddof=1)
    std_g = np.std(guided.astype(np.float64), axis=axes, keepdims=True, ddof=1)
    return r * guided * (std_c / std_g) + (1 - r) * guided


def test_guidance_rescale_matches_numpy_and_diffusers():
    guided, cond = 3.0 * _rand(3, 8, 8, 4), _rand(3, 8, 8, 4, seed=1)
    for r in (0.0, 0.7, 1.0):
        got = guidance.guidance_rescale(jnp.asarray(guided), jnp.asarray(cond), r)
        np.testing.assert_allclose(got, _rescale_reference(guided, cond, r), rtol=1e-5, atol=1e-6)
    out = guidance.guidance_rescale(jnp.asarray(guided), jnp.asarray(cond), 1.0)
    np.testing.assert_allclose(np.std(np.asarray(out), axis=(1, 2, 3)), np.std(cond, axis=(1, 2, 3)), rtol=1e-5)

    torch = pytest.importorskip("torch")
    pytest.importorskip("diffusers")
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg

    # diffusers works in NCHW; the statistic is over all non-batch axes, so the layout does not matter
    ref = rescale_noise_cfg(torch.from_numpy(guided), torch.from_numpy(cond), guidance_rescale=0.7).numpy()
    np.testing.assert_allclose(guidance.guidance_rescale(jnp.asarray(guided), jnp.asarray(cond), 0.7), ref, rtol=1e-5)


def test_cfg_denoise_fn_makes_one_batched_call():
    calls = []
    w = jnp.asarray(_rand(4, 4, seed=3))

    def model_fn(x, t, ctx):
        calls.append((x.shape, t.shape, ctx.shape))
        return jnp.tanh(x @ w) * jnp.cos(t / 1000)[:, None, None, None] + ctx.mean(axis=(1, 2))[:, None, None, None]

    x, t = jnp.asarray(_rand(2, 3, 3, 4)), jnp.array([500.0, 500.0])
    cond, uncond = jnp.asarray(_rand(2, 7, 5, seed=4)), jnp.asarray(_rand(2, 7, 5, seed=5))
    denoise = guidance.cfg_denoise_fn(model_fn, cond, uncond, 6.0)
    out = denoise(x, t)
    assert calls == [((4, 3, 3, 4), (4,), (4, 7, 5))]
    want = guidance.combine(model_fn(x, t, cond), model_fn(x, t, uncond), 6.0)
    np.testing.assert_allclose(out, want, rtol=1e-6, atol=1e-6)

    rescaled = guidance.cfg_denoise_fn(model_fn, cond, uncond, 6.0, guidance_rescale=0.5)(x, 500.0)  # scalar t
    np.testing.assert_allclose(
        rescaled, guidance.guidance_rescale(want, model_fn(x, t, cond), 0.5), rtol=1e-5, atol=1e-6
    )


def test_cfg_context_may_be_a_pytree_and_scale_traced():
    def model_fn(x, t, ctx):
        return x * ctx["a"][:, None] + ctx["b"]

    x = jnp.ones((2, 3))
    ctx = {"a": jnp.array([1.0, 2.0]), "b": jnp.full((2, 3), 0.5)}
    unc = {"a": jnp.zeros(2), "b": jnp.zeros((2, 3))}

    @jax.jit
    def run(scale):
        return guidance.cfg_denoise_fn(model_fn, ctx, unc, scale)(x, jnp.zeros(2))

    np.testing.assert_allclose(run(2.0), 2.0 * (x * ctx["a"][:, None] + 0.5), rtol=1e-6)
    np.testing.assert_allclose(run(3.0), 3.0 * (x * ctx["a"][:, None] + 0.5), rtol=1e-6)
    assert run._cache_size() == 1
