"""The train step ``(state, batch, rng) -> (state, metrics)``, compiled for a mesh in one of two forms.

* ``form="jit"``: one program over global arrays; the state keeps the shardings it was created with (FSDP) and
  XLA inserts the collectives. In/out shardings are explicit and the state's buffers are donated.
* ``form="shard_map"``: explicit data parallelism. Each device holds the whole state (it is gathered on entry if it
  was sharded), computes gradients on its slice of the batch, and the gradients are averaged with ``pmean`` over the
  batch axes before the (identical, replicated) optimizer update.

Both forms compute the same numbers as a one-device step: every example's randomness (timestep, noise, condition
dropout, VAE posterior sample) comes from a key derived from (rng, step, global example index), never from the
device layout, and the loss is the mean over the global batch.

Batches are dicts, either
  {"images": [B, H, W, 3] float32 in [-1, 1], "input_ids": [B, 77] int32}                  (frozen encoders run here)
  {"latents": [B, h, w, C] float32 (already scaled), "context": [B, 77, D] float32}       (cached)
optionally with "uncond_context": [77, D] or [1, 77, D], the empty-prompt embedding (otherwise it is computed from
``models.uncond_ids`` with the frozen text encoder). Host-local numpy batches hold this process's rows.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, PartitionSpec as P

from jaxt2i.diffusion import losses
from jaxt2i.diffusion import schedules
from jaxt2i.models.vae import scale_latents
from jaxt2i.train.optim import OptimConfig, ema_update, learning_rate_schedule, make_optimizer
from jaxt2i.train.sharding import (
    DEFAULT_RULES,
    LogicalRules,
    batch_axes,
    batch_shardings,
    replicated,
    shard_batch,
)
from jaxt2i.train.state import Models, TrainableConfig, TrainState, unet_params

FORMS = ("jit", "shard_map")

# Sub-streams of an example's key.
_TIMESTEP, _NOISE, _DROPOUT, _POSTERIOR = range(4)
_NUM_STREAMS = 4

StepFn = Callable[..., tuple[TrainState, dict]]


def _with_compute_dtype(module, dtype, **overrides):
    """The module set to compute in `dtype` (params stay float32); None passes through."""
    if module is None:
        return None
    updates = {"param_dtype": jnp.float32, **overrides}
    if dtype is not None:
        updates["dtype"] = dtype
    return module.clone(**{k: v for k, v in updates.items() if hasattr(module, k)})


def example_keys(key: jax.Array, first_index: jax.Array, count: int) -> jax.Array:
    """One key per example, from its global index in the batch.  -> [count, 2] uint32"""
    index = first_index + jnp.arange(count, dtype=jnp.int32)
    return jax.vmap(lambda i: jax.random.fold_in(key, i))(index)


def _substreams(keys: jax.Array) -> jax.Array:
    """[B] example keys -> [4, B] keys: timestep, noise, dropout and posterior streams."""
    return jnp.swapaxes(jax.vmap(lambda k: jax.random.split(k, _NUM_STREAMS))(keys), 0, 1)


def _per_example_normal(keys: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    return jax.vmap(lambda k: jax.random.normal(k, shape, jnp.float32))(keys)


class _Objective:
    """The per-batch loss as a function of the trainable params (everything else closed over or passed in)."""

    def __init__(self, models: Models, schedule: schedules.ScheduleConfig, loss_cfg: losses.LossConfig,
                 trainable_cfg: TrainableConfig, compute_dtype, remat: bool | None):
        unet_overrides = {} if remat is None else {"remat": remat}
        self.unet = _with_compute_dtype(models.unet, compute_dtype, **unet_overrides)
        self.vae = _with_compute_dtype(models.vae, compute_dtype)
        self.text_encoder = _with_compute_dtype(models.text_encoder, compute_dtype)
        self.uncond_ids = None if models.uncond_ids is None else jnp.asarray(models.uncond_ids, jnp.int32)
        self.text_layer = models.text_layer
        self.alphas_cumprod = jnp.asarray(schedules.alphas_cumprod(schedule), jnp.float32)
        self.num_timesteps = schedule.num_train_timesteps
        self.loss_cfg = loss_cfg
        self.trainable_cfg = trainable_cfg

    def _encode_text(self, frozen, input_ids):
        if self.text_encoder is None:
            raise ValueError("the batch has input_ids but models.text_encoder is None; pass the text encoder, or "
                             "feed cached batches with 'context'.")
        out = self.text_encoder.apply({"params": frozen["text_encoder"]}, input_ids, self.text_layer,
                                      method="encode")
        return out.astype(jnp.float32)

    def latents_and_context(self, frozen, batch, posterior_keys):
        """-> (x0 [B, h, w, C] float32 scaled latents, context [B, L, D] float32)."""
        if "latents" in batch:
            latents = jnp.asarray(batch["latents"], jnp.float32)
        elif "images" in batch:
            if self.vae is None:
                raise ValueError("the batch has images but models.vae is None; pass the VAE, or feed cached "
                                 "batches with 'latents'.")
            posterior = self.vae.apply({"params": frozen["vae"]}, batch["images"], method="encode")
            mean = posterior.mean.astype(jnp.float32)
            std = jnp.exp(0.5 * posterior.logvar.astype(jnp.float32))
            z = mean + std * _per_example_normal(posterior_keys, mean.shape[1:])
            latents = scale_latents(z, self.vae.config)
        else:
            raise ValueError(f"the batch needs 'latents' or 'images'; it has {sorted(batch)}.")
        if "context" in batch:
            context = jnp.asarray(batch["context"], jnp.float32)
        elif "input_ids" in batch:
            context = self._encode_text(frozen, batch["input_ids"])
        else:
            raise ValueError(f"the batch needs 'context' or 'input_ids'; it has {sorted(batch)}.")
        return latents, context

    def uncond_context(self, frozen, batch):
        """Empty-prompt embedding [1, L, D] float32."""
        if "uncond_context" in batch:
            u = jnp.asarray(batch["uncond_context"], jnp.float32)
            return u if u.ndim == 3 else u[None]
        if self.text_encoder is not None and self.uncond_ids is not None:
            return self._encode_text(frozen, self.uncond_ids.reshape(1, -1))
        raise ValueError(
            f"condition dropout (p={self.loss_cfg.cond_dropout}) needs the empty-prompt embedding: put "
            "'uncond_context' in the batch, give models.uncond_ids and the text encoder, or set cond_dropout=0."
        )

    def __call__(self, params, frozen, batch, key, first_index):
        """-> (mean weighted loss over this batch, per-example losses [B])."""
        cfg = self.loss_cfg
        batch_size = jax.tree.leaves({k: v for k, v in batch.items() if k != "uncond_context"})[0].shape[0]
        streams = _substreams(example_keys(key, first_index, batch_size))
        x0, context = self.latents_and_context(frozen, batch, streams[_POSTERIOR])
        t = jax.vmap(lambda k: jax.random.randint(k, (), 0, self.num_timesteps))(streams[_TIMESTEP])
        noise = _per_example_normal(streams[_NOISE], x0.shape[1:])
        if cfg.cond_dropout > 0:
            drop = losses.dropout_mask(streams[_DROPOUT], cfg.cond_dropout)
            context = losses.drop_condition(context, self.uncond_context(frozen, batch), drop)
        abar = self.alphas_cumprod[t]
        x_t = losses.noisy_sample(x0, noise, abar)
        variables = {"params": unet_params(params, frozen, self.trainable_cfg)}
        prediction = self.unet.apply(variables, x_t, t.astype(jnp.float32), context)
        target = losses.training_target(x0, noise, abar, cfg.prediction_target)
        weights = losses.min_snr_weights(abar, cfg.min_snr_gamma, cfg.prediction_target)
        per_example = losses.per_example_mse(prediction, target) * weights
        return per_example.mean(), per_example


def _apply_gradients(state: TrainState, grads, loss, tx: optax.GradientTransformation, optim_cfg: OptimConfig):
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    ema = state.ema_params
    if optim_cfg.ema_decay is not None:
        ema = ema_update(ema, params, optim_cfg.ema_decay)
    metrics = {
        "loss": loss,
        "grad_norm": optax.global_norm(grads),
        "lr": jnp.asarray(learning_rate_schedule(optim_cfg)(state.step), jnp.float32),
    }
    new_state = state.replace(step=state.step + 1, params=params, ema_params=ema, opt_state=opt_state)
    return new_state, metrics


def _raw_key(rng) -> jax.Array:
    """Typed or raw key -> raw uint32 key data."""
    rng = rng if isinstance(rng, jax.Array) else jnp.asarray(rng)
    return jax.random.key_data(rng) if jax.dtypes.issubdtype(rng.dtype, jax.dtypes.prng_key) else rng


def make_train_step(
    models: Models,
    schedule: schedules.ScheduleConfig,
    loss_cfg: losses.LossConfig,
    optim_cfg: OptimConfig,
    trainable_cfg: TrainableConfig,
    *,
    compute_dtype: Any = jnp.float32,
    mesh: Mesh,
    state_shardings: TrainState,
    form: str = "jit",
    rules: LogicalRules = DEFAULT_RULES,
    remat: bool | None = None,
) -> StepFn:
    """Builds ``step(state, batch, rng=None) -> (state, metrics)``; see the module docstring.

    compute_dtype: dtype the modules compute in (e.g. jnp.bfloat16); parameters, gradients, optimizer state and
    the loss stay float32. remat: overrides the U-Net's rematerialisation switch when not None.
    rng: the base key (uint32 [2] or typed); None uses ``state.rng``. The step index is folded into it.
    metrics: float32 scalars ``loss`` (weighted, mean over the global batch), ``grad_norm`` (before clipping) and
    ``lr`` (the learning rate this update used).
    The state passed in is donated: do not use it after the call.
    """
    if form not in FORMS:
        raise ValueError(f"form={form!r}; use one of {FORMS}.")
    objective = _Objective(models, schedule, loss_cfg, trainable_cfg, compute_dtype, remat)
    tx = make_optimizer(optim_cfg)
    grad_fn = jax.value_and_grad(objective, has_aux=True)
    axes = batch_axes(mesh, rules)
    repl = replicated(mesh)

    def global_step(state, batch, rng):
        key = jax.random.fold_in(state.rng if rng is None else rng, state.step)
        (loss, _), grads = grad_fn(state.params, state.frozen, batch, key, jnp.int32(0))
        return _apply_gradients(state, grads, loss, tx, optim_cfg)

    def local_step(state, batch, rng):
        key = jax.random.fold_in(state.rng if rng is None else rng, state.step)
        local_size = jax.tree.leaves({k: v for k, v in batch.items() if k != "uncond_context"})[0].shape[0]
        shard = jnp.int32(0)
        for axis in axes:  # row-major over the batch axes, as PartitionSpec((a, b)) lays the rows out
            shard = shard * mesh.shape[axis] + jax.lax.axis_index(axis)
        (loss, _), grads = grad_fn(state.params, state.frozen, batch, key, shard * local_size)
        grads = jax.lax.pmean(grads, axes)
        loss = jax.lax.pmean(loss, axes)
        return _apply_gradients(state, grads, loss, tx, optim_cfg)

    compiled: dict[tuple[str, ...], Callable] = {}

    def compile_for(batch: Mapping[str, Any], with_rng: bool) -> Callable:
        shardings = batch_shardings(batch, mesh, rules)
        if form == "jit":
            body = global_step
        else:
            specs = {k: s.spec for k, s in shardings.items()}
            body = jax.shard_map(local_step, mesh=mesh, in_specs=(P(), specs, P()), out_specs=(P(), P()),
                                 check_vma=False)
        rng_sharding = repl if with_rng else None
        return jax.jit(body, in_shardings=(state_shardings, shardings, rng_sharding),
                       out_shardings=(state_shardings, repl), donate_argnums=(0,))

    def step(state: TrainState, batch: Mapping[str, Any], rng=None):
        batch = shard_batch(batch, mesh, rules)
        key = (tuple(sorted(batch)), rng is None)
        if key not in compiled:
            compiled[key] = compile_for(batch, rng is not None)
        return compiled[key](state, batch, None if rng is None else _raw_key(rng))

    def lower(state: TrainState, batch: Mapping[str, Any], rng=None):
        """The step lowered for these inputs (e.g. for ``.cost_analysis()``); nothing is run or donated."""
        batch = shard_batch(batch, mesh, rules)
        fn = compile_for(batch, rng is not None)
        return fn.lower(state, batch, None if rng is None else _raw_key(rng))

    step.objective = objective  # for tests and tools that evaluate the loss without a step
    step.lower = lower
    return step
