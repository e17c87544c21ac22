"""Training objective pieces (targets, min-SNR, condition dropout), optimizer schedule, EMA, and the train step."""

from __future__ import annotations

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxt2i.diffusion import losses, schedules
from jaxt2i.diffusion.losses import LossConfig
from jaxt2i.diffusion.schedules import ScheduleConfig
from jaxt2i.models.conditioner import Conditioner, ConditionerConfig
from jaxt2i.models.latent_diffusion import Models
from jaxt2i.train import sharding
from jaxt2i.train.kinds.diffusion import DiffusionLoss
from jaxt2i.train.optim import OptimConfig, ema_update, learning_rate_schedule
from jaxt2i.train.state import TrainableConfig, split_attention, trained_components
from jaxt2i.train.step import example_keys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_sharding import cached_batch, denoiser, denoiser_params, diffusion_run, flat_numpy  # noqa: E402

ABAR = schedules.alphas_cumprod(ScheduleConfig())


def _mesh():
    return sharding.make_mesh(sharding.MeshConfig(), jax.devices()[:1])


# -- objective pieces --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("target", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("gamma", [1.0, 5.0])
def test_min_snr_weights_match_formula(target, gamma):
    t = np.array([0, 10, 100, 400, 700, 999])
    abar = ABAR[t].astype(np.float64)
    snr = abar / (1 - abar)
    expected = {
        "epsilon": np.minimum(snr, gamma) / snr,
        "v_prediction": np.minimum(snr, gamma) / (snr + 1),
        "sample": np.minimum(snr, gamma),
    }[target]
    got = np.asarray(losses.min_snr_weights(jnp.asarray(ABAR[t]), gamma, target))
    np.testing.assert_allclose(got, expected, rtol=1e-5)
    np.testing.assert_array_equal(np.asarray(losses.min_snr_weights(jnp.asarray(ABAR[t]), None, target)), 1.0)


def test_noisy_sample_and_targets_agree_with_schedule():
    cfg = ScheduleConfig()
    rng = np.random.default_rng(0)
    x0 = jnp.asarray(rng.standard_normal((3, 4, 4, 2)), jnp.float32)
    eps = jnp.asarray(rng.standard_normal((3, 4, 4, 2)), jnp.float32)
    t = np.array([5, 500, 990])
    abar = jnp.asarray(ABAR[t])
    x_t = losses.noisy_sample(x0, eps, abar)
    np.testing.assert_allclose(x_t, schedules.add_noise(x0, eps, t, cfg), rtol=1e-6, atol=1e-6)
    v = losses.training_target(x0, eps, abar, "v_prediction")
    np.testing.assert_allclose(v, schedules.velocity(x0, eps, t, cfg), rtol=1e-6, atol=1e-6)
    # each target, fed back as a prediction of its own kind, recovers (x0, eps)
    a = abar.reshape(-1, 1, 1, 1)
    for kind in ("epsilon", "v_prediction", "sample"):
        rec_x0, rec_eps = schedules.vp_to_x0_eps(losses.training_target(x0, eps, abar, kind), x_t, a, kind)
        np.testing.assert_allclose(rec_x0, x0, atol=2e-3)
        np.testing.assert_allclose(rec_eps, eps, atol=2e-3)


@pytest.mark.parametrize("p", [0.1, 0.3])
def test_condition_dropout_rate(p):
    n = 20_000
    keys = example_keys(jax.random.PRNGKey(7), jnp.int32(0), n)
    rate = float(jnp.mean(losses.dropout_mask(keys, p)))
    sigma = np.sqrt(p * (1 - p) / n)
    assert abs(rate - p) < 5 * sigma, f"dropout rate {rate:.4f} vs p={p} (sigma {sigma:.4f})"


def test_drop_condition_replaces_exactly_masked_rows():
    ctx = jnp.arange(4 * 3 * 2, dtype=jnp.float32).reshape(4, 3, 2)
    uncond = -jnp.ones((3, 2))
    mask = jnp.array([True, False, True, False])
    out = np.asarray(losses.drop_condition(ctx, uncond, mask))
    np.testing.assert_array_equal(out[[0, 2]], -1.0)
    np.testing.assert_array_equal(out[[1, 3]], np.asarray(ctx)[[1, 3]])


def test_loss_config_validates():
    with pytest.raises(ValueError, match="prediction_target"):
        LossConfig(prediction_target="eps")
    with pytest.raises(ValueError, match="cond_dropout"):
        LossConfig(cond_dropout=1.5)


# -- optimizer ---------------------------------------------------------------------------------------------------


def test_learning_rate_warmup_then_cosine():
    cfg = OptimConfig(lr=2e-4, warmup_steps=10, total_steps=110, final_lr_fraction=0.1)
    lr = learning_rate_schedule(cfg)
    np.testing.assert_allclose(float(lr(0)), 0.0)
    np.testing.assert_allclose(float(lr(5)), 1e-4, rtol=1e-6)
    np.testing.assert_allclose(float(lr(10)), 2e-4, rtol=1e-6)
    for step in (30, 60, 110):
        progress = (step - 10) / 100
        expected = 2e-5 + (2e-4 - 2e-5) * 0.5 * (1 + np.cos(np.pi * progress))
        np.testing.assert_allclose(float(lr(step)), expected, rtol=1e-5)
    np.testing.assert_allclose(float(lr(500)), 2e-5, rtol=1e-5)


def test_ema_update_formula():
    ema = {"w": jnp.array([1.0, 2.0])}
    new = ema_update(ema, {"w": jnp.array([3.0, -2.0])}, 0.9)
    np.testing.assert_allclose(new["w"], [0.9 * 1 + 0.1 * 3, 0.9 * 2 - 0.1 * 2], rtol=1e-6)


# -- the objective against a hand computation (stand-in denoiser) ------------------------------------------------


def test_objective_matches_hand_computation():
    module = denoiser("stand_in")
    params = jax.tree.map(jnp.asarray, denoiser_params(module))
    batch = {k: jnp.asarray(v) for k, v in cached_batch(4).items()}
    cfg = LossConfig(prediction_target="v_prediction", min_snr_gamma=5.0, cond_dropout=0.0)
    objective = DiffusionLoss(Models(None, None, module), ScheduleConfig(), cfg)
    key = jax.random.PRNGKey(11)
    per_example = jax.jit(objective.per_example)({"unet": params}, batch, key, jnp.int32(0))
    loss, metrics = jax.jit(objective)({"unet": params}, batch, key, jnp.int32(0))
    assert metrics == {}

    # documented derivation: example i uses fold_in(key, i), split into (timestep, noise, dropout, posterior)
    streams = [jax.random.split(jax.random.fold_in(key, i), 4) for i in range(4)]
    t = np.array([int(jax.random.randint(s[0], (), 0, 1000)) for s in streams])
    eps = np.stack([np.asarray(jax.random.normal(s[1], (8, 8, 4))) for s in streams])
    abar = ABAR[t].astype(np.float64)
    x0 = np.asarray(batch["latents"], np.float64)
    a, s = np.sqrt(abar)[:, None, None, None], np.sqrt(1 - abar)[:, None, None, None]
    x_t = (a * x0 + s * eps).astype(np.float32)
    pred = np.asarray(jax.jit(module.apply)({"params": params}, x_t, t.astype(np.float32), batch["text_states"]),
                      np.float64)
    target = a * eps - s * x0
    snr = abar / (1 - abar)
    expected = ((pred - target) ** 2).mean(axis=(1, 2, 3)) * np.minimum(snr, 5.0) / (snr + 1)
    np.testing.assert_allclose(np.asarray(per_example), expected, rtol=2e-5)
    np.testing.assert_allclose(float(loss), expected.mean(), rtol=2e-5)


# -- train steps -------------------------------------------------------------------------------------------------


def _init(kind, trainable, optim, compute_dtype=jnp.float32, remat=False, loss=None, seed=0):
    """A step of the ``unet`` kind's objective on a U-Net computing in ``compute_dtype`` (float32 master weights),
    as ``latent_diffusion.build_models`` builds it for ``compute_dtype`` / ``model.remat``."""
    module = denoiser(kind, dtype=compute_dtype, param_dtype=jnp.float32, remat=remat)
    loss = loss or LossConfig(min_snr_gamma=5.0, cond_dropout=0.2)
    return diffusion_run(Models(None, None, module), {"unet": denoiser_params(module, seed)}, optim, trainable, loss,
                         _mesh(), seed=seed)


OPTIM = OptimConfig(lr=1e-3, warmup_steps=2, total_steps=20, ema_decay=0.9)


@pytest.fixture(scope="module")
def real_fp32_run():
    """Two fp32 steps of the real tiny U-Net (full mode); returns the per-step snapshots and metrics."""
    state, step = _init("real", TrainableConfig("full"), OPTIM)
    snapshots, metrics = [flat_numpy(state.params)], []
    batch = cached_batch(2)
    for _ in range(2):
        state, m = step(state, batch)
        snapshots.append(flat_numpy(state.params))
        metrics.append({k: float(v) for k, v in m.items()})
    return state, snapshots, metrics


def test_real_unet_step(real_fp32_run):
    state, snapshots, metrics = real_fp32_run
    assert int(state.step) == 2
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(state.params))
    lr = learning_rate_schedule(OPTIM)
    for i, m in enumerate(metrics):
        assert np.isfinite(m["loss"]) and m["grad_norm"] > 0
        np.testing.assert_allclose(m["lr"], float(lr(i)), rtol=1e-6)
    # warmup starts at lr 0, so the first update (decoupled weight decay included) leaves the params as they were
    for k, v in snapshots[0].items():
        np.testing.assert_array_equal(snapshots[1][k], v, err_msg=k)
    changed = [k for k in snapshots[0] if not np.array_equal(snapshots[0][k], snapshots[2][k])]
    assert len(changed) == len(snapshots[0])
    # EMA: e_2 = d * (d * p0 + (1 - d) * p1) + (1 - d) * p2
    ema = flat_numpy(state.ema_params)
    d = OPTIM.ema_decay
    for k in ("unet/conv_in/kernel", "unet/down_blocks_0/attentions_0/transformer_blocks_0/attn2/query/kernel"):
        expected = d * (d * snapshots[0][k] + (1 - d) * snapshots[1][k]) + (1 - d) * snapshots[2][k]
        np.testing.assert_allclose(ema[k], expected, rtol=1e-5, atol=1e-7)


def _check_bf16_remat_step(kind: str, fp32_metrics: dict):
    state, step = _init(kind, TrainableConfig("full"), OPTIM, compute_dtype=jnp.bfloat16, remat=True)
    state, m = step(state, cached_batch(2))
    # master weights and optimizer state stay float32
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves((state.params, state.ema_params)))
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(state.opt_state) if leaf.ndim)
    # same init, batch and randomness: the bf16 loss and gradient norm are the fp32 ones up to rounding. bf16's unit
    # roundoff is 3.9e-3; observed on the stand-in: loss 4e-4, grad norm 9.5e-4 relative.
    np.testing.assert_allclose(float(m["loss"]), fp32_metrics["loss"], rtol=5e-3)
    np.testing.assert_allclose(float(m["grad_norm"]), fp32_metrics["grad_norm"], rtol=5e-3)


def test_bf16_remat_step_matches_fp32():
    state, step = _init("stand_in", TrainableConfig("full"), OPTIM)
    _, m = step(state, cached_batch(2))
    _check_bf16_remat_step("stand_in", {k: float(v) for k, v in m.items()})


@pytest.mark.slow
def test_real_unet_bf16_remat_step_matches_fp32(real_fp32_run):
    _check_bf16_remat_step("real", real_fp32_run[2][0])


def test_attention_mode_trains_only_attention():
    state, step = _init("stand_in", TrainableConfig("attention"), OptimConfig(lr=1e-2, warmup_steps=0, total_steps=5))
    frozen_before = flat_numpy(state.frozen["unet"])
    params_before = flat_numpy(state.params)
    assert all("/attn1/" in k or "/attn2/" in k for k in params_before) and params_before
    for _ in range(2):
        state, _ = step(state, cached_batch(4))
    frozen_after, params_after = flat_numpy(state.frozen["unet"]), flat_numpy(state.params)
    for k, v in frozen_before.items():
        np.testing.assert_array_equal(frozen_after[k], v, err_msg=k)
    assert all(not np.array_equal(params_after[k], v) for k, v in params_before.items())
    full = flat_numpy(trained_components(state, TrainableConfig("attention"))["unet"])
    assert {f"unet/{k}" for k in full} == {f"unet/{k}" for k in frozen_before} | params_before.keys()


def test_freeze_holds_the_named_parameters_and_trains_the_rest():
    trainable = TrainableConfig("full", freeze=("unet/conv_in",))
    values = {"conv_in/bias": np.full((32,), 0.25, np.float32)}  # set at init (e.g. a parse head), then held
    module = denoiser("stand_in")
    state, step = diffusion_run(Models(None, None, module), {"unet": denoiser_params(module, 0)}, OPTIM, trainable,
                                LossConfig(), _mesh(), overrides={"unet": values})
    assert set(flat_numpy(state.frozen["unet"])) == {"conv_in/bias", "conv_in/kernel"}
    np.testing.assert_array_equal(flat_numpy(state.frozen["unet"])["conv_in/bias"], values["conv_in/bias"])
    assert not any(k.startswith("unet/conv_in/") for k in flat_numpy(state.params))
    frozen_before, params_before = flat_numpy(state.frozen["unet"]), flat_numpy(state.params)
    for _ in range(3):
        state, _ = step(state, cached_batch(4))
    for k, v in frozen_before.items():
        np.testing.assert_array_equal(flat_numpy(state.frozen["unet"])[k], v, err_msg=k)
    assert all(not np.array_equal(flat_numpy(state.params)[k], v) for k, v in params_before.items())
    full = flat_numpy(trained_components(state, trainable, ema=True)["unet"])
    assert {f"unet/{k}" for k in full} == {f"unet/{k}" for k in frozen_before} | params_before.keys()
    np.testing.assert_array_equal(full["conv_in/bias"], values["conv_in/bias"])


def test_freeze_and_overrides_refuse_what_does_not_fit():
    module = denoiser("stand_in")
    models, mesh, given = Models(None, None, module), _mesh(), {"unet": denoiser_params(module, 0)}
    with pytest.raises(ValueError, match="'unet/conv_inn' names no trainable parameter"):
        diffusion_run(models, given, OPTIM, TrainableConfig("full", freeze=("unet/conv_inn",)), LossConfig(), mesh)
    with pytest.raises(ValueError, match="mode 'full' only"):
        TrainableConfig("attention", freeze=("unet/conv_in",))
    with pytest.raises(ValueError, match="no parameter 'conv_in/weight'"):
        diffusion_run(models, given, OPTIM, TrainableConfig(), LossConfig(), mesh,
                      overrides={"unet": {"conv_in/weight": 0}})
    with pytest.raises(ValueError, match="'conv_in/bias' has shape"):
        diffusion_run(models, given, OPTIM, TrainableConfig(), LossConfig(), mesh,
                      overrides={"unet": {"conv_in/bias": np.zeros((3, 3))}})


def test_a_conditioner_trains_with_the_unet_on_cached_text_states():
    """Cached batches hold two text layers [B, 2, L, D] (before the conditioner); condition dropout swaps in the
    empty prompt's two layers; the conditioner runs in the loss and trains, except the part frozen."""
    module = denoiser("stand_in")
    models = Models(None, None, module, Conditioner(ConditionerConfig(width=32, rank=3)), text_layer=(0, -1))
    trainable = TrainableConfig("full", freeze=("conditioner/down",))
    state, step = diffusion_run(models, {"unet": denoiser_params(module, 0)}, OPTIM, trainable,
                                LossConfig(cond_dropout=0.5), _mesh())
    assert set(state.params) == {"unet", "conditioner"} and set(state.frozen) == {"conditioner"}
    assert set(flat_numpy(state.params["conditioner"])) == {"up/kernel", "up/bias"}
    rng = np.random.default_rng(3)
    batch = {"latents": rng.standard_normal((4, 8, 8, 4)).astype(np.float32),
             "text_states": rng.standard_normal((4, 2, 77, 32)).astype(np.float32),
             "uncond_text_states": rng.standard_normal((2, 77, 32)).astype(np.float32)}
    down = flat_numpy(state.frozen["conditioner"])
    up = flat_numpy(state.params["conditioner"])
    assert all(not v.any() for v in up.values())  # a fresh conditioner is the identity on layer 0
    for _ in range(3):
        state, m = step(state, batch)
        assert np.isfinite(float(m["loss"]))
    for k, v in flat_numpy(state.frozen["conditioner"]).items():
        np.testing.assert_array_equal(v, down[k], err_msg=k)
    assert all(np.abs(v).max() > 0 for v in flat_numpy(state.params["conditioner"]).values())
    with pytest.raises(ValueError, match=r"states must be \[B, 2, L, 32\]"):
        step(state, dict(batch, text_states=batch["text_states"][:, 0], uncond_text_states=batch["text_states"][0, 0]))


def test_split_attention_on_real_unet_tree():
    from jaxt2i.models.unet import PRESETS, abstract_params

    tree = abstract_params(PRESETS["tiny_sd1"])
    attention, rest = split_attention(tree)
    att_keys = set(flat_numpy(jax.tree.map(lambda s: np.zeros(()), attention)))
    rest_keys = set(flat_numpy(jax.tree.map(lambda s: np.zeros(()), rest)))
    all_keys = set(flat_numpy(jax.tree.map(lambda s: np.zeros(()), tree)))
    assert att_keys | rest_keys == all_keys and not att_keys & rest_keys
    assert att_keys == {k for k in all_keys if "/attn1/" in k or "/attn2/" in k}
    assert len(att_keys) > 0


@pytest.mark.slow  # the same path runs in the default suite through tests/train/test_loop.py (configs/tiny.yaml)
def test_step_with_frozen_encoders_on_images():
    """The non-cached path: images and token ids go through the frozen VAE and text encoder."""
    from jaxt2i.models.clip import PRESETS as CLIP_PRESETS, CLIPTextModel
    from jaxt2i.models.vae import PRESETS as VAE_PRESETS, AutoencoderKL
    from jaxt2i.train.kinds.diffusion import component_initializers
    from jaxt2i.train.state import init_train_state
    from jaxt2i.train.step import make_train_step

    module = denoiser("stand_in")
    vae = AutoencoderKL(VAE_PRESETS["tiny"])
    text = CLIPTextModel(CLIP_PRESETS["tiny_sd1"])
    ids = np.zeros((1, 77), np.int32)
    ids[0, 0], ids[0, 1:] = 49406, 49407
    models = Models(text, vae, module)
    mesh = _mesh()
    optim = OptimConfig(lr=1e-3, warmup_steps=0, total_steps=5, ema_decay=None)
    trainable = TrainableConfig("full")
    state, shardings = init_train_state(component_initializers(models), {"unet": denoiser_params(module)},
                                        ("unet",), optim, trainable, mesh, seed=0)
    frozen_before = flat_numpy(state.frozen)
    assert state.ema_params is None and set(state.frozen) == {"vae", "text_encoder"}
    step = make_train_step(DiffusionLoss(models, ScheduleConfig(), LossConfig(cond_dropout=0.5), uncond_ids=ids),
                           optim, trainable, mesh=mesh, state_shardings=shardings)
    side = 8 * VAE_PRESETS["tiny"].downsample_factor
    rng = np.random.default_rng(0)
    batch = {"images": rng.uniform(-1, 1, (2, side, side, 3)).astype(np.float32),
             "input_ids": rng.integers(0, 1000, (2, 77)).astype(np.int32)}
    state, m = step(state, batch)
    assert np.isfinite(float(m["loss"])) and float(m["grad_norm"]) > 0
    frozen_after = flat_numpy(state.frozen)
    for k, v in frozen_before.items():
        np.testing.assert_array_equal(frozen_after[k], v, err_msg=k)


def test_dropout_without_uncond_embedding_is_an_error():
    state, step = _init("stand_in", TrainableConfig("full"), OPTIM, loss=LossConfig(cond_dropout=0.1))
    batch = cached_batch(2)
    del batch["uncond_text_states"]
    with pytest.raises(ValueError, match="uncond_text_states"):
        step(state, batch)
