"""Training a small KL-VAE on the shapes world (``jaxt2i.shapes.world``) with the ELBO.

Loss per batch (images ``x`` in [-1, 1], ``D = H * W * 3`` pixel values per image)::

    loss = mean_b [ rec(x_b, decode(z_b)) / D + beta * KL(q(z | x_b) || N(0, I)) / D ],   z_b ~ q(z | x_b)

with ``rec`` the summed L1 (``recon: l1``) or squared (``recon: l2``) error: the per-pixel mean error plus
``beta`` times the KL per pixel value, i.e. ``beta`` weighs the KL against the reconstruction summed over pixels,
as latent diffusion's ``kl_weight`` does. The step is one pure jitted function ``(state, batch, key) -> (state,
metrics)`` (the step number is folded into ``key``), AdamW from :mod:`jaxt2i.train.optim`; everything follows from
the config's seed.

After training, ``scaling_factor`` is set to ``1 / std`` of the posterior means on held-out images (as Stable
Diffusion chose 0.18215), so the diffusion model sees latents of unit variance. The output folder holds
``params.safetensors`` (the flattened parameter tree, ``/``-joined keys), ``config.json`` (``VAEConfig`` as
``dataclasses.asdict``), ``metrics.json``, ``train_config.json`` and ``log.jsonl`` (one line per logged step).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from pathlib import Path
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct

from jaxt2i.shapes import world as shapes
from jaxt2i.models.vae import AutoencoderKL, VAEConfig
from jaxt2i.train.optim import OptimConfig, make_optimizer
from jaxt2i.train.small import (count_params, epoch_batches, load_model_folder, run_logged_steps,
                                save_model_folder)

RECON_LOSSES = ("l1", "l2")


# ----------------------------------------------------------------------------- configs


@dataclasses.dataclass(frozen=True)
class VAETrainConfig:
    """Everything a VAE run depends on.

    model: the VAEConfig fields that differ from Stable Diffusion's (a small shapes VAE by default).
    train_examples: size of the fixed pool of training images (``shapes.batch(seed, 0, n, "train")``); batches are
      drawn from it by a seeded permutation per epoch. heldout_examples: held-out images for PSNR and the latent
      scale (``split="heldout"``, the combinations the training split never shows).
    """

    seed: int = 0
    model: Mapping[str, Any] = dataclasses.field(default_factory=lambda: dict(
        block_out_channels=(32, 64, 64), layers_per_block=1, norm_num_groups=8, latent_channels=4, sample_size=64))
    steps: int = 2000
    batch_size: int = 32
    lr: float = 1e-3
    warmup_steps: int = 100
    weight_decay: float = 0.0
    grad_clip_norm: float | None = 1.0
    beta: float = 1e-4
    recon: str = "l1"
    train_examples: int = 8192
    heldout_examples: int = 256
    eval_batch_size: int = 64
    log_every: int = 50
    save_dtype: str = "float32"

    def __post_init__(self):
        if self.recon not in RECON_LOSSES:
            raise ValueError(f"recon must be one of {RECON_LOSSES}; got {self.recon!r}.")
        if self.batch_size > self.train_examples:
            raise ValueError(f"batch_size {self.batch_size} exceeds train_examples {self.train_examples}.")

    @property
    def vae_config(self) -> VAEConfig:
        return VAEConfig(**dict(self.model))

    @property
    def optim(self) -> OptimConfig:
        return OptimConfig(lr=self.lr, warmup_steps=self.warmup_steps, total_steps=self.steps,
                           weight_decay=self.weight_decay, grad_clip_norm=self.grad_clip_norm, ema_decay=None,
                           final_lr_fraction=0.1)


# ----------------------------------------------------------------------------- saving


def load_vae(folder: str | os.PathLike) -> tuple[dict, VAEConfig]:
    """``(params, VAEConfig)`` of a VAE trained by :func:`train`."""
    params, config = load_model_folder(folder)
    return params, VAEConfig(**config)


# ----------------------------------------------------------------------------- the step


@struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    opt_state: Any


def init_state(config: VAEConfig, optimizer: optax.GradientTransformation, key: jax.Array) -> TrainState:
    """Fresh parameters (from ``key``) and optimizer state."""
    side = config.downsample_factor
    params = AutoencoderKL(config).init(key, jnp.zeros((1, side, side, config.in_channels)))["params"]
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params))


def elbo_loss(params, model: AutoencoderKL, images: jax.Array, key: jax.Array, beta: float, recon: str
              ) -> tuple[jax.Array, dict]:
    """Images ``[B, H, W, 3]`` in [0, 1] -> (scalar loss, metrics); see the module docstring for the formula."""
    x = 2.0 * images.astype(jnp.float32) - 1.0
    x_hat, posterior = model.apply({"params": params}, x, key)
    err = x_hat.astype(jnp.float32) - x
    per_value = jnp.abs(err) if recon == "l1" else jnp.square(err)
    d = math.prod(x.shape[1:])
    rec = jnp.mean(per_value)
    kl = jnp.mean(posterior.kl()) / d
    mse01 = jnp.mean(jnp.square(jnp.clip(x_hat.astype(jnp.float32), -1, 1) - x)) / 4.0  # in [0, 1] units
    return rec + beta * kl, {"rec": rec, "kl_per_value": kl, "psnr": -10.0 * jnp.log10(mse01 + 1e-12)}


def make_train_step(config: VAEConfig, optimizer: optax.GradientTransformation, beta: float, recon: str
                    ) -> Callable[[TrainState, jax.Array, jax.Array], tuple[TrainState, dict]]:
    """The jitted pure step ``(state, images [B, H, W, 3] in [0, 1], key) -> (state, metrics)``."""
    model = AutoencoderKL(config)

    def step(state: TrainState, images: jax.Array, key: jax.Array) -> tuple[TrainState, dict]:
        key = jax.random.fold_in(key, state.step)
        (loss, metrics), grads = jax.value_and_grad(elbo_loss, has_aux=True)(
            state.params, model, images, key, beta, recon)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = dict(metrics, loss=loss, grad_norm=optax.global_norm(grads))
        return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics

    return jax.jit(step)


# ----------------------------------------------------------------------------- evaluation


def psnr(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-image PSNR in dB of images ``[N, H, W, C]`` in [0, 1]: ``-10 log10(mean squared error)``."""
    mse = np.mean(np.square(np.asarray(a, np.float64) - np.asarray(b, np.float64)), axis=(1, 2, 3))
    return -10.0 * np.log10(np.maximum(mse, 1e-12))


def make_reconstruct(config: VAEConfig) -> Callable[[Any, jax.Array], tuple[jax.Array, jax.Array]]:
    """Jitted ``(params, images [B, H, W, 3] in [0, 1]) -> (reconstructions in [0, 1], posterior means)``."""
    model = AutoencoderKL(config)

    def reconstruct(params, images):
        x = 2.0 * images.astype(jnp.float32) - 1.0
        posterior = model.apply({"params": params}, x, method=AutoencoderKL.encode)
        x_hat = model.apply({"params": params}, posterior.mean, method=AutoencoderKL.decode)
        return jnp.clip((x_hat.astype(jnp.float32) + 1.0) / 2.0, 0.0, 1.0), posterior.mean

    return jax.jit(reconstruct)


def evaluate(params, config: VAEConfig, images: np.ndarray, batch_size: int = 64) -> dict:
    """Reconstruction (posterior mean) PSNR and latent statistics on ``images [N, H, W, 3]`` in [0, 1]."""
    reconstruct = make_reconstruct(config)
    scores, means = [], []
    for i in range(0, len(images), batch_size):
        chunk = images[i: i + batch_size]
        rec, mean = reconstruct(params, jnp.asarray(chunk))
        scores.append(psnr(np.asarray(rec), chunk))
        means.append(np.asarray(mean))
    scores, means = np.concatenate(scores), np.concatenate(means)
    latent_std = float(np.std(means))
    return {"psnr_mean": float(np.mean(scores)), "psnr_min": float(np.min(scores)),
            "latent_mean": float(np.mean(means)), "latent_std": latent_std,
            "latent_shape": list(means.shape[1:]), "scaling_factor": 1.0 / max(latent_std, 1e-6)}


# ----------------------------------------------------------------------------- the loop


def train(cfg: VAETrainConfig, out_dir: str | os.PathLike | None = None, log: Callable[[str], None] = print) -> dict:
    """Trains the VAE described by ``cfg``; writes the output folder when ``out_dir`` is given. Returns metrics."""
    vae_cfg = cfg.vae_config
    t0 = time.time()
    pool = shapes.batch(cfg.seed, 0, cfg.train_examples, "train")["images"]
    heldout = shapes.batch(cfg.seed, 0, cfg.heldout_examples, "heldout")["images"]
    if pool.shape[1] != vae_cfg.sample_size:
        log(f"note: images are {pool.shape[1]}px; VAEConfig.sample_size is {vae_cfg.sample_size}")
    log(f"data: {len(pool)} train / {len(heldout)} held-out images in {time.time() - t0:.1f}s")
    optimizer = make_optimizer(cfg.optim)
    key = jax.random.key(cfg.seed)
    init_key, step_key = jax.random.split(key)
    state = init_state(vae_cfg, optimizer, init_key)
    n_params = count_params(state.params)
    log(f"model: {n_params:,} parameters ({n_params * 4 / 2**20:.2f} MiB float32); "
        f"latents {pool.shape[1] // vae_cfg.downsample_factor}x{pool.shape[2] // vae_cfg.downsample_factor}"
        f"x{vae_cfg.latent_channels}")
    train_step = make_train_step(vae_cfg, optimizer, cfg.beta, cfg.recon)
    def step_fn(step):
        nonlocal state
        images = pool[epoch_batches(len(pool), cfg.batch_size, cfg.seed, step)]
        state, metrics = train_step(state, jnp.asarray(images), step_key)
        return metrics

    history, train_time = run_logged_steps(cfg.steps, cfg.log_every, step_fn, cfg, out_dir, log)
    result = evaluate(state.params, vae_cfg, heldout, cfg.eval_batch_size)
    result.update(train_time_s=round(train_time, 1), steps=cfg.steps, parameters=n_params,
                  final_train_loss=history[-1]["loss"])
    final_cfg = dataclasses.replace(vae_cfg, scaling_factor=round(result["scaling_factor"], 6),
                                    sample_size=int(pool.shape[1]))
    if out_dir is not None:
        result["params_bytes"] = save_model_folder(out_dir, state.params, dataclasses.asdict(final_cfg),
                                                   cfg.save_dtype)
        (Path(out_dir) / "metrics.json").write_text(json.dumps(result, indent=2))
    log("held-out: " + json.dumps(result))
    result["params"] = state.params
    result["history"] = history
    return result
