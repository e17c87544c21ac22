"""The latent-diffusion family as pure functions: text encoder -> (conditioner) -> denoiser on VAE latents.

The denoiser is a U-Net (component ``unet``, Stable Diffusion) or a text-conditioned diffusion transformer
(component ``transformer``, :mod:`jaxt2i.models.dit` in the PixArt-alpha layout); both take
``(x, t, context)``. One :class:`Models` value (linen modules, hashable, so it can be a static argument of
``jax.jit``) and one parameter dict ``{"text_encoder", "vae", "unet" | "transformer"[, "conditioner"]}`` are what
the pipeline and the trainer share::

    ids [B, 77] --text_states--> [B, L, D] (one text layer) or [B, k, L, D] (k layers, ``text_layer`` a tuple)
                --condition----> context [B, L', D]  (the conditioner when the model has one, else the k states
                                                      concatenated along the tokens, L' = k L)
    predict(x [B, h, w, C], t [B], context) -> denoiser output [B, h, w, C'] float32 (C' = 2C with a learned variance)
    predict_noise(...) -> the prediction the sampler uses [B, h, w, C] (the learned variance dropped)
    decode(latents) -> images [B, H, W, 3] in [0, 1];  encode_images(images) -> scaled latents
"""

from __future__ import annotations

from typing import Any, Mapping, NamedTuple

import einops
import jax
import jax.numpy as jnp

from jaxt2i.models import clip, dit, unet, vae
from jaxt2i.models.conditioner import Conditioner

DENOISERS = ("unet", "transformer")  # the component names a latent-diffusion denoiser may have


class Models(NamedTuple):
    """The linen modules of a latent-diffusion model (parameters live apart, in a dict of the same names).

    text_layer: the text-encoder hidden state(s) that condition the denoiser (``CLIPTextModel.encode``'s
    ``layer``: -1 the last, 0 the embeddings; a tuple of several, which the conditioner merges or which are
    concatenated along the tokens). text_encoder / vae may be None where batches carry cached text states /
    latents. denoiser_name: the denoiser's component name in the parameter dict (``"unet"`` or ``"transformer"``).
    """

    text_encoder: clip.CLIPTextModel | None
    vae: vae.AutoencoderKL | None
    denoiser: unet.UNet | dit.DiT
    conditioner: Conditioner | None = None
    text_layer: int | tuple[int, ...] = -1
    denoiser_name: str = "unet"


def denoiser_name(configs: Mapping[str, Any]) -> str:
    """The denoiser's component name in ``configs`` (``"unet"`` or ``"transformer"``); ValueError unless exactly
    one is there, and a transformer must be text-conditioned."""
    names = [name for name in DENOISERS if name in configs]
    if len(names) != 1:
        raise ValueError(f"a latent-diffusion model has one denoiser, a 'unet' or a 'transformer' component; this "
                         f"one has {names or 'neither'} (components: {sorted(configs)}).")
    if names[0] == "transformer" and configs["transformer"].conditioning != "text":
        raise ValueError(f"the transformer is {configs['transformer'].conditioning!r}-conditioned; a latent-diffusion "
                         f"model needs a text-conditioned one (conditioning='text'). A class-conditional DiT is a "
                         f"model of the 'dit' family.")
    return names[0]


def context_width(config: unet.UNetConfig | dit.DiTConfig) -> int:
    """The width of the text states the denoiser ``config`` reads (U-Net cross_attention_dim, DiT caption_channels)."""
    return config.caption_channels if isinstance(config, dit.DiTConfig) else config.cross_attention_dim


def has_learned_variance(config: unet.UNetConfig | dit.DiTConfig) -> bool:
    """True when the denoiser also predicts a variance (its output has twice the latent channels)."""
    return isinstance(config, dit.DiTConfig) and config.learn_sigma


def check_text_layer(configs: Mapping[str, Any], text_layer: int | tuple[int, ...]) -> None:
    """Raises ValueError unless ``text_layer`` exists in the text encoder and fits the conditioner (which reads
    exactly ``num_inputs`` states, of the text encoder's and the denoiser's context width)."""
    text_config = configs["text_encoder"]
    clip.hidden_state_indices(text_config.num_layers, text_layer)
    conditioner = configs.get("conditioner")
    if conditioner is None:
        return
    count = len(text_layer) if isinstance(text_layer, tuple) else None
    if count != conditioner.num_inputs:
        raise ValueError(f"text_layer {text_layer!r} gives the conditioner the wrong input: it merges "
                         f"{conditioner.num_inputs} text layers, e.g. [0, -1] (the embeddings carry the content, the "
                         f"last layer is merged in).")
    name = denoiser_name(configs)
    widths = {"text encoder hidden_size": text_config.hidden_size, "conditioner width": conditioner.width,
              f"{name} context width": context_width(configs[name])}
    if len(set(widths.values())) != 1:
        raise ValueError(f"the conditioner joins parts of different widths: {widths}; they must be equal.")


def build_models(configs: Mapping[str, Any], text_layer: int | tuple[int, ...] = -1, *, dtype: Any = jnp.float32,
                 param_dtype: Any = None, remat: bool = False) -> Models:
    """Modules for ``configs`` (component name -> config) computing in ``dtype`` and storing in ``param_dtype``
    (default: ``dtype``). The VAE computes in float32 when ``dtype`` is float16 (the SD VAE overflows there)."""
    check_text_layer(configs, text_layer)
    param_dtype = dtype if param_dtype is None else param_dtype
    vae_dtype = jnp.float32 if jnp.dtype(dtype) == jnp.float16 else dtype
    vae_param_dtype = jnp.float32 if jnp.dtype(param_dtype) == jnp.float16 else param_dtype
    conditioner = configs.get("conditioner")
    name = denoiser_name(configs)
    denoiser_cls = dit.DiT if name == "transformer" else unet.UNet
    return Models(
        text_encoder=clip.CLIPTextModel(configs["text_encoder"], dtype=dtype, param_dtype=param_dtype),
        vae=vae.AutoencoderKL(configs["vae"], dtype=vae_dtype, param_dtype=vae_param_dtype),
        denoiser=denoiser_cls(configs[name], dtype=dtype, param_dtype=param_dtype, remat=remat),
        conditioner=None if conditioner is None else Conditioner(conditioner, dtype=dtype, param_dtype=param_dtype),
        text_layer=text_layer,
        denoiser_name=name,
    )


def text_states(models: Models, params: Mapping[str, Any], ids: jax.Array) -> jax.Array:
    """[B, 77] ids -> the text encoder's state(s) at ``models.text_layer`` after its final LayerNorm:
    [B, L, D] for one layer, [B, k, L, D] for k of them (what a latent cache stores)."""
    return models.text_encoder.apply({"params": params["text_encoder"]}, ids, models.text_layer,
                                     method=clip.CLIPTextModel.encode)


def condition(models: Models, params: Mapping[str, Any], states: jax.Array) -> jax.Array:
    """Text states ([B, L, D] or [B, k, L, D]) -> the denoiser's context [B, L', D]: the conditioner's output when the
    model has one, else the states themselves (k of them concatenated along the tokens, L' = k L)."""
    if models.conditioner is not None:
        return models.conditioner.apply({"params": params["conditioner"]}, states)
    if states.ndim == 4:
        return einops.rearrange(states, "b k l d -> b (k l) d")
    return states


def encode_text(models: Models, params: Mapping[str, Any], ids: jax.Array) -> jax.Array:
    """[B, 77] ids -> context [B, L', D], as the denoiser receives it."""
    return condition(models, params, text_states(models, params, ids))


def predict(models: Models, params: Mapping[str, Any], x: jax.Array, t: jax.Array, context: jax.Array) -> jax.Array:
    """The denoiser in its compute dtype: x [B, h, w, C], t [B], context [B, L, D] -> [B, h, w, C'] float32 (all
    of its output channels: C' = 2C for a transformer with a learned variance)."""
    dtype = models.denoiser.dtype
    out = models.denoiser.apply({"params": params[models.denoiser_name]}, x.astype(dtype), t, context.astype(dtype))
    return out.astype(jnp.float32)


def predict_noise(models: Models, params: Mapping[str, Any], x: jax.Array, t: jax.Array,
                  context: jax.Array) -> jax.Array:
    """What the sampler uses: :func:`predict` without a learned variance, [B, h, w, C] float32 (diffusers' PixArt
    and DiT pipelines likewise sample with the mean prediction alone)."""
    out = predict(models, params, x, t, context)
    if has_learned_variance(models.denoiser.config):
        return out[..., : out.shape[-1] // 2]
    return out


def vae_decode(module: vae.AutoencoderKL, vae_params: Any, latents: jax.Array) -> jax.Array:
    """Scaled latents [B, h, w, C] -> images [B, H, W, 3] float32 in [0, 1], with the VAE ``module``."""
    z = vae.unscale_latents(latents.astype(jnp.float32), module.config).astype(module.dtype)
    x = module.apply({"params": vae_params}, z, method=vae.AutoencoderKL.decode)
    return jnp.clip((x.astype(jnp.float32) + 1.0) / 2.0, 0.0, 1.0)


def decode(models: Models, params: Mapping[str, Any], latents: jax.Array) -> jax.Array:
    """Scaled latents [B, h, w, C] -> images [B, H, W, 3] float32 in [0, 1]."""
    return vae_decode(models.vae, params["vae"], latents)


def encode_images(models: Models, params: Mapping[str, Any], images: jax.Array, key: jax.Array | None) -> jax.Array:
    """Images [B, H, W, 3] in [0, 1] -> scaled latents [B, h, w, C]: a posterior sample with ``key``, else the mean."""
    x = (2.0 * images.astype(jnp.float32) - 1.0).astype(models.vae.dtype)
    posterior = models.vae.apply({"params": params["vae"]}, x, method=vae.AutoencoderKL.encode)
    z = posterior.mode() if key is None else posterior.sample(key)
    return vae.scale_latents(z.astype(jnp.float32), models.vae.config)
