"""CLIP text encoder (JAX only): shapes, configs, pooling rule, layer selection, key-table errors."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxt2i.convert.clip_keys import (
    SD2_PREFIX,
    diffusers_to_original,
    normalize_text_encoder_keys,
    original_to_diffusers,
    text_encoder_to_flax,
    text_encoder_to_torch,
)
from jaxt2i.convert.core import ConversionError
from jaxt2i.models.clip import (
    PRESETS,
    CLIPTextConfig,
    CLIPTextModel,
    abstract_params,
    encode_text,
    eos_positions,
)


def count(tree):
    return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(tree))


@functools.lru_cache(maxsize=None)
def init(config, seed=0):
    """(model, params) with random parameters; cached per config (compiling is the slow part on CPU)."""
    model = CLIPTextModel(config)
    return model, jax.jit(model.init)(jax.random.PRNGKey(seed), jnp.zeros((1, 77), jnp.int32))["params"]


@functools.lru_cache(maxsize=None)
def jitted_apply(config, dtype=jnp.float32):
    return jax.jit(CLIPTextModel(config, dtype=dtype).apply)


def random_ids(batch=2, length=77, seed=0, eos=49407, pad=49407):
    rng = np.random.default_rng(seed)
    ids = np.full((batch, length), pad, np.int32)
    ids[:, 0] = 49406
    for b in range(batch):
        n = rng.integers(1, length - 2)
        ids[b, 1:n + 1] = rng.integers(0, 49405, n)
        ids[b, n + 1] = eos
    return jnp.asarray(ids)


def test_param_counts_of_presets():
    # OpenAI CLIP ViT-L/14 text tower: 123,060,480 parameters.
    assert count(abstract_params(PRESETS["sd15"])) == 123_060_480
    d, layers = 1024, 23
    per_layer = 4 * (d * d + d) + 2 * d * 4 * d + 4 * d + d + 4 * d
    assert count(abstract_params(PRESETS["sd21"])) == 49408 * d + 77 * d + layers * per_layer + 2 * d


def test_shapes_and_outputs():
    cfg = dataclasses.replace(PRESETS["tiny_sd1"], projection_dim=16)
    _, params = init(cfg)
    out = jitted_apply(cfg)({"params": params}, random_ids(3))
    assert out.last_hidden_state.shape == (3, 77, 32)
    assert len(out.hidden_states) == cfg.num_layers + 1
    assert all(h.shape == (3, 77, 32) for h in out.hidden_states)
    assert out.pooled.shape == (3, 32) and out.text_embeds.shape == (3, 16)
    out_short = jitted_apply(cfg)({"params": params}, random_ids(3)[:, :20])  # shorter sequences work too
    assert out_short.last_hidden_state.shape == (3, 20, 32)


def test_causal():
    cfg = PRESETS["tiny_sd2"]
    _, params = init(cfg)
    ids = random_ids(2, pad=0)
    changed = ids.at[0, 40].set(123)
    a = jitted_apply(cfg)({"params": params}, ids).last_hidden_state[:1]
    b = jitted_apply(cfg)({"params": params}, changed).last_hidden_state[:1]
    np.testing.assert_array_equal(a[:, :40], b[:, :40])
    assert not np.allclose(a[:, 40:], b[:, 40:])


def test_eos_rule():
    ids = jnp.asarray([[49406, 5, 49407, 49407, 49407], [49406, 49407, 0, 0, 0]])
    np.testing.assert_array_equal(eos_positions(ids, 2), [2, 1])  # legacy: argmax of the ids
    np.testing.assert_array_equal(eos_positions(ids, 49407), [2, 1])  # first EOS
    custom = jnp.asarray([[5, 7, 9, 3, 0]])
    assert int(eos_positions(custom, 2)[0]) == 2 and int(eos_positions(custom, 3)[0]) == 3


def test_pooled_is_final_ln_at_eos():
    _, params = init(PRESETS["tiny_sd1"])
    for eos_id, pad in ((2, 0), (49407, 49407)):
        cfg = dataclasses.replace(PRESETS["tiny_sd1"], eos_token_id=eos_id)
        ids = random_ids(2, pad=pad)
        out = jitted_apply(cfg)({"params": params}, ids)
        first_eos = np.argmax(np.asarray(ids) == 49407, axis=1)
        np.testing.assert_array_equal(out.pooled, np.asarray(out.last_hidden_state)[np.arange(2), first_eos])


def test_encode_text_layers():
    cfg = PRESETS["tiny_sd2"]
    model, params = init(cfg)
    ids = random_ids(2, pad=0)
    out = jitted_apply(cfg)({"params": params}, ids)
    encode = jax.jit(encode_text, static_argnames=("config", "layer"))
    np.testing.assert_allclose(encode(params, ids, config=cfg), out.last_hidden_state, atol=1e-6)
    final_ln = lambda h: model.apply({"params": params}, h, method=lambda m, x: m.final_layer_norm(x))
    for layer in (-2, 0, 1):
        np.testing.assert_allclose(encode(params, ids, config=cfg, layer=layer),
                                   final_ln(out.hidden_states[layer]), atol=1e-6)
    with pytest.raises(ValueError, match=f"does not exist in a {cfg.num_layers}-layer text encoder"):
        encode_text(params, ids, cfg, layer=cfg.num_layers + 1)
    # several layers: each one's state after the final LayerNorm, stacked in the order given
    both = encode(params, ids, config=cfg, layer=(-1, 0))
    assert both.shape == (2, 2, ids.shape[1], cfg.hidden_size)
    np.testing.assert_allclose(both, np.stack([out.last_hidden_state, final_ln(out.hidden_states[0])], 1),
                               atol=1e-6)
    for bad, message in (((), "at least one layer"), ((-1, cfg.num_layers), "same hidden state twice"),
                         ((0, 99), "does not exist"), ((0, "last"), "use an integer")):
        with pytest.raises(ValueError, match=message):
            encode_text(params, ids, cfg, layer=bad)


def test_bfloat16_compute():
    cfg = PRESETS["tiny_sd1"]
    _, params = init(cfg)
    ids = random_ids(2)
    ref = jitted_apply(cfg)({"params": params}, ids).last_hidden_state
    low = jitted_apply(cfg, jnp.bfloat16)({"params": params}, ids).last_hidden_state
    assert low.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(low, np.float32), ref, atol=0.1)
    stored = abstract_params(cfg, param_dtype=jnp.bfloat16)
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree_util.tree_leaves(stored))


def test_too_many_tokens():
    model, params = init(PRESETS["tiny_sd1"])
    with pytest.raises(ValueError, match="at most 77"):
        model.apply({"params": params}, jnp.zeros((1, 78), jnp.int32))


def test_config_round_trip():
    for name, cfg in PRESETS.items():
        assert CLIPTextConfig.from_diffusers(cfg.to_diffusers()) == cfg, name
    with_proj = dataclasses.replace(PRESETS["tiny_sd2"], projection_dim=8)
    assert CLIPTextConfig.from_diffusers(with_proj.to_diffusers()) == with_proj
    # A real SD 1.5 text_encoder/config.json: CLIPTextModel with a projection_dim it does not use.
    sd15_json = {"architectures": ["CLIPTextModel"], "hidden_act": "quick_gelu", "hidden_size": 768,
                 "intermediate_size": 3072, "num_attention_heads": 12, "num_hidden_layers": 12,
                 "projection_dim": 768, "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1,
                 "layer_norm_eps": 1e-05, "max_position_embeddings": 77, "vocab_size": 49408,
                 "model_type": "clip_text_model", "dropout": 0.0}
    assert CLIPTextConfig.from_diffusers(sd15_json) == PRESETS["sd15"]
    with pytest.raises(ValueError, match="hidden_act"):
        CLIPTextConfig(hidden_act="relu")


def random_state_dict(cfg, seed=0):
    """A transformers-layout state dict of a randomly initialised model (through our own export)."""
    _, params = init(cfg, seed)
    return text_encoder_to_torch(jax.device_get(params), cfg)


def test_flax_round_trip_both_key_layouts():
    cfg = PRESETS["tiny_sd1"]
    sd = random_state_dict(cfg)
    unprefixed = text_encoder_to_torch(text_encoder_to_flax(sd, cfg, source="t"), cfg, prefixed=False)
    assert not any(k.startswith("text_model.") for k in unprefixed)
    unprefixed["embeddings.position_ids"] = np.arange(77)[None]  # old checkpoints carry this buffer
    back = text_encoder_to_torch(text_encoder_to_flax(unprefixed, cfg, source="t"), cfg)
    assert back.keys() == sd.keys()
    for k in sd:
        np.testing.assert_array_equal(back[k], sd[k])


def test_conversion_errors_name_the_key():
    cfg = PRESETS["tiny_sd1"]
    sd = random_state_dict(cfg)
    missing = dict(sd)
    del missing["text_model.encoder.layers.1.mlp.fc2.bias"]
    with pytest.raises(ConversionError, match=r"missing .*text_model\.encoder\.layers\.1\.mlp\.fc2\.bias"):
        text_encoder_to_flax(missing, cfg, source="ckpt")
    unexpected = dict(sd, **{"text_model.encoder.layers.2.mlp.fc2.bias": np.zeros(32, np.float32)})
    with pytest.raises(ConversionError, match=r"unexpected .*text_model\.encoder\.layers\.2\.mlp\.fc2\.bias"):
        text_encoder_to_flax(unexpected, cfg, source="ckpt")
    wrong = dict(sd, **{"text_model.final_layer_norm.weight": np.ones(33, np.float32)})
    with pytest.raises(ConversionError, match=r"text_model\.final_layer_norm\.weight has shape \(33,\)"):
        text_encoder_to_flax(wrong, cfg, source="ckpt")
    # A plain CLIPTextModel checkpoint loaded into a config with a projection: the projection is missing.
    with pytest.raises(ConversionError, match="text_projection.weight"):
        text_encoder_to_flax(sd, dataclasses.replace(cfg, projection_dim=8), source="ckpt")


def test_original_layout_errors_name_the_key():
    cfg = PRESETS["tiny_sd2"]
    original = diffusers_to_original(random_state_dict(cfg), cfg, SD2_PREFIX)
    missing = dict(original)
    del missing[SD2_PREFIX + "transformer.resblocks.1.attn.in_proj_bias"]
    with pytest.raises(ConversionError, match=r"resblocks\.1\.attn\.in_proj_bias"):
        original_to_diffusers(missing, cfg, SD2_PREFIX)
    unexpected = dict(original, **{SD2_PREFIX + "transformer.resblocks.9.ln_1.weight": np.ones(32, np.float32)})
    with pytest.raises(ConversionError, match=r"resblocks\.9\.ln_1\.weight"):
        original_to_diffusers(unexpected, cfg, SD2_PREFIX)
    with pytest.raises(ConversionError, match="no text-encoder tensors"):
        original_to_diffusers(original, cfg, "cond_stage_model.transformer.")
    # The tensors of other models in the same file are not ours to judge.
    other = dict(original, **{"model.diffusion_model.x": np.zeros(1)})
    assert original_to_diffusers(other, cfg, SD2_PREFIX).keys() == normalize_text_encoder_keys(
        random_state_dict(cfg)).keys()


def test_find_prefix_and_config_from_original():
    from jaxt2i.convert.clip_keys import SD1_PREFIX, config_from_original, find_text_encoder_prefix

    for name, prefix in (("tiny_sd1", SD1_PREFIX), ("tiny_sd2", SD2_PREFIX)):
        cfg = PRESETS[name]
        original = diffusers_to_original(random_state_dict(cfg), cfg, prefix)
        original["model.diffusion_model.x"] = np.zeros(1)
        assert find_text_encoder_prefix(original) == prefix
        assert config_from_original(original, prefix, head_dim=cfg.head_dim) == cfg, name
    with pytest.raises(ConversionError, match="no text encoder"):
        find_text_encoder_prefix({"model.diffusion_model.x": np.zeros(1)})
