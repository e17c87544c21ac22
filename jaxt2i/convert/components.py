"""Every component type a model folder can hold, and how each one is built and converted: one table.

A component type names its config class and its abstract parameter tree; the three Stable Diffusion components
also convert to and from the diffusers/transformers state dict (the pivot layout: original single files are
first renamed to it). jaxt2i's own model folders hold any registered type; a new family registers its
components here.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import numpy as np

from jaxt2i.convert import clip_keys, dit_keys, unet_keys, vae_keys
from jaxt2i.convert import dvae_keys
from jaxt2i.convert.core import ConversionError
from jaxt2i.models import clip, clip_vision, conditioner, dit, token_heads, unet, vae
from jaxt2i.models import dalle, dvae


@dataclasses.dataclass(frozen=True)
class Component:
    """How one component type is built and converted.

    ``abstract_params(config, param_dtype) -> tree of jax.ShapeDtypeStruct``. ``from_torch(state_dict, config,
    source, dtype) -> params`` and ``to_torch(params, config) -> state_dict`` use the diffusers/transformers key
    layout (None: the type exists only in jaxt2i's format); ``weight_stem``: its file stem in a diffusers folder.
    """

    config_cls: type
    abstract_params: Callable[..., dict]
    from_torch: Callable[..., dict] | None = None
    to_torch: Callable[..., dict] | None = None
    weight_stem: str | None = None


def _clip_from_torch(sd, config, *, source, dtype=None):
    return clip_keys.text_encoder_to_flax(sd, config, source=source, dtype=dtype)


def _clip_to_torch(params, config):
    return clip_keys.text_encoder_to_torch(params, config, prefixed=True)


COMPONENTS: dict[str, Component] = {
    "text_encoder": Component(clip.CLIPTextConfig, clip.abstract_params, _clip_from_torch, _clip_to_torch, "model"),
    "vae": Component(vae.VAEConfig, vae.abstract_params, vae_keys.params_from_diffusers,
                     vae_keys.params_to_diffusers, "diffusion_pytorch_model"),
    "unet": Component(unet.UNetConfig, unet.abstract_params, unet_keys.params_from_diffusers,
                      unet_keys.params_to_diffusers, "diffusion_pytorch_model"),
    "dit": Component(dit.DiTConfig, dit.abstract_params, dit_keys.params_from_diffusers, dit_keys.params_to_diffusers,
                     "diffusion_pytorch_model"),
    "conditioner": Component(conditioner.ConditionerConfig, conditioner.abstract_params),
    "clip_vision": Component(clip_vision.CLIPVisionConfig, clip_vision.image_tower_abstract_params),
    "token_heads": Component(token_heads.TokenHeadsConfig, token_heads.abstract_params),
    "dvae_encoder": Component(dvae.DVAEConfig, dvae.encoder_abstract_params, dvae_keys.encoder_from_torch,
                              dvae_keys.encoder_to_torch),
    "dvae_decoder": Component(dvae.DVAEConfig, dvae.decoder_abstract_params, dvae_keys.decoder_from_torch,
                              dvae_keys.decoder_to_torch),
    "dalle_transformer": Component(dalle.DalleConfig, dalle.abstract_params),
}


def component(kind: str) -> Component:
    """The registered component type ``kind``; an error lists the known ones."""
    if kind not in COMPONENTS:
        raise ConversionError(f"unknown component type {kind!r}; this jaxt2i knows {sorted(COMPONENTS)}. "
                              "Was the folder written by a newer jaxt2i?")
    return COMPONENTS[kind]


def params_from_torch(kind: str, state_dict: Mapping[str, np.ndarray], config: Any, *, source: str,
                      dtype: Any = None) -> dict:
    """diffusers/transformers-layout state dict -> Flax params of component type ``kind`` (checked, key by key)."""
    return component(kind).from_torch(state_dict, config, source=source, dtype=dtype)


def params_to_torch(kind: str, params: Mapping[str, Any], config: Any) -> dict[str, np.ndarray]:
    """Flax params of component type ``kind`` -> diffusers/transformers-layout state dict."""
    return component(kind).to_torch(params, config)
