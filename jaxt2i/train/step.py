"""The train step ``(state, batch, rng) -> (state, metrics)`` of any component kind, compiled for a mesh in one of
two forms.

A kind's loss is ``loss_fn(components, batch, key, first_index, gather) -> (loss, metrics)``: ``components`` the
whole parameter trees (``jaxt2i.train.state.components``), ``batch`` this program's rows, ``key`` the step's key,
``first_index`` the global index of the batch's first row (per-example randomness comes from ``fold_in(key,
global index)``, never from the device layout), ``gather(x)`` the global rows of a per-row array ``x`` (identity in
the jit form; an all-gather over the batch axes in the shard_map form), for losses that compare examples with each
other (contrastive). The loss is the mean over the global batch; metrics are scalars, likewise means. A loss may also
return, under the metrics key :data:`FROZEN_UPDATES`, ``{component: tree}``: new values of frozen components that
replace them after the step (statistics kept outside the optimizer, e.g. a VQ codebook's moving averages); compute
them from ``gather``-ed rows, so that they are the same on every device.

* ``form="jit"``: one program over global arrays; the state keeps the shardings it was created with (FSDP) and
  XLA inserts the collectives. In/out shardings are explicit and the state's buffers are donated.
* ``form="shard_map"``: explicit data parallelism. Each device holds the whole state (it is gathered on entry if it
  was sharded), computes gradients on its slice of the batch, and the gradients are averaged with ``pmean`` over the
  batch axes before the (identical, replicated) optimizer update. A loss computed on gathered rows is the same on
  every device, and the all-gather's transpose sums every device's share of its gradient, so the ``pmean`` gives
  the global gradient there too.

Both forms compute the same numbers as a one-device step. Batches are dicts of host-local numpy arrays (this
process's rows) or global jax.Arrays; ``sharding.SHARED_KEYS`` entries (one array shared by all rows) are
replicated.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, PartitionSpec as P

from jaxt2i.train.optim import OptimConfig, ema_update, learning_rate_schedule, make_optimizer
from jaxt2i.train.sharding import (DEFAULT_RULES, SHARED_KEYS, LogicalRules, batch_axes, batch_shardings,
                                   replicated, shard_batch)
from jaxt2i.train.state import TrainableConfig, TrainState, components

FORMS = ("jit", "shard_map")
FROZEN_UPDATES = "frozen_updates"  # a loss's metrics entry: {component: tree} replacing frozen components

LossFn = Callable[..., tuple[jax.Array, dict]]
StepFn = Callable[..., tuple[TrainState, dict]]


def example_keys(key: jax.Array, first_index: jax.Array, count: int) -> jax.Array:
    """One key per example, from its global index in the batch.  -> [count, 2] uint32"""
    index = first_index + jnp.arange(count, dtype=jnp.int32)
    return jax.vmap(lambda i: jax.random.fold_in(key, i))(index)


def batch_rows(batch: Mapping[str, Any]) -> int:
    """Rows of a batch (the leading dimension of its per-row arrays)."""
    return jax.tree.leaves({k: v for k, v in batch.items() if k not in SHARED_KEYS})[0].shape[0]


def _identity(x):
    return x


def _frozen_after(state: TrainState, aux: dict) -> tuple[Any, dict]:
    """(the frozen trees after the step, the metrics without ``FROZEN_UPDATES``)."""
    aux = dict(aux)
    updates = aux.pop(FROZEN_UPDATES, None) or {}
    wrong = set(updates) - (set(state.frozen) - set(state.params))
    if wrong:
        raise ValueError(f"the loss updates {sorted(wrong)} through {FROZEN_UPDATES!r}; only frozen components take "
                         f"such updates (the run's are {sorted(set(state.frozen) - set(state.params))}).")
    return {**state.frozen, **updates}, aux


def _apply_gradients(state: TrainState, grads, loss, aux: dict, tx: optax.GradientTransformation,
                     optim_cfg: OptimConfig):
    frozen, aux = _frozen_after(state, aux)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    ema = state.ema_params
    if optim_cfg.ema_decay is not None:
        ema = ema_update(ema, params, optim_cfg.ema_decay)
    metrics = {
        **aux,
        "loss": loss,
        "grad_norm": optax.global_norm(grads),
        "lr": jnp.asarray(learning_rate_schedule(optim_cfg)(state.step), jnp.float32),
    }
    new_state = state.replace(step=state.step + 1, params=params, frozen=frozen, ema_params=ema, opt_state=opt_state)
    return new_state, metrics


def _raw_key(rng) -> jax.Array:
    """Typed or raw key -> raw uint32 key data."""
    rng = rng if isinstance(rng, jax.Array) else jnp.asarray(rng)
    return jax.random.key_data(rng) if jax.dtypes.issubdtype(rng.dtype, jax.dtypes.prng_key) else rng


def make_train_step(
    loss_fn: LossFn,
    optim_cfg: OptimConfig,
    trainable_cfg: TrainableConfig,
    *,
    mesh: Mesh,
    state_shardings: TrainState,
    form: str = "jit",
    rules: LogicalRules = DEFAULT_RULES,
) -> StepFn:
    """Builds ``step(state, batch, rng=None) -> (state, metrics)``; see the module docstring.

    rng: the base key (uint32 [2] or typed); None uses ``state.rng``. The step index is folded into it.
    metrics: the loss's own metrics plus float32 scalars ``loss`` (mean over the global batch), ``grad_norm``
    (before clipping) and ``lr`` (the learning rate this update used). ``step.lower(state, batch)`` lowers the
    step without running it (for ``.cost_analysis()``); ``step.gradients(state, batch)`` returns the gradient
    without an update. The state passed in is donated: do not use it after.
    """
    if form not in FORMS:
        raise ValueError(f"form={form!r}; use one of {FORMS}.")
    tx = make_optimizer(optim_cfg)
    axes = batch_axes(mesh, rules)
    repl = replicated(mesh)

    def objective(params, frozen, batch, key, first_index, gather):
        return loss_fn(components(params, frozen, trainable_cfg), batch, key, first_index, gather)

    grad_fn = jax.value_and_grad(objective, has_aux=True)

    def global_gradients(state, batch, rng):
        key = jax.random.fold_in(state.rng if rng is None else rng, state.step)
        (loss, aux), grads = grad_fn(state.params, state.frozen, batch, key, jnp.int32(0), _identity)
        return grads, loss, aux

    def gather(x):
        return jax.lax.all_gather(x, axes, tiled=True) if axes else x

    def local_gradients(state, batch, rng):
        key = jax.random.fold_in(state.rng if rng is None else rng, state.step)
        shard = jnp.int32(0)
        for axis in axes:  # row-major over the batch axes, as PartitionSpec((a, b)) lays the rows out
            shard = shard * mesh.shape[axis] + jax.lax.axis_index(axis)
        (loss, aux), grads = grad_fn(state.params, state.frozen, batch, key, shard * batch_rows(batch), gather)
        return jax.lax.pmean((grads, loss, aux), axes) if axes else (grads, loss, aux)

    def global_step(state, batch, rng):
        return _apply_gradients(state, *global_gradients(state, batch, rng), tx, optim_cfg)

    def local_step(state, batch, rng):
        return _apply_gradients(state, *local_gradients(state, batch, rng), tx, optim_cfg)

    compiled: dict[tuple, Callable] = {}

    def compile_for(batch: Mapping[str, Any], with_rng: bool, gradients_only: bool = False) -> Callable:
        shardings = batch_shardings(batch, mesh, rules)
        body = (global_gradients if gradients_only else global_step) if form == "jit" else \
            (local_gradients if gradients_only else local_step)
        if form == "shard_map":
            specs = {k: s.spec for k, s in shardings.items()}
            body = jax.shard_map(body, mesh=mesh, in_specs=(P(), specs, P()),
                                 out_specs=(P(), P(), P()) if gradients_only else (P(), P()), check_vma=False)
        rng_sharding = repl if with_rng else None
        if gradients_only:  # nothing donated: the state stays usable
            return jax.jit(body, in_shardings=(state_shardings, shardings, rng_sharding),
                           out_shardings=(state_shardings.params, repl, repl))
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

    def gradients(state: TrainState, batch: Mapping[str, Any], rng=None):
        """``(grads, loss, metrics)`` of the step's form for these inputs, without an update (for tests and
        tools): the gradient the optimizer would receive, averaged over the global batch."""
        batch = shard_batch(batch, mesh, rules)
        fn = compile_for(batch, rng is not None, gradients_only=True)
        return fn(state, batch, None if rng is None else _raw_key(rng))

    step.lower = lower
    step.gradients = gradients
    step.loss = objective  # for tests and tools that evaluate the loss without a step
    return step
