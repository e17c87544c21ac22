"""DiT module: shapes, configs (diffusers config.json of every accepted class name), presets, FLOPs, sharding."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from jaxt2i.convert.native import config_from_dict, config_to_dict
from jaxt2i.models.dit import PRESETS, DiT, DiTConfig, abstract_params
from jaxt2i.nn.attention import default_backend
from jaxt2i.nn.embeddings import sincos_position_table_2d
from jaxt2i.train import sharding

REPO = Path(__file__).resolve().parents[1]

TINY = PRESETS["tiny"]
TINY_TEXT = PRESETS["tiny_text"]


def random_tree(abstract, seed: int = 0, scale: float = 0.5):
    """Random parameters for an abstract tree (no XLA random init): N(0, scale^2 / fan_in) kernels."""
    rng = np.random.default_rng(seed)

    def one(leaf):
        fan_in = int(np.prod(leaf.shape[:-1])) if len(leaf.shape) > 1 else 1
        return (scale * rng.standard_normal(leaf.shape) / np.sqrt(fan_in)).astype(np.float32)

    return jax.tree.map(one, abstract)


def _inputs(config: DiTConfig, batch: int, height: int, width: int, length: int = 5, seed: int = 0):
    rng = np.random.default_rng(seed)
    sample = rng.standard_normal((batch, height, width, config.in_channels)).astype(np.float32)
    if config.conditioning == "class":
        return sample, rng.integers(0, config.num_classes + 1, batch).astype(np.int32)
    return sample, rng.standard_normal((batch, length, config.caption_channels)).astype(np.float32)


@pytest.mark.parametrize("config", [TINY, TINY_TEXT], ids=["class", "text"])
def test_shapes_any_latent_size(config):
    params = random_tree(abstract_params(config))
    apply = jax.jit(DiT(config).apply)
    for height, width in [(8, 8), (6, 12)]:  # the configured size, and a non-square one (table rebuilt)
        sample, condition = _inputs(config, 2, height, width)
        out = apply({"params": params}, sample, jnp.array([3.0, 999.0]), condition)
        assert out.shape == (2, height, width, 2 * config.in_channels)
        assert np.all(np.isfinite(out)) and np.abs(out).max() > 1e-3
    # a scalar timestep is broadcast over the batch
    scalar = apply({"params": params}, sample, 500.0, condition)
    both = apply({"params": params}, sample, jnp.array([500.0, 500.0]), condition)
    np.testing.assert_allclose(scalar, both, rtol=0, atol=1e-6)


def test_condition_changes_output_and_mask_hides_padding():
    params = random_tree(abstract_params(TINY))
    sample, _ = _inputs(TINY, 2, 8, 8)
    apply = jax.jit(DiT(TINY).apply)
    a = apply({"params": params}, sample, 10.0, jnp.array([1, 1]))
    b = apply({"params": params}, sample, 10.0, jnp.array([1, TINY.null_class]))
    np.testing.assert_allclose(a[0], b[0], rtol=0, atol=1e-6)
    assert np.abs(a[1] - b[1]).max() > 1e-3

    params = random_tree(abstract_params(TINY_TEXT))
    sample, states = _inputs(TINY_TEXT, 1, 8, 8)
    mask = np.array([[1, 1, 1, 0, 0]], np.float32)
    apply = jax.jit(DiT(TINY_TEXT).apply)
    masked = apply({"params": params}, sample, 10.0, states, condition_mask=mask)
    changed = states.copy()
    changed[:, 3:] += 5.0  # the padded positions change: a masked model does not see it
    np.testing.assert_allclose(apply({"params": params}, sample, 10.0, changed, condition_mask=mask), masked,
                               rtol=0, atol=1e-5)
    assert np.abs(apply({"params": params}, sample, 10.0, changed) - masked).max() > 1e-3


def test_init_zero_output_and_remat_same_values():
    """adaLN-Zero init: the output layer starts at zero; remat changes memory, not values or gradients."""
    config = dataclasses.replace(TINY, num_layers=1)
    sample, labels = _inputs(config, 2, 8, 8)
    variables = jax.jit(DiT(config).init)(jax.random.PRNGKey(0), sample, jnp.zeros(2), labels)
    assert np.abs(jax.jit(DiT(config).apply)(variables, sample, jnp.ones(2), labels)).max() == 0
    params = random_tree(abstract_params(config))

    def loss(p, model):
        return jnp.sum(model.apply({"params": p}, sample, jnp.array([1.0, 2.0]), labels) ** 2)

    plain = jax.jit(jax.grad(loss), static_argnums=1)(params, DiT(config))
    remat = jax.jit(jax.grad(loss), static_argnums=1)(params, DiT(config, remat=True))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), plain, remat)


def test_dropout_needs_rng_and_is_random():
    config = dataclasses.replace(TINY_TEXT, dropout=0.5)
    params = random_tree(abstract_params(config))
    sample, states = _inputs(config, 1, 8, 8)
    model = DiT(config)
    run = lambda seed: model.apply({"params": params}, sample, 1.0, states, deterministic=False,
                                   rngs={"dropout": jax.random.PRNGKey(seed)})
    assert np.abs(run(0) - run(1)).max() > 1e-3
    np.testing.assert_array_equal(model.apply({"params": params}, sample, 1.0, states),
                                  model.apply({"params": params}, sample, 1.0, states))


def test_input_errors():
    params = random_tree(abstract_params(TINY))
    model = DiT(TINY)
    with pytest.raises(ValueError, match="multiples of patch_size"):
        model.apply({"params": params}, np.zeros((1, 7, 8, 4)), 1.0, np.zeros(1, np.int32))
    with pytest.raises(ValueError, match="class ids"):
        model.apply({"params": params}, np.zeros((1, 8, 8, 4)), 1.0, np.zeros((1, 5, 32)))
    text_params = random_tree(abstract_params(TINY_TEXT))
    with pytest.raises(ValueError, match="text states"):
        DiT(TINY_TEXT).apply({"params": text_params}, np.zeros((1, 8, 8, 4)), 1.0, np.zeros((1, 5, 7)))


def test_position_table_layout():
    """Token h * W + w: first half encodes the column w, second half the row h; sin then cos per half."""
    table = sincos_position_table_2d(8, 2, 3)
    assert table.shape == (6, 8)
    token = 1 * 3 + 2  # h = 1, w = 2
    np.testing.assert_allclose(table[token, :4], [np.sin(2), np.sin(2 / 100), np.cos(2), np.cos(2 / 100)], rtol=1e-6)
    np.testing.assert_allclose(table[token, 4:], [np.sin(1), np.sin(1 / 100), np.cos(1), np.cos(1 / 100)], rtol=1e-6)
    # another grid covers the same range of positions when scaled to the training grid
    scaled = sincos_position_table_2d(8, 4, 4, base_size=2)
    np.testing.assert_allclose(scaled[2, :2], np.sin(np.array([1.0, 0.01])), rtol=1e-6)  # w = 2 -> position 1


# -- configs -----------------------------------------------------------------------------------------------------------

# The layouts of the published folders' transformer/config.json (legacy class name, norm_type decides).
LEGACY_DIT = {
    "_class_name": "Transformer2DModel", "_diffusers_version": "0.12.0.dev0", "activation_fn": "gelu-approximate",
    "attention_bias": True, "attention_head_dim": 72, "cross_attention_dim": None, "dropout": 0.0, "in_channels": 4,
    "norm_elementwise_affine": False, "norm_num_groups": 32, "norm_type": "ada_norm_zero", "num_attention_heads": 16,
    "num_embeds_ada_norm": 1000, "num_layers": 28, "num_vector_embeds": None, "only_cross_attention": False,
    "out_channels": 8, "patch_size": 2, "sample_size": 32, "upcast_attention": False, "use_linear_projection": False,
}
LEGACY_PIXART = {
    "_class_name": "Transformer2DModel", "activation_fn": "gelu-approximate", "attention_bias": True,
    "attention_head_dim": 72, "attention_type": "default", "caption_channels": 4096, "cross_attention_dim": 1152,
    "double_self_attention": False, "dropout": 0.0, "in_channels": 4, "norm_elementwise_affine": False,
    "norm_eps": 1e-06, "norm_num_groups": 32, "norm_type": "ada_norm_single", "num_attention_heads": 16,
    "num_embeds_ada_norm": 1000, "num_layers": 28, "num_vector_embeds": None, "only_cross_attention": False,
    "out_channels": 8, "patch_size": 2, "sample_size": 64, "upcast_attention": False, "use_linear_projection": False,
}


def test_from_diffusers_accepts_every_class_name():
    assert DiTConfig.from_diffusers(LEGACY_DIT) == PRESETS["DiT-XL/2"]
    assert DiTConfig.from_diffusers(LEGACY_PIXART) == PRESETS["PixArt-alpha-512"]
    assert DiTConfig.from_diffusers(dict(LEGACY_PIXART, sample_size=128)).use_additional_conditions
    assert DiTConfig.from_diffusers(dict(LEGACY_PIXART, sample_size=128)).interpolation_scale == 2.0
    for config in [*PRESETS.values(), dataclasses.replace(TINY_TEXT, sample_size=16, use_additional_conditions=True,
                                                          attention_head_dim=24, interpolation_scale=2.0)]:
        exported = config.to_diffusers()
        assert exported["_class_name"] == ("DiTTransformer2DModel" if config.conditioning == "class"
                                           else "PixArtTransformer2DModel")
        assert DiTConfig.from_diffusers(json.loads(json.dumps(exported))) == config
        assert config_from_dict(DiTConfig, json.loads(json.dumps(config_to_dict(config))), source="t") == config
    # entries at diffusers' defaults may be absent: out_channels None means in_channels for DiT, 8 for PixArt
    assert DiTConfig.from_diffusers({"_class_name": "DiTTransformer2DModel"}).out_channels == 4
    assert DiTConfig.from_diffusers({"_class_name": "PixArtTransformer2DModel", "caption_channels": 8,
                                     "sample_size": 64}).out_channels == 8


@pytest.mark.parametrize("change, message", [
    ({"_class_name": "UNet2DConditionModel"}, "expected a DiTTransformer2DModel"),
    ({"norm_type": "layer_norm"}, "Continuous-input"),
    ({"patch_size": None}, "patched-latent"),
    ({"activation_fn": "geglu"}, "activation_fn"),
    ({"norm_elementwise_affine": True}, "norm_elementwise_affine"),
    ({"cross_attention_dim": 768}, "no cross-attention"),
    ({"some_new_option": 1}, "unknown config entries"),
])
def test_from_diffusers_refuses_other_models(change, message):
    with pytest.raises(ValueError, match=message):
        DiTConfig.from_diffusers(dict(LEGACY_DIT, **change))


def test_text_config_errors():
    with pytest.raises(ValueError, match="caption projection"):
        DiTConfig.from_diffusers(dict(LEGACY_PIXART, caption_channels=None))
    with pytest.raises(ValueError, match="must equal the width"):
        DiTConfig.from_diffusers(dict(LEGACY_PIXART, cross_attention_dim=768))
    with pytest.raises(ValueError, match="inconsistent"):
        DiTConfig.from_diffusers({"_class_name": "PixArtTransformer2DModel", "norm_type": "ada_norm_zero"})
    with pytest.raises(ValueError, match="conditioning"):
        DiTConfig(conditioning="image")
    with pytest.raises(ValueError, match="patch_size"):
        DiTConfig(sample_size=9, patch_size=2)
    with pytest.raises(ValueError, match="resolution"):
        config = dataclasses.replace(TINY_TEXT, use_additional_conditions=True, attention_head_dim=24)
        sample, states = _inputs(config, 1, 8, 8)
        DiT(config).apply({"params": random_tree(abstract_params(config))}, sample, 1.0, states)


# -- presets -----------------------------------------------------------------------------------------------------------


def test_presets():
    for size, (depth, width, heads) in {"XL": (28, 1152, 16), "L": (24, 1024, 16), "B": (12, 768, 12),
                                        "S": (12, 384, 6)}.items():
        for patch in (2, 4, 8):
            config = PRESETS[f"DiT-{size}/{patch}"]
            assert (config.num_layers, config.width, config.num_attention_heads, config.patch_size) == (
                depth, width, heads, patch)
            assert config.learn_sigma and config.out_channels == 8 and config.num_classes == 1000
    assert PRESETS["PixArt-alpha-512"].conditioning == "text" and PRESETS["tiny_text"].conditioning == "text"


def test_xl2_parameter_count_is_the_papers():
    """675M (facebookresearch/DiT counts 675,129,632, its fixed 256x1152 position table included). Our tree holds
    diffusers' per-block copies of the timestep+label embedder: 27 extra copies."""
    config = PRESETS["DiT-XL/2"]
    flat = jax.tree_util.tree_flatten_with_path(abstract_params(config))[0]
    total = sum(int(np.prod(leaf.shape)) for _, leaf in flat)
    block_0_embedder = sum(int(np.prod(leaf.shape)) for path, leaf in flat
                           if path[0].key == "transformer_blocks_0" and path[2].key == "emb")
    position_table = (config.sample_size // config.patch_size) ** 2 * config.width
    shared = total - (config.num_layers - 1) * block_0_embedder
    assert shared + position_table == 675_129_632


def test_xl2_forward_flops_match_the_paper():
    """XLA's cost analysis of one XL/2 forward (32x32 latents, batch 1): 118.6 GFLOPs (multiply-adds) published."""
    config = PRESETS["DiT-XL/2"]
    args = (jax.ShapeDtypeStruct((1, 32, 32, 4), jnp.float32), jax.ShapeDtypeStruct((1,), jnp.float32),
            jax.ShapeDtypeStruct((1,), jnp.int32))
    with default_backend("xla"):
        lowered = jax.jit(DiT(config).apply).lower({"params": abstract_params(config)}, *args)
    multiply_adds = lowered.cost_analysis()["flops"] / 2
    assert abs(multiply_adds / 118.6e9 - 1) < 0.01, multiply_adds


# -- sharding ----------------------------------------------------------------------------------------------------------


def test_logical_axes_map_to_mesh_axes():
    boxed = abstract_params(TINY, boxed=True)
    block = boxed["transformer_blocks_0"]
    assert isinstance(block["attn1"]["query"]["kernel"], nn.LogicallyPartitioned)
    mesh = sharding.make_mesh(sharding.MeshConfig(), jax.devices()[:1])
    specs = sharding.param_shardings(boxed, mesh)
    block = specs["transformer_blocks_0"]
    assert block["attn1"]["query"]["kernel"].spec == P("fsdp", "tensor")
    assert block["attn1"]["out"]["kernel"].spec == P("tensor", "fsdp")
    assert block["ff"]["proj"]["kernel"].spec == P("fsdp", "tensor")
    assert block["norm1"]["linear"]["kernel"].spec == P("fsdp", "tensor")
    assert block["norm1"]["emb"]["class_embedder"]["embedding"].spec == P(None, "fsdp")
    assert specs["pos_embed"]["proj"]["kernel"].spec == P(None, None, None, "fsdp")
    # plain trees (conversion) carry no boxes
    is_box = lambda x: isinstance(x, nn.LogicallyPartitioned)
    assert not any(is_box(x) for x in jax.tree.leaves(abstract_params(TINY), is_leaf=is_box))


_SHARDED_STATE_SCRIPT = textwrap.dedent("""
    import jax, jax.numpy as jnp
    from jax.sharding import PartitionSpec as P
    from jaxt2i.models import dit
    from jaxt2i.train import sharding
    from jaxt2i.train.optim import OptimConfig
    from jaxt2i.train.state import TrainableConfig, init_train_state
    config = dit.PRESETS["tiny_text"]
    args, kwargs = dit.dummy_inputs(config)
    init = lambda key: dit.DiT(config).init(key, *[jnp.zeros(a.shape, a.dtype) for a in args], **kwargs)["params"]
    mesh = sharding.make_mesh(sharding.MeshConfig(data=2, fsdp=4))
    state, _ = init_train_state({"dit": init}, None, ["dit"], OptimConfig(), TrainableConfig(), mesh)
    for tree in (state.params, state.opt_state[1][0].mu):
        kernel = jax.tree.leaves(tree["dit"]["transformer_blocks_1"]["ff"]["proj"]["kernel"])[0]
        assert kernel.sharding.spec == P("fsdp", "tensor"), kernel.sharding.spec
        assert kernel.addressable_shards[0].data.shape == (32 // 4, 128), kernel.addressable_shards[0].data.shape
    print("ok")
""")


def test_train_state_shards_over_fsdp_mesh():
    """The trainer places the DiT's annotated kernels by the logical rules on a data x fsdp = 2 x 4 host mesh."""
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu",
               PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    result = subprocess.run([sys.executable, "-c", _SHARDED_STATE_SCRIPT], env=env, cwd=str(REPO),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-3000:]
