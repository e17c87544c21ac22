"""The class-conditional DiT pipeline (diffusers' ``DiTPipeline``): class ids -> transformer sampling on VAE
latents -> pixels, as one jitted program.

Guidance follows diffusers: the unconditional half of the batch gets the null class (id ``num_classes``), guidance
combines the noise part of the output, and a learned variance is dropped before the sampler step, so any of the
library's samplers runs. Prompts given to :meth:`ClassPipeline.text_to_image` are class names (``id2label``).
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxt2i.convert.load import LoadedModel
from jaxt2i.diffusion import samplers
from jaxt2i.diffusion.guidance import cfg_denoise_fn
from jaxt2i.diffusion.schedules import ScheduleConfig
from jaxt2i.dtypes import as_dtype
from jaxt2i.models import dit, latent_diffusion, vae
from jaxt2i.devices import place
from jaxt2i.pipelines.common import (cast_floats, check_sampling_args, example_keys, example_seeds, map_examples,
                                     normal_per_example)

DIT_SAMPLING = (50, 4.0)  # (steps, guidance): diffusers' DiTPipeline defaults


@dataclasses.dataclass(frozen=True)
class _Spec:
    """The static part of a class-to-image program (one compiled program per distinct value)."""

    transformer: dit.DiT
    vae: vae.AutoencoderKL
    name: str  # the transformer's component name
    schedule: ScheduleConfig
    sampler: str
    steps: int
    use_cfg: bool
    karras: bool
    eta: float


def _predict(spec: _Spec, params, x, t, labels):
    """The transformer's noise prediction [B, h, w, C] float32 (a learned variance dropped)."""
    module = spec.transformer
    out = module.apply({"params": params[spec.name]}, x.astype(module.dtype), t, labels).astype(jnp.float32)
    return out[..., : module.config.in_channels]


@functools.partial(jax.jit, static_argnames=("spec",))
def _program(params, labels, noise, guidance, key, *, spec: _Spec):
    """labels [B] int32, noise [B, h, w, C] standard normal -> images [B, H, W, 3] float32 in [0, 1]."""
    model_fn = functools.partial(_predict, spec, params)
    if spec.use_cfg:
        null = jnp.full_like(labels, spec.transformer.config.num_classes)
        denoise = cfg_denoise_fn(model_fn, labels, null, guidance)
    else:
        denoise = lambda x, t: model_fn(x, t, labels)  # noqa: E731
    latents = samplers.sample(denoise, noise, sampler=spec.sampler, steps=spec.steps, schedule=spec.schedule,
                              key=key, eta=spec.eta, use_karras_sigmas=spec.karras)
    return latent_diffusion.vae_decode(spec.vae, params["vae"], latents)


@functools.partial(jax.jit, static_argnames=("spec",))
def _program_per_example(params, labels, noise, guidance, keys, *, spec: _Spec):
    """:func:`_program` with one key per example (keys [B]): example ``i`` as a batch of one with ``keys[i]``."""
    return map_examples(lambda ex, key: _program(params, ex["labels"], ex["noise"], guidance, key, spec=spec),
                        {"labels": labels, "noise": noise}, keys)


def class_names(id2label: dict) -> dict[str, int]:
    """diffusers' ``id2label`` ({"0": "tench, Tinca tinca", ...}) -> {each comma-separated name: id}."""
    names = {}
    for key, value in id2label.items():
        for name in str(value).split(","):
            if name.strip():
                names[name.strip()] = int(key)
    return names


class ClassPipeline:
    """A loaded class-conditional DiT: transformer (component type ``dit``) + VAE + schedule + class names.

    Attributes: configs, params (component name -> tree), schedule, labels (class name -> id, from ``id2label``),
    transformer / vae (linen modules), sampling (recommended ``{"steps", "guidance"}``; may be empty).
    """

    def __init__(self, loaded: LoadedModel, dtype: str | Any = "float32"):
        if loaded.family != "dit":
            raise ValueError(f"{loaded.source}: a {loaded.family!r} model is not a class-conditional DiT; load it with "
                             "jaxt2i.load_pipeline, which picks the pipeline of its family.")
        self.dtype = as_dtype(dtype)
        self.configs, self.schedule, self.source = dict(loaded.configs), loaded.schedule, loaded.source
        self.sampling, self.types, self.extras = dict(loaded.sampling), dict(loaded.types), dict(loaded.extras)
        names = [k for k in self.configs if loaded.component_type(k) == "dit"]
        if len(names) != 1 or "vae" not in self.configs:
            raise ValueError(f"{loaded.source}: a DiT model needs one transformer (type 'dit') and a 'vae'; it has "
                             f"{ {k: loaded.component_type(k) for k in self.configs} }.")
        self.transformer_name = names[0]
        config = self.configs[self.transformer_name]
        if config.conditioning != "class":
            raise ValueError(f"{loaded.source}: its transformer is {config.conditioning!r}-conditioned; the dit family "
                             "holds class-conditional transformers (a text-conditioned one is a latent_diffusion "
                             "model's denoiser).")
        vae_dtype = jnp.float32 if jnp.dtype(self.dtype) == jnp.float16 else self.dtype
        self.transformer = dit.DiT(config, dtype=self.dtype, param_dtype=self.dtype)
        self.vae = vae.AutoencoderKL(self.configs["vae"], dtype=vae_dtype, param_dtype=vae_dtype)
        self.labels = class_names(self.extras.get("id2label", {}))
        self.params = {name: jax.device_put(cast_floats(tree, self._param_dtype(name)))
                       for name, tree in loaded.params.items()}

    def _param_dtype(self, name: str):
        return {self.transformer_name: self.transformer.param_dtype, "vae": self.vae.param_dtype}.get(name, jnp.float32)

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.configs["vae"].block_out_channels) - 1)

    @property
    def default_size(self) -> tuple[int, int]:
        """(height, width) the transformer was trained at."""
        side = self.configs[self.transformer_name].sample_size * self.vae_scale_factor
        return side, side

    def sampling_defaults(self, steps: int | None = None, guidance: float | None = None) -> tuple[int, float]:
        """``(steps, guidance)``: the given values, else the model's recommendation, else diffusers' 50 and 4.0."""
        steps = steps if steps is not None else self.sampling.get("steps", DIT_SAMPLING[0])
        guidance = guidance if guidance is not None else self.sampling.get("guidance", DIT_SAMPLING[1])
        return int(steps), float(guidance)

    @property
    def num_classes(self) -> int:
        return self.configs[self.transformer_name].num_classes

    def label_ids(self, labels: int | str | Sequence[int | str]) -> np.ndarray:
        """Class ids or names (``id2label``'s, e.g. "golden retriever") -> int32 [B]; unknown names and ids out
        of range are a ValueError that names close matches."""
        labels = [labels] if isinstance(labels, (int, str, np.integer)) else list(labels)
        if not labels:
            raise ValueError("Give at least one class label or name.")
        ids = []
        for label in labels:
            if isinstance(label, str):
                if label.strip() not in self.labels:
                    close = difflib.get_close_matches(label.strip(), list(self.labels), n=3)
                    hint = f" Did you mean {', '.join(map(repr, close))}?" if close else (
                        "" if self.labels else " This model has no class names (id2label); give class ids.")
                    raise ValueError(f"unknown class name {label!r}.{hint}")
                ids.append(self.labels[label.strip()])
            else:
                if not 0 <= int(label) < self.num_classes:
                    raise ValueError(f"class id {label} is out of range: this model has classes 0..{self.num_classes - 1}.")
                ids.append(int(label))
        return np.asarray(ids, np.int32)

    def class_to_image(self, labels: int | str | Sequence[int | str], steps: int | None = None,
                       guidance_scale: float | None = None, sampler: str = "ddim", seed: int | Sequence[int] = 0,
                       latents=None, *,
                       height: int | None = None, width: int | None = None, eta: float = 0.0,
                       use_karras_sigmas: bool = False, sharding: jax.sharding.Sharding | None = None) -> np.ndarray:
        """Class ids or names -> float32 images [B, H, W, 3] in [0, 1] (one jitted program).

        ``steps`` / ``guidance_scale`` default to the model's recommendation, else diffusers' 50 and 4.0; guidance
        <= 1 skips the null-class half of the batch. ``latents``: optional standard-normal noise [B, h, w, C]
        (NHWC; the sampler scales it as it needs), otherwise drawn from ``seed`` at ``height`` x ``width``
        (default: the trained size; multiples of the VAE factor times the patch size). ``seed``: an int, or one
        per image (image ``i`` then equals a call with label ``i`` alone and ``seed[i]``); ``sharding``: where
        the batch goes (see :meth:`jaxt2i.pipelines.Pipeline.text_to_image`).
        """
        ids = self.label_ids(labels)
        steps, guidance = self.sampling_defaults(steps, guidance_scale)
        check_sampling_args(steps=steps, guidance_scale=guidance, sampler=sampler)
        seeds = example_seeds(seed, len(ids))
        if seeds is None:
            noise_key, program_key = jax.random.split(jax.random.key(seed))
        else:
            noise_key, program_key = example_keys(seeds)
        noise = self._noise(latents, len(ids), height, width, noise_key, seeds is not None)
        spec = _Spec(self.transformer, self.vae, self.transformer_name, self.schedule, sampler, steps, guidance > 1.0,
                     bool(use_karras_sigmas), float(eta))
        labels, noise = place((jnp.asarray(ids), noise), sharding)
        if seeds is None:
            out = _program(self.params, labels, noise, jnp.float32(guidance), program_key, spec=spec)
        else:
            keys = place(program_key, sharding)
            out = _program_per_example(self.params, labels, noise, jnp.float32(guidance), keys, spec=spec)
        return np.asarray(out)

    def _noise(self, latents, batch: int, height, width, key, per_example: bool = False) -> jax.Array:
        config = self.configs[self.transformer_name]
        multiple = self.vae_scale_factor * config.patch_size
        default_h, default_w = self.default_size
        height, width = int(height or default_h), int(width or default_w)
        if height <= 0 or width <= 0 or height % multiple or width % multiple:
            raise ValueError(f"image size {width}x{height} must be positive multiples of {multiple} (the VAE's factor "
                             f"{self.vae_scale_factor} x the patch size {config.patch_size}).")
        shape = (batch, height // self.vae_scale_factor, width // self.vae_scale_factor, config.in_channels)
        if latents is None:
            return normal_per_example(key, shape[1:]) if per_example else jax.random.normal(key, shape, jnp.float32)
        noise = jnp.asarray(latents, jnp.float32)
        if noise.ndim != 4 or noise.shape[0] != batch or noise.shape[-1] != config.in_channels \
                or noise.shape[1] % config.patch_size or noise.shape[2] % config.patch_size:
            raise ValueError(f"latents have shape {tuple(noise.shape)}; expected [{batch}, h, w, {config.in_channels}] "
                             f"(NHWC, h and w multiples of {config.patch_size}), e.g. {shape}.")
        return noise

    def text_to_image(self, prompts: str | Sequence[str], negative_prompt=None, steps: int | None = None,
                      guidance_scale: float | None = None, sampler: str = "ddim", seed: int | Sequence[int] = 0,
                      height: int | None = None, width: int | None = None, latents=None, *, eta: float = 0.0,
                      use_karras_sigmas: bool = False, progress=False,
                      sharding: jax.sharding.Sharding | None = None) -> np.ndarray:
        """Prompts read as class names (``id2label``) -> images, as :meth:`class_to_image` (the text-to-image
        signature of every family; a class-conditional model has no negative prompt, and runs as one program)."""
        if negative_prompt:
            raise ValueError("a class-conditional DiT has no negative prompt; its guidance contrasts the class with "
                             "the null class.")
        return self.class_to_image(prompts, steps=steps, guidance_scale=guidance_scale, sampler=sampler, seed=seed,
                                   latents=latents, height=height, width=width, eta=eta,
                                   use_karras_sigmas=use_karras_sigmas, sharding=sharding)

    def __repr__(self) -> str:
        return (f"ClassPipeline(source={self.source!r}, dtype={jnp.dtype(self.dtype).name}, "
                f"classes={self.num_classes})")
