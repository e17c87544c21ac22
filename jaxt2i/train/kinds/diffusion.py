"""The latent-diffusion objective of the ``unet`` kind, and its modules.

Batches are dicts, either
  {"images": [B, H, W, 3] float32 in [-1, 1], "input_ids": [B, 77] int32}                  (frozen encoders run here)
  {"latents": [B, h, w, C] float32 (already scaled), "context": [B, 77, D] float32}       (cached)
optionally with "uncond_context": [77, D] or [1, 77, D], the empty-prompt embedding (otherwise it is computed from
``models.uncond_ids`` with the frozen text encoder). Every example's randomness (timestep, noise, condition
dropout, VAE posterior sample) comes from a key derived from (step key, global example index).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxt2i.diffusion import losses, schedules
from jaxt2i.models.vae import scale_latents
from jaxt2i.train.step import batch_rows, example_keys

# Sub-streams of an example's key.
_TIMESTEP, _NOISE, _DROPOUT, _POSTERIOR = range(4)
_NUM_STREAMS = 4


class Models(NamedTuple):
    """The module instances a diffusion step runs. vae / text_encoder may be None when batches carry cached
    latents and context. uncond_ids: [1, 77] int32 ids of the empty prompt (for condition dropout), or None.
    text_layer: which text-encoder hidden state conditions the U-Net, or a tuple of several."""

    unet: nn.Module
    vae: nn.Module | None = None
    text_encoder: nn.Module | None = None
    uncond_ids: Any = None
    text_layer: int | tuple[int, ...] = -1


def _fp32(module: nn.Module) -> nn.Module:
    """Master weights are float32 whatever dtype the caller built the module with."""
    return module.clone(param_dtype=jnp.float32) if hasattr(module, "param_dtype") else module


def _init_unet(module: nn.Module, key: jax.Array) -> Any:
    cfg = module.config
    factor = 2 ** (cfg.num_blocks - 1)
    sample = jnp.zeros((1, factor, factor, cfg.in_channels), jnp.float32)
    context = jnp.zeros((1, cfg.context_layers, cfg.cross_attention_dim), jnp.float32)
    return _fp32(module).init(key, sample, jnp.zeros((1,), jnp.float32), context)["params"]


def _init_vae(module: nn.Module, key: jax.Array) -> Any:
    side = module.config.downsample_factor
    return _fp32(module).init(key, jnp.zeros((1, side, side, module.config.in_channels), jnp.float32))["params"]


def _init_text_encoder(module: nn.Module, key: jax.Array) -> Any:
    return _fp32(module).init(key, jnp.zeros((1, 1), jnp.int32))["params"]


_INITIALIZERS = {"unet": _init_unet, "vae": _init_vae, "text_encoder": _init_text_encoder}


def component_initializers(models: Models) -> dict:
    """``{component: key -> fresh float32 tree}`` for the modules ``models`` has (U-Net, VAE, text encoder)."""
    return {name: (lambda key, m=getattr(models, name), f=f: f(m, key))
            for name, f in _INITIALIZERS.items() if getattr(models, name) is not None}


def _substreams(keys: jax.Array) -> jax.Array:
    """[B] example keys -> [4, B] keys: timestep, noise, dropout and posterior streams."""
    return jnp.swapaxes(jax.vmap(lambda k: jax.random.split(k, _NUM_STREAMS))(keys), 0, 1)


def _per_example_normal(keys: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    return jax.vmap(lambda k: jax.random.normal(k, shape, jnp.float32))(keys)


class DiffusionLoss:
    """``(components, batch, key, first_index) -> (mean weighted loss over the batch, {})``; see the module
    docstring. ``components``: ``{"unet", "vae", "text_encoder"}`` trees (the encoders only when batches need
    them)."""

    def __init__(self, models: Models, schedule: schedules.ScheduleConfig, loss_cfg: losses.LossConfig):
        self.models = models
        self.uncond_ids = None if models.uncond_ids is None else jnp.asarray(models.uncond_ids, jnp.int32)
        self.alphas_cumprod = jnp.asarray(schedules.alphas_cumprod(schedule), jnp.float32)
        self.num_timesteps = schedule.num_train_timesteps
        self.loss_cfg = loss_cfg

    def _encode_text(self, components, input_ids):
        if self.models.text_encoder is None:
            raise ValueError("the batch has input_ids but models.text_encoder is None; pass the text encoder, or "
                             "feed cached batches with 'context'.")
        out = self.models.text_encoder.apply({"params": components["text_encoder"]}, input_ids,
                                             self.models.text_layer, method="encode")
        return out.astype(jnp.float32)

    def latents_and_context(self, components, batch, posterior_keys):
        """-> (x0 [B, h, w, C] float32 scaled latents, context [B, L, D] float32)."""
        if "latents" in batch:
            latents = jnp.asarray(batch["latents"], jnp.float32)
        elif "images" in batch:
            if self.models.vae is None:
                raise ValueError("the batch has images but models.vae is None; pass the VAE, or feed cached "
                                 "batches with 'latents'.")
            posterior = self.models.vae.apply({"params": components["vae"]}, batch["images"], method="encode")
            mean = posterior.mean.astype(jnp.float32)
            std = jnp.exp(0.5 * posterior.logvar.astype(jnp.float32))
            z = mean + std * _per_example_normal(posterior_keys, mean.shape[1:])
            latents = scale_latents(z, self.models.vae.config)
        else:
            raise ValueError(f"the batch needs 'latents' or 'images'; it has {sorted(batch)}.")
        if "context" in batch:
            context = jnp.asarray(batch["context"], jnp.float32)
        elif "input_ids" in batch:
            context = self._encode_text(components, batch["input_ids"])
        else:
            raise ValueError(f"the batch needs 'context' or 'input_ids'; it has {sorted(batch)}.")
        return latents, context

    def uncond_context(self, components, batch):
        """Empty-prompt embedding [1, L, D] float32."""
        if "uncond_context" in batch:
            u = jnp.asarray(batch["uncond_context"], jnp.float32)
            return u if u.ndim == 3 else u[None]
        if self.models.text_encoder is not None and self.uncond_ids is not None:
            return self._encode_text(components, self.uncond_ids.reshape(1, -1))
        raise ValueError(
            f"condition dropout (p={self.loss_cfg.cond_dropout}) needs the empty-prompt embedding: put "
            "'uncond_context' in the batch, give models.uncond_ids and the text encoder, or set cond_dropout=0."
        )

    def per_example(self, components, batch, key, first_index) -> jax.Array:
        """Weighted per-example losses [B]."""
        cfg = self.loss_cfg
        streams = _substreams(example_keys(key, first_index, batch_rows(batch)))
        x0, context = self.latents_and_context(components, batch, streams[_POSTERIOR])
        t = jax.vmap(lambda k: jax.random.randint(k, (), 0, self.num_timesteps))(streams[_TIMESTEP])
        noise = _per_example_normal(streams[_NOISE], x0.shape[1:])
        if cfg.cond_dropout > 0:
            drop = losses.dropout_mask(streams[_DROPOUT], cfg.cond_dropout)
            context = losses.drop_condition(context, self.uncond_context(components, batch), drop)
        abar = self.alphas_cumprod[t]
        x_t = losses.noisy_sample(x0, noise, abar)
        prediction = self.models.unet.apply({"params": components["unet"]}, x_t, t.astype(jnp.float32), context)
        target = losses.training_target(x0, noise, abar, cfg.prediction_target)
        weights = losses.min_snr_weights(abar, cfg.min_snr_gamma, cfg.prediction_target)
        return losses.per_example_mse(prediction, target) * weights

    def __call__(self, components, batch, key, first_index, gather=None):
        return self.per_example(components, batch, key, first_index).mean(), {}
