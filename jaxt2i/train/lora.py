"""LoRA adapters on the attention projections, as pure functions of parameter trees.

An adapter on a Dense kernel W [in, out] is a pair A [in, r], B [r, out]; the adapted layer computes
``x W + (alpha / r) (x A) B``, i.e. it uses the merged kernel ``W + (alpha / r) A B``. B starts at zero, so a
fresh adapter leaves the model unchanged. Targets are the ``query``, ``key``, ``value`` and ``out`` Dense layers of
every attention module (:class:`jaxt2i.nn.attention.MultiHeadAttention`), found structurally in the tree.

The adapter tree mirrors the parameter tree down to the targeted Dense modules, whose leaves are
``{"lora_a": A, "lora_b": B}``. Training merges it into the base weights before each forward pass
(:func:`merge_lora`); :func:`apply_with_lora` runs the low-rank path separately, without merging.
"""

from __future__ import annotations

import json
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from safetensors import safe_open
from safetensors.numpy import save_file

ATTENTION_PROJECTIONS = ("query", "key", "value", "out")
LORA_FORMAT = "jaxt2i-lora"

Path = tuple[str, ...]


def _is_attention_module(node: Any) -> bool:
    return isinstance(node, dict) and all(
        isinstance(node.get(name), dict) and "kernel" in node[name] for name in ATTENTION_PROJECTIONS
    )


def attention_module_paths(params: Any) -> list[Path]:
    """Paths of every attention module (a dict holding query/key/value/out Dense layers), in tree order."""
    found: list[Path] = []

    def visit(node, path):
        if _is_attention_module(node):
            found.append(path)
            return
        if isinstance(node, dict):
            for key in sorted(node):
                visit(node[key], path + (key,))

    visit(params, ())
    return found


def lora_target_paths(params: Any) -> list[Path]:
    """Paths of the Dense modules LoRA adapts: the 2-D-kernel projections of every attention module."""
    targets = []
    for path in attention_module_paths(params):
        node = params
        for key in path:
            node = node[key]
        targets += [path + (name,) for name in ATTENTION_PROJECTIONS if np.ndim(node[name]["kernel"]) == 2]
    if not targets:
        raise ValueError(
            "found no attention modules (dicts with query/key/value/out Dense layers) to put LoRA adapters on; "
            "is this a U-Net parameter tree?"
        )
    return targets


def _get(tree: Any, path: Path) -> Any:
    for key in path:
        tree = tree[key]
    return tree


def init_lora(params: Any, rank: int, rng: jax.Array, dtype=jnp.float32) -> dict:
    """Fresh adapters for every target of `params`: A ~ N(0, 1/in) [in, r], B = 0 [r, out].

    `params` may be abstract (ShapeDtypeStructs); only the kernel shapes are read.
    """
    if rank < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {rank}.")
    flat = {}
    for i, path in enumerate(lora_target_paths(params)):
        d_in, d_out = _get(params, path)["kernel"].shape
        a = jax.random.normal(jax.random.fold_in(rng, i), (d_in, rank), dtype) * jnp.asarray(d_in**-0.5, dtype)
        flat[path + ("lora_a",)] = a
        flat[path + ("lora_b",)] = jnp.zeros((rank, d_out), dtype)
    return traverse_util.unflatten_dict(flat)


def _adapters(lora_params: Any) -> dict[Path, tuple[Any, Any]]:
    flat = traverse_util.flatten_dict(lora_params)
    paths = {k[:-1] for k in flat}
    out = {}
    for path in paths:
        if (path + ("lora_a",)) not in flat or (path + ("lora_b",)) not in flat:
            raise ValueError(f"LoRA tree entry {'/'.join(path)} must hold both lora_a and lora_b.")
        out[path] = (flat[path + ("lora_a",)], flat[path + ("lora_b",)])
    return out


def lora_delta(a: jax.Array, b: jax.Array, alpha: float) -> jax.Array:
    """(alpha / r) A B in float32.  a: [in, r], b: [r, out] -> [in, out]"""
    rank = a.shape[-1]
    return (alpha / rank) * jnp.matmul(a.astype(jnp.float32), b.astype(jnp.float32), precision="highest")


def merge_lora(base_params: Any, lora_params: Any, alpha: float) -> Any:
    """Base params with every adapter folded into its kernel: W <- W + (alpha / r) A B (kernel dtype kept).

    base_params: the full tree (e.g. the U-Net's variables); lora_params: paths relative to the same root.
    """
    flat = traverse_util.flatten_dict(base_params)
    for path, (a, b) in _adapters(lora_params).items():
        key = path + ("kernel",)
        if key not in flat:
            raise ValueError(
                f"LoRA adapter {'/'.join(path)} has no kernel to merge into in the base params; the adapters were "
                "made for a different model (or a tree with/without the top-level 'params' key)."
            )
        w = flat[key]
        if w.shape != (a.shape[0], b.shape[1]):
            raise ValueError(
                f"LoRA adapter {'/'.join(path)}: A {a.shape} @ B {b.shape} does not match kernel {w.shape}."
            )
        flat[key] = (w.astype(jnp.float32) + lora_delta(a, b, alpha)).astype(w.dtype)
    return traverse_util.unflatten_dict(flat)


def apply_with_lora(module: nn.Module, variables: Any, lora_params: Any, alpha: float, *args,
                    method: str | Callable | None = None, **kwargs):
    """``module.apply(variables, *args)`` with the adapters run as a separate low-rank path in each targeted
    Dense layer (``y = x W + (alpha / r) (x A) B``) instead of merging them into W."""
    adapters = {path: ab for path, ab in _adapters(lora_params).items()}
    if adapters and next(iter(adapters))[0] == "params":
        adapters = {path[1:]: ab for path, ab in adapters.items()}

    def interceptor(next_fun, call_args, call_kwargs, context):
        mod = context.module
        if context.method_name != "__call__" or not isinstance(mod, nn.Dense):
            return next_fun(*call_args, **call_kwargs)
        ab = adapters.get(tuple(mod.path))
        y = next_fun(*call_args, **call_kwargs)
        if ab is None:
            return y
        a, b = ab
        x = call_args[0]
        dtype = mod.dtype or x.dtype
        low = jnp.matmul(jnp.matmul(x.astype(dtype), a.astype(dtype)), b.astype(dtype))
        return y + (alpha / a.shape[-1]) * low.astype(y.dtype)

    with nn.intercept_methods(interceptor):
        return module.apply(variables, *args, method=method, **kwargs)


def save_lora(path: str, lora_params: Any, alpha: float) -> None:
    """Writes the adapters alone as safetensors: keys are '/'-joined tree paths; rank and alpha in metadata."""
    flat = traverse_util.flatten_dict(lora_params)
    tensors = {"/".join(k): np.asarray(jax.device_get(v)) for k, v in flat.items()}
    ranks = {int(v.shape[-1]) for k, v in flat.items() if k[-1] == "lora_a"}
    metadata = {"format": LORA_FORMAT, "alpha": json.dumps(float(alpha)), "rank": json.dumps(sorted(ranks))}
    save_file(tensors, path, metadata=metadata)


def load_lora(path: str) -> tuple[dict, float]:
    """Reads adapters written by :func:`save_lora` -> (lora_params, alpha)."""
    with safe_open(path, framework="numpy") as f:
        metadata = f.metadata() or {}
        if metadata.get("format") != LORA_FORMAT:
            raise ValueError(
                f"{path} is not a jaxt2i LoRA file (metadata format={metadata.get('format')!r}); "
                "write it with jaxt2i.train.lora.save_lora."
            )
        flat = {tuple(k.split("/")): f.get_tensor(k) for k in f.keys()}
    return traverse_util.unflatten_dict(flat), float(json.loads(metadata["alpha"]))
