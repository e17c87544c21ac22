"""jaxt2i's own model-folder format: ``jaxt2i.json`` plus one safetensors file per component, for every family.

``jaxt2i.json`` (format version 2)::

    {"format": "jaxt2i", "version": 2,
     "family": "latent_diffusion" | "dit" | "dalle" | null,  # the pipeline that loads it (null: components alone)
     "components": {NAME: {"type": TYPE, "config": {...}}},   # TYPE a jaxt2i.convert.components type
     "schedule": {...} | null, "tokenizer": {...}, "text_layer": -1 | [0, -1], "sampling": {"steps", "guidance"},
     "extras": {...}}                            # optional, family-specific (the dit family's "id2label")

A component entry of a model that ships inside the package may say ``"from": MODEL`` (a name in
:data:`jaxt2i.shipped.SHIPPED_MODELS`): its weights are that shipped model's component of the same name (with the
same config), so shipped models share a text encoder or a VAE instead of each carrying a copy. Folders written
from a loaded model are always self-contained.

``NAME.safetensors`` holds component NAME's Flax parameter tree flattened with ``/``-joined paths; ``tokenizer/``
optionally holds the tokenizer's own files. Loading needs no key table and no transposes, so it is fast; every
tree is still checked against its type's abstract tree, like every other format. Version-1 folders (components
as bare configs named by their type, no family) are read through :func:`upgrade_manifest`.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Mapping

import numpy as np
from flax import traverse_util

from jaxt2i.convert.core import ConversionError
from jaxt2i.convert.io import read_safetensors
from jaxt2i.shipped import SHIPPED_MODELS, model_path

MANIFEST = "jaxt2i.json"
FORMAT_VERSION = 2
FAMILIES = ("latent_diffusion", "dit", "dalle")


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
    """Reads ``jaxt2i.json`` and returns it in the current version's layout (see the module docstring)."""
    path = os.path.join(folder, MANIFEST)
    try:
        with open(path) as f:
            manifest = json.load(f)
    except json.JSONDecodeError as e:
        raise ConversionError(f"{path} is not valid JSON ({e}).") from None
    if not isinstance(manifest, dict) or manifest.get("format") != "jaxt2i" \
            or not isinstance(manifest.get("components"), dict):
        raise ConversionError(f"{path} is not a jaxt2i manifest.")
    version = manifest.get("version", 0)
    if version > FORMAT_VERSION:
        raise ConversionError(f"{path} has format version {version}; this jaxt2i reads up to "
                              f"{FORMAT_VERSION}. Upgrade jaxt2i.")
    if version < 2:
        manifest = upgrade_manifest(manifest)
        vision = v1_clip_vision_config(folder)
        if vision is not None:
            manifest["components"]["clip_vision"] = {"type": "clip_vision", "config": vision}
    family = manifest.get("family")
    if family is not None and family not in FAMILIES:
        raise ConversionError(f"{path}: unknown family {family!r}; this jaxt2i knows {list(FAMILIES)}.")
    for name, entry in manifest["components"].items():
        if not isinstance(entry, dict) or not isinstance(entry.get("type"), str) \
                or not isinstance(entry.get("config"), dict):
            raise ConversionError(f"{path}: component {name!r} must be {{\"type\": ..., \"config\": {{...}}}}.")
        if "from" in entry and entry["from"] not in SHIPPED_MODELS:
            raise ConversionError(f"{path}: component {name!r} takes its weights from {entry['from']!r}, which is not "
                                  f"a model shipped with this jaxt2i ({', '.join(SHIPPED_MODELS)}).")
    return manifest


# Version 1 kept a context merge inside the U-Net config and weights; version 2 keeps it as a conditioner.
_V1_MERGE_FIELD = "context_merge_rank"
_V1_UNET_ONLY_FIELDS = ("context_encoder_layers", "context_encoder_heads", _V1_MERGE_FIELD)
V1_MERGE_PREFIX = "context_merge/"


def upgrade_manifest(manifest: Mapping[str, Any]) -> dict:
    """A version-1 manifest in the version-2 layout: each component ``{"type": name, "config": config}``, the
    family from the components, a U-Net's context merge (``context_merge_rank``) as a ``conditioner`` component
    (:func:`v1_unet_parts` splits the weights the same way); ``"upgraded_from"`` keeps the version read, for
    :func:`read_component`. Raises for a U-Net with a context encoder, which no
    version-2 component holds."""
    out = {k: v for k, v in manifest.items() if k != "components"}
    components = {name: {"type": name, "config": dict(config)} for name, config in manifest["components"].items()}
    unet_entry = components.get("unet")
    if unet_entry is not None:
        config = unet_entry["config"]
        if config.get("context_encoder_layers"):
            raise ConversionError("this version-1 folder's U-Net has a context encoder (context_encoder_layers="
                                  f"{config['context_encoder_layers']}), which this jaxt2i does not implement.")
        rank = config.get(_V1_MERGE_FIELD) or 0
        for field in _V1_UNET_ONLY_FIELDS:
            config.pop(field, None)
        if rank:
            components["conditioner"] = {"type": "conditioner", "config": {
                "width": config.get("cross_attention_dim", 768), "rank": rank, "num_inputs": 2}}
    out["components"] = components
    out["family"] = "latent_diffusion" if "unet" in components else None
    out["version"] = FORMAT_VERSION
    out["upgraded_from"] = manifest.get("version", 0)
    return out


def v1_unet_parts(flat_unet: Mapping[str, np.ndarray]) -> tuple[dict, dict]:
    """A version-1 U-Net's flat tensors -> (U-Net tensors, conditioner tensors): ``context_merge/...`` is the
    conditioner's ``...``."""
    unet = {k: v for k, v in flat_unet.items() if not k.startswith(V1_MERGE_PREFIX)}
    merge = {k[len(V1_MERGE_PREFIX):]: v for k, v in flat_unet.items() if k.startswith(V1_MERGE_PREFIX)}
    return unet, merge


def check_weight_files(folder: str | os.PathLike, manifest: Mapping[str, Any]) -> None:
    """Refuses a folder holding a ``NAME.safetensors`` that the manifest names no component for (a stray or renamed
    weight file: which weights the folder means is unclear). Other files (a README, samples) are fine."""
    names = {f"{name}.safetensors" for name in manifest["components"]}
    stray = sorted(f for f in os.listdir(folder) if f.endswith(".safetensors") and f not in names)
    if stray:
        raise ConversionError(f"{os.path.join(folder, stray[0])}: a weight file that {MANIFEST} names no component "
                              f"for (its components: {sorted(manifest['components'])}). Remove or rename it, or add "
                              f"the component to {MANIFEST}.")


def write_manifest(folder: str, manifest: Mapping[str, Any]) -> None:
    """Writes ``jaxt2i.json`` into ``folder``."""
    with open(os.path.join(folder, MANIFEST), "w") as f:
        json.dump(manifest, f, indent=2)


def read_component(folder: str | os.PathLike, name: str, version: int = FORMAT_VERSION) -> dict[str, np.ndarray]:
    """The flat ``{"a/b/kernel": array}`` tensors of component ``name`` (of a folder of format ``version``)."""
    if version < 2 and name in ("unet", "conditioner"):
        unet, merge = v1_unet_parts(_read_file(folder, "unet"))
        return unet if name == "unet" else merge
    if version < 2 and name == "clip_vision":
        return read_safetensors(os.path.join(folder, _V1_CLIP_VISION_DIR, "params.safetensors"))
    return _read_file(folder, name)


def shared_component_folder(folder: str | os.PathLike, name: str, entry: Mapping[str, Any]) -> str:
    """Where component ``name`` of ``folder`` keeps its weights: ``folder`` itself, or the shipped model its
    ``"from"`` names, after checking that the shipped model holds that component with the same config."""
    origin = entry.get("from")
    if origin is None:
        return os.fspath(folder)
    source = model_path(origin)
    theirs = read_manifest(source)["components"].get(name)
    same = theirs is not None and theirs["type"] == entry["type"] and \
        json.loads(json.dumps(theirs["config"])) == json.loads(json.dumps(entry["config"]))
    if not same:
        raise ConversionError(f"{folder}: component {name!r} shares the weights of the shipped model {origin!r}, whose "
                              f"{name!r} is not the same component any more (another type or config); rebuild this "
                              f"folder with its own copy.")
    return source


def _read_file(folder: str | os.PathLike, name: str) -> dict[str, np.ndarray]:
    path = os.path.join(folder, f"{name}.safetensors")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{folder}: component file {name}.safetensors is missing.")
    return read_safetensors(path)


_V1_CLIP_VISION_DIR = "clip_vision"


def v1_clip_vision_config(folder: str | os.PathLike) -> dict | None:
    """The image-tower config of a version-1 folder's ``clip_vision/`` (``config.json``'s ``"vision"``), or None."""
    path = os.path.join(folder, _V1_CLIP_VISION_DIR, "config.json")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)["vision"]
