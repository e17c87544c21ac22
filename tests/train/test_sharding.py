"""Mesh, logical rules and FSDP placement; the sharded train step (jit and shard_map forms) equals the 1-device step.

JAX fixes its device count at import, so the multi-device runs happen in a subprocess started with
XLA_FLAGS=--xla_force_host_platform_device_count=8; this file is also that subprocess's script
(``python tests/train/test_sharding.py run ...``) and holds the small stand-in denoiser the fast tests train
(the real U-Net's compile takes ~10 s of CPU per program; the slow variant runs the same matrix with it).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import einops
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util
from jax.sharding import AbstractMesh, PartitionSpec as P

from jaxt2i.nn.attention import MultiHeadAttention
from jaxt2i.nn.embeddings import sinusoidal_embedding
from jaxt2i.train import sharding
from jaxt2i.train.sharding import MeshConfig
from tests.weights import random_params

HERE = Path(__file__).resolve()
REPO = HERE.parents[2]


# ---------------------------------------------------------------------------------------------------------------
# A small denoiser with the U-Net's interface (conv in/out, time embedding, self- and cross-attention blocks).
# ---------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TinyDenoiserConfig:
    in_channels: int = 4
    channels: int = 32
    cross_attention_dim: int = 32
    heads: int = 2
    num_blocks: int = 1  # latents need no particular multiple


class _Block(nn.Module):
    heads: int
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, context):  # [B, L, C], [B, Lc, D]
        c = x.shape[-1]
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        attn = lambda name: MultiHeadAttention(self.heads, c // self.heads, out_bias=True, name=name, **kw)
        x = x + attn("attn1")(nn.LayerNorm(name="norm1", **kw)(x))
        x = x + attn("attn2")(nn.LayerNorm(name="norm2", **kw)(x), context)
        h = nn.gelu(nn.Dense(2 * c, name="ff_in", **kw)(nn.LayerNorm(name="norm3", **kw)(x)))
        return x + nn.Dense(c, name="ff_out", **kw)(h)


class TinyDenoiser(nn.Module):
    """``(sample [B,H,W,C], timesteps [B], context [B,L,D]) -> [B,H,W,C]`` like jaxt2i's UNet."""

    config: TinyDenoiserConfig
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    remat: bool = False

    @nn.compact
    def __call__(self, sample, timesteps, context, deterministic: bool = True):
        cfg, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = nn.Conv(cfg.channels, (3, 3), name="conv_in", **kw)(sample.astype(self.dtype))
        temb = sinusoidal_embedding(jnp.broadcast_to(timesteps, (sample.shape[0],)), cfg.channels)
        h = h + nn.Dense(cfg.channels, name="time_proj", **kw)(temb.astype(self.dtype))[:, None, None, :]
        h = nn.silu(nn.GroupNorm(num_groups=8, name="norm_in", **kw)(h))
        tokens = einops.rearrange(h, "b h w c -> b (h w) c")
        block = nn.remat(_Block) if self.remat else _Block
        tokens = block(cfg.heads, name="block", **kw)(tokens, context.astype(self.dtype))
        h = einops.rearrange(tokens, "b (h w) c -> b h w c", h=sample.shape[1])
        return nn.Conv(cfg.in_channels, (3, 3), name="conv_out", **kw)(nn.silu(h))


# ---------------------------------------------------------------------------------------------------------------
# Shared helpers (also imported by the other train-core tests)
# ---------------------------------------------------------------------------------------------------------------


def denoiser(kind: str, **kw):
    """('stand_in' | 'real' | 'dit') -> module instance of the U-Net interface (the DiT: text-conditioned, learned
    variance, one transformer block)."""
    if kind == "dit":
        from jaxt2i.models.dit import PRESETS, DiT

        return DiT(dataclasses.replace(PRESETS["tiny_text"], caption_channels=32, num_layers=1), **kw)
    if kind == "real":
        from jaxt2i.models.unet import PRESETS, UNet

        # 8 channels per GroupNorm group: with tiny_sd1's one channel per group, the bias in front of each norm
        # has an exactly-zero gradient, and Adam turns its round-off into O(lr) updates that differ run to run.
        return UNet(dataclasses.replace(PRESETS["tiny_sd1"], norm_num_groups=8), **kw)
    return TinyDenoiser(TinyDenoiserConfig(), **kw)


def denoiser_params(module, seed: int = 0):
    cfg = module.config
    side = getattr(cfg, "patch_size", None) or 2 ** (cfg.num_blocks - 1)
    width = getattr(cfg, "caption_channels", None) or cfg.cross_attention_dim
    sample = jax.ShapeDtypeStruct((1, side, side, cfg.in_channels), jnp.float32)
    abstract = jax.eval_shape(module.init, jax.random.PRNGKey(0), sample, jax.ShapeDtypeStruct((1,), jnp.float32),
                              jax.ShapeDtypeStruct((1, 1, width), jnp.float32))["params"]
    return random_params(nn.unbox(abstract), seed)


def cached_batch(batch_size: int, side: int = 8, dim: int = 32, seed: int = 1) -> dict:
    rng = np.random.default_rng(seed)
    return {
        "latents": rng.standard_normal((batch_size, side, side, 4)).astype(np.float32),
        "text_states": rng.standard_normal((batch_size, 77, dim)).astype(np.float32),
        "uncond_text_states": rng.standard_normal((77, dim)).astype(np.float32),
    }


def diffusion_run(models, given, optim, trainable, loss, mesh, *, seed: int = 0, form: str = "jit",
                  overrides=None, schedule=None):
    """``(state, step)`` of the ``unet`` kind's objective on ``models`` (a latent_diffusion.Models): the U-Net (and
    conditioner) train, the other modules are frozen; ``given``: ``{component: starting tree}``."""
    from jaxt2i.diffusion.schedules import ScheduleConfig
    from jaxt2i.train.kinds.diffusion import DiffusionLoss, component_initializers
    from jaxt2i.train.state import init_train_state
    from jaxt2i.train.step import make_train_step

    denoiser_name = models.denoiser_name
    trained = (denoiser_name, "conditioner") if models.conditioner is not None else (denoiser_name,)
    state, shardings = init_train_state(component_initializers(models), given, trained, optim, trainable, mesh,
                                        seed=seed, overrides=overrides)
    step = make_train_step(DiffusionLoss(models, schedule or ScheduleConfig(), loss, uncond_ids=None), optim,
                           trainable, mesh=mesh, state_shardings=shardings, form=form)
    return state, step


def flat_numpy(tree) -> dict[str, np.ndarray]:
    return {"/".join(k): np.asarray(v) for k, v in traverse_util.flatten_dict(jax.device_get(tree)).items()}


def relative_errors(got: dict, ref: dict) -> dict[str, float]:
    """Per-leaf ||got - ref|| / ||ref||."""
    assert got.keys() == ref.keys()
    return {k: float(np.linalg.norm(got[k] - ref[k]) / max(np.linalg.norm(ref[k]), 1e-30)) for k in ref}


# ---------------------------------------------------------------------------------------------------------------
# The worker: runs a few train steps on one or several meshes and saves the resulting params.
# ---------------------------------------------------------------------------------------------------------------

GLOBAL_BATCH = 8
STEPS = 2


def _run_configs(kind: str, configs: list[str], out: str, multiprocess: bool) -> None:
    from jax.experimental import multihost_utils

    from jaxt2i.diffusion.losses import LossConfig
    from jaxt2i.models.latent_diffusion import Models
    from jaxt2i.train import distributed
    from jaxt2i.train.optim import OptimConfig
    from jaxt2i.train.state import TrainableConfig

    if multiprocess:
        assert distributed.maybe_initialize(), "expected JAXT2I_* variables for a multi-process run"
    module = denoiser(kind)
    component = "transformer" if kind == "dit" else "unet"
    models = Models(text_encoder=None, vae=None, denoiser=module, denoiser_name=component)
    params = denoiser_params(module)
    batch = cached_batch(GLOBAL_BATCH)
    optim = OptimConfig(lr=1e-3, warmup_steps=1, total_steps=10, weight_decay=0.01, grad_clip_norm=1.0, ema_decay=0.9)
    # the DiT's learned variance trains with the hybrid objective, which is DiT's epsilon objective
    target = "epsilon" if kind == "dit" else "v_prediction"
    loss = LossConfig(prediction_target=target, min_snr_gamma=5.0, cond_dropout=0.5)
    trainable = TrainableConfig("full")
    results = {}
    for spec in configs:
        shape, form = spec.split(":")
        data, fsdp = (int(x) for x in shape.split("x"))
        devices = jax.devices()[: data * fsdp]
        mesh = sharding.make_mesh(MeshConfig(data=data, fsdp=fsdp), devices)
        state, step = diffusion_run(models, {component: params}, optim, trainable, loss, mesh, seed=3, form=form)
        fsdp_sharded = [x for x in jax.tree.leaves(state.params) if x.sharding.spec != P()]
        rows = sharding.host_batch_slice(GLOBAL_BATCH, mesh)
        local = {k: (v if k in sharding.SHARED_KEYS else v[rows]) for k, v in batch.items()}
        losses = []
        for _ in range(STEPS):
            state, metrics = step(state, local)
            losses.append(float(metrics["loss"]))
        trees = {"params": state.params, "ema": state.ema_params, "mu": state.opt_state[1][0].mu}
        if multiprocess:
            trees = multihost_utils.process_allgather(trees, tiled=True)
        for name, tree in trees.items():
            for k, v in flat_numpy(tree).items():
                results[f"{spec}|{name}|{k}"] = v
        results[f"{spec}|losses"] = np.asarray(losses)
        results[f"{spec}|num_sharded"] = np.asarray(len(fsdp_sharded))
    if jax.process_index() == 0:
        np.savez(out, **results)


def run_worker(args: list[str], devices: int, extra_env: dict | None = None, timeout: int = 900):
    env = dict(os.environ)
    env.update(
        # LLVM optimisation off: every configuration compiles ~2x faster and all of them run the same way
        XLA_FLAGS=f"--xla_force_host_platform_device_count={devices} --xla_backend_optimization_level=0 "
        "--xla_llvm_disable_expensive_passes=true",
        JAX_PLATFORMS="cpu",
        JAX_DEFAULT_MATMUL_PRECISION="highest",
        PYTHONPATH=str(REPO) + os.pathsep + env.get("PYTHONPATH", ""),
    )
    env.update(extra_env or {})
    return subprocess.Popen([sys.executable, str(HERE), *args], env=env, cwd=str(REPO),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(proc, timeout: int = 900) -> str:
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, f"worker failed (exit {proc.returncode}):\n{out[-6000:]}"
    return out


def load_results(path) -> dict:
    with np.load(path) as f:
        return {k: f[k] for k in f.files}


def split_results(results: dict, spec: str) -> dict:
    prefix = spec + "|"
    return {k[len(prefix):]: v for k, v in results.items() if k.startswith(prefix)}


def zero_gradient_leaves(results: dict) -> list[str]:
    """Attention key biases: softmax ignores a shift shared by all keys, so their gradient is zero in exact
    arithmetic and round-off; Adam turns that round-off into O(lr) updates that differ between layouts. Checked
    here to be round-off (their first moment ~ 0.1 x the gradient), so they can be left out of the comparison."""
    leaves = [k for k in results if k.endswith("key/bias") and "|" in k]
    for k in (k for k in leaves if k.startswith("mu|")):
        assert float(np.max(np.abs(results[k]))) < 1e-7, (k, float(np.max(np.abs(results[k]))))
    return leaves


def assert_same_training(got: dict, ref: dict, rtol: float = 1e-5):
    np.testing.assert_allclose(got["losses"], ref["losses"], rtol=rtol)
    skipped = set(zero_gradient_leaves(ref)) | set(zero_gradient_leaves(got))
    tensors = {k: v for k, v in ref.items() if "|" in k and k not in skipped}
    errors = relative_errors({k: got[k] for k in tensors}, tensors)
    worst = max(errors, key=errors.get)
    assert errors[worst] <= rtol, f"{worst}: relative error {errors[worst]:.2e} > {rtol}"


# ---------------------------------------------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------------------------------------------

MATRIX = ["8x1:jit", "4x2:jit", "1x8:jit", "8x1:shard_map", "4x2:shard_map", "1x8:shard_map"]


def _matrix(kind: str, tmp_path, matrix=tuple(MATRIX)):
    out = tmp_path / "matrix.npz"
    finish(run_worker(["run", kind, ",".join(["1x1:jit", *matrix]), str(out)], devices=8))
    results = load_results(out)
    ref = split_results(results, "1x1:jit")
    assert int(ref["num_sharded"]) == 0
    for spec in matrix:
        got = split_results(results, spec)
        assert_same_training(got, ref)
        if not spec.startswith("8x1"):
            assert int(got["num_sharded"]) > 0, f"{spec}: FSDP sharded no parameter"
    # the run trained: parameters moved away from their initial values
    assert not np.allclose(ref["losses"][0], ref["losses"][1])


def test_sharded_steps_equal_single_device(tmp_path):
    _matrix("stand_in", tmp_path)


@pytest.mark.slow
def test_sharded_steps_equal_single_device_real_unet(tmp_path):
    _matrix("real", tmp_path)


def test_sharded_steps_equal_single_device_dit(tmp_path):
    """The text DiT (parameters placed by its logical axis names) on a data x fsdp mesh, both step forms."""
    _matrix("dit", tmp_path, ("4x2:jit", "4x2:shard_map"))


def test_mesh_config_shapes():
    assert MeshConfig().shape(8) == (8, 1, 1)
    assert MeshConfig(data=-1, fsdp=2).shape(8) == (4, 2, 1)
    assert MeshConfig(data=1, fsdp=-1).shape(8) == (1, 8, 1)
    with pytest.raises(ValueError, match="devices"):
        MeshConfig(data=3, fsdp=1).shape(8)
    with pytest.raises(ValueError, match="at most one"):
        MeshConfig(data=-1, fsdp=-1).shape(8)
    mesh = sharding.make_mesh(MeshConfig(), jax.devices()[:1])
    assert mesh.axis_names == ("data", "fsdp", "tensor")


def test_fsdp_spec_picks_largest_divisible_dim():
    mesh = AbstractMesh((4, 2, 1), ("data", "fsdp", "tensor"))
    assert sharding.fsdp_spec((3, 3, 64, 128), mesh) == P(None, None, None, "fsdp")
    assert sharding.fsdp_spec((320, 77), mesh) == P("fsdp", None)
    assert sharding.fsdp_spec((33, 35), mesh, min_size=0) == P()  # nothing divisible
    assert sharding.fsdp_spec((64,), mesh) == P()  # below min_size: replicated
    assert sharding.fsdp_spec((), mesh) == P()
    no_fsdp = AbstractMesh((8, 1, 1), ("data", "fsdp", "tensor"))
    assert sharding.fsdp_spec((3, 3, 64, 128), no_fsdp) == P()


def test_rules_are_data():
    mesh = AbstractMesh((4, 2, 1), ("data", "fsdp", "tensor"))
    assert sharding.batch_axes(mesh) == ("data", "fsdp")
    only_data = (("batch", "data"), ("fsdp", None))
    assert sharding.batch_axes(mesh, only_data) == ("data",)
    assert sharding.fsdp_spec((1024, 1024), mesh, only_data) == P()
    # parameters annotated with logical names follow the rules instead of the heuristic
    boxed = {"w": nn.LogicallyPartitioned(jax.ShapeDtypeStruct((64, 128), jnp.float32), ("embed", "mlp"))}
    real_mesh = sharding.make_mesh(MeshConfig(), jax.devices()[:1])
    spec = sharding.param_shardings(boxed, real_mesh)["w"].spec
    assert spec == P("fsdp", "tensor")


def test_host_batch_slice_single_process():
    mesh = sharding.make_mesh(MeshConfig(), jax.devices()[:1])
    assert sharding.host_batch_slice(8, mesh) == slice(0, 8)
    assert sharding.local_batch_size(8, mesh) == 8


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["run", "multiprocess"])
    parser.add_argument("kind", choices=["stand_in", "real", "dit"])
    parser.add_argument("configs")
    parser.add_argument("out")
    a = parser.parse_args()
    _run_configs(a.kind, a.configs.split(","), a.out, multiprocess=a.mode == "multiprocess")
    print(json.dumps({"ok": True, "process": jax.process_index()}))
