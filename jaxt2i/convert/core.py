"""Key tables: the explicit mapping between PyTorch state dicts and Flax parameter trees.

A table is a list of :class:`Rule` s. Each rule names one Flax leaf (a path in the parameter tree), one PyTorch key
and the transform between them. :func:`to_flax` applies a table to a state dict and checks it against the abstract
parameter tree (from ``jax.eval_shape(model.init, ...)``); :func:`to_torch` is its exact inverse, used for export.
Anything missing, unexpected or of the wrong shape is an error that names the key and the file.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterable, Mapping

import jax
import numpy as np
from flax import traverse_util

# transform name -> (torch -> flax, flax -> torch)
_TRANSFORMS = {
    # Same layout in both (biases, norms, embeddings).
    "identity": (lambda t: t, lambda f: f),
    # torch Linear weight [out, in] -> flax Dense kernel [in, out].
    "linear": (lambda t: np.transpose(t), lambda f: np.transpose(f)),
    # torch Conv2d weight [O, I, kh, kw] -> flax Conv kernel [kh, kw, I, O].
    "conv": (lambda t: np.transpose(t, (2, 3, 1, 0)), lambda f: np.transpose(f, (3, 2, 0, 1))),
    # A 1x1 torch Conv2d [O, I, 1, 1] used where Flax has a Dense [I, O] (old VAE attention, proj_in/out of SD1).
    "conv1x1_linear": (lambda t: np.transpose(t[:, :, 0, 0]), lambda f: np.transpose(f)[:, :, None, None]),
}


class ConversionError(ValueError):
    """A checkpoint does not match the model it is being loaded into.

    ``torch_key`` names the offending tensor when there is exactly one (a shape mismatch), else None.
    """

    def __init__(self, message: str, torch_key: str | None = None):
        super().__init__(message)
        self.torch_key = torch_key


@dataclasses.dataclass(frozen=True)
class Rule:
    """One Flax leaf <-> one PyTorch tensor."""

    flax_path: tuple[str, ...]
    torch_key: str
    transform: str = "identity"

    def __post_init__(self):
        if self.transform not in _TRANSFORMS:
            raise ValueError(f"Unknown transform {self.transform!r} for {self.torch_key}.")


def dense(flax_prefix: tuple[str, ...], torch_prefix: str, bias: bool = True) -> list[Rule]:
    """Rules for a torch ``nn.Linear`` stored as a flax ``nn.Dense`` (kernel [in, out], bias [out])."""
    rules = [Rule(flax_prefix + ("kernel",), f"{torch_prefix}.weight", "linear")]
    if bias:
        rules.append(Rule(flax_prefix + ("bias",), f"{torch_prefix}.bias"))
    return rules


def conv(flax_prefix: tuple[str, ...], torch_prefix: str, bias: bool = True) -> list[Rule]:
    """Rules for a torch ``nn.Conv2d`` stored as a flax ``nn.Conv`` (kernel HWIO)."""
    rules = [Rule(flax_prefix + ("kernel",), f"{torch_prefix}.weight", "conv")]
    if bias:
        rules.append(Rule(flax_prefix + ("bias",), f"{torch_prefix}.bias"))
    return rules


def norm(flax_prefix: tuple[str, ...], torch_prefix: str) -> list[Rule]:
    """Rules for a torch LayerNorm/GroupNorm (weight, bias) stored as flax (scale, bias)."""
    return [
        Rule(flax_prefix + ("scale",), f"{torch_prefix}.weight"),
        Rule(flax_prefix + ("bias",), f"{torch_prefix}.bias"),
    ]


def _flatten(tree: Mapping[str, Any]) -> dict[tuple[str, ...], Any]:
    return traverse_util.flatten_dict(dict(tree))


def _check_table(rules: list[Rule], abstract_flat: Mapping[tuple[str, ...], Any], what: str) -> None:
    """The table and the model agree: each leaf has exactly one rule and each rule names a real leaf."""
    by_path: dict[tuple[str, ...], Rule] = {}
    for rule in rules:
        if rule.flax_path in by_path:
            raise ConversionError(f"{what}: key table maps two tensors to {'/'.join(rule.flax_path)}.")
        by_path[rule.flax_path] = rule
    unknown = [p for p in by_path if p not in abstract_flat]
    if unknown:
        raise ConversionError(f"{what}: key table names parameters the model does not have: "
                              f"{', '.join('/'.join(p) for p in unknown[:5])}.")
    uncovered = [p for p in abstract_flat if p not in by_path]
    if uncovered:
        raise ConversionError(f"{what}: key table has no rule for model parameters: "
                              f"{', '.join('/'.join(p) for p in uncovered[:5])}.")


def to_flax(
    state_dict: Mapping[str, np.ndarray],
    rules: list[Rule],
    abstract_params: Mapping[str, Any],
    *,
    source: str,
    ignore: Iterable[str] = (),
    dtype: Any = None,
) -> dict:
    """Builds a Flax parameter tree from a PyTorch state dict.

    Args:
      state_dict: torch key -> numpy array (any float dtype).
      rules: the key table for this model/config.
      abstract_params: the tree of ``jax.ShapeDtypeStruct`` from ``jax.eval_shape(model.init, ...)["params"]``.
      source: file or folder name, used in error messages.
      ignore: torch keys that may be present without being used (e.g. non-persistent buffers).
      dtype: storage dtype of the result; default: the abstract tree's dtype of each leaf.

    Returns:
      Nested dict of numpy arrays with exactly the structure and shapes of ``abstract_params``.

    Raises:
      ConversionError: on a missing key, an unexpected key or a shape mismatch (naming key and source).
    """
    abstract_flat = _flatten(abstract_params)
    _check_table(rules, abstract_flat, source)
    ignore = set(ignore)
    missing = [r.torch_key for r in rules if r.torch_key not in state_dict]
    if missing:
        raise ConversionError(
            f"{source}: missing {len(missing)} tensor(s) the model needs, e.g. {', '.join(missing[:5])}. "
            "Is this checkpoint for a different architecture? Pass the matching config/preset.")
    used = {r.torch_key for r in rules}
    unexpected = sorted(k for k in state_dict if k not in used and k not in ignore)
    if unexpected:
        raise ConversionError(
            f"{source}: {len(unexpected)} unexpected tensor(s) that this model has no place for, e.g. "
            f"{', '.join(unexpected[:5])}. Is this checkpoint for a different architecture?")
    flat = {}
    for rule in rules:
        leaf = abstract_flat[rule.flax_path]
        raw = np.asarray(state_dict[rule.torch_key])
        try:
            value = _TRANSFORMS[rule.transform][0](raw)
        except (IndexError, ValueError):  # wrong rank for the transform, e.g. a Linear weight where a conv belongs
            value = raw
        if tuple(value.shape) != tuple(leaf.shape):
            raise ConversionError(
                f"{source}: tensor {rule.torch_key} has shape {tuple(np.shape(state_dict[rule.torch_key]))}, "
                f"which gives {tuple(value.shape)} for {'/'.join(rule.flax_path)}; the model expects "
                f"{tuple(leaf.shape)}. The checkpoint and the config disagree.", torch_key=rule.torch_key)
        # np.ascontiguousarray turns 0-d arrays into [1]; the reshape keeps the model's shape
        flat[rule.flax_path] = np.ascontiguousarray(value).reshape(leaf.shape).astype(dtype or leaf.dtype, copy=False)
    return traverse_util.unflatten_dict(flat)


def to_torch(params: Mapping[str, Any], rules: list[Rule]) -> dict[str, np.ndarray]:
    """Inverse of :func:`to_flax`: a Flax parameter tree -> torch key -> numpy array (same dtypes)."""
    flat = _flatten(params)
    _check_table(rules, {p: None for p in flat}, "export")
    return {
        r.torch_key: np.ascontiguousarray(_TRANSFORMS[r.transform][1](np.asarray(jax.device_get(flat[r.flax_path]))))
        for r in rules
    }


def rename_keys(
    state_dict: Mapping[str, np.ndarray], mapping: Mapping[str, str], *, source: str, ignore: Iterable[str] = ()
) -> dict[str, np.ndarray]:
    """Renames keys with an explicit one-to-one table (e.g. original SD layout -> diffusers layout).

    Every key of ``state_dict`` must be in ``mapping`` or ``ignore``; every mapped key must be present.
    """
    ignore = set(ignore)
    missing = [k for k in mapping if k not in state_dict]
    if missing:
        raise ConversionError(f"{source}: missing {len(missing)} tensor(s), e.g. {', '.join(missing[:5])}.")
    unexpected = sorted(k for k in state_dict if k not in mapping and k not in ignore)
    if unexpected:
        raise ConversionError(
            f"{source}: {len(unexpected)} unexpected tensor(s), e.g. {', '.join(unexpected[:5])}.")
    return {new: state_dict[old] for old, new in mapping.items()}
