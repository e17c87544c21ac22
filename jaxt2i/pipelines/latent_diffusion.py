"""The latent-diffusion pipeline (Stable Diffusion; text-conditioned DiTs): jitted programs from token ids to pixels,
over pure functional models.

Each public method runs one compiled program (tokens -> text encoder -> sampler scan -> VAE decode). Everything
that may change between calls without changing shapes (prompt text, seed, guidance scale, the image given to
img2img/inpaint) is a traced argument, so it never recompiles; what changes shapes or control flow (batch size,
resolution, sampler, steps, strength, whether guidance is on) is static and selects another cached program.
With ``progress=`` the same computation runs in stages (setup, one dispatch per model call, decode) so the caller
can report progress; every stage stays cacheable by the persistent compilation cache.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxt2i.convert.load import LoadedModel
from jaxt2i.diffusion import samplers
from jaxt2i.diffusion.guidance import cfg_denoise_fn
from jaxt2i.diffusion.schedules import ScheduleConfig
from jaxt2i.dtypes import as_dtype
from jaxt2i.models import latent_diffusion
from jaxt2i.models.dit_config import DiTConfig
from jaxt2i.models.latent_diffusion import Models
from jaxt2i.models.unet import UNetConfig
from jaxt2i.devices import place
from jaxt2i.pipelines.common import (ProgressBar, ProgressFn, cast_floats, check_sampling_args, example_keys,
                                     example_seeds, map_examples, normal_per_example)
from jaxt2i.tokenizer import CLIPTokenizer

# ------------------------------------------------------------------------------------------ static program spec
@dataclasses.dataclass(frozen=True)
class _Spec:
    """The static part of a sampling program (hashable; one compiled program per distinct value).

    kind: "txt2img" | "img2img" | "inpaint"; strength: img2img/inpaint strength (the last int(steps * strength)
    steps are run; inpaint at strength 1 starts from pure noise).
    """

    models: Models
    schedule: ScheduleConfig
    kind: str
    sampler: str
    steps: int
    use_cfg: bool
    karras: bool
    eta: float
    strength: float = 1.0

    @property
    def start_step(self) -> int:
        return 0 if self.strength >= 1.0 and self.kind != "img2img" else samplers.strength_start_step(
            self.steps, self.strength)

    @property
    def sampler_kwargs(self) -> dict:
        return dict(sampler=self.sampler, steps=self.steps, schedule=self.schedule, eta=self.eta,
                    use_karras_sigmas=self.karras, start_step=self.start_step)


# The functional pieces, jitted once per distinct Models value (shared by every Pipeline of the same architecture).
_jit_encode_text = jax.jit(latent_diffusion.encode_text, static_argnums=0)
_jit_predict_noise = jax.jit(latent_diffusion.predict_noise, static_argnums=0)
_jit_decode = jax.jit(latent_diffusion.decode, static_argnums=0)
_jit_encode_latents = jax.jit(latent_diffusion.encode_images, static_argnums=0)


def _setup(spec: _Spec, params, inputs: dict, key):
    """Everything before the sampling loop: text encoding, image encoding, the start sample.

    inputs: ids / uncond_ids [B, 77]; noise [B, h, w, 4] standard normal; images [B, H, W, 3] and masks
    [B, H, W, 1] for img2img / inpaint. Returns (PreparedRun, cond) where cond holds what the denoiser and the
    inpainting blend need at every step.
    """
    context = latent_diffusion.encode_text(spec.models, params, inputs["ids"])
    cond = {"context": context,
            "uncond": latent_diffusion.encode_text(spec.models, params, inputs["uncond_ids"]) if spec.use_cfg else None}
    noise, start = inputs["noise"], spec.start_step
    x, noised = noise, False
    if spec.kind != "txt2img":
        encode_key, masked_key = jax.random.split(key)
        x0 = latent_diffusion.encode_images(spec.models, params, inputs["images"], encode_key)
        if spec.kind == "img2img" or start > 0:
            x, start = samplers.img2img_start(x0, noise, sampler=spec.sampler, steps=spec.steps,
                                              strength=spec.strength, schedule=spec.schedule,
                                              use_karras_sigmas=spec.karras)
            noised = True
        if spec.kind == "inpaint":
            masks = inputs["masks"]
            factor = masks.shape[1] // noise.shape[1]
            # Nearest-neighbour downsampling to the latent grid (what diffusers' interpolate does).
            latent_mask = masks[:, ::factor, ::factor, :].astype(jnp.float32)
            if spec.models.denoiser.config.in_channels == 9:
                # The repainted region is blanked to mid-gray (0 in the VAE's [-1, 1] range), as SD's inpainting
                # models were trained.
                masked_images = jnp.where(masks < 0.5, inputs["images"], 0.5)
                masked = latent_diffusion.encode_images(spec.models, params, masked_images, masked_key)
                cond["extra"] = jnp.concatenate([latent_mask, masked], axis=-1)
            else:
                cond["blend"] = {"x0": x0, "noise": noise, "mask": latent_mask}
    run = samplers.prepare_run(x, init_is_noised=noised, key=key, **spec.sampler_kwargs)
    return run, cond


def _denoiser(spec: _Spec, params, cond, guidance, rescale):
    """denoise_fn(x, t) for the sampler: the denoiser with classifier-free guidance (one batched call)."""
    extra = cond.get("extra")

    def model_fn(x, t, ctx):
        if extra is not None:  # 9-channel inpainting U-Net: [x, mask, masked-image latents]
            reps = x.shape[0] // extra.shape[0]
            x = jnp.concatenate([x, jnp.tile(extra, (reps, 1, 1, 1)).astype(x.dtype)], axis=-1)
        return latent_diffusion.predict_noise(spec.models, params, x, t, ctx)

    if spec.use_cfg:
        return cfg_denoise_fn(model_fn, cond["context"], cond["uncond"], guidance, rescale)
    return lambda x, t: model_fn(x, t, cond["context"])


def _run_segment(spec: _Spec, params, state, xs, cond, guidance, rescale, key):
    """Runs the model calls in ``xs`` (all of them, or a slice) and returns the new sampler state."""
    post = None
    if "blend" in cond:  # ordinary model inpainting: restore the known region after every step
        b = cond["blend"]
        post = samplers.inpaint_post_step_fn(b["x0"], b["noise"], b["mask"], sampler=spec.sampler, steps=spec.steps,
                                             schedule=spec.schedule, use_karras_sigmas=spec.karras,
                                             start_step=spec.start_step)
    return samplers.run_calls(_denoiser(spec, params, cond, guidance, rescale), state, xs, key=key,
                              post_step_fn=post, **spec.sampler_kwargs)


@functools.partial(jax.jit, static_argnames=("spec",))
def _program(params, inputs, guidance, rescale, key, *, spec: _Spec):
    """The whole text->image / image->image / inpaint program: [B, 77] ids ... -> images [B, H, W, 3]."""
    setup_key, sample_key = jax.random.split(key)
    run, cond = _setup(spec, params, inputs, setup_key)
    state = _run_segment(spec, params, run.state, run.xs, cond, guidance, rescale, sample_key)
    return latent_diffusion.decode(spec.models, params, state["x"])


@functools.partial(jax.jit, static_argnames=("spec",))
def _program_per_example(params, inputs, guidance, rescale, keys, *, spec: _Spec):
    """:func:`_program` with one key per example (keys [B]): example ``i`` is computed as ``_program`` computes a
    batch of one with ``keys[i]``, vmapped into one batched program."""
    return map_examples(lambda example, key: _program(params, example, guidance, rescale, key, spec=spec), inputs,
                        keys)


# The same program in three stages, so a caller can watch progress between segments of model calls (each stage
# compiles once and is cacheable; a host callback inside one program would make it uncacheable).
@functools.partial(jax.jit, static_argnums=0)
def _setup_stage(spec: _Spec, params, inputs, key):
    run, cond = _setup(spec, params, inputs, key)
    return run.state, run.xs, cond



_segment_stage = jax.jit(_run_segment, static_argnums=0)


def _run_with_progress(spec: _Spec, params, inputs, guidance, rescale, key, progress: ProgressFn):
    setup_key, sample_key = jax.random.split(key)
    state, xs, cond = _setup_stage(spec, params, inputs, setup_key)
    total = int(xs["i"].shape[0])
    progress(0, total)
    for i in range(total):
        xs_i = jax.tree.map(lambda a: a[i:i + 1], xs)
        state = _segment_stage(spec, params, state, xs_i, cond, guidance, rescale, sample_key)
        jax.block_until_ready(state["x"])
        progress(i + 1, total)
    return _jit_decode(spec.models, params, state["x"])


# --------------------------------------------------------------------------------------------------- Pipeline
SD_SAMPLING = (50, 7.5)  # (steps, guidance): Stable Diffusion's usual settings, for models that recommend none


class Pipeline:
    """A loaded latent-diffusion model: CLIP text encoder, KL-VAE and a denoiser (a U-Net, or a text-conditioned
    diffusion transformer) with their parameters.

    Attributes:
      models: :class:`~jaxt2i.models.latent_diffusion.Models` (linen modules); params: component name ->
      parameter tree (``text_encoder``, ``vae``, ``unet`` or ``transformer``, optionally ``conditioner``, and
      components the pipeline does not run, such as a CLIP image tower ``clip_vision`` for reranking); configs:
      component configs; schedule: the noise schedule; tokenizer: the CLIP tokenizer;
      sampling: the model's recommended ``{"steps", "guidance"}`` (from its jaxt2i.json; may be empty).
    """

    def __init__(self, loaded: LoadedModel, dtype: str | Any = "float32"):
        if loaded.family != "latent_diffusion":
            raise ValueError(f"{loaded.source}: a {loaded.family!r} model is not a latent-diffusion model; load it "
                             "with jaxt2i.load_pipeline, which picks the pipeline of its family.")
        self.dtype = as_dtype(dtype)
        self.configs = dict(loaded.configs)
        self.schedule = loaded.schedule
        self.source = loaded.source
        self.sampling = dict(loaded.sampling)
        self.types = dict(loaded.types)
        self.tokenizer = _tokenizer_for(loaded)
        self._tokenizer_settings = dict(loaded.tokenizer)
        self.models = latent_diffusion.build_models(self.configs, loaded.text_layer, dtype=self.dtype)
        self.params = {name: jax.device_put(cast_floats(tree, _param_dtype(self.models, name)))
                       for name, tree in loaded.params.items()}

    # ------------------------------------------------------------------------------------ properties
    @property
    def vae_scale_factor(self) -> int:
        """Pixels per latent cell (8 for Stable Diffusion)."""
        return 2 ** (len(self.configs["vae"].block_out_channels) - 1)

    @property
    def size_multiple(self) -> int:
        """Pixels per step of the image sides: the VAE's factor times the denoiser's (:func:`denoiser_factor`)."""
        return self.vae_scale_factor * denoiser_factor(self.configs[self.models.denoiser_name])

    @property
    def size_rule(self) -> str:
        """The image-size rule in words, as every size error states it."""
        denoiser = self.configs[self.models.denoiser_name]
        what = "patch size" if isinstance(denoiser, DiTConfig) else "downsampling"
        return (f"positive multiples of {self.size_multiple} pixels (the VAE's factor {self.vae_scale_factor} x the "
                f"{self.models.denoiser_name}'s {what} {denoiser_factor(denoiser)})")

    def check_image_size(self, height: int, width: int, batch: int = 1) -> None:
        """Raises ValueError unless ``height`` x ``width`` follows :attr:`size_rule` and ``batch`` such images fit in
        memory: decoding holds at least one float32 activation ``[batch, height, width, C]`` (C: the VAE decoder's
        last width), which is compared with the device's memory before anything runs."""
        m = self.size_multiple
        if height <= 0 or width <= 0 or height % m or width % m:
            raise ValueError(f"image size {width}x{height}: width and height must be {self.size_rule}; e.g. "
                             f"{max(m, width // m * m)}x{max(m, height // m * m)}.")
        needed = batch * height * width * self.configs["vae"].block_out_channels[0] * 4
        available = device_memory_bytes()
        if available is not None and needed > available:
            raise ValueError(f"image size {width}x{height} (x{batch}) cannot fit: decoding it holds at least "
                             f"{needed / 2**30:.1f} GiB at once and the device has {available / 2**30:.1f} GiB. "
                             f"Choose a smaller size (this model was trained at {self.default_size[1]}x"
                             f"{self.default_size[0]}).")

    @property
    def default_size(self) -> tuple[int, int]:
        """(height, width) the denoiser was trained at."""
        side = self.configs[self.models.denoiser_name].sample_size * self.vae_scale_factor
        return side, side

    def sampling_defaults(self, steps: int | None = None, guidance: float | None = None, *,
                          fallback: tuple[int, float] = SD_SAMPLING) -> tuple[int, float]:
        """``(steps, guidance)``: the given values, else the model's recommendation (``self.sampling``, from its
        jaxt2i.json), else ``fallback`` (Stable Diffusion's usual 50 steps at guidance 7.5)."""
        steps = steps if steps is not None else self.sampling.get("steps", fallback[0])
        guidance = guidance if guidance is not None else self.sampling.get("guidance", fallback[1])
        return steps, guidance

    @property
    def is_inpainting_model(self) -> bool:
        return self.configs[self.models.denoiser_name].in_channels == 9

    def to_loaded_model(self) -> LoadedModel:
        """The pipeline's configs and parameters (as numpy) in the format-independent form, for export."""
        params = {k: jax.tree.map(np.asarray, v) for k, v in self.params.items()}
        return LoadedModel(self.configs, params, self.schedule, self._tokenizer_settings, self.source,
                           self.models.text_layer, dict(self.sampling), "latent_diffusion", dict(self.types))

    # ------------------------------------------------------------------------------ functional pieces
    def tokenize(self, prompts: str | Sequence[str]) -> np.ndarray:
        """Prompts -> int32 [B, 77] token ids."""
        return self.tokenizer(prompts)

    def encode_prompt(self, prompts: str | Sequence[str]) -> jax.Array:
        """Prompts -> [B, 77, D] conditioning, as the denoiser receives it."""
        return _jit_encode_text(self.models, self.params, jnp.asarray(self.tokenize(prompts)))

    def predict_noise(self, latents, timesteps, context) -> jax.Array:
        """latents [B, h, w, C] NHWC, timesteps [B] or scalar, context [B, 77, D] -> the denoiser's prediction
        [B, h, w, 4] (a learned variance dropped)."""
        latents = jnp.asarray(latents)
        t = jnp.broadcast_to(jnp.asarray(timesteps, jnp.float32), (latents.shape[0],))
        return _jit_predict_noise(self.models, self.params, latents, t, jnp.asarray(context))

    def decode_latents(self, latents) -> jax.Array:
        """Scaled latents [B, h, w, 4] (as the sampler returns them) -> images [B, H, W, 3] float32 in [0, 1]."""
        return _jit_decode(self.models, self.params, jnp.asarray(latents))

    def encode_image(self, images, key: jax.Array | None = None) -> jax.Array:
        """Images [B, H, W, 3] in [0, 1] -> scaled latents [B, H/8, W/8, 4] (posterior mean, or a sample with key)."""
        images = _check_images(images, self.vae_scale_factor)
        return _jit_encode_latents(self.models, self.params, images, key)

    # ---------------------------------------------------------------------------------- programs
    def _run(self, kind: str, prompts, negative_prompt, steps, guidance_scale, sampler, seed, eta, guidance_rescale,
             use_karras_sigmas, progress, *, height, width, latents=None, strength=1.0, images=None,
             masks=None, sharding=None) -> np.ndarray:
        """Validates the arguments, builds the static spec and runs the program (or its stages, with progress)."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not prompts:
            raise ValueError("Give at least one prompt.")
        check_sampling_args(steps=steps, guidance_scale=guidance_scale, strength=strength, sampler=sampler)
        self.check_image_size(height, width, len(prompts))
        spec = _Spec(self.models, self.schedule, kind, sampler, int(steps), float(guidance_scale) > 1.0,
                     bool(use_karras_sigmas), float(eta), float(strength))
        spec.start_step  # noqa: B018 -- validates strength against steps before anything runs
        seeds = example_seeds(seed, len(prompts))
        if seeds is None:
            noise_key, program_key = jax.random.split(jax.random.key(seed))
        else:
            noise_key, program_key = example_keys(seeds)
        inputs = {"ids": jnp.asarray(self.tokenize(prompts)),
                  "uncond_ids": jnp.asarray(self.tokenize(_negatives(negative_prompt, len(prompts)))),
                  "noise": self._noise(latents, len(prompts), height, width, noise_key, seeds is not None)}
        if images is not None:
            inputs["images"] = images
        if masks is not None:
            inputs["masks"] = masks
        inputs = place(inputs, sharding)
        guidance, rescale = jnp.float32(guidance_scale), jnp.float32(guidance_rescale)
        report = (progress if callable(progress) else ProgressBar()) if progress else None
        if seeds is not None:  # one program; progress reports its start and end
            if report is not None:
                report(0, 1)
            out = _program_per_example(self.params, inputs, guidance, rescale, place(program_key, sharding),
                                       spec=spec)
            if report is not None:
                report(1, 1)
        elif report is not None:
            out = _run_with_progress(spec, self.params, inputs, guidance, rescale, program_key, report)
        else:
            out = _program(self.params, inputs, guidance, rescale, program_key, spec=spec)
        return np.asarray(out)

    def _noise(self, latents, batch, height, width, key, per_example: bool = False):
        """The start noise [B, h, w, C]: ``latents``, else drawn from ``key`` (from each of keys [B] with
        ``per_example``)."""
        shape = (batch, height // self.vae_scale_factor, width // self.vae_scale_factor,
                 self.configs["vae"].latent_channels)
        if latents is None:
            return normal_per_example(key, shape[1:]) if per_example else jax.random.normal(key, shape, jnp.float32)
        latents = jnp.asarray(latents, jnp.float32)
        if latents.shape != shape:
            raise ValueError(f"latents have shape {latents.shape}; expected {shape} (NHWC) for {batch} image(s) "
                             f"of {height}x{width}.")
        return latents

    def _size(self, height, width):
        default_h, default_w = self.default_size
        return int(height or default_h), int(width or default_w)

    def text_to_image(self, prompts: str | Sequence[str], negative_prompt: str | Sequence[str] | None = None,
                      steps: int = 50, guidance_scale: float = 7.5, sampler: str = "ddim",
                      seed: int | Sequence[int] = 0, height: int | None = None, width: int | None = None,
                      latents=None, *, eta: float = 0.0, guidance_rescale: float = 0.0, use_karras_sigmas: bool = False,
                      progress: bool | ProgressFn = False, sharding: jax.sharding.Sharding | None = None
                      ) -> np.ndarray:
        """Prompts -> float32 images [B, H, W, 3] in [0, 1] (one jitted program: text encoding, sampling, decoding).

        ``seed``: an int draws the whole batch from one key; a sequence of B ints draws image ``i`` exactly as
        ``text_to_image([prompts[i]], seed=seed[i])`` does (up to float rounding of batched kernels), so every image
        can be reproduced alone. ``latents``: optional standard-normal noise [B, H/8, W/8, 4] (the sampler scales
        it as it needs); otherwise drawn from ``seed``. Guidance <= 1 skips the unconditional half of the batch.
        ``progress``: True prints a progress line, or a function ``fn(done, total)`` called after every model call
        (the program then runs in stages: same numbers, one dispatch per model call; with one seed per image it
        reports the one program's start and end). ``sharding``: where the batch's inputs go, e.g.
        ``NamedSharding(Mesh(devices, ("batch",)), P("batch"))`` for data parallelism (B a multiple of the device
        count; the parameters are used where they are: replicate them over the same devices).
        """
        if self.is_inpainting_model:
            raise ValueError("This is a 9-channel inpainting model; use inpaint() (or `jaxt2i inpaint`).")
        height, width = self._size(height, width)
        return self._run("txt2img", prompts, negative_prompt, steps, guidance_scale, sampler, seed, eta,
                         guidance_rescale, use_karras_sigmas, progress, height=height, width=width, latents=latents,
                         sharding=sharding)

    def image_to_image(self, prompts: str | Sequence[str], image, strength: float = 0.8,
                       negative_prompt: str | Sequence[str] | None = None, steps: int = 50,
                       guidance_scale: float = 7.5, sampler: str = "ddim", seed: int = 0, latents=None, *,
                       eta: float = 0.0, guidance_rescale: float = 0.0, use_karras_sigmas: bool = False,
                       progress: bool | ProgressFn = False) -> np.ndarray:
        """Prompts + image(s) [B or 1, H, W, 3] in [0, 1] -> images [B, H, W, 3]; ``strength`` in (0, 1] is how
        much of the schedule is re-run (diffusers' semantics: the last ``int(steps * strength)`` steps).

        ``latents``: optional standard-normal noise [B, H/8, W/8, 4] used to noise the image's latents.
        """
        batch = 1 if isinstance(prompts, str) else len(prompts)
        images = _batch_images(_check_images(image), batch)
        return self._run("img2img", prompts, negative_prompt, steps, guidance_scale, sampler, seed, eta,
                         guidance_rescale, use_karras_sigmas, progress, height=images.shape[1],
                         width=images.shape[2], latents=latents, strength=strength, images=images)

    def inpaint(self, prompts: str | Sequence[str], image, mask, strength: float = 1.0,
                negative_prompt: str | Sequence[str] | None = None, steps: int = 50, guidance_scale: float = 7.5,
                sampler: str = "ddim", seed: int = 0, *, eta: float = 0.0, guidance_rescale: float = 0.0,
                latents=None, use_karras_sigmas: bool = False, progress: bool | ProgressFn = False) -> np.ndarray:
        """Repaints where ``mask`` is 1. image [B or 1, H, W, 3] in [0, 1]; mask [B or 1, H, W(, 1)] in {0, 1}.

        9-channel inpainting U-Nets get the mask and the masked image's latents as extra input channels; ordinary
        models keep the known region by blending it back (noised to the current level) after every step.
        ``latents``: optional standard-normal noise [B, H/8, W/8, 4] (the start noise, also used for blending).
        """
        batch = 1 if isinstance(prompts, str) else len(prompts)
        images = _batch_images(_check_images(image), batch)
        masks = _batch_images(_check_mask(mask, images.shape[1:3]), batch)
        return self._run("inpaint", prompts, negative_prompt, steps, guidance_scale, sampler, seed, eta,
                         guidance_rescale, use_karras_sigmas, progress, height=images.shape[1],
                         width=images.shape[2], latents=latents, strength=strength, images=images, masks=masks)

    def __repr__(self) -> str:
        return (f"Pipeline(source={self.source!r}, dtype={jnp.dtype(self.dtype).name}, "
                f"prediction_type={self.schedule.prediction_type!r}, inpainting={self.is_inpainting_model})")


# ------------------------------------------------------------------------------------------------- helpers
def denoiser_factor(config: UNetConfig | DiTConfig) -> int:
    """Latent cells per step of the denoiser's grid: a U-Net halves its input ``num_blocks - 1`` times (its skip
    connections need every level to divide evenly), a DiT cuts it into ``patch_size`` x ``patch_size`` patches."""
    return config.patch_size if isinstance(config, DiTConfig) else 2 ** (config.num_blocks - 1)


def device_memory_bytes() -> int | None:
    """Memory of the default device: the accelerator's allocator limit, or the host's physical memory on a CPU;
    None when neither is known."""
    device = jax.devices()[0]
    stats = device.memory_stats() if device.platform != "cpu" else None
    if stats and stats.get("bytes_limit"):
        return int(stats["bytes_limit"])
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None


def _param_dtype(models: Models, name: str) -> Any:
    """Storage dtype of component ``name``: its module's ``param_dtype`` (components the pipeline does not run
    keep float32)."""
    if name == models.denoiser_name:
        return models.denoiser.param_dtype
    module = getattr(models, name, None) if name in ("text_encoder", "vae", "conditioner") else None
    return jnp.float32 if module is None else module.param_dtype


def _tokenizer_for(loaded: LoadedModel) -> CLIPTokenizer:
    folder = loaded.tokenizer.get("folder")
    if folder:
        return CLIPTokenizer.from_folder(folder)
    pad = loaded.tokenizer.get("pad") or "eos"
    return CLIPTokenizer.default(pad=pad)


def _negatives(negative_prompt, batch: int) -> list[str]:
    if negative_prompt is None:
        return [""] * batch
    if isinstance(negative_prompt, str):
        return [negative_prompt] * batch
    negatives = list(negative_prompt)
    if len(negatives) != batch:
        raise ValueError(f"Got {len(negatives)} negative prompts for {batch} prompts; give one, or one per prompt.")
    return negatives


def _check_images(images, factor: int = 1) -> jax.Array:
    """[B, H, W, 3] (or [H, W, 3]) images in [0, 1], sides multiples of ``factor`` (the sampling programs check
    their size rule themselves, with the batch)."""
    images = np.asarray(images, np.float32)
    if images.ndim == 3:
        images = images[None]
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"Images must be [B, H, W, 3] (or [H, W, 3]) RGB in [0, 1]; got shape {images.shape}.")
    if images.shape[1] % factor or images.shape[2] % factor:
        raise ValueError(f"Image size {images.shape[2]}x{images.shape[1]} must be a multiple of {factor} (the VAE's "
                         "factor); resize or crop it.")
    if images.min() < -1e-3 or images.max() > 1 + 1e-3:
        raise ValueError("Image values must be in [0, 1] (float); divide uint8 images by 255.")
    return jnp.asarray(images)


def _check_mask(mask, size: tuple[int, int]) -> jax.Array:
    mask = np.asarray(mask, np.float32)
    if mask.ndim == 2:
        mask = mask[None, ..., None]
    elif mask.ndim == 3:
        mask = mask[..., None] if mask.shape[-1] != 1 else mask[None]
    if mask.ndim != 4 or mask.shape[-1] != 1:
        raise ValueError(f"mask must be [H, W], [B, H, W] or [B, H, W, 1]; got shape {mask.shape}.")
    if tuple(mask.shape[1:3]) != tuple(size):
        raise ValueError(f"mask is {mask.shape[2]}x{mask.shape[1]} but the image is {size[1]}x{size[0]}; "
                         "give a mask of the image's size.")
    return jnp.asarray((mask >= 0.5).astype(np.float32))


def _batch_images(images: jax.Array, batch: int) -> jax.Array:
    if images.shape[0] == batch:
        return images
    if images.shape[0] == 1:
        return jnp.repeat(images, batch, axis=0)
    raise ValueError(f"Got {images.shape[0]} images for {batch} prompts; give one image, or one per prompt.")
