"""The latent-diffusion objective of the ``unet`` and ``dit`` kinds, on :mod:`jaxt2i.models.latent_diffusion`'s ``Models``.

Batches are dicts, either
  {"images": [B, H, W, 3] float32 in [-1, 1], "input_ids": [B, 77] int32}       (the frozen encoders run here)
  {"latents": [B, h, w, C] float32 (already scaled), "text_states": [B, L, D] or [B, k, L, D] float32}  (cached)
optionally with "uncond_text_states" ([L, D] / [k, L, D], one row shared by all, or with a leading 1): the empty
prompt's text states (otherwise they are computed from ``uncond_ids`` with the frozen text encoder). Text states
are the text encoder's output at ``models.text_layer``, before the conditioner: condition dropout replaces them,
then the conditioner (when the model has one, trained with the U-Net) turns them into the U-Net's context. Every
example's randomness (timestep, noise, condition dropout, VAE posterior sample) comes from a key derived from
(step key, global example index). A denoiser with a learned variance (a DiT with ``learn_sigma``) trains with
IDDPM's hybrid objective as DiT does: the (min-SNR weighted) noise MSE plus ``loss.vlb_weight`` times the
variational bound, whose gradient reaches only the variance channels (:func:`jaxt2i.diffusion.variance.hybrid_loss`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxt2i.diffusion import losses, schedules, variance
from jaxt2i.models import latent_diffusion
from jaxt2i.models.dit import DiTConfig
from jaxt2i.models.latent_diffusion import Models
from jaxt2i.models.vae import scale_latents
from jaxt2i.train.step import batch_rows, example_keys

# Sub-streams of an example's key.
TIMESTEP, NOISE, DROPOUT, POSTERIOR = range(4)
_NUM_STREAMS = 4


def _fp32(module):
    """Master weights are float32 whatever dtype the caller built the module with."""
    return module.clone(param_dtype=jnp.float32) if hasattr(module, "param_dtype") else module


def _init_denoiser(module, key: jax.Array) -> Any:
    cfg = module.config
    if isinstance(cfg, DiTConfig):
        side, width = cfg.patch_size, cfg.caption_channels
    else:
        side, width = 2 ** (cfg.num_blocks - 1), cfg.cross_attention_dim
    sample = jnp.zeros((1, side, side, cfg.in_channels), jnp.float32)
    context = jnp.zeros((1, 1, width), jnp.float32)
    return _fp32(module).init(key, sample, jnp.zeros((1,), jnp.float32), context)["params"]


def _init_vae(module, key: jax.Array) -> Any:
    side = module.config.downsample_factor
    return _fp32(module).init(key, jnp.zeros((1, side, side, module.config.in_channels), jnp.float32))["params"]


def _init_text_encoder(module, key: jax.Array) -> Any:
    return _fp32(module).init(key, jnp.zeros((1, 1), jnp.int32))["params"]


def _init_conditioner(module, key: jax.Array) -> Any:
    cfg = module.config
    return _fp32(module).init(key, jnp.zeros((1, cfg.num_inputs, 1, cfg.width), jnp.float32))["params"]


_INITIALIZERS = {"denoiser": _init_denoiser, "vae": _init_vae, "text_encoder": _init_text_encoder,
                 "conditioner": _init_conditioner}


def component_initializers(models: Models) -> dict[str, Callable]:
    """``{component: key -> fresh float32 tree}`` for the modules ``models`` has (the denoiser under its component
    name, VAE, text encoder, conditioner)."""
    return {(models.denoiser_name if field == "denoiser" else field): (lambda key, m=getattr(models, field), f=f: f(m, key))
            for field, f in _INITIALIZERS.items() if getattr(models, field) is not None}


def _substreams(keys: jax.Array) -> jax.Array:
    """[B] example keys -> [4, B] keys: timestep, noise, dropout and posterior streams."""
    return jnp.swapaxes(jax.vmap(lambda k: jax.random.split(k, _NUM_STREAMS))(keys), 0, 1)


def _per_example_normal(keys: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    return jax.vmap(lambda k: jax.random.normal(k, shape, jnp.float32))(keys)


def batch_latents(vae_module, vae_params, batch: dict, posterior_keys: jax.Array) -> jax.Array:
    """The batch's scaled latents [B, h, w, C] float32: its cached ``latents``, else a posterior sample of its
    ``images`` ([B, H, W, 3] in [-1, 1]) under the frozen VAE, one key per example."""
    if "latents" in batch:
        return jnp.asarray(batch["latents"], jnp.float32)
    if "images" not in batch:
        raise ValueError(f"the batch needs 'latents' or 'images'; it has {sorted(batch)}.")
    if vae_module is None:
        raise ValueError("the batch has images but the models have no VAE; pass it, or feed cached batches with "
                         "'latents'.")
    posterior = vae_module.apply({"params": vae_params}, batch["images"], method="encode")
    mean = posterior.mean.astype(jnp.float32)
    std = jnp.exp(0.5 * posterior.logvar.astype(jnp.float32))
    z = mean + std * _per_example_normal(posterior_keys, mean.shape[1:])
    return scale_latents(z, vae_module.config)


def example_streams(key: jax.Array, first_index, batch: dict) -> jax.Array:
    """[4, B] keys of the batch's examples: timestep, noise, dropout and posterior streams (see the module)."""
    return _substreams(example_keys(key, first_index, batch_rows(batch)))


def diffuse(streams: jax.Array, x0: jax.Array, alphas_cumprod: jax.Array):
    """A training timestep and noise per example (``streams`` from :func:`example_streams`) -> (t [B] int32,
    noise, abar [B], x_t), x0 / noise / x_t [B, h, w, C] float32."""
    t = jax.vmap(lambda k: jax.random.randint(k, (), 0, alphas_cumprod.shape[0]))(streams[TIMESTEP])
    noise = _per_example_normal(streams[NOISE], x0.shape[1:])
    abar = alphas_cumprod[t]
    return t, noise, abar, losses.noisy_sample(x0, noise, abar)


def denoising_loss(prediction: jax.Array, x0: jax.Array, noise: jax.Array, x_t: jax.Array, t: jax.Array,
                   schedule: schedules.ScheduleConfig, loss_cfg: losses.LossConfig, abar: jax.Array,
                   learned_variance: bool) -> jax.Array:
    """Per-example losses [B] of a denoiser's ``prediction`` [B, h, w, C or 2C]: the (min-SNR weighted) MSE to the
    ``loss_cfg.prediction_target``, plus ``vlb_weight`` x the variational bound with a learned variance."""
    weights = losses.min_snr_weights(abar, loss_cfg.min_snr_gamma, loss_cfg.prediction_target)
    if learned_variance:
        parts = variance.hybrid_loss(prediction, x0, noise, x_t, t, schedule)
        return parts["mse"] * weights + jnp.float32(loss_cfg.vlb_weight) * parts["vb"]
    target = losses.training_target(x0, noise, abar, loss_cfg.prediction_target)
    return losses.per_example_mse(prediction, target) * weights


def drop_text(states: jax.Array, uncond: jax.Array, mask: jax.Array) -> jax.Array:
    """The empty prompt's states where ``mask`` is True.  states [B, ...], uncond [...] or [1, ...], mask [B]."""
    uncond = jnp.broadcast_to(jnp.asarray(uncond, states.dtype), states.shape)
    return jnp.where(mask.reshape((-1,) + (1,) * (states.ndim - 1)), uncond, states)


class DiffusionLoss:
    """``(components, batch, key, first_index, gather) -> (mean weighted loss over the batch, {})``; see the module
    docstring. ``components``: ``{"unet" | "transformer"[, "conditioner"], "vae", "text_encoder"}`` trees (the encoders only when
    batches need them). ``uncond_ids``: [1, 77] int32 ids of the empty prompt (for condition dropout), or None."""

    def __init__(self, models: Models, schedule: schedules.ScheduleConfig, loss_cfg: losses.LossConfig,
                 uncond_ids: Any = None):
        self.models = models
        self.uncond_ids = None if uncond_ids is None else jnp.asarray(np.asarray(uncond_ids).reshape(1, -1), jnp.int32)
        self.schedule = dataclasses.replace(schedule, prediction_type=loss_cfg.prediction_target)
        self.alphas_cumprod = jnp.asarray(schedules.alphas_cumprod(schedule), jnp.float32)
        self.num_timesteps = schedule.num_train_timesteps
        self.loss_cfg = loss_cfg

    def _text_states(self, components, input_ids):
        if self.models.text_encoder is None:
            raise ValueError("the batch has input_ids but the models have no text encoder; pass it, or feed cached "
                             "batches with 'text_states'.")
        return latent_diffusion.text_states(self.models, components, input_ids).astype(jnp.float32)

    def latents_and_text(self, components, batch, posterior_keys):
        """-> (x0 [B, h, w, C] float32 scaled latents, text states [B, L, D] / [B, k, L, D] float32)."""
        latents = batch_latents(self.models.vae, components.get("vae"), batch, posterior_keys)
        if "text_states" in batch:
            states = jnp.asarray(batch["text_states"], jnp.float32)
        elif "input_ids" in batch:
            states = self._text_states(components, batch["input_ids"])
        else:
            raise ValueError(f"the batch needs 'text_states' or 'input_ids'; it has {sorted(batch)}.")
        return latents, states

    def uncond_states(self, components, batch, states):
        """The empty prompt's text states with a leading axis of 1 ([1, L, D] or [1, k, L, D]) float32."""
        if "uncond_text_states" in batch:
            u = jnp.asarray(batch["uncond_text_states"], jnp.float32)
            return u if u.ndim == states.ndim else u[None]
        if self.models.text_encoder is not None and self.uncond_ids is not None:
            return self._text_states(components, self.uncond_ids)
        raise ValueError(
            f"condition dropout (p={self.loss_cfg.cond_dropout}) needs the empty prompt's text states: put "
            "'uncond_text_states' in the batch, give uncond_ids and the text encoder, or set cond_dropout=0.")

    def per_example(self, components, batch, key, first_index) -> jax.Array:
        """Weighted per-example losses [B]."""
        cfg = self.loss_cfg
        streams = example_streams(key, first_index, batch)
        x0, states = self.latents_and_text(components, batch, streams[POSTERIOR])
        t, noise, abar, x_t = diffuse(streams, x0, self.alphas_cumprod)
        if cfg.cond_dropout > 0:
            drop = losses.dropout_mask(streams[DROPOUT], cfg.cond_dropout)
            states = drop_text(states, self.uncond_states(components, batch, states), drop)
        context = latent_diffusion.condition(self.models, components, states)
        prediction = latent_diffusion.predict(self.models, components, x_t, t.astype(jnp.float32), context)
        return denoising_loss(prediction, x0, noise, x_t, t, self.schedule, cfg, abar,
                              latent_diffusion.has_learned_variance(self.models.denoiser.config))

    def __call__(self, components, batch, key, first_index, gather=None):
        return self.per_example(components, batch, key, first_index).mean(), {}
