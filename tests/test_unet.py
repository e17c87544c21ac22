"""U-Net config, presets, module behaviour and key-table checks that need no PyTorch."""

from __future__ import annotations

import dataclasses
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from jaxt2i.convert.core import ConversionError
from jaxt2i.convert.unet_keys import (
    ORIGINAL_PREFIX,
    diffusers_table,
    original_key_map,
    params_from_diffusers,
    params_to_diffusers,
)
from jaxt2i.models.unet import PRESETS, UNet, UNetConfig, abstract_params

# One level, attention everywhere: the smallest graph with every kind of layer, for the compile-heavy checks.
MICRO = UNetConfig(sample_size=4, block_out_channels=(32,), layers_per_block=1,
                   down_block_types=("CrossAttnDownBlock2D",), up_block_types=("CrossAttnUpBlock2D",),
                   attention_head_dim=2, cross_attention_dim=16)


@functools.lru_cache(maxsize=None)
def cached_abstract(name: str) -> dict:
    return abstract_params(PRESETS[name])


def random_params(config: UNetConfig, seed: int = 0, dtype=np.float32) -> dict:
    """Random parameters drawn from the abstract tree (no `init` compile)."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: (0.2 * rng.standard_normal(s.shape)).astype(dtype), abstract_params(config))


def inputs(config: UNetConfig, batch: int = 2, size: int = 8, seed: int = 1):
    rng = np.random.default_rng(seed)
    sample = rng.standard_normal((batch, size, size, config.in_channels)).astype(np.float32)
    context = rng.standard_normal((batch, 5, config.cross_attention_dim)).astype(np.float32)
    return sample, context


# -- config ----------------------------------------------------------------------------------------------------------


def test_full_size_parameter_counts():
    """The published sizes of the SD1.5 and SD2.1 U-Nets."""
    count = lambda name: sum(x.size for x in jax.tree.leaves(cached_abstract(name)))
    assert count("sd15") == 859_520_964
    assert count("sd21") == 865_910_724
    # Inpainting adds 5 input channels to conv_in only (3 * 3 * 5 * 320 weights).
    assert count("sd15_inpaint") - count("sd15") == 3 * 3 * 5 * 320


def test_head_semantics_follow_diffusers():
    sd15, sd21 = PRESETS["sd15"], PRESETS["sd21"]
    assert [sd15.heads(i) for i in range(4)] == [8, 8, 8, 8]  # SD1: "attention_head_dim" is the head count
    assert [c // sd15.heads(i) for i, c in enumerate(sd15.block_out_channels)] == [40, 80, 160, 160]
    assert [c // sd21.heads(i) for i, c in enumerate(sd21.block_out_channels)] == [64, 64, 64, 64]
    assert sd21.heads(-1) == 20  # the mid block uses the last entry
    explicit = UNetConfig(attention_head_dim=64, num_attention_heads=(5, 10, 20, 20))
    assert [explicit.heads(i) for i in range(4)] == [5, 10, 20, 20]


def test_sd21_presets_match_diffusers_configs():
    sd21, inpaint = PRESETS["sd21"], PRESETS["sd2_inpaint"]
    assert sd21.use_linear_projection and sd21.upcast_attention and sd21.cross_attention_dim == 1024
    assert sd21.attention_head_dim == (5, 10, 20, 20) and sd21.sample_size == 96
    assert inpaint.in_channels == 9 and inpaint.use_linear_projection and inpaint.cross_attention_dim == 1024
    assert PRESETS["sd15_inpaint"].in_channels == 9 and PRESETS["sd15"].cross_attention_dim == 768


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_diffusers_config_round_trip(name):
    config = PRESETS[name]
    as_json = json.loads(json.dumps(config.to_diffusers()))
    assert as_json["_class_name"] == "UNet2DConditionModel"
    assert UNetConfig.from_diffusers(as_json) == config


def test_from_diffusers_ignores_metadata_and_accepts_lists():
    raw = dict(PRESETS["sd21"].to_diffusers(), _diffusers_version="0.8.0", _name_or_path="x")
    raw["block_out_channels"] = [320, 640, 1280, 1280]
    config = UNetConfig.from_diffusers(raw)
    assert config.block_out_channels == (320, 640, 1280, 1280) and config.attention_head_dim == (5, 10, 20, 20)


@pytest.mark.parametrize("key, value", [
    ("class_embed_type", "timestep"),
    ("only_cross_attention", True),
    ("dual_cross_attention", True),
    ("addition_embed_type", "text_time"),
    ("mid_block_type", "UNetMidBlock2DSimpleCrossAttn"),
    ("num_class_embeds", 1000),
    ("time_embedding_type", "fourier"),
    ("down_block_types", ["AttnDownBlock2D", "DownBlock2D"]),
    ("layers_per_block", [1, 2]),
    ("some_future_option", 1),
])
def test_from_diffusers_rejects_unsupported(key, value):
    raw = dict(PRESETS["tiny_sd1"].to_diffusers(), **{key: value})
    with pytest.raises(ValueError, match=key if key != "down_block_types" else "AttnDownBlock2D"):
        UNetConfig.from_diffusers(raw)


def test_config_validation():
    with pytest.raises(ValueError, match="same length"):
        dataclasses.replace(PRESETS["tiny_sd1"], block_out_channels=(32, 64, 64))
    with pytest.raises(ValueError, match="heads"):
        dataclasses.replace(PRESETS["tiny_sd1"], attention_head_dim=3)
    with pytest.raises(ValueError, match="norm_num_groups"):
        dataclasses.replace(PRESETS["tiny_sd1"], norm_num_groups=24)


# -- module ----------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny():
    config = PRESETS["tiny_sd1"]
    return config, random_params(config)


def test_scalar_timestep_broadcasts_and_remat_is_identical():
    """One compiled function, three variants: vector t, scalar t, remat; plus remat gradients."""
    config = MICRO
    params = random_params(config)
    sample, context = inputs(config, size=4)

    def run(params, t_vector, t_scalar):
        plain = UNet(config).apply({"params": params}, sample, t_vector, context)
        scalar = UNet(config).apply({"params": params}, sample, t_scalar, context)
        remat = UNet(config, remat=True).apply({"params": params}, sample, t_vector, context)
        return plain, scalar, remat

    plain, scalar, remat = jax.jit(run)(params, jnp.full((2,), 421.25), jnp.float32(421.25))
    assert plain.shape == (2, 4, 4, config.out_channels) and plain.dtype == jnp.float32
    assert np.all(np.isfinite(plain))
    np.testing.assert_array_equal(np.asarray(scalar), np.asarray(plain))
    np.testing.assert_allclose(np.asarray(remat), np.asarray(plain), rtol=0, atol=1e-6)

    def loss(params, remat_flag):
        out = UNet(config, remat=remat_flag).apply({"params": params}, sample, jnp.array([3.0, 700.5]), context)
        return jnp.mean(out ** 2)

    both = jax.jit(lambda p: (jax.grad(loss)(p, False), jax.grad(loss)(p, True)))
    g_plain, g_remat = both(params)
    flat_plain, flat_remat = traverse_util.flatten_dict(g_plain), traverse_util.flatten_dict(g_remat)
    assert flat_plain.keys() == flat_remat.keys()
    assert all(np.abs(v).max() > 0 for v in flat_plain.values())  # every parameter is used
    for key in flat_plain:
        np.testing.assert_allclose(flat_remat[key], flat_plain[key], rtol=1e-5, atol=1e-7, err_msg=str(key))


def test_fractional_timesteps_and_bfloat16_compute(tiny):
    config, params = tiny
    sample, context = inputs(config, batch=1)
    sample, context = np.repeat(sample, 2, 0), np.repeat(context, 2, 0)
    t = jnp.array([10.0, 10.5])

    def run(params):
        full = UNet(config).apply({"params": params}, sample, t, context)
        half = UNet(config, dtype=jnp.bfloat16).apply({"params": params}, sample, t, context)
        return full, half

    full, half = jax.jit(run)(params)
    full = np.asarray(full)
    assert np.abs(full[0] - full[1]).max() > 1e-4  # fractional timesteps are meaningful
    assert half.dtype == jnp.bfloat16
    half = np.asarray(half.astype(jnp.float32))
    assert np.all(np.isfinite(half))
    assert np.abs(half - full).max() <= 0.05 * np.abs(full).max()


def test_dtypes_reach_every_layer(tiny):
    config, _ = tiny
    sample, context = inputs(config, batch=1)
    abstract = jax.eval_shape(
        UNet(config, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16).init, jax.random.PRNGKey(0), sample,
        jnp.zeros((1,)), context)
    assert {leaf.dtype for leaf in jax.tree.leaves(abstract)} == {jnp.dtype(jnp.bfloat16)}
    out = jax.eval_shape(UNet(config, dtype=jnp.bfloat16).apply, {"params": abstract_params(config)}, sample,
                         jnp.zeros((1,)), context)
    assert out.dtype == jnp.bfloat16 and out.shape == sample.shape


@pytest.mark.parametrize("bad, match", [
    ("channels", "sample must be NHWC"),
    ("size", "multiples of 2"),
    ("context", "context must be"),
])
def test_input_validation(tiny, bad, match):
    config, params = tiny
    sample, context = inputs(config, batch=1)
    if bad == "channels":
        sample = sample[..., :3]
    elif bad == "size":
        sample = sample[:, :7, :7]
    else:
        context = context[..., :16]
    with pytest.raises(ValueError, match=match):
        UNet(config).apply({"params": params}, sample, jnp.zeros((1,)), context)


# -- key tables ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_table_covers_the_tree_exactly(name):
    config = PRESETS[name]
    table = diffusers_table(config)
    paths = [r.flax_path for r in table]
    keys = [r.torch_key for r in table]
    assert len(set(paths)) == len(paths) and len(set(keys)) == len(keys)
    assert set(paths) == set(traverse_util.flatten_dict(cached_abstract(name)))


def test_sd15_original_keys_spot_check():
    """Names as they appear in the released SD1.5 single-file checkpoint."""
    key_map = original_key_map(PRESETS["sd15"])
    assert len(key_map) == 686
    p = ORIGINAL_PREFIX
    expected = {
        f"{p}time_embed.0.weight": "time_embedding.linear_1.weight",
        f"{p}input_blocks.0.0.weight": "conv_in.weight",
        f"{p}input_blocks.1.0.in_layers.0.weight": "down_blocks.0.resnets.0.norm1.weight",
        f"{p}input_blocks.1.0.emb_layers.1.weight": "down_blocks.0.resnets.0.time_emb_proj.weight",
        f"{p}input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight":
            "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight",
        f"{p}input_blocks.3.0.op.weight": "down_blocks.0.downsamplers.0.conv.weight",
        f"{p}input_blocks.4.0.skip_connection.weight": "down_blocks.1.resnets.0.conv_shortcut.weight",
        f"{p}input_blocks.11.0.out_layers.3.bias": "down_blocks.3.resnets.1.conv2.bias",
        f"{p}middle_block.1.proj_in.weight": "mid_block.attentions.0.proj_in.weight",
        f"{p}middle_block.2.in_layers.2.weight": "mid_block.resnets.1.conv1.weight",
        f"{p}output_blocks.2.1.conv.weight": "up_blocks.0.upsamplers.0.conv.weight",
        f"{p}output_blocks.5.2.conv.weight": "up_blocks.1.upsamplers.0.conv.weight",
        f"{p}output_blocks.11.1.transformer_blocks.0.ff.net.0.proj.weight":
            "up_blocks.3.attentions.2.transformer_blocks.0.ff.net.0.proj.weight",
        f"{p}out.0.weight": "conv_norm_out.weight",
        f"{p}out.2.bias": "conv_out.bias",
    }
    for original, diffusers in expected.items():
        assert key_map[original] == diffusers


@pytest.fixture(scope="module")
def tiny_state(tiny):
    config, params = tiny
    return config, params_to_diffusers(params, config)


def test_diffusers_round_trip(tiny_state, tiny):
    config, state = tiny_state
    back = params_from_diffusers(state, config)
    jax.tree.map(np.testing.assert_array_equal, back, tiny[1])


def test_missing_key_is_named(tiny_state):
    config, state = tiny_state
    key = "up_blocks.1.attentions.1.transformer_blocks.0.attn2.to_k.weight"
    broken = {k: v for k, v in state.items() if k != key}
    with pytest.raises(ConversionError, match=key.replace(".", r"\.")):
        params_from_diffusers(broken, config, source="unet.safetensors")


def test_unexpected_key_is_named(tiny_state):
    config, state = tiny_state
    key = "down_blocks.0.attentions.0.transformer_blocks.1.norm1.weight"
    with pytest.raises(ConversionError, match=key.replace(".", r"\.")):
        params_from_diffusers(dict(state, **{key: np.zeros(32, np.float32)}), config)


def test_wrong_shape_is_named(tiny_state):
    config, state = tiny_state
    key = "mid_block.attentions.0.proj_in.weight"
    broken = dict(state, **{key: np.zeros((64, 32, 1, 1), np.float32)})  # SD1 tiny: [64, 64, 1, 1] expected
    with pytest.raises(ConversionError, match=key.replace(".", r"\.")):
        params_from_diffusers(broken, config)


def test_sd1_weights_do_not_load_into_sd2_architecture(tiny_state):
    """1x1-conv projections (SD1) given to a linear-projection config are refused, naming the tensor."""
    config, state = tiny_state
    linear = dataclasses.replace(config, use_linear_projection=True)
    with pytest.raises(ConversionError, match=r"proj_in\.weight"):
        params_from_diffusers(state, linear)


def test_abstract_params_are_cached_but_returned_as_fresh_trees():
    from jaxt2i import presets as pipeline_presets

    config = dataclasses.replace(PRESETS["tiny_sd1"], cross_attention_dim=24)  # a config no other test traced
    first = pipeline_presets.abstract_params("unet", config)
    hits = pipeline_presets._cached_abstract_params.cache_info().hits
    second = pipeline_presets.abstract_params("unet", config)
    assert pipeline_presets._cached_abstract_params.cache_info().hits == hits + 1  # not traced again
    assert jax.tree.map(lambda a: (a.shape, a.dtype), first) == jax.tree.map(lambda a: (a.shape, a.dtype), second)
    assert first is not second and first["conv_in"] is not second["conv_in"]
    first.pop("conv_in")  # mutating a returned tree does not reach the cache
    assert "conv_in" in pipeline_presets.abstract_params("unet", config)
