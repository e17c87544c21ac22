"""One pipeline per model family, all with ``text_to_image(prompts, seed=..., ...) -> float32 [B, H, W, 3]`` in
[0, 1]; :func:`load_pipeline` reads any supported model and picks the pipeline of its family (:data:`PIPELINES`)."""

from __future__ import annotations

import os

from jaxt2i.convert.load import read_any
from jaxt2i.pipelines.common import enable_compilation_cache
from jaxt2i.pipelines.dalle import DallePipeline
from jaxt2i.pipelines.dit import ClassPipeline
from jaxt2i.pipelines.latent_diffusion import Pipeline
from jaxt2i.shipped import SHIPPED_MODELS, model_path

# jaxt2i.json "family" (or the family of a diffusers pipeline class) -> the pipeline class that loads it.
PIPELINES: dict[str, type] = {"latent_diffusion": Pipeline, "dit": ClassPipeline, "dalle": DallePipeline}


def load_pipeline(path: str | os.PathLike, config: str | None = None, dtype: str = "float32", *, ema: bool = False,
                  variant: str | None = None, compilation_cache: str | None = None):
    """Loads a model from any supported format, with the pipeline of its family (:data:`PIPELINES`).

    Args:
      path: the name of a model that ships with jaxt2i (:data:`jaxt2i.shipped.SHIPPED_MODELS`: ``shapes``, the
        default model, and ``dit-shapes``), a diffusers-format folder (model_index.json: ``StableDiffusionPipeline``, ``DiTPipeline``, ...), an
        original single-file checkpoint (.safetensors or .ckpt of Stable Diffusion; DiT's ``.pt``), or a jaxt2i
        model folder (``jaxt2i convert``, ``jaxt2i train``).
      config: for single files: a preset name (``sd15``, ``sd15_inpaint``, ``sd21``, ``sd21_base``,
        ``sd2_inpaint``) or a diffusers folder whose configs describe the architecture; default: detected.
      dtype: compute and storage dtype: ``float32``, ``bfloat16`` or ``float16``.
      ema: for single files, use the EMA copy of the U-Net weights.
      variant: for diffusers folders, a weight-file variant such as ``fp16``.
      compilation_cache: directory of the persistent compilation cache (see :func:`enable_compilation_cache`).
    """
    enable_compilation_cache(compilation_cache)
    path = model_path(path)
    if os.fspath(path) in SHIPPED_MODELS.values() and not os.path.isdir(path):
        raise FileNotFoundError(f"the shipped model folder {path} is missing from this install; reinstall jaxt2i.")
    loaded = read_any(path, config=config, ema=ema, variant=variant)
    if loaded.family not in PIPELINES:
        what = "components alone (no pipeline family)" if loaded.family is None else f"family {loaded.family!r}"
        raise ValueError(f"{path} holds {what}: {sorted(loaded.configs)}; jaxt2i samples from the families "
                         f"{sorted(PIPELINES)}. A training stage's output (a VAE, a CLIP) is a part for "
                         "`jaxt2i train`, not a model to sample from.")
    return PIPELINES[loaded.family](loaded, dtype=dtype)


__all__ = ["PIPELINES", "ClassPipeline", "DallePipeline", "Pipeline", "enable_compilation_cache", "load_pipeline"]
