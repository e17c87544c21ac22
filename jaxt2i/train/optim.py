"""Optimizer of the train step: AdamW behind global-norm clipping, linear warmup + cosine decay, and EMA."""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import optax


@dataclass(frozen=True)
class OptimConfig:
    """AdamW settings. The learning rate rises linearly from 0 to `lr` over `warmup_steps`, then follows a
    cosine from `lr` down to `lr * final_lr_fraction` at `total_steps` (constant afterwards).

    grad_clip_norm: clip the global gradient norm to this value before Adam (None or 0 disables clipping).
    ema_decay: decay of the exponential moving average of the trainable params (None disables the EMA).
    """

    lr: float = 1e-5
    warmup_steps: int = 500
    total_steps: int = 10_000
    weight_decay: float = 1e-2
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    grad_clip_norm: float | None = 1.0
    ema_decay: float | None = 0.9999
    final_lr_fraction: float = 0.0

    def __post_init__(self):
        if self.total_steps < 1 or self.warmup_steps < 0:
            raise ValueError(
                f"OptimConfig needs total_steps >= 1 and warmup_steps >= 0; got total_steps={self.total_steps}, "
                f"warmup_steps={self.warmup_steps}."
            )
        if self.ema_decay is not None and not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"OptimConfig.ema_decay={self.ema_decay} must lie in [0, 1), or be None to disable EMA.")


def learning_rate_schedule(cfg: OptimConfig) -> optax.Schedule:
    """step -> learning rate: linear warmup from 0, then cosine decay to `lr * final_lr_fraction`."""
    warmup = min(cfg.warmup_steps, cfg.total_steps)
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=cfg.lr,
        warmup_steps=warmup,
        decay_steps=max(cfg.total_steps, warmup + 1),
        end_value=cfg.lr * cfg.final_lr_fraction,
    )


def make_optimizer(cfg: OptimConfig) -> optax.GradientTransformation:
    """clip_by_global_norm -> AdamW(schedule); weight decay applies to every trainable parameter, as torch's
    AdamW does in the diffusers fine-tuning scripts."""
    adamw = optax.adamw(
        learning_rate=learning_rate_schedule(cfg),
        b1=cfg.b1,
        b2=cfg.b2,
        eps=cfg.eps,
        weight_decay=cfg.weight_decay,
    )
    if cfg.grad_clip_norm:
        return optax.chain(optax.clip_by_global_norm(cfg.grad_clip_norm), adamw)
    return adamw


def ema_update(ema_params, params, decay: float):
    """ema <- decay * ema + (1 - decay) * params, leaf by leaf in the params' dtype."""
    def one(e, p):
        d = jnp.asarray(decay, e.dtype)
        return d * e + (1 - d) * p.astype(e.dtype)

    return jax.tree.map(one, ema_params, params)
