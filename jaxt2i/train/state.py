"""Train state: which parameters train, how they are initialised and where they live on the mesh.

Parameter trees are the trees *under* ``"params"`` (as the ``abstract_params`` functions of the model files return
them); modules are applied with ``{"params": tree}``.

What trains (:class:`TrainableConfig`):
* ``"full"``: every U-Net parameter. ``state.params`` is the U-Net tree.
* ``"attention"``: only the U-Net's attention modules (self- and cross-attention q/k/v/out). ``state.params``
  holds those subtrees, ``state.frozen["unet"]`` the rest; the two are disjoint and join back into the U-Net tree.
* ``"lora"``: rank-r adapters on the attention projections (:mod:`jaxt2i.train.lora`). ``state.params`` is the
  adapter tree, ``state.frozen["unet"]`` the whole base U-Net.
The text encoder and VAE are always frozen (``state.frozen["text_encoder"]``, ``state.frozen["vae"]``; absent when
training on cached latents and embeddings).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Mapping, NamedTuple, Sequence

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from jax.sharding import Mesh

from jaxt2i.train import lora as lora_lib
from jaxt2i.train.optim import OptimConfig, make_optimizer
from jaxt2i.train.sharding import DEFAULT_RULES, LogicalRules, param_shardings, replicated

log = logging.getLogger(__name__)

TRAINABLE_MODES = ("full", "attention", "lora")


@dataclass(frozen=True)
class TrainableConfig:
    """Which U-Net parameters the optimizer updates; see the module docstring.

    freeze: with mode "full", ``/``-path prefixes of U-Net parameters held at their initial values (e.g.
    ``["context_merge/down"]``); they live in ``state.frozen["unet"]``: no update, no weight decay, no EMA.
    """

    mode: str = "full"
    lora_rank: int = 4
    lora_alpha: float = 4.0
    freeze: tuple[str, ...] = ()

    def __post_init__(self):
        if self.mode not in TRAINABLE_MODES:
            raise ValueError(f"TrainableConfig.mode={self.mode!r}; use one of {TRAINABLE_MODES}.")
        if self.freeze and self.mode != "full":
            raise ValueError(f"TrainableConfig.freeze={list(self.freeze)} holds U-Net parameters fixed in mode 'full' "
                             f"only; mode {self.mode!r} already chooses what trains.")
        if self.mode == "lora" and self.lora_rank < 1:
            raise ValueError(f"TrainableConfig.lora_rank={self.lora_rank} must be >= 1.")


class Models(NamedTuple):
    """The module instances a train step runs. vae / text_encoder may be None when batches carry cached latents
    and context. uncond_ids: [1, 77] int32 ids of the empty prompt (for condition dropout), or None.
    text_layer: which text-encoder hidden state conditions the U-Net (-1 last, -2 penultimate), or a tuple of
    several, concatenated along the tokens (``CLIPTextModel.encode``)."""

    unet: nn.Module
    vae: nn.Module | None = None
    text_encoder: nn.Module | None = None
    uncond_ids: Any = None
    text_layer: int | tuple[int, ...] = -1


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


# -- partitioning of the U-Net tree ------------------------------------------------------------------------------------


def _is_attention_path(path: tuple[str, ...], attention_paths: set[tuple[str, ...]]) -> bool:
    return any(path[: len(p)] == p for p in attention_paths)


def split_attention(unet_params: Any) -> tuple[dict, dict]:
    """U-Net tree -> (attention subtrees, everything else), two disjoint nested dicts."""
    attention = set(lora_lib.attention_module_paths(unet_params))
    if not attention:
        raise ValueError("the U-Net parameter tree has no attention modules; use TrainableConfig(mode='full').")
    flat = traverse_util.flatten_dict(unet_params)
    inside = {k: v for k, v in flat.items() if _is_attention_path(k, attention)}
    outside = {k: v for k, v in flat.items() if k not in inside}
    return traverse_util.unflatten_dict(inside), traverse_util.unflatten_dict(outside)


def leaf_paths(tree: Any) -> list[str]:
    """The ``/``-path of every leaf of the nested dict ``tree`` (its keys joined by ``/``), in ``jax.tree_util``
    leaf order."""
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
    """Union of two nested dicts with disjoint leaves (the inverse of :func:`split_attention`)."""
    flat = traverse_util.flatten_dict(a)
    other = traverse_util.flatten_dict(b)
    overlap = flat.keys() & other.keys()
    if overlap:
        raise ValueError(f"trees overlap at {sorted('/'.join(k) for k in overlap)[:5]}; they must be disjoint.")
    flat.update(other)
    return traverse_util.unflatten_dict(flat)


def split_trainable(unet_params: Any, cfg: TrainableConfig, rng: jax.Array) -> tuple[Any, Any]:
    """U-Net tree -> (trainable params, frozen U-Net part or None)."""
    if cfg.mode == "full":
        if cfg.freeze:
            return split_paths(unet_params, paths_under(unet_params, cfg.freeze, "U-Net parameter (trainable.freeze)"))
        return unet_params, None
    if cfg.mode == "attention":
        return split_attention(unet_params)
    return lora_lib.init_lora(unet_params, cfg.lora_rank, rng), unet_params


def unet_params(params: Any, frozen: Mapping[str, Any], cfg: TrainableConfig) -> Any:
    """The U-Net tree the forward pass uses: trainable and frozen parts joined, LoRA merged. Pure."""
    if cfg.mode == "full" and not cfg.freeze:
        return params
    if cfg.mode in ("full", "attention"):
        return join_trees(params, frozen["unet"])
    return lora_lib.merge_lora(frozen["unet"], params, cfg.lora_alpha)


def trained_unet_params(state: TrainState, cfg: TrainableConfig, *, ema: bool = False) -> Any:
    """The full U-Net tree after training (EMA weights with ema=True), ready for export."""
    params = state.ema_params if ema else state.params
    if params is None:
        raise ValueError("this state has no EMA params (OptimConfig.ema_decay=None); export with ema=False.")
    return unet_params(params, state.frozen, cfg)


# -- fresh parameters ------------------------------------------------------------------------------------------------


def _init_unet(unet: nn.Module, rng: jax.Array) -> Any:
    cfg = unet.config
    factor = 2 ** (cfg.num_blocks - 1)
    sample = jnp.zeros((1, factor, factor, cfg.in_channels), jnp.float32)
    context = jnp.zeros((1, cfg.context_layers, cfg.cross_attention_dim), jnp.float32)
    return unet.init(rng, sample, jnp.zeros((1,), jnp.float32), context)["params"]


def _init_vae(vae: nn.Module, rng: jax.Array) -> Any:
    cfg = vae.config
    side = cfg.downsample_factor
    return vae.init(rng, jnp.zeros((1, side, side, cfg.in_channels), jnp.float32))["params"]


def _init_text_encoder(text_encoder: nn.Module, rng: jax.Array) -> Any:
    return text_encoder.init(rng, jnp.zeros((1, 1), jnp.int32))["params"]


_INITIALIZERS = {"unet": _init_unet, "vae": _init_vae, "text_encoder": _init_text_encoder}


def _model_modules(models: Models) -> dict[str, nn.Module]:
    return {name: getattr(models, name) for name in _INITIALIZERS if getattr(models, name) is not None}


def _fp32_storage(module: nn.Module) -> nn.Module:
    """Master weights are float32 whatever dtype the caller built the module with."""
    return module.clone(param_dtype=jnp.float32) if hasattr(module, "param_dtype") else module


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


def _build_state(given: dict, models: Models, optim_cfg: OptimConfig, trainable_cfg: TrainableConfig,
                 seed: int, overrides: Mapping[str, Mapping[str, Any]] | None = None) -> TrainState:
    root = jax.random.PRNGKey(seed)
    init_key, lora_key = jax.random.split(jax.random.fold_in(root, 0x1217))
    model_params = {}
    for i, (name, module) in enumerate(_model_modules(models).items()):
        if given.get(name) is not None:
            model_params[name] = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), given[name])
        else:
            model_params[name] = _INITIALIZERS[name](_fp32_storage(module), jax.random.fold_in(init_key, i))
        if (overrides or {}).get(name):
            model_params[name] = override_leaves(model_params[name], overrides[name], f"initial {name} values")
    params, frozen_unet = split_trainable(model_params.pop("unet"), trainable_cfg, lora_key)
    frozen = dict(model_params)
    if frozen_unet is not None:
        frozen["unet"] = frozen_unet
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


def init_train_state(
    models: Models,
    model_params: Mapping[str, Any] | None,
    optim_cfg: OptimConfig,
    trainable_cfg: TrainableConfig,
    mesh: Mesh,
    rules: LogicalRules = DEFAULT_RULES,
    seed: int = 0,
    overrides: Mapping[str, Mapping[str, Any]] | None = None,
) -> tuple[TrainState, TrainState]:
    """Builds the sharded train state -> (state, state_shardings).

    model_params: {"unet": tree, "vae": tree, "text_encoder": tree} with any entry missing or None (or the
    whole dict None) meaning a fresh random init of that model (training from scratch). Trees may be numpy or
    jax arrays; they are stored as float32 master weights. overrides: ``{model: {"/"-path: array}}``, leaves set
    after init or loading (e.g. a fresh U-Net's ``context_merge/down/kernel`` from a CLIP's parse head). Shapes
    come from ``jax.eval_shape``; the state is then created directly in its sharded layout by a jit with
    ``out_shardings`` (no host-side full copy).
    """
    given = {k: v for k, v in (model_params or {}).items() if v is not None}
    unknown = set(given) - set(_INITIALIZERS)
    if unknown:
        raise ValueError(f"model_params has unknown entries {sorted(unknown)}; expected {sorted(_INITIALIZERS)}.")
    missing_module = [k for k in given if getattr(models, k) is None]
    if missing_module:
        raise ValueError(f"model_params has {missing_module} but models has no module for it; pass the module too.")
    fresh = [k for k in _model_modules(models) if k not in given]
    if fresh:
        log.info("initialising %s from scratch (seed %d)", ", ".join(fresh), seed)

    def build(given_params, override_values):
        return _build_state(given_params, models, optim_cfg, trainable_cfg, seed, override_values)

    overrides = {k: {p: np.asarray(v, np.float32) for p, v in d.items()} for k, d in (overrides or {}).items() if d}
    abstract = jax.eval_shape(build, given, overrides)
    shardings = state_shardings_for(abstract, mesh, rules)
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
