"""Classifier-free guidance as pure functions.

The conditional and unconditional predictions come from ONE batched model call on
concat([uncond, cond]) along the batch axis, as diffusers' pipelines do.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp


def combine(cond: jnp.ndarray, uncond: jnp.ndarray, scale) -> jnp.ndarray:
    """uncond + scale * (cond - uncond).  cond, uncond: [B, ...]; scale: scalar or [B] (traced)."""
    scale = jnp.asarray(scale, cond.dtype)
    scale = scale.reshape(scale.shape + (1,) * (cond.ndim - scale.ndim)) if scale.ndim else scale
    return uncond + scale * (cond - uncond)


def _std_per_sample(x: jnp.ndarray) -> jnp.ndarray:
    """Unbiased std over all non-batch axes, kept for broadcasting.  # [B, 1, ..., 1] float32"""
    axes = tuple(range(1, x.ndim))
    return jnp.std(x.astype(jnp.float32), axis=axes, keepdims=True, ddof=1)


def guidance_rescale(guided: jnp.ndarray, cond: jnp.ndarray, rescale) -> jnp.ndarray:
    """Rescales a guided prediction to the per-sample std of the conditional one, then mixes:
    rescale * guided * std(cond) / std(guided) + (1 - rescale) * guided  (Lin et al. 2023, Sec. 3.4).

    guided, cond: [B, ...]; rescale: scalar in [0, 1] (traced). Statistics in float32.
    """
    ratio = _std_per_sample(cond) / _std_per_sample(guided)
    rescaled = guided.astype(jnp.float32) * ratio
    out = rescale * rescaled + (1 - rescale) * guided.astype(jnp.float32)
    return out.astype(guided.dtype)


_guidance_rescale = guidance_rescale  # cfg_denoise_fn's argument of the same name shadows it


def _concat_batch(a: Any, b: Any) -> Any:
    return jax.tree.map(lambda u, v: jnp.concatenate([u, v], axis=0), a, b)


def cfg_denoise_fn(
    model_fn: Callable[[jnp.ndarray, jnp.ndarray, Any], jnp.ndarray],
    context: Any,
    uncond_context: Any,
    guidance_scale,
    guidance_rescale: float = 0.0,
) -> Callable[[jnp.ndarray, jnp.ndarray], jnp.ndarray]:
    """Wraps model_fn(x, t, context) into a guided denoise_fn(x, t) for `samplers.sample`.

    context, uncond_context: pytrees of [B, ...] arrays (e.g. [B, 77, D] text embeddings), same
    structure and shapes. guidance_scale, guidance_rescale: scalars, may be traced (a Python 0 for
    guidance_rescale skips the rescale entirely). Each call of the returned function makes one
    model call on a batch of 2B: [uncond; cond].
    """
    both = _concat_batch(uncond_context, context)

    def denoise(x: jnp.ndarray, t: jnp.ndarray) -> jnp.ndarray:
        batch = x.shape[0]
        t = jnp.broadcast_to(jnp.asarray(t, jnp.float32), (batch,))
        out = model_fn(jnp.concatenate([x, x], axis=0), jnp.concatenate([t, t], axis=0), both)
        uncond, cond = out[:batch], out[batch:]
        guided = combine(cond, uncond, guidance_scale)
        if isinstance(guidance_rescale, (int, float)) and guidance_rescale == 0:
            return guided
        return _guidance_rescale(guided, cond, guidance_rescale)

    return denoise


__all__ = ["combine", "guidance_rescale", "cfg_denoise_fn"]
