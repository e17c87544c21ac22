"""Train state: which parameters train, how they are initialised and where they live on the mesh.

A run works on *components*: named parameter trees (``"unet"``, ``"vae"``, ``"text_encoder"``, ``"clip"``, ...;
each the tree *under* ``"params"``, as the ``abstract_params`` functions of the model files return them). The
component kind (``jaxt2i.train.kinds``) names the ones that train; the others are frozen. What of the trainable
ones the optimizer updates (:class:`TrainableConfig`):

* ``"full"``: every parameter, except those under ``freeze`` prefixes (``/``-paths that start with the component
  name, e.g. ``"conditioner/down"``), which are held at their initial values.
* ``"attention"``: only the attention modules (self- and cross-attention q/k/v/out) of each trainable component.
* ``"lora"``: rank-r adapters on the attention projections (:mod:`jaxt2i.train.lora`) of each trainable component.

``state.params`` is ``{component: what trains}``; ``state.frozen`` is ``{component: the rest}`` -- frozen
components whole, and for a trainable one the part held fixed (its frozen leaves, the non-attention part, or the
LoRA base). :func:`components` joins them back into whole trees.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from jaxt2i.train import lora as lora_lib
from jaxt2i.train.optim import OptimConfig, make_optimizer
from jaxt2i.train.sharding import DEFAULT_RULES, LogicalRules, param_shardings, replicated

log = logging.getLogger(__name__)

TRAINABLE_MODES = ("full", "attention", "lora")

Initializer = Callable[[jax.Array], Any]  # key -> a fresh float32 parameter tree


@dataclass(frozen=True)
class TrainableConfig:
    """Which parameters of the trainable components the optimizer updates; see the module docstring.

    freeze: with mode "full", ``/``-path prefixes (component name first, e.g. ``["conditioner/down"]``) of
    parameters held at their initial values: they live in ``state.frozen``, no update, no weight decay, no EMA.
    """

    mode: str = "full"
    lora_rank: int = 4
    lora_alpha: float = 4.0
    freeze: tuple[str, ...] = ()

    def __post_init__(self):
        if self.mode not in TRAINABLE_MODES:
            raise ValueError(f"TrainableConfig.mode={self.mode!r}; use one of {TRAINABLE_MODES}.")
        if self.freeze and self.mode != "full":
            raise ValueError(f"TrainableConfig.freeze={list(self.freeze)} holds parameters fixed in mode 'full' "
                             f"only; mode {self.mode!r} already chooses what trains.")
        if self.mode == "lora" and self.lora_rank < 1:
            raise ValueError(f"TrainableConfig.lora_rank={self.lora_rank} must be >= 1.")


class TrainState(flax.struct.PyTreeNode):
    """Everything a run needs to continue: step (int32 []), trainable params, frozen params, EMA of the trainable
    params (None without EMA), optimizer state, and the base RNG key (uint32 [2]); each step folds its index
    into that key, so the key never changes and a restored run draws the same randomness."""

    step: jax.Array
    params: Any
    frozen: Any
    ema_params: Any
    opt_state: Any
    rng: jax.Array


# -- splitting and joining trees ---------------------------------------------------------------------------------------


def leaf_paths(tree: Any) -> list[str]:
    """The ``/``-path of every leaf of the nested dict ``tree``, in ``jax.tree_util`` leaf order."""
    return ["/".join(str(getattr(k, "key", k)) for k in path)
            for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def paths_under(tree: Any, prefixes: Sequence[str], what: str = "parameter") -> set[str]:
    """The ``/``-paths of ``tree``'s leaves that lie under one of ``prefixes`` (whole path components:
    ``layers_1`` does not take ``layers_10``). Raises ValueError naming a prefix that matches no leaf."""
    paths = leaf_paths(tree)
    chosen = set()
    for prefix in prefixes:
        prefix = prefix.strip("/")
        found = {p for p in paths if p == prefix or p.startswith(prefix + "/")}
        if not found:
            tops = sorted({"/".join(p.split("/")[:2]) for p in paths})
            raise ValueError(f"{prefix!r} names no {what}; paths start with one of {tops[:40]}.")
        chosen |= found
    return chosen


def split_paths(tree: Any, paths: set[str]) -> tuple[dict, dict]:
    """Nested dict -> (leaves not in ``paths``, leaves in ``paths``), two disjoint nested dicts."""
    flat = traverse_util.flatten_dict(tree, sep="/")
    inside = {k: v for k, v in flat.items() if k in paths}
    outside = {k: v for k, v in flat.items() if k not in paths}
    return traverse_util.unflatten_dict(outside, sep="/"), traverse_util.unflatten_dict(inside, sep="/")


def join_trees(a: Any, b: Any) -> dict:
    """Union of two nested dicts with disjoint leaves (the inverse of :func:`split_paths`)."""
    flat = traverse_util.flatten_dict(a)
    other = traverse_util.flatten_dict(b)
    overlap = flat.keys() & other.keys()
    if overlap:
        raise ValueError(f"trees overlap at {sorted('/'.join(k) for k in overlap)[:5]}; they must be disjoint.")
    flat.update(other)
    return traverse_util.unflatten_dict(flat)


def split_attention(params: Any) -> tuple[dict, dict]:
    """A component's tree -> (attention subtrees, everything else), two disjoint nested dicts."""
    attention = [tuple(p) for p in lora_lib.attention_module_paths(params)]
    if not attention:
        raise ValueError("the parameter tree has no attention modules; use TrainableConfig(mode='full').")
    flat = traverse_util.flatten_dict(params)
    inside = {k: v for k, v in flat.items() if any(k[: len(p)] == p for p in attention)}
    outside = {k: v for k, v in flat.items() if k not in inside}
    return traverse_util.unflatten_dict(inside), traverse_util.unflatten_dict(outside)


def split_trainable(trainable: Mapping[str, Any], cfg: TrainableConfig, rng: jax.Array) -> tuple[dict, dict]:
    """``{component: tree}`` -> (what trains, what is held fixed), both ``{component: tree}``."""
    trainable = dict(trainable)
    if cfg.mode == "full":
        if not cfg.freeze:
            return trainable, {}
        held = paths_under(trainable, cfg.freeze, "trainable parameter (trainable.freeze)")
        params, fixed = split_paths(trainable, held)
        return params, fixed
    if cfg.mode == "attention":
        parts = {name: split_attention(tree) for name, tree in trainable.items()}
        return {n: p[0] for n, p in parts.items()}, {n: p[1] for n, p in parts.items()}
    keys = jax.random.split(rng, len(trainable))
    return ({name: lora_lib.init_lora(tree, cfg.lora_rank, k) for (name, tree), k in zip(trainable.items(), keys)},
            trainable)


def components(params: Mapping[str, Any], frozen: Mapping[str, Any], cfg: TrainableConfig) -> dict:
    """``{component: whole tree}``: trainable and held parts joined (LoRA merged), frozen components as they are.
    Pure (runs inside the step)."""
    out = {name: tree for name, tree in frozen.items() if name not in params}
    for name, tree in params.items():
        if name not in frozen:
            out[name] = tree
        elif cfg.mode == "lora":
            out[name] = lora_lib.merge_lora(frozen[name], tree, cfg.lora_alpha)
        else:
            out[name] = join_trees(tree, frozen[name])
    return out


def trained_components(state: TrainState, cfg: TrainableConfig, *, ema: bool = False) -> dict:
    """The whole trees of the trainable components after training (EMA weights with ema=True)."""
    params = state.ema_params if ema else state.params
    if params is None:
        raise ValueError("this state has no EMA params (OptimConfig.ema_decay=None); export with ema=False.")
    return {name: tree for name, tree in components(params, state.frozen, cfg).items() if name in params}


def host_tree(tree: Any) -> Any:
    """A (possibly multi-host sharded) tree -> numpy arrays on this host."""
    if jax.process_count() > 1:
        tree = multihost_utils.process_allgather(tree, tiled=True)
    return jax.tree.map(lambda x: np.asarray(jax.device_get(x)), tree)


# -- the state -------------------------------------------------------------------------------------------------------


def override_leaves(tree: Any, values: Mapping[str, Any], what: str) -> dict:
    """``tree`` with the leaves at the ``/``-paths of ``values`` replaced (float32); each path must exist and keep
    its shape."""
    flat = traverse_util.flatten_dict(tree, sep="/")
    for path, value in values.items():
        if path not in flat:
            near = sorted(k for k in flat if k.split("/")[0] == path.split("/")[0])[:10]
            raise ValueError(f"{what}: no parameter {path!r}; near it: {near}")
        if tuple(np.shape(value)) != tuple(flat[path].shape):
            raise ValueError(f"{what}: {path!r} has shape {tuple(flat[path].shape)}; the value given has "
                             f"{tuple(np.shape(value))}.")
        flat[path] = jnp.asarray(value, jnp.float32)
    return traverse_util.unflatten_dict(flat, sep="/")


def _build_state(given: dict, initializers: Mapping[str, Initializer], trainable: Sequence[str],
                 optim_cfg: OptimConfig, trainable_cfg: TrainableConfig, seed: int,
                 overrides: Mapping[str, Mapping[str, Any]]) -> TrainState:
    root = jax.random.PRNGKey(seed)
    init_key, lora_key = jax.random.split(jax.random.fold_in(root, 0x1217))
    trees = {}
    for i, (name, init) in enumerate(initializers.items()):
        if given.get(name) is not None:
            trees[name] = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), given[name])
        else:
            trees[name] = init(jax.random.fold_in(init_key, i))
        if overrides.get(name):
            trees[name] = override_leaves(trees[name], overrides[name], f"initial {name} values")
    params, held = split_trainable({n: trees.pop(n) for n in trainable}, trainable_cfg, lora_key)
    frozen = {**trees, **held}
    ema = params if optim_cfg.ema_decay is not None else None
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        frozen=frozen,
        ema_params=ema,
        opt_state=make_optimizer(optim_cfg).init(params),
        rng=jax.random.fold_in(root, 0x57E9),
    )


def state_shardings_for(abstract_state: TrainState, mesh: Mesh, rules: LogicalRules = DEFAULT_RULES) -> TrainState:
    """Shardings of a (possibly abstract) TrainState: step and rng replicated, every tree FSDP-placed."""
    return TrainState(
        step=replicated(mesh),
        params=param_shardings(abstract_state.params, mesh, rules),
        frozen=param_shardings(abstract_state.frozen, mesh, rules),
        ema_params=param_shardings(abstract_state.ema_params, mesh, rules),
        opt_state=param_shardings(abstract_state.opt_state, mesh, rules),
        rng=replicated(mesh),
    )


def _prepare_inputs(initializers, given, trainable, overrides):
    """Checked ``given`` (None entries dropped) and float32 ``overrides``."""
    given = {k: v for k, v in (given or {}).items() if v is not None}
    unknown = (set(given) | set(trainable)) - set(initializers)
    if unknown:
        raise ValueError(f"components {sorted(unknown)} have no initializer; the run has {sorted(initializers)}.")
    overrides = {k: {p: np.asarray(v, np.float32) for p, v in d.items()} for k, d in (overrides or {}).items() if d}
    return given, overrides


def _state_builder(initializers, trainable, optim_cfg, trainable_cfg, seed):
    def build(given_params, override_values, boxed=False):
        state = _build_state(given_params, initializers, tuple(trainable), optim_cfg, trainable_cfg, seed,
                             override_values)
        return state if boxed else nn.unbox(state)

    return build


def abstract_train_state(
    initializers: Mapping[str, Initializer],
    given: Mapping[str, Any] | None,
    trainable: Sequence[str],
    optim_cfg: OptimConfig,
    trainable_cfg: TrainableConfig,
    mesh: Mesh,
    rules: LogicalRules = DEFAULT_RULES,
    seed: int = 0,
    overrides: Mapping[str, Mapping[str, Any]] | None = None,
) -> tuple[TrainState, TrainState]:
    """The train state :func:`init_train_state` would build, as shapes only -> (abstract state, state_shardings).

    Every leaf of the abstract state is a ``jax.ShapeDtypeStruct`` carrying its sharding, so a step can be lowered
    and compiled for it (memory and cost analysis) without allocating a parameter. Arguments as for
    :func:`init_train_state`.
    """
    given, overrides = _prepare_inputs(initializers, given, trainable, overrides)
    build = _state_builder(initializers, trainable, optim_cfg, trainable_cfg, seed)
    # Parameters a model annotates with logical axis names (flax LogicallyPartitioned boxes; the optimizer's moments
    # carry the same boxes) are placed by the rules; the state itself holds plain arrays.
    boxed = jax.eval_shape(functools.partial(build, boxed=True), given, overrides)
    shardings = state_shardings_for(boxed, mesh, rules)
    abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), nn.unbox(boxed),
                            shardings)
    return abstract, shardings


def init_train_state(
    initializers: Mapping[str, Initializer],
    given: Mapping[str, Any] | None,
    trainable: Sequence[str],
    optim_cfg: OptimConfig,
    trainable_cfg: TrainableConfig,
    mesh: Mesh,
    rules: LogicalRules = DEFAULT_RULES,
    seed: int = 0,
    overrides: Mapping[str, Mapping[str, Any]] | None = None,
) -> tuple[TrainState, TrainState]:
    """Builds the sharded train state -> (state, state_shardings).

    initializers: ``{component: key -> fresh float32 tree}`` for every component of the run (the order fixes
    each one's init key). given: ``{component: tree}`` of weights to start from (numpy or jax arrays, stored as
    float32); a component missing or None is freshly initialised. trainable: the components that train.
    overrides: ``{component: {"/"-path: array}}``, leaves set after init or loading. Shapes come from
    ``jax.eval_shape`` (:func:`abstract_train_state`); the state is then created directly in its sharded layout by a
    jit with ``out_shardings`` (no host-side full copy).
    """
    given, overrides = _prepare_inputs(initializers, given, trainable, overrides)
    fresh = [k for k in initializers if k not in given]
    if fresh:
        log.info("initialising %s from scratch (seed %d)", ", ".join(fresh), seed)
    _, shardings = abstract_train_state(initializers, given, trainable, optim_cfg, trainable_cfg, mesh, rules, seed,
                                        overrides)
    build = _state_builder(initializers, trainable, optim_cfg, trainable_cfg, seed)
    state = jax.jit(build, out_shardings=shardings)(_place_on_mesh(given, mesh, rules), overrides)
    return state, shardings


def _place_on_mesh(tree: Any, mesh: Mesh, rules: LogicalRules) -> Any:
    """Host arrays -> float32 jax.Arrays in their FSDP layout; each device receives only its slice (works with
    several processes, each holding the same host values). jax.Arrays are left where they are."""

    def one(x, sharding):
        if isinstance(x, jax.Array):
            return x
        host = np.asarray(x, np.float32)
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

    return jax.tree.map(one, tree, param_shardings(tree, mesh, rules))


def count_params(tree: Any) -> int:
    """Number of scalars in a parameter tree."""
    return int(sum(np.prod(np.shape(x)) for x in jax.tree.leaves(tree)))
