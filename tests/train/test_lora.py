"""LoRA adapters: targets, merge == separate low-rank path, save/load on their own, training only the adapters."""

from __future__ import annotations

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from jaxt2i.diffusion.losses import LossConfig
from jaxt2i.models.latent_diffusion import Models
from jaxt2i.train import lora, sharding
from jaxt2i.train.optim import OptimConfig
from jaxt2i.train.state import TrainableConfig, trained_components

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_sharding import cached_batch, denoiser, denoiser_params, diffusion_run, flat_numpy  # noqa: E402


def _random_adapters(params, rank, seed):
    """Adapters with B != 0 (a fresh adapter is the identity, which would make the merge test vacuous)."""
    adapters = lora.init_lora(params, rank, jax.random.PRNGKey(seed))
    rng = np.random.default_rng(seed)
    flat = traverse_util.flatten_dict(adapters)
    for k, v in flat.items():
        if k[-1] == "lora_b":
            flat[k] = jnp.asarray(0.1 * rng.standard_normal(v.shape), jnp.float32)
    return traverse_util.unflatten_dict(flat)


def test_targets_are_attention_projections_of_real_unet():
    from jaxt2i.models.unet import PRESETS, abstract_params

    tree = abstract_params(PRESETS["tiny_sd1"])
    targets = lora.lora_target_paths(tree)
    assert {p[-1] for p in targets} == {"query", "key", "value", "out"}
    assert {p[-2] for p in targets} == {"attn1", "attn2"}
    blocks = {p[:-2] for p in targets}
    assert len(targets) == 8 * len(blocks)  # 4 projections x (self + cross) per transformer block
    adapters = lora.init_lora(tree, 4, jax.random.PRNGKey(0))
    for path in targets:
        node = adapters
        for key in path:
            node = node[key]
        kernel = tree
        for key in path:
            kernel = kernel[key]
        assert node["lora_a"].shape == (kernel["kernel"].shape[0], 4)
        assert node["lora_b"].shape == (4, kernel["kernel"].shape[1])


def test_merged_apply_equals_adapter_apply_real_unet():
    from jaxt2i.models.unet import PRESETS, UNet

    module = UNet(PRESETS["tiny_sd1"])
    params = jax.tree.map(jnp.asarray, denoiser_params(module, seed=3))
    adapters = _random_adapters(params, rank=4, seed=5)
    alpha = 8.0
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((2, 8, 8, 4)), jnp.float32)
    t = jnp.asarray([10.0, 500.0])
    ctx = jnp.asarray(rng.standard_normal((2, 77, 32)), jnp.float32)

    apply = jax.jit(lambda p: module.apply({"params": p}, x, t, ctx))
    merged = apply(lora.merge_lora(params, adapters, alpha))
    separate = jax.jit(lambda p, a: lora.apply_with_lora(module, {"params": p}, a, alpha, x, t, ctx))(params, adapters)
    base = apply(params)
    np.testing.assert_allclose(np.asarray(merged), np.asarray(separate), rtol=1e-4, atol=1e-5)
    # the adapters matter: the comparison above is not between two copies of the base output
    assert float(jnp.max(jnp.abs(merged - base))) > 100 * float(jnp.max(jnp.abs(merged - separate)))


def test_fresh_adapters_are_identity_and_merge_touches_only_targets():
    module = denoiser("stand_in")
    params = jax.tree.map(jnp.asarray, denoiser_params(module))
    fresh = lora.init_lora(params, 2, jax.random.PRNGKey(0))
    merged = flat_numpy(lora.merge_lora(params, fresh, 4.0))
    base = flat_numpy(params)
    for k, v in base.items():
        np.testing.assert_array_equal(merged[k], v, err_msg=k)
    changed = flat_numpy(lora.merge_lora(params, _random_adapters(params, 2, 1), 4.0))
    targets = {"/".join(p + ("kernel",)) for p in lora.lora_target_paths(params)}
    for k, v in base.items():
        assert np.array_equal(changed[k], v) == (k not in targets), k
    # W' = W + (alpha / r) A B
    path = lora.lora_target_paths(params)[0]
    ad = _random_adapters(params, 2, 1)
    for key in path:
        ad = ad[key]
    key = "/".join(path + ("kernel",))
    np.testing.assert_allclose(changed[key], base[key] + 2.0 * np.asarray(ad["lora_a"]) @ np.asarray(ad["lora_b"]),
                               rtol=1e-5, atol=1e-6)


def test_save_and_load_adapters_alone(tmp_path):
    module = denoiser("stand_in")
    params = jax.tree.map(jnp.asarray, denoiser_params(module))
    adapters = _random_adapters(params, 3, 2)
    path = tmp_path / "lora.safetensors"
    lora.save_lora(str(path), adapters, alpha=6.0)
    loaded, alpha = lora.load_lora(str(path))
    assert alpha == 6.0
    want, got = flat_numpy(adapters), flat_numpy(loaded)
    assert got.keys() == want.keys()
    assert all(k.endswith(("lora_a", "lora_b")) for k in got)  # adapters only, no base weights
    for k in want:
        np.testing.assert_array_equal(got[k], want[k])
    other = tmp_path / "plain.safetensors"
    from safetensors.numpy import save_file

    save_file({"w": np.zeros(2, np.float32)}, str(other))
    with pytest.raises(ValueError, match="not a jaxt2i LoRA file"):
        lora.load_lora(str(other))


def test_merge_rejects_mismatched_adapters():
    module = denoiser("stand_in")
    params = jax.tree.map(jnp.asarray, denoiser_params(module))
    bad = {"block": {"attn1": {"query": {"lora_a": jnp.zeros((5, 2)), "lora_b": jnp.zeros((2, 32))}}}}
    with pytest.raises(ValueError, match="does not match"):
        lora.merge_lora(params, bad, 1.0)
    with pytest.raises(ValueError, match="no kernel"):
        lora.merge_lora(params, {"nope": {"lora_a": jnp.zeros((1, 1)), "lora_b": jnp.zeros((1, 1))}}, 1.0)


def test_lora_training_updates_only_adapters():
    module = denoiser("stand_in")
    trainable = TrainableConfig("lora", lora_rank=2, lora_alpha=4.0)
    optim = OptimConfig(lr=1e-2, warmup_steps=0, total_steps=5, ema_decay=0.5)
    mesh = sharding.make_mesh(sharding.MeshConfig(), jax.devices()[:1])
    state, step = diffusion_run(Models(None, None, module), {"unet": denoiser_params(module)}, optim, trainable,
                                LossConfig(cond_dropout=0.2), mesh)
    base = flat_numpy(state.frozen["unet"])
    assert all(k.endswith(("lora_a", "lora_b")) for k in flat_numpy(state.params))
    for _ in range(2):
        state, metrics = step(state, cached_batch(4))
        assert np.isfinite(float(metrics["loss"]))
    for k, v in flat_numpy(state.frozen["unet"]).items():
        np.testing.assert_array_equal(v, base[k], err_msg=k)
    adapters = flat_numpy(state.params)
    assert adapters and all(np.abs(v).max() > 0 for k, v in adapters.items() if k.endswith("lora_b"))
    merged = flat_numpy(trained_components(state, trainable)["unet"])
    expected = flat_numpy(lora.merge_lora(state.frozen["unet"], state.params["unet"], 4.0))
    for k in expected:
        np.testing.assert_array_equal(merged[k], expected[k])
