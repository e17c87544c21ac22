"""Named whole-pipeline presets: which U-Net, VAE, text encoder, schedule and tokenizer padding belong together.

Used when a single-file checkpoint carries no configs (``load_pipeline(path, config="sd21_base")``), for tests
(``tiny_sd1``/``tiny_sd2``) and for building random-weight models in benchmarks.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp

from jaxt2i.convert.components import component
from jaxt2i.diffusion.schedules import ScheduleConfig
from jaxt2i.models import clip, unet, vae


@dataclasses.dataclass(frozen=True)
class PipelinePreset:
    """Preset names of each component plus the schedule and tokenizer padding ("eos" for SD1, "zero" for SD2)."""

    unet: str
    vae: str
    text_encoder: str
    schedule: ScheduleConfig
    tokenizer_pad: str

    def configs(self) -> dict[str, Any]:
        """Component name -> config dataclass."""
        return {"unet": unet.PRESETS[self.unet], "vae": vae.PRESETS[self.vae],
                "text_encoder": clip.PRESETS[self.text_encoder]}


_SD1 = ScheduleConfig()
_SD2_V = ScheduleConfig(prediction_type="v_prediction")

PRESETS: dict[str, PipelinePreset] = {
    "sd15": PipelinePreset("sd15", "sd", "sd15", _SD1, "eos"),
    "sd15_inpaint": PipelinePreset("sd15_inpaint", "sd", "sd15", _SD1, "eos"),
    "sd21": PipelinePreset("sd21", "sd", "sd21", _SD2_V, "zero"),
    "sd21_base": PipelinePreset("sd21", "sd", "sd21", _SD1, "zero"),
    "sd2_inpaint": PipelinePreset("sd2_inpaint", "sd", "sd21", _SD1, "zero"),
    "tiny_sd1": PipelinePreset("tiny_sd1", "tiny", "tiny_sd1", _SD1, "eos"),
    "tiny_sd2": PipelinePreset("tiny_sd2", "tiny", "tiny_sd2", _SD2_V, "zero"),
}


def get(name: str) -> PipelinePreset:
    """A pipeline preset by name, with the list of valid names in the error."""
    if name not in PRESETS:
        raise ValueError(f"Unknown model preset {name!r}; choose one of {', '.join(PRESETS)}, "
                         "or pass a diffusers folder as config.")
    return PRESETS[name]


def abstract_params(kind: str, config: Any, param_dtype: Any = jnp.float32) -> dict:
    """Abstract (shape-only) parameter tree of a component of type ``kind`` (``jaxt2i.convert.components``) — no
    real initialisation.

    Tracing a model's ``init`` takes about a second for SD-size models, so trees are cached per
    ``(kind, config, param_dtype)``; each call returns a fresh copy of the nested dicts.
    """
    try:
        tree = _cached_abstract_params(kind, config, jnp.dtype(param_dtype))
    except TypeError:  # a config with an unhashable field: no caching
        tree = _abstract_params(kind, config, jnp.dtype(param_dtype))
    return jax.tree.map(lambda leaf: leaf, tree)


def _abstract_params(kind: str, config: Any, param_dtype: Any) -> dict:
    return component(kind).abstract_params(config, param_dtype)


_cached_abstract_params = functools.lru_cache(maxsize=32)(_abstract_params)
