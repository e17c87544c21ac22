"""KL-VAE: config, shapes, dtypes, the posterior, latent scaling and the key tables (no PyTorch needed)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxt2i.convert.core import ConversionError
from jaxt2i.convert.vae_keys import (
    diffusers_table,
    original_key_map,
    params_from_diffusers,
    params_from_original,
    params_to_diffusers,
    params_to_original,
)
from jaxt2i.models.vae import (
    PRESETS,
    AutoencoderKL,
    DiagonalGaussian,
    VAEConfig,
    abstract_params,
    decode_latents,
    encode_to_latents,
    get_config,
    scale_latents,
    unscale_latents,
)

TINY = PRESETS["tiny"]


def random_params(config: VAEConfig, seed: int = 0) -> dict:
    """Random parameters of the right shapes, made with numpy (jit-compiling ``init`` takes ~10 s of CPU)."""
    rng = np.random.default_rng(seed)

    def leaf(path, shape_dtype):
        shape, name = shape_dtype.shape, path[-1].key
        if name == "kernel":
            return (rng.standard_normal(shape) / math.sqrt(math.prod(shape[:-1]))).astype(np.float32)
        return ((1.0 if name == "scale" else 0.0) + 0.1 * rng.standard_normal(shape)).astype(np.float32)

    return jax.tree_util.tree_map_with_path(leaf, abstract_params(config))


@pytest.fixture(scope="module")
def tiny_params():
    return random_params(TINY)


def _count(tree) -> int:
    return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(tree))


def test_sd_preset_has_the_published_parameter_count():
    # diffusers' AutoencoderKL for SD 1.x/2.x has 83,653,863 parameters (checked against torch in the slow test).
    assert _count(abstract_params(PRESETS["sd"])) == 83_653_863
    assert PRESETS["sd"].downsample_factor == 8 and PRESETS["sd"].scaling_factor == 0.18215
    assert get_config("tiny") is TINY
    with pytest.raises(ValueError, match="sd, sdxl, tiny"):
        get_config("sd15")


def test_param_dtype_reaches_every_leaf():
    tree = abstract_params(TINY, param_dtype=jnp.bfloat16)
    assert {leaf.dtype for leaf in jax.tree.leaves(tree)} == {jnp.dtype(jnp.bfloat16)}


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_config_round_trips_through_diffusers_dict(name):
    config = PRESETS[name]
    assert VAEConfig.from_diffusers(config.to_diffusers()) == config


def test_from_diffusers_accepts_real_config_spellings():
    d = dict(TINY.to_diffusers(), _diffusers_version="0.42.1", _name_or_path="x", sample_size=[32, 32])
    d.pop("latents_mean")
    assert VAEConfig.from_diffusers(d) == TINY


@pytest.mark.parametrize("change, message", [
    ({"_class_name": "AutoencoderTiny"}, "AutoencoderKL"),
    ({"down_block_types": ["DownEncoderBlock2D", "AttnDownEncoderBlock2D"]}, "down_block_types"),
    ({"up_block_types": ["UpDecoderBlock2D"]}, "up_block_types"),
    ({"act_fn": "gelu"}, "act_fn"),
    ({"latents_mean": [0.0] * 4}, "latents_mean"),
    ({"norm_type": "spatial"}, "norm_type"),
    ({"sample_size": [32, 64]}, "sample_size"),
    ({"norm_num_groups": 7}, "divisible"),
])
def test_from_diffusers_rejects_unsupported_options(change, message):
    with pytest.raises(ValueError, match=message):
        VAEConfig.from_diffusers(dict(TINY.to_diffusers(), **change))


def test_shapes_and_call(tiny_params):
    model = AutoencoderKL(TINY)
    x = jnp.linspace(-1, 1, 2 * 32 * 32 * 3).reshape(2, 32, 32, 3)
    recon, posterior = jax.jit(lambda p, x, k: model.apply({"params": p}, x, k))(tiny_params, x, jax.random.key(1))
    assert recon.shape == (2, 32, 32, 3)
    assert posterior.mean.shape == posterior.logvar.shape == (2, 16, 16, 4)


def test_bfloat16_compute(tiny_params):
    model = AutoencoderKL(TINY, dtype=jnp.bfloat16)
    z = jax.random.normal(jax.random.key(0), (1, 8, 8, 4))
    out = jax.jit(lambda p, z: model.apply({"params": p}, z, method=AutoencoderKL.decode))(tiny_params, z)
    ref = jax.jit(lambda p, z: AutoencoderKL(TINY).apply({"params": p}, z, method=AutoencoderKL.decode))(
        tiny_params, z)
    assert out.dtype == jnp.bfloat16 and out.shape == (1, 16, 16, 3)
    assert float(jnp.max(jnp.abs(out.astype(jnp.float32) - ref))) < 0.1 * float(jnp.max(jnp.abs(ref))) + 0.05


def test_latent_helpers(tiny_params):
    images = jax.random.uniform(jax.random.key(0), (2, 32, 32, 3))
    encode = jax.jit(encode_to_latents, static_argnums=2)
    a = encode(tiny_params, images, TINY, key=jax.random.key(1))
    b = encode(tiny_params, images, TINY, key=jax.random.key(1))
    c = encode(tiny_params, images, TINY, key=jax.random.key(2))
    assert a.shape == (2, 16, 16, 4) and a.dtype == jnp.float32
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)
    decoded = jax.jit(decode_latents, static_argnums=2)({"params": tiny_params}, 3.0 * a, TINY)
    assert decoded.shape == (2, 32, 32, 3)
    assert float(decoded.min()) >= 0.0 and float(decoded.max()) <= 1.0


def test_scaling_with_shift():
    config = VAEConfig(scaling_factor=0.5, shift_factor=0.25)
    z = jnp.arange(4.0)
    np.testing.assert_allclose(scale_latents(z, config), (z - 0.25) * 0.5)
    np.testing.assert_allclose(unscale_latents(scale_latents(z, config), config), z, rtol=1e-6)
    np.testing.assert_allclose(scale_latents(z, TINY), z * 0.18215)


def test_diagonal_gaussian():
    mean = jnp.zeros((2, 1, 1, 2))
    logvar = jnp.array([[[[-40.0, 25.0]]], [[[0.0, 0.0]]]])
    dist = DiagonalGaussian.from_moments(jnp.concatenate([mean, logvar], axis=-1))
    np.testing.assert_array_equal(dist.logvar[0, 0, 0], [-30.0, 20.0])
    kl = dist.kl()
    assert kl.shape == (2,) and float(kl[1]) == 0.0  # the standard normal against itself
    np.testing.assert_allclose(kl[0], 0.5 * ((math.exp(-30) - 1 + 30) + (math.exp(20) - 1 - 20)), rtol=1e-6)
    np.testing.assert_allclose(dist.kl(dist), [0.0, 0.0], atol=1e-6)
    np.testing.assert_allclose(dist.nll(jnp.ones((2, 1, 1, 2)))[1], math.log(2 * math.pi) + 1.0, rtol=1e-6)
    # It is a pytree: it crosses jit boundaries and tree maps.
    doubled = jax.jit(lambda d: jax.tree.map(lambda t: 2 * t, d))(dist)
    assert isinstance(doubled, DiagonalGaussian)
    np.testing.assert_array_equal(doubled.logvar, 2 * dist.logvar)


@pytest.mark.parametrize("config", [TINY, VAEConfig(block_out_channels=(8, 16, 16), norm_num_groups=4,
                                                    mid_block_add_attention=False, use_quant_conv=False)])
def test_key_tables_round_trip(config):
    params = random_params(config, seed=3)
    exported = params_to_diffusers(params, config)
    assert len(exported) == len(diffusers_table(config)) == len(original_key_map(config))
    jax.tree.map(np.testing.assert_array_equal, params_from_diffusers(exported, config), params)
    original = params_to_original(params, config)
    assert all(k.startswith("first_stage_model.") for k in original)
    jax.tree.map(np.testing.assert_array_equal, params_from_original(original, config), params)
    standalone = params_to_original(params, config, prefix="")
    jax.tree.map(np.testing.assert_array_equal, params_from_original(standalone, config, prefix=""), params)


def test_loading_into_the_wrong_config_names_keys(tiny_params):
    exported = params_to_diffusers(tiny_params, TINY)
    with pytest.raises(ConversionError, match="mid_block.attentions.0"):
        params_from_diffusers(exported, VAEConfig(block_out_channels=(32, 64), layers_per_block=1,
                                                  norm_num_groups=8, mid_block_add_attention=False))
    with pytest.raises(ConversionError, match=r"encoder\.down_blocks\.0\.resnets\.1\."):
        params_from_diffusers(exported, VAEConfig(block_out_channels=(32, 64), layers_per_block=2,
                                                  norm_num_groups=8))
