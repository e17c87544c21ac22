"""Kind ``dvae``: its loss maths against independent references (numpy float64, torch.distributions, numeric
integration), the VQ pieces (straight-through gradient, moving-average codebook, folding into a plain dVAE), frozen
updates through the train step, and runs through `jaxt2i train` (exact resume after SIGKILL, jit == shard_map on 8
devices, each variant exporting a folder that `jaxt2i.load_dvae` reads)."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import jaxt2i
from jaxt2i.dvae import DVAE as DVAEModel
from jaxt2i.models import dvae as dvae_model
from jaxt2i.models import vector_quantizer as vq
from jaxt2i.train import sharding
from jaxt2i.train.kinds import dvae_losses as L
from jaxt2i.train.kinds.dvae import LossConfig, gumbel_objective, reconstruction
from jaxt2i.train.optim import OptimConfig
from jaxt2i.train.state import TrainableConfig, init_train_state
from jaxt2i.train.step import FROZEN_UPDATES, example_keys, make_train_step
from tests.weights import random_params

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_kinds import COMMON, ROOT, env, folder, losses, train  # noqa: E402,F401 -- env is a fixture

TINY = dvae_model.get_config("tiny")
BASE = (str(ROOT / "configs" / "shapes_dvae.yaml"), *COMMON, "data.image_size=16", "model.preset=tiny",
        "model.heldout_examples=4")
VQ = (*BASE, "model.quantizer=vq", "model.code_dim=8")
VARIANTS = {"gumbel": (*BASE, "model.quantizer=gumbel", "loss.recon=logit_laplace", "loss.beta_steps=2",
                       "loss.temperature_steps=3"),
            "vq": (*VQ, "loss.codebook_update=gradient", "loss.recon=mse"), "vq_ema": (*VQ, "loss.codebook_update=ema")}


# -- the loss maths ------------------------------------------------------------------------------------------------


def test_logit_laplace_nll_is_the_log_density_of_a_sigmoid_laplace_variable():
    rng = np.random.default_rng(0)
    mu, log_b = rng.normal(0, 1.5, (5, 7, 3)), rng.normal(-1, 0.7, (5, 7, 3))
    x = rng.uniform(0.1, 0.9, (5, 7, 3))
    got = np.asarray(L.logit_laplace_nll(jnp.asarray(np.concatenate([mu, log_b], -1), jnp.float32),
                                         jnp.asarray(x, jnp.float32)))
    # x = sigmoid(y), y ~ Laplace(mu, b): log f(x) = log Laplace(logit x) - log(x (1 - x))
    y = torch.tensor(np.log(x) - np.log1p(-x), dtype=torch.float64)
    laplace = torch.distributions.Laplace(torch.tensor(mu), torch.tensor(np.exp(log_b)))
    want = -(laplace.log_prob(y).numpy() - np.log(x * (1 - x)))
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)


def test_logit_laplace_density_integrates_to_one_on_the_unit_interval():
    y = np.linspace(-40.0, 40.0, 400_001)  # integrate over x = sigmoid(y): dx = x (1 - x) dy
    x = 1.0 / (1.0 + np.exp(-y))
    for mu, log_b in ((0.0, 0.0), (1.3, -1.5), (-2.0, 0.5)):
        stats = jnp.asarray(np.broadcast_to([mu, log_b], (len(x), 2)), jnp.float32)
        nll = np.asarray(L.logit_laplace_nll(stats, jnp.asarray(x[:, None], jnp.float32)))[:, 0]
        inside = (x > 1e-6) & (x < 1 - 1e-6)  # float32 x(1-x) is exact enough there
        mass = np.trapezoid(np.exp(-nll[inside].astype(np.float64)) * (x * (1 - x))[inside], y[inside])
        np.testing.assert_allclose(mass, 1.0, atol=2e-3)


def test_kl_to_uniform_matches_torch_distributions():
    logits = np.random.default_rng(1).normal(0, 3, (4, 5, 6, 32)).astype(np.float32)
    got = np.asarray(L.kl_to_uniform(jnp.asarray(logits)))
    q = torch.distributions.Categorical(logits=torch.tensor(logits, dtype=torch.float64))
    uniform = torch.distributions.Categorical(probs=torch.full((32,), 1 / 32, dtype=torch.float64))
    np.testing.assert_allclose(got, torch.distributions.kl_divergence(q, uniform).numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(L.kl_to_uniform(jnp.zeros((3, 32)))), 0.0, atol=1e-6)


def test_gumbel_softmax_becomes_the_gumbel_max_one_hot_as_the_temperature_falls():
    keys = jax.random.split(jax.random.key(0), 64)
    logits = jnp.asarray(np.random.default_rng(2).normal(0, 1, (64, 3, 3, 10)), jnp.float32)
    noise = jax.vmap(lambda k: jax.random.gumbel(k, logits.shape[1:], jnp.float32))(keys)
    perturbed = np.sort(np.asarray(logits + noise), -1)
    gap = perturbed[..., -1] - perturbed[..., -2]  # the winner's margin
    hard = np.asarray(jax.nn.one_hot(jnp.argmax(logits + noise, -1), 10))
    errors = []
    for tau in (1.0, 1e-1, 1e-2, 1e-3):
        soft = np.asarray(L.gumbel_softmax(keys, logits, tau))
        np.testing.assert_array_equal(soft.argmax(-1), hard.argmax(-1))
        clear = gap > 40 * tau  # the others' weights are below exp(-40) there
        np.testing.assert_allclose(soft[clear], hard[clear], atol=1e-6)
        errors.append(np.abs(soft - hard).max(-1).mean())
    assert np.all(np.diff(errors) < 0) and errors[-1] < 1e-2 and np.mean(gap > 40e-3) > 0.95, errors
    np.testing.assert_allclose(np.asarray(L.gumbel_softmax(keys, logits, 0.7).sum(-1)), 1.0, atol=1e-5)


def test_gumbel_max_draws_follow_the_softmax():
    logits = jnp.asarray([0.5, -1.0, 2.0, 0.0], jnp.float32)
    keys = jax.random.split(jax.random.key(3), 40_000)
    draws = jnp.argmax(L.gumbel_softmax(keys, jnp.broadcast_to(logits, (40_000, 4)), 1e-3), -1)
    freq = np.bincount(np.asarray(draws), minlength=4) / 40_000
    np.testing.assert_allclose(freq, np.asarray(jax.nn.softmax(logits)), atol=0.01)


def test_cosine_schedules_hit_their_endpoints():
    tau = [float(L.cosine_schedule(s, 1.0, 1 / 16, 1000)) for s in (0, 500, 1000, 5000)]
    np.testing.assert_allclose(tau, [1.0, (1 + 1 / 16) / 2, 1 / 16, 1 / 16], rtol=1e-6)
    beta = np.asarray([L.cosine_schedule(s, 0.0, 6.6, 100) for s in range(0, 120)])
    assert beta[0] == 0.0 and beta[100] == pytest.approx(6.6) and np.all(np.diff(beta) >= 0)
    assert float(L.cosine_schedule(7, 0.0, 6.6, 0)) == pytest.approx(6.6)  # no ramp: the target at once


def test_usage_metrics():
    assert float(L.perplexity(jnp.ones(64))) == pytest.approx(64.0, rel=1e-5)
    assert float(L.perplexity(jnp.zeros(64).at[5].set(9.0))) == pytest.approx(1.0)
    counts = np.array([3.0, 1.0, 0.0, 4.0])
    p = counts[counts > 0] / counts.sum()
    assert float(L.perplexity(jnp.asarray(counts))) == pytest.approx(math.exp(-np.sum(p * np.log(p))), rel=1e-5)
    assert float(L.codes_used(jnp.asarray(counts))) == 0.75
    np.testing.assert_array_equal(np.asarray(L.token_counts(jnp.asarray([[0, 3], [3, 3]]), 5)), [1, 0, 0, 3, 0])


def test_gumbel_objective_weighs_the_summed_kl_as_the_paper_does():
    """loss = mean NLL per value + beta * (KL summed over positions) / (H W C): per position, beta / (f^2 C)."""
    encoder, decoder = dvae_model.Encoder(TINY), dvae_model.Decoder(TINY)
    params = {"encoder": random_params(dvae_model.encoder_abstract_params(TINY), 0),
              "decoder": random_params(dvae_model.decoder_abstract_params(TINY), 1)}
    x01 = jnp.asarray(np.random.default_rng(4).uniform(0, 1, (3, 16, 16, 3)), jnp.float32)
    keys = example_keys(jax.random.key(2), jnp.int32(0), 3)
    cfg = LossConfig(beta=6.6, beta_steps=10, temperature_steps=10)
    objective = jax.jit(lambda step: gumbel_objective(encoder, decoder, params, x01, keys, step, cfg))
    loss, m = objective(jnp.int32(10))
    assert float(m["beta"]) == pytest.approx(6.6) and float(m["temperature"]) == pytest.approx(1 / 16)
    per_position = 6.6 / (TINY.downsample_factor ** 2 * 3)
    np.testing.assert_allclose(float(loss), float(m["rec"]) + per_position * float(m["kl"]), rtol=1e-5)
    loss0, m0 = objective(jnp.int32(0))
    assert float(m0["beta"]) == 0.0 and float(m0["temperature"]) == 1.0
    np.testing.assert_allclose(float(loss0), float(m0["rec"]), rtol=1e-6)


def test_reconstruction_terms():
    rng = np.random.default_rng(8)
    stats = rng.normal(0, 1, (2, 4, 4, 6))
    x = rng.uniform(0, 1, (2, 4, 4, 3))
    xm = 0.8 * x + 0.1
    mu = stats[..., :3]
    want = {"logit_laplace": np.log(2) + stats[..., 3:] + np.log(xm * (1 - xm))
            + np.abs(np.log(xm / (1 - xm)) - mu) * np.exp(-stats[..., 3:]),
            "logit_mse": (mu - np.log(xm / (1 - xm))) ** 2,
            "mse": ((1 / (1 + np.exp(-mu)) - 0.1) / 0.8 - x) ** 2}
    shown = np.clip((1 / (1 + np.exp(-mu)) - 0.1) / 0.8, 0, 1)
    for recon, per_value in want.items():
        rec, mse = reconstruction(jnp.asarray(stats, jnp.float32), jnp.asarray(x, jnp.float32), recon)
        np.testing.assert_allclose(np.asarray(rec), per_value.mean((1, 2, 3)), rtol=1e-5, err_msg=recon)
        np.testing.assert_allclose(np.asarray(mse), ((shown - x) ** 2).mean((1, 2, 3)), rtol=1e-5)


# -- the VQ pieces ---------------------------------------------------------------------------------------------------


def test_nearest_codes_and_straight_through_gradient():
    rng = np.random.default_rng(5)
    z_e = jnp.asarray(rng.normal(0, 1, (2, 3, 3, 4)), jnp.float32)
    embedding = jnp.asarray(rng.normal(0, 1, (16, 4)), jnp.float32)
    z = np.asarray(z_e, np.float64).reshape(-1, 1, 4)
    brute = np.argmin(np.sum((z - np.asarray(embedding, np.float64)[None]) ** 2, -1), -1)
    z_in, codes, z_q = vq.quantize(z_e, embedding)
    np.testing.assert_array_equal(np.asarray(codes).reshape(-1), brute)
    # z_e + (z_q - z_e): z_q up to the round-off of one subtraction and one addition
    np.testing.assert_allclose(np.asarray(z_in), np.asarray(embedding)[brute].reshape(z_e.shape), rtol=0, atol=5e-7)
    w = jnp.asarray(rng.normal(0, 1, z_e.shape), jnp.float32)
    f = lambda z, e: jnp.sum(jnp.sin(vq.quantize(z, e)[0]) * w)  # noqa: E731
    g_z, g_e = jax.grad(f, argnums=(0, 1))(z_e, embedding)
    np.testing.assert_allclose(np.asarray(g_z), np.asarray(jnp.cos(z_q) * w), rtol=1e-6)  # identity through sg
    np.testing.assert_array_equal(np.asarray(g_e), 0.0)  # the decoder's gradient never reaches the codebook
    g_cb = jax.grad(lambda z, e: L.vq_losses(z, vq.quantize(z, e)[2])[0], argnums=(0, 1))(z_e, embedding)
    g_commit = jax.grad(lambda z, e: L.vq_losses(z, vq.quantize(z, e)[2])[1], argnums=(0, 1))(z_e, embedding)
    assert not np.any(np.asarray(g_cb[0])) and np.any(np.asarray(g_cb[1]))  # codebook loss moves the codes
    assert np.any(np.asarray(g_commit[0])) and not np.any(np.asarray(g_commit[1]))  # commitment the encoder


def test_ema_codebook_update_matches_a_direct_computation():
    rng = np.random.default_rng(6)
    k, d, n, decay, eps = 6, 3, 40, 0.99, 1e-5
    codebook = {"embedding": rng.normal(0, 1, (k, d)), "cluster_size": rng.uniform(0, 3, k),
                "embed_sum": rng.normal(0, 1, (k, d))}
    vectors, codes = rng.normal(0, 1, (n, d)), rng.integers(0, k - 1, n)  # the last code stays unused
    size, total = codebook["cluster_size"].copy(), codebook["embed_sum"].copy()
    for j in range(k):
        mine = codes == j
        size[j] = decay * size[j] + (1 - decay) * mine.sum()
        total[j] = decay * total[j] + (1 - decay) * vectors[mine].sum(0)
    smoothed = (size + eps) / (size.sum() + k * eps) * size.sum()
    got = vq.ema_update({a: jnp.asarray(v, jnp.float32) for a, v in codebook.items()},
                        jnp.asarray(vectors, jnp.float32), jnp.asarray(codes), decay, eps)
    np.testing.assert_allclose(np.asarray(got["cluster_size"]), size, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(got["embed_sum"]), total, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(got["embedding"]), total / smoothed[:, None], rtol=1e-4, atol=1e-6)
    fresh = vq.init_codebook(jax.random.key(0), k, d, ema=True)  # an unused fresh code keeps its vector
    kept = vq.ema_update(fresh, jnp.zeros((4, d)), jnp.zeros(4, jnp.int32), decay, eps)
    np.testing.assert_allclose(np.asarray(kept["embedding"][1:]), np.asarray(fresh["embedding"][1:]), rtol=1e-4)


def test_a_vq_model_folds_into_a_plain_dvae():
    inner = dataclasses.replace(TINY, vocab_size=8)  # code_dim 8 on both sides of a 64-code codebook
    enc = random_params(dvae_model.encoder_abstract_params(inner), 0)
    dec = random_params(dvae_model.decoder_abstract_params(inner), 1)
    embedding = vq.init_codebook(jax.random.key(2), TINY.vocab_size, 8, ema=False)["embedding"]
    images = np.random.default_rng(7).uniform(0, 1, (2, 16, 16, 3)).astype(np.float32)
    z_e = jax.jit(dvae_model.Encoder(inner).apply)({"params": enc}, dvae_model.map_pixels(images))
    z_in, codes, _ = vq.quantize(z_e, embedding)
    want = jax.jit(dvae_model.Decoder(inner).apply)({"params": dec}, z_in)
    f_enc, f_dec = vq.fold_into_dvae(jax.device_get(enc), jax.device_get(dec), np.asarray(embedding))
    folded = DVAEModel(TINY, {"encoder": f_enc, "decoder": f_dec})
    np.testing.assert_array_equal(np.asarray(folded.tokens(images)), np.asarray(codes))
    np.testing.assert_allclose(np.asarray(folded.decoder_stats(codes)), np.asarray(want), rtol=1e-4, atol=1e-5)
    probs = jax.nn.softmax(folded.encode(images))  # softmax(-|z_e - E_j|^2): the nearest code is the likeliest
    dist = vq.squared_distances(z_e, embedding)
    np.testing.assert_allclose(np.asarray(probs), np.asarray(jax.nn.softmax(-dist)), rtol=1e-3, atol=1e-5)


def test_frozen_updates_replace_frozen_components_after_the_step():
    mesh = sharding.make_mesh(sharding.MeshConfig(), jax.devices()[:1])
    inits = {"w": lambda key: {"x": jnp.ones(3)}, "stats": lambda key: {"count": jnp.zeros(())}}
    optim = OptimConfig(lr=0.1, warmup_steps=0, ema_decay=None)

    def loss_fn(components, batch, key, first_index, gather):
        loss = jnp.sum(jnp.square(components["w"]["x"] - batch["t"].mean(0)))
        updates = {"stats": {"count": components["stats"]["count"] + batch["t"].shape[0]}}
        return loss, {FROZEN_UPDATES: updates}

    state, shardings = init_train_state(inits, None, ("w",), optim, TrainableConfig(), mesh)
    step = make_train_step(loss_fn, optim, TrainableConfig(), mesh=mesh, state_shardings=shardings)
    batch = {"t": np.zeros((4, 3), np.float32)}
    state, metrics = step(state, batch)
    state, metrics = step(state, batch)
    assert float(state.frozen["stats"]["count"]) == 8.0 and FROZEN_UPDATES not in metrics
    bad = make_train_step(lambda c, b, k, i, g: (jnp.sum(c["w"]["x"]), {FROZEN_UPDATES: {"w": c["w"]}}), optim,
                          TrainableConfig(), mesh=mesh, state_shardings=shardings)
    with pytest.raises(ValueError, match="only frozen components"):
        bad(state, batch)


# -- runs through `jaxt2i train` ---------------------------------------------------------------------------------


def _records(workdir) -> list[dict]:
    drop = ("steps_per_s", "images_per_s")
    return [{k: v for k, v in json.loads(line).items() if k not in drop}
            for line in (workdir / "metrics.jsonl").read_text().splitlines()]


METRICS = {"gumbel": {"rec", "kl", "temperature", "beta", "psnr", "perplexity", "codes_used"},
           "vq": {"rec", "psnr", "codebook_loss", "commitment_loss", "perplexity", "codes_used"}}
METRICS["vq_ema"] = METRICS["vq"] | {"dead_codes"}


def check_run(workdir, variant: str):
    """The run's metrics, and its export: a dVAE folder with the held-out scores that `jaxt2i.load_dvae` reads."""
    record = _records(workdir)[0]
    assert METRICS[variant] <= set(record) and np.isfinite(list(record.values())).all(), record
    manifest = json.loads((workdir / "final" / "jaxt2i.json").read_text())
    assert {k: v.get("type", k) for k, v in manifest["components"].items()} == {
        "dvae_encoder": "dvae_encoder", "dvae_decoder": "dvae_decoder"}
    assert manifest["family"] is None
    assert set(manifest["extras"]["heldout"]) == {"images", "psnr", "perplexity", "codes_used", "dead_codes"}
    dvae = jaxt2i.load_dvae(workdir / "final")
    assert dvae.config == dataclasses.replace(TINY, image_size=16)  # a VQ model is a plain dVAE once exported
    images = np.random.default_rng(0).uniform(0, 1, (2, 16, 16, 3)).astype(np.float32)
    assert dvae.encode(images).shape == (2, 8, 8, 64) and dvae.decode(dvae.tokens(images)).shape == images.shape


@pytest.mark.parametrize("variant", ["gumbel", pytest.param("vq_ema", marks=pytest.mark.slow)])
def test_dvae_resumes_bit_exactly_after_sigkill(env, tmp_path, variant):
    ref = train(env, tmp_path / "ref", VARIANTS[variant])
    assert ref.returncode == 0, ref.stderr[-4000:]
    assert "held-out (4 images, hard tokens): PSNR" in ref.stderr
    check_run(tmp_path / "ref", variant)
    killed = train(env, tmp_path / "run", VARIANTS[variant], kill_at=3)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-4000:]
    resumed = train(env, tmp_path / "run", VARIANTS[variant])
    assert resumed.returncode == 0 and "resumed from" in resumed.stderr, resumed.stderr[-4000:]
    # every metric, the schedules' temperature and beta and the moving-average codebook's included, continues exactly
    assert _records(tmp_path / "run") == _records(tmp_path / "ref") and len(losses(tmp_path / "ref")) == 4
    got, want = folder(tmp_path / "run"), folder(tmp_path / "ref")
    assert got.keys() == want.keys() and got
    for k in want:
        assert np.array_equal(got[k], want[k]), k


def test_one_step_of_the_vq_variant_with_a_trained_codebook(env, tmp_path):
    proc = train(env, tmp_path / "run", (*VARIANTS["vq"], "steps=1", "sample.every=1"))
    assert proc.returncode == 0, proc.stderr[-4000:]
    check_run(tmp_path / "run", "vq")
    assert (tmp_path / "run" / "samples" / "step_00000001.png").is_file()


SHARDED = r'''
import json, sys
from jaxt2i.train import loop
from jaxt2i.train.config import load_config
args, out = json.loads(sys.argv[1]), {}
for form in ("jit", "shard_map"):
    cfg = load_config(args[0], [*args[1:], f"form={form}", f"workdir={sys.argv[2]}/{form}", "steps=2", "mesh.data=-1"])
    loop.run(cfg)
    out[form] = [json.loads(l) for l in open(f"{sys.argv[2]}/{form}/metrics.jsonl")]
print("RESULT " + json.dumps(out))
'''


@pytest.mark.parametrize("variant", ["gumbel", pytest.param("vq_ema", marks=pytest.mark.slow)])
def test_jit_and_shard_map_forms_agree_on_8_devices(env, tmp_path, variant):
    """Per-example Gumbel noise, the global batch's token histogram and moving-average codebook updates (from
    all-gathered rows) are the same in both forms."""
    e = dict(env, XLA_FLAGS=env["XLA_FLAGS"] + " --xla_force_host_platform_device_count=8")
    proc = subprocess.run([sys.executable, "-c", SHARDED, json.dumps(VARIANTS[variant]), str(tmp_path)], cwd=ROOT,
                          env=e, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout.split("RESULT ")[-1])
    for jit_rec, map_rec in zip(result["jit"], result["shard_map"], strict=True):
        for k in ("loss", "rec", "psnr", "perplexity", "codes_used", "grad_norm"):
            np.testing.assert_allclose(map_rec[k], jit_rec[k], rtol=2e-5, atol=1e-6, err_msg=k)
    got, want = folder(tmp_path / "shard_map"), folder(tmp_path / "jit")
    assert got.keys() == want.keys() and got
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-4, atol=1e-5, err_msg=k)
