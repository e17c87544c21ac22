"""The shapes-world KL-VAE trainer: loss goes down, one step is deterministic, outputs round-trip."""

import dataclasses
import functools
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxt2i.shapes import world as shapes
from jaxt2i.models.vae import VAEConfig
from jaxt2i.train import small
from jaxt2i.train import vae_trainer as vt

TINY = VAEConfig(block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4, latent_channels=2,
                 mid_block_add_attention=False, sample_size=16)
CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def _images(n=8):
    # 16x16 crops around the centre of shapes images: small, but with objects in them.
    return jnp.asarray(shapes.batch(0, 0, n, "train")["images"][:, 24:40, 24:40])


@functools.lru_cache(maxsize=None)
def _optimizer_and_step():
    """Built once per test session: every test reuses the one compiled step."""
    cfg = vt.VAETrainConfig(steps=20, lr=3e-3, warmup_steps=0, batch_size=8, train_examples=8)
    optimizer = vt.make_optimizer(cfg.optim)
    return optimizer, vt.make_train_step(TINY, optimizer, cfg.beta, cfg.recon)


def _setup():
    optimizer, step = _optimizer_and_step()
    return vt.init_state(TINY, optimizer, jax.random.key(0)), step


def test_a_few_steps_reduce_the_loss():
    state, step = _setup()
    images, key = _images(), jax.random.key(1)
    losses = []
    for _ in range(15):
        state, metrics = step(state, images, key)
        losses.append(float(metrics["loss"]))
    assert int(state.step) == 15
    assert losses[-1] < 0.7 * losses[0], losses


def test_one_step_is_deterministic_from_the_seed():
    images = _images()
    (s1, step), (s2, _) = _setup(), _setup()
    a, _ = step(s1, images, jax.random.key(7))
    b, _ = step(s2, images, jax.random.key(7))
    c, _ = step(s1, images, jax.random.key(8))
    leaves = lambda s: jax.tree.leaves(s.params)
    assert all(np.array_equal(x, y) for x, y in zip(leaves(a), leaves(b)))
    assert not all(np.array_equal(x, y) for x, y in zip(leaves(a), leaves(c)))  # the posterior sample moves


def test_elbo_terms():
    state, _ = _setup()
    model = vt.AutoencoderKL(TINY)
    images = _images(4)
    loss0, m0 = vt.elbo_loss(state.params, model, images, jax.random.key(0), 0.0, "l1")
    loss1, m1 = vt.elbo_loss(state.params, model, images, jax.random.key(0), 10.0, "l1")
    np.testing.assert_allclose(float(loss0), float(m0["rec"]), rtol=1e-6)
    np.testing.assert_allclose(float(loss1), float(m1["rec"]) + 10.0 * float(m1["kl_per_value"]), rtol=1e-5)
    assert float(m1["kl_per_value"]) > 0


def test_psnr_hand_case():
    a = np.zeros((2, 4, 4, 3))
    b = a.copy()
    b[0] += 0.1  # mse 0.01 -> 20 dB
    b[1] += 0.01  # mse 1e-4 -> 40 dB
    np.testing.assert_allclose(vt.psnr(a, b), [20.0, 40.0], rtol=1e-9)


def test_epoch_batches_walk_a_permutation():
    seen = np.concatenate([small.epoch_batches(12, 4, 0, s) for s in range(3)])
    assert sorted(seen) == list(range(12))
    assert not np.array_equal(small.epoch_batches(12, 4, 0, 0), small.epoch_batches(12, 4, 0, 3))  # new epoch order


def test_save_and_load_round_trip(tmp_path):
    state, _ = _setup()
    size = small.save_model_folder(tmp_path, state.params, dataclasses.asdict(TINY))
    assert size == (tmp_path / "params.safetensors").stat().st_size
    params, config = vt.load_vae(tmp_path)
    assert config == TINY
    flat_a, flat_b = small.flatten_params(state.params), small.flatten_params(params)
    assert flat_a.keys() == flat_b.keys() and "encoder/conv_in/kernel" in flat_a
    assert all(np.array_equal(flat_a[k], flat_b[k]) for k in flat_a)
    with pytest.raises(FileNotFoundError, match="is missing"):
        small.load_model_folder(tmp_path / "nowhere")


def test_shipped_config_loads_and_is_small(tmp_path):
    cfg = small.load_yaml_config(CONFIGS / "shapes_vae.yaml", vt.VAETrainConfig)
    vae = cfg.vae_config
    assert 64 // vae.downsample_factor == 16 and vae.latent_channels == 4
    abstract = jax.eval_shape(lambda k: vt.init_state(vae, vt.make_optimizer(cfg.optim), k).params,
                              jax.random.key(0))
    assert small.count_params(abstract) * 4 < 2_000_000  # well inside the 20 MB budget of the shipped models
    bad = tmp_path / "bad.yaml"
    bad.write_text("stepz: 3\n")
    with pytest.raises(ValueError, match="unknown config key .stepz."):
        small.load_yaml_config(bad, vt.VAETrainConfig)


def test_script_main_reads_overrides_and_rejects_bad_ones(tmp_path, capsys):
    seen = {}

    def fake_train(cfg, out_dir, log):
        seen.update(cfg=cfg, out=out_dir)

    argv = ["--config", str(CONFIGS / "shapes_vae.yaml"), "--out", str(tmp_path / "o"), "--set", "steps=7",
            "--set", "recon=l1"]
    small.script_main(argv, "test", vt.VAETrainConfig, fake_train, out_help="out")
    assert seen["cfg"].steps == 7 and seen["cfg"].recon == "l1" and seen["out"] == str(tmp_path / "o")
    for bad, message in ((["--set", "steps"], "expects KEY=VALUE"), (["--set", "stepz=3"], "unknown config key 'stepz'")):
        with pytest.raises(SystemExit):
            small.script_main(argv[:4] + bad, "test", vt.VAETrainConfig, fake_train, out_help="out")
        assert message in capsys.readouterr().err
