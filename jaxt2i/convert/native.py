"""jaxt2i's own checkpoint format: a folder with ``jaxt2i.json`` and one safetensors file per component.

``jaxt2i.json`` holds the format version, each component's config (dataclass fields), the noise schedule, the
tokenizer settings and ``text_layer`` (the text-encoder hidden state that conditions the U-Net; -1, the last, when
absent); ``<component>.safetensors`` holds the Flax parameter tree flattened with ``/``-joined
paths. Loading needs no key table and no transposes, so it is fast; the tree is still checked against the
model's abstract tree, like every other format.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from typing import Any, Mapping, Sequence

import numpy as np
from flax import traverse_util

from jaxt2i.convert.core import ConversionError
from jaxt2i.convert.io import atomic_folder, read_safetensors, write_safetensors

MANIFEST = "jaxt2i.json"
FORMAT_VERSION = 1


def is_native_folder(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a folder written by :func:`save_native` / ``jaxt2i convert``."""
    return os.path.isfile(os.path.join(path, MANIFEST))


def flatten_params(params: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Nested param tree -> ``{"a/b/kernel": array}`` (numpy, on host)."""
    return {"/".join(k): np.asarray(v) for k, v in traverse_util.flatten_dict(dict(params)).items()}


def unflatten_params(flat: Mapping[str, np.ndarray]) -> dict:
    """Inverse of :func:`flatten_params`."""
    return traverse_util.unflatten_dict({tuple(k.split("/")): v for k, v in flat.items()})


def config_to_dict(config: Any) -> dict:
    """A frozen config dataclass -> JSON-ready dict."""
    return dataclasses.asdict(config)


def config_from_dict(cls: type, data: Mapping[str, Any], *, source: str) -> Any:
    """Rebuilds a frozen config dataclass; JSON lists become tuples again. Unknown fields are an error."""
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - fields)
    if unknown:
        raise ConversionError(f"{source}: unknown {cls.__name__} field(s) {unknown}; written by a newer jaxt2i?")
    return cls(**{k: _tuples(v) for k, v in data.items()})


def _tuples(value: Any) -> Any:
    if isinstance(value, list):
        return tuple(_tuples(v) for v in value)
    return value


def save_native(
    folder: str | os.PathLike,
    *,
    configs: Mapping[str, Any],
    params: Mapping[str, Mapping[str, Any]],
    schedule: Any,
    tokenizer: Mapping[str, Any],
    tokenizer_files: str | os.PathLike | None = None,
    text_layer: int | Sequence[int] = -1,
    sampling: Mapping[str, Any] | None = None,
    overwrite: bool = False,
) -> None:
    """Writes a jaxt2i folder.

    Args:
      folder: destination; must not exist unless ``overwrite`` (nothing the user had is replaced silently).
      configs: component name -> config dataclass (``unet``, ``vae``, ``text_encoder``, ...).
      params: component name -> Flax parameter tree.
      schedule: the noise-schedule config dataclass.
      tokenizer: tokenizer settings (JSON-ready), e.g. ``{"pad": "eos"}``.
      tokenizer_files: optional folder with vocab.json/merges.txt to copy to ``tokenizer/``.
      text_layer: the text-encoder hidden state(s) the U-Net is conditioned on (``CLIPTextModel.encode``'s ``layer``).
      sampling: the model's recommended sampling settings, ``{"steps": int, "guidance": float}`` (either may be
        absent; :func:`sampling_settings` checks them); ``jaxt2i generate`` uses them when not told otherwise.
    """
    sampling = sampling_settings(sampling or {}, str(folder))
    with atomic_folder(folder, overwrite=overwrite) as staging:
        for name, tree in params.items():
            write_safetensors(os.path.join(staging, f"{name}.safetensors"), flatten_params(tree),
                              metadata={"format": "jaxt2i"})
        manifest = {
            "format": "jaxt2i",
            "version": FORMAT_VERSION,
            "components": {name: config_to_dict(cfg) for name, cfg in configs.items()},
            "schedule": config_to_dict(schedule),
            "tokenizer": dict(tokenizer),
            "text_layer": list(text_layer) if isinstance(text_layer, (list, tuple)) else int(text_layer),
        }
        if sampling:
            manifest["sampling"] = sampling
        with open(os.path.join(staging, MANIFEST), "w") as f:
            json.dump(manifest, f, indent=2)
        if tokenizer_files is not None:
            shutil.copytree(tokenizer_files, os.path.join(staging, "tokenizer"))


SAMPLING_KEYS = ("steps", "guidance")


def sampling_settings(raw: Any, source: str) -> dict:
    """Checks a manifest's ``"sampling"`` entry -- ``{"steps": int >= 1, "guidance": float}``, either key optional --
    and returns it as a plain dict (``steps`` int, ``guidance`` float). Raises ConversionError naming ``source``."""
    if not isinstance(raw, Mapping):
        raise ConversionError(f"{source}: jaxt2i.json \"sampling\" must be an object like "
                              f"{{\"steps\": 25, \"guidance\": 3.0}}, got {raw!r}.")
    unknown = sorted(set(raw) - set(SAMPLING_KEYS))
    if unknown:
        raise ConversionError(f"{source}: jaxt2i.json \"sampling\" has unknown keys {unknown}; "
                              f"known: {list(SAMPLING_KEYS)}.")
    out = {}
    steps, guidance = raw.get("steps"), raw.get("guidance")
    if steps is not None:
        if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 1:
            raise ConversionError(f"{source}: jaxt2i.json \"sampling\".steps must be an integer >= 1, got {steps!r}.")
        out["steps"] = int(steps)
    if guidance is not None:
        if isinstance(guidance, bool) or not isinstance(guidance, (int, float, np.integer, np.floating)) \
                or not np.isfinite(guidance):
            raise ConversionError(f"{source}: jaxt2i.json \"sampling\".guidance must be a number, got {guidance!r}.")
        out["guidance"] = float(guidance)
    return out


def read_manifest(folder: str | os.PathLike) -> dict:
    """Reads and validates ``jaxt2i.json``."""
    path = os.path.join(folder, MANIFEST)
    try:
        with open(path) as f:
            manifest = json.load(f)
    except json.JSONDecodeError as e:
        raise ConversionError(f"{path} is not valid JSON ({e}).") from None
    if manifest.get("format") != "jaxt2i" or not isinstance(manifest.get("components"), dict):
        raise ConversionError(f"{path} is not a jaxt2i manifest.")
    if manifest.get("version", 0) > FORMAT_VERSION:
        raise ConversionError(f"{path} has format version {manifest['version']}; this jaxt2i reads up to "
                              f"{FORMAT_VERSION}. Upgrade jaxt2i.")
    return manifest


def read_component(folder: str | os.PathLike, name: str) -> dict[str, np.ndarray]:
    """The flat ``{"a/b/kernel": array}`` tensors of one component."""
    path = os.path.join(folder, f"{name}.safetensors")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{folder}: component file {name}.safetensors is missing.")
    return read_safetensors(path)
