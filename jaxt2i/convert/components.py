"""The three Stable Diffusion components and how each one converts: one table, used by every format.

For each component this names its config class, its module, its abstract parameter tree and its converters to
and from the diffusers/transformers state dict (the pivot layout: original single files are first renamed to it).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import jax.numpy as jnp
import numpy as np

from jaxt2i.convert import clip_keys, unet_keys, vae_keys
from jaxt2i.models import clip, unet, vae


@dataclasses.dataclass(frozen=True)
class Component:
    """How one component is built and converted.

    ``from_torch(state_dict, config, source, dtype) -> params`` and ``to_torch(params, config) -> state_dict`` use
    the diffusers/transformers key layout; ``original_prefix`` is where the component lives in an original
    single-file checkpoint.
    """

    name: str
    config_cls: type
    module: Callable[..., Any]
    presets: Mapping[str, Any]
    from_torch: Callable[..., dict]
    to_torch: Callable[..., dict]
    weight_stem: str  # file stem inside a diffusers folder


def _clip_from_torch(sd, config, *, source, dtype=None):
    return clip_keys.text_encoder_to_flax(sd, config, source=source, dtype=dtype)


def _clip_to_torch(params, config):
    return clip_keys.text_encoder_to_torch(params, config, prefixed=True)


COMPONENTS: dict[str, Component] = {
    "text_encoder": Component("text_encoder", clip.CLIPTextConfig, clip.CLIPTextModel, clip.PRESETS,
                              _clip_from_torch, _clip_to_torch, "model"),
    "vae": Component("vae", vae.VAEConfig, vae.AutoencoderKL, vae.PRESETS,
                     vae_keys.params_from_diffusers, vae_keys.params_to_diffusers, "diffusion_pytorch_model"),
    "unet": Component("unet", unet.UNetConfig, unet.UNet, unet.PRESETS,
                      unet_keys.params_from_diffusers, unet_keys.params_to_diffusers, "diffusion_pytorch_model"),
}


def build_module(name: str, config: Any, dtype: Any = jnp.float32, param_dtype: Any = jnp.float32):
    """The linen module of component ``name`` for ``config``."""
    return COMPONENTS[name].module(config, dtype=dtype, param_dtype=param_dtype)


def params_from_torch(name: str, state_dict: Mapping[str, np.ndarray], config: Any, *, source: str,
                      dtype: Any = None) -> dict:
    """diffusers/transformers-layout state dict -> Flax params of component ``name`` (checked, key by key)."""
    return COMPONENTS[name].from_torch(state_dict, config, source=source, dtype=dtype)


def params_to_torch(name: str, params: Mapping[str, Any], config: Any) -> dict[str, np.ndarray]:
    """Flax params of component ``name`` -> diffusers/transformers-layout state dict."""
    return COMPONENTS[name].to_torch(params, config)
