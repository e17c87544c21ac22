"""Kind ``vae``: a KL-VAE trained with the ELBO on the configured images.

Loss per batch (images ``x`` in [-1, 1], ``D = H * W * 3`` values per image)::

    loss = mean_b [ rec(x_b, decode(z_b)) / D + beta * KL(q(z | x_b) || N(0, I)) / D ],   z_b ~ q(z | x_b)

with ``rec`` the summed L1 (``loss.recon: l1``) or squared (``l2``) error: ``beta`` weighs the KL against the
reconstruction summed over pixels, as latent diffusion's ``kl_weight`` does. Each example's posterior draw comes
from its own key (its global index). Metrics: ``rec``, ``kl_per_value``, ``psnr`` (dB, posterior sample, images
in [0, 1]).

Export: the VAE alone as a model folder, with ``scaling_factor`` = 1 / std of the posterior means of
``model.heldout_examples`` images of the data split ``model.heldout_split`` (as Stable Diffusion chose 0.18215), so
a diffusion model trained on it sees latents of unit variance; their reconstruction PSNR is logged. Samples:
reconstructions of the first 8 held-out images beside the originals.
"""

from __future__ import annotations

import dataclasses
import math
import sys
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxt2i.data.sources import make_source
from jaxt2i.data.transforms import preprocess
from jaxt2i.images import save_png
from jaxt2i.models.vae import AutoencoderKL, VAEConfig
from jaxt2i.models.vae import init_params as init_vae
from jaxt2i.train.config import from_dict
from jaxt2i.train.kinds.base import Kind, write_components
from jaxt2i.train.state import TrainState
from jaxt2i.train.step import batch_rows, example_keys

RECON_LOSSES = ("l1", "l2")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """config: ``VAEConfig`` fields (missing ones: Stable Diffusion's). heldout_split / heldout_examples: the
    images the latent scale and the logged PSNR are measured on. export_ema: export the EMA weights when kept."""

    config: Any = None
    heldout_split: str = "heldout"
    heldout_examples: int = 256
    export_ema: bool = True


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """beta: weight of the KL per value; recon: "l1" or "l2" reconstruction error."""

    beta: float = 1e-4
    recon: str = "l1"

    def __post_init__(self):
        if self.recon not in RECON_LOSSES:
            raise ValueError(f"loss.recon={self.recon!r}; use one of {RECON_LOSSES}.")


def elbo_loss(module: AutoencoderKL, params, images: jax.Array, keys: jax.Array, beta: float, recon: str
              ) -> tuple[jax.Array, dict]:
    """Images ``[B, H, W, 3]`` in [-1, 1], one key per image -> (mean loss, metrics); see the module docstring."""
    x = images.astype(jnp.float32)
    posterior = module.apply({"params": params}, x, method="encode")
    noise = jax.vmap(lambda k: jax.random.normal(k, posterior.mean.shape[1:], jnp.float32))(keys)
    z = posterior.mean.astype(jnp.float32) + jnp.exp(0.5 * posterior.logvar.astype(jnp.float32)) * noise
    x_hat = module.apply({"params": params}, z.astype(module.dtype), method="decode").astype(jnp.float32)
    err = x_hat - x
    per_value = jnp.abs(err) if recon == "l1" else jnp.square(err)
    d = math.prod(x.shape[1:])
    rec = jnp.mean(per_value, axis=(1, 2, 3))
    kl = posterior.kl() / d
    mse01 = jnp.mean(jnp.square(jnp.clip(x_hat, -1, 1) - x), axis=(1, 2, 3)) / 4.0  # in [0, 1] units
    metrics = {"rec": jnp.mean(rec), "kl_per_value": jnp.mean(kl), "psnr": jnp.mean(-10.0 * jnp.log10(mse01 + 1e-12))}
    return jnp.mean(rec + beta * kl), metrics


class VAEKind(Kind):
    ModelConfig = ModelConfig
    LossConfig = LossConfig
    trainable = ("vae",)

    def __init__(self, cfg):
        super().__init__(cfg)
        self.config = from_dict(VAEConfig, cfg.model.config, "model.config.")
        self.module = AutoencoderKL(self.config, dtype=self.dtype, param_dtype=jnp.float32)

    def initializers(self):
        return {"vae": lambda key: init_vae(self.config, key)}

    def loss(self, components, batch, key, first_index, gather):
        keys = example_keys(key, first_index, batch_rows(batch))
        return elbo_loss(self.module, components["vae"], batch["images"], keys, self.cfg.loss.beta,
                         self.cfg.loss.recon)

    def heldout_images(self, count: int | None = None) -> np.ndarray:
        """``[N, S, S, 3]`` float32 in [-1, 1]: the held-out images, centre-cropped to ``data.image_size``."""
        m, data = self.cfg.model, self.cfg.data
        source = make_source(dataclasses.replace(data, split=m.heldout_split, num_examples=m.heldout_examples,
                                                 use_cache=False))
        n = min(len(source), count or m.heldout_examples)
        return np.stack([preprocess(source.example(i).image, data.image_size, crop="center") for i in range(n)])

    def _reconstruct(self, params, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """-> (reconstructions from the posterior means in [-1, 1], posterior means), in chunks of batch_size."""

        @jax.jit
        def run(x):
            posterior = self.module.apply({"params": params}, x, method="encode")
            x_hat = self.module.apply({"params": params}, posterior.mean, method="decode")
            return jnp.clip(x_hat.astype(jnp.float32), -1, 1), posterior.mean.astype(jnp.float32)

        chunks = [run(jnp.asarray(images[i: i + self.cfg.batch_size]))
                  for i in range(0, len(images), self.cfg.batch_size)]
        return (np.concatenate([np.asarray(c[0]) for c in chunks]), np.concatenate([np.asarray(c[1]) for c in chunks]))

    def export(self, state: TrainState, out: Path, *, overwrite: bool) -> None:
        params = self.host_components(state, self.cfg.model.export_ema)["vae"]
        if jax.process_index() != 0:
            return
        images = self.heldout_images()
        recon, means = self._reconstruct(params, images)
        std = float(np.std(means))
        mse = np.mean(np.square((recon - images) / 2.0), axis=(1, 2, 3))
        psnr = float(np.mean(-10.0 * np.log10(np.maximum(mse, 1e-12))))
        config = dataclasses.replace(self.config, scaling_factor=round(1.0 / max(std, 1e-6), 6),
                                     sample_size=self.cfg.data.image_size)
        print(f"[jaxt2i train] held-out ({len(images)} images): PSNR {psnr:.2f} dB, latent std {std:.4f}, "
              f"scaling_factor {config.scaling_factor}", file=sys.stderr, flush=True)
        write_components(out, {"vae": config}, {"vae": params}, overwrite=overwrite, source=str(self.cfg.workdir))

    def sample(self, state: TrainState, step: int, out_dir: Path) -> Path | None:
        params = self.host_components(state, self.cfg.model.export_ema)["vae"]
        if jax.process_index() != 0:
            return None
        images = self.heldout_images(8)
        recon, _ = self._reconstruct(params, images)
        grid = np.concatenate([images, recon]) * 0.5 + 0.5  # originals, then their reconstructions
        return Path(save_png(out_dir / f"step_{step:08d}.png", grid, metadata={"step": str(step)},
                             columns=len(images)))
