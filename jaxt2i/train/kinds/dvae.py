"""Kind ``dvae``: DALL-E's discrete VAE (:mod:`jaxt2i.models.dvae`), or a VQ-VAE on the same encoder and decoder.

``model.quantizer: gumbel`` (DALL-E, Ramesh et al. 2021, appendix A.2): the encoder's logits over the vocabulary are
relaxed into soft one-hots ``softmax((logits + g) / tau)`` (Gumbel noise ``g`` from each example's key) that the
decoder reads; ``tau`` follows a cosine from ``loss.temperature_start`` (1) to ``loss.temperature_end`` (1/16) over
``loss.temperature_steps``. The loss is the negative ELB with a KL weight ``beta``, divided by the number of pixel
values ``D = H * W * C`` of an image::

    loss = mean_b [ sum_pixels NLL(x_b | decoder) + beta * sum_positions KL(q(. | x_b) || Uniform(V)) ] / D

``NLL`` is the logit-Laplace negative log-density of the ``map_pixels``'d image (``loss.recon: logit_laplace``;
``logit_mse`` and ``mse`` are squared errors instead, see ``RECON_LOSSES``). ``beta`` rises from 0 along a cosine over
``loss.beta_steps`` to ``loss.beta``, which is the paper's 6.6 *in the paper's units*: the paper sums the likelihood
over the 256x256x3 pixel values and the KL over the 32x32 positions and divides the whole by 256x256x3, "making the
KL's effective weight beta/192" -- exactly the formula above. Per token position, the KL's weight relative to the
per-value NLL is ``beta / (f^2 C)`` (``f`` the downsampling factor: 192 for OpenAI's model, 48 for 64x64 -> 16x16).

``model.quantizer: vq`` (van den Oord et al. 2017): the same ``Encoder`` / ``Decoder`` with ``vocab_size =
model.code_dim`` around a codebook of ``vocab_size`` vectors (:mod:`jaxt2i.models.vector_quantizer`): nearest code,
straight-through gradient, ``loss = rec + codebook loss + loss.commitment (0.25) * commitment loss`` (means over
elements; ``rec`` as above, mean per pixel value). ``loss.codebook_update: ema`` replaces the codebook loss by
moving-average updates (decay ``loss.codebook_decay`` 0.99, Laplace smoothing ``loss.codebook_epsilon``), computed
from the whole global batch; the codebook is then a frozen component that the step replaces
(``jaxt2i.train.step.FROZEN_UPDATES``).

The schedules read the step number each batch carries (``batch["step"]``, from the data position, so a resumed run
continues them exactly). Metrics: ``rec`` (NLL in nats per pixel value, or the MSE), ``psnr`` (dB, of the decoder's
mean image from the relaxed tokens / the quantised codes), ``perplexity`` and ``codes_used`` (of the global batch's
hard-token histogram), and per variant ``kl`` (nats per token position), ``temperature``, ``beta``;
``codebook_loss``, ``commitment_loss``, ``dead_codes`` (EMA: codes whose moving-average count is below
``DEAD_CODE_SHARE`` of the mean code's, i.e. used less than 1/100 as often as under uniform use).

Export: a dVAE model folder (components ``dvae_encoder`` and ``dvae_decoder``; ``jaxt2i.load_dvae`` reads it; a VQ
model is folded into a plain dVAE, see :func:`jaxt2i.models.vector_quantizer.fold_into_dvae`), and the
reconstruction PSNR of ``model.heldout_examples`` held-out images through hard tokens, their token perplexity and
dead codes (codes none of them uses), printed and kept in the folder's ``extras["heldout"]``. Samples: those
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

from jaxt2i.convert.load import LoadedModel, write_native
from jaxt2i.dvae import COMPONENT_TYPES, DVAE
from jaxt2i.images import save_png
from jaxt2i.models import dvae as dvae_model
from jaxt2i.models import vector_quantizer as vq
from jaxt2i.train.config import from_dict
from jaxt2i.train.kinds import dvae_losses as L
from jaxt2i.train.kinds.base import Kind
from jaxt2i.train.kinds.vae import VAEKind
from jaxt2i.train.state import TrainState
from jaxt2i.train.step import FROZEN_UPDATES, batch_rows, example_keys

QUANTIZERS = ("gumbel", "vq")
# logit_laplace: the NLL of the logit-Laplace distributions (nats per value; the paper's). logit_mse: the squared
# error of mu against logit(map_pixels(x)) (the same location with a fixed-scale Gaussian; its gradient never
# vanishes, and it does not spend the model on sharpening the background's scale: on the mostly black shapes world
# it learns several times faster). mse: the squared error of the mean image in [0, 1] (unclipped; the sigmoid
# saturates when mu overshoots, and its gradient then vanishes).
RECON_LOSSES = ("logit_laplace", "logit_mse", "mse")
CODEBOOK_UPDATES = ("gradient", "ema")
DEAD_CODE_SHARE = 0.01  # a code is dead when its EMA count is below this fraction of the mean code's


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """preset: a ``jaxt2i.models.dvae`` preset; config: ``DVAEConfig`` fields over it (``image_size`` is
    ``data.image_size``). quantizer: "gumbel" or "vq"; code_dim: channels of the VQ code vectors.
    heldout_split / heldout_examples: the images the exported model is scored on. export_ema: export the EMA
    weights when kept (a moving-average codebook, ``loss.codebook_update: ema``, is exported as it is)."""

    preset: str = "shapes"
    config: Any = None
    quantizer: str = "gumbel"
    code_dim: int = 64
    heldout_split: str = "heldout"
    heldout_examples: int = 256
    export_ema: bool = True

    def __post_init__(self):
        if self.quantizer not in QUANTIZERS:
            raise ValueError(f"model.quantizer={self.quantizer!r}; use one of {QUANTIZERS}.")
        if self.code_dim < 1:
            raise ValueError(f"model.code_dim must be >= 1, got {self.code_dim}.")


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """recon: one of ``RECON_LOSSES``. gumbel: beta (paper's units, see the module), beta_steps,
    temperature_start/end/steps. vq: commitment, codebook_update ("gradient" or "ema"), codebook_decay,
    codebook_epsilon."""

    recon: str = "logit_laplace"
    beta: float = 6.6
    beta_steps: int = 5000
    temperature_start: float = 1.0
    temperature_end: float = 1.0 / 16.0
    temperature_steps: int = 150_000
    commitment: float = 0.25
    codebook_update: str = "gradient"
    codebook_decay: float = 0.99
    codebook_epsilon: float = 1e-5

    def __post_init__(self):
        if self.recon not in RECON_LOSSES:
            raise ValueError(f"loss.recon={self.recon!r}; use one of {RECON_LOSSES}.")
        if self.codebook_update not in CODEBOOK_UPDATES:
            raise ValueError(f"loss.codebook_update={self.codebook_update!r}; use one of {CODEBOOK_UPDATES}.")
        if min(self.temperature_start, self.temperature_end) <= 0:
            raise ValueError("loss.temperature_start and loss.temperature_end must be > 0.")
        if not 0.0 <= self.codebook_decay < 1.0:
            raise ValueError(f"loss.codebook_decay={self.codebook_decay} must lie in [0, 1).")


# ----------------------------------------------------------------------------- losses


def reconstruction(stats: jax.Array, x01: jax.Array, recon: str) -> tuple[jax.Array, jax.Array]:
    """Decoder statistics [B, H, W, 2C], images [B, H, W, C] in [0, 1] -> (the reconstruction term per image [B],
    mean per pixel value -- see ``RECON_LOSSES``; the squared error of the decoder's mean image, as it is shown, per
    image [B])."""
    x_mapped = dvae_model.map_pixels(x01)
    mu = stats[..., : stats.shape[-1] // 2]
    if recon == "logit_laplace":
        per_value = L.logit_laplace_nll(stats, x_mapped)
    elif recon == "logit_mse":
        per_value = jnp.square(mu - (jnp.log(x_mapped) - jnp.log1p(-x_mapped)))
    else:
        eps = dvae_model.LOGIT_LAPLACE_EPS
        per_value = jnp.square((jax.nn.sigmoid(mu) - eps) / (1.0 - 2.0 * eps) - x01)  # unmap_pixels, unclipped
    rec = jnp.mean(per_value, axis=(1, 2, 3))
    shown = dvae_model.stats_to_images(stats)
    return rec, jnp.mean(jnp.square(shown - x01), axis=(1, 2, 3))


def usage_metrics(tokens: jax.Array, vocab_size: int) -> dict:
    """Hard tokens of the global batch -> ``perplexity`` and ``codes_used`` of their histogram."""
    counts = L.token_counts(tokens, vocab_size)
    return {"perplexity": L.perplexity(counts), "codes_used": L.codes_used(counts)}


def gumbel_objective(encoder, decoder, params: dict, x01: jax.Array, keys: jax.Array, step: jax.Array,
                     cfg: LossConfig, gather=lambda x: x) -> tuple[jax.Array, dict]:
    """DALL-E's relaxed ELB (module docstring): images [B, H, W, C] in [0, 1], one key per image, the step number
    -> (mean loss, metrics). ``params``: ``{"encoder", "decoder"}`` trees."""
    logits = encoder.apply({"params": params["encoder"]}, dvae_model.map_pixels(x01))  # [B, h, w, V]
    temperature = L.cosine_schedule(step, cfg.temperature_start, cfg.temperature_end, cfg.temperature_steps)
    beta = L.cosine_schedule(step, 0.0, cfg.beta, cfg.beta_steps)
    soft = L.gumbel_softmax(keys, logits, temperature)
    stats = decoder.apply({"params": params["decoder"]}, soft)
    rec, mse = reconstruction(stats, x01, cfg.recon)
    kl = L.kl_to_uniform(logits)  # [B, h, w]
    values = math.prod(x01.shape[1:])
    loss = jnp.mean(rec + beta * jnp.sum(kl, axis=(1, 2)) / values)
    tokens = jnp.argmax(logits, axis=-1)
    metrics = {"rec": jnp.mean(rec), "kl": jnp.mean(kl), "temperature": temperature, "beta": beta,
               "psnr": jnp.mean(L.psnr(mse)), **usage_metrics(gather(tokens), logits.shape[-1])}
    return loss, metrics


def vq_objective(encoder, decoder, params: dict, x01: jax.Array, cfg: LossConfig,
                 gather=lambda x: x) -> tuple[jax.Array, dict]:
    """VQ-VAE's loss (module docstring): images [B, H, W, C] in [0, 1] -> (mean loss, metrics). ``params``:
    ``{"encoder", "decoder", "codebook"}``; with ``cfg.codebook_update == "ema"`` the metrics carry the updated
    codebook under ``FROZEN_UPDATES``."""
    codebook = params["codebook"]
    z_e = encoder.apply({"params": params["encoder"]}, dvae_model.map_pixels(x01))  # [B, h, w, D]
    z_in, codes, z_q = vq.quantize(z_e, codebook["embedding"])
    stats = decoder.apply({"params": params["decoder"]}, z_in)
    rec, mse = reconstruction(stats, x01, cfg.recon)
    codebook_loss, commitment_loss = L.vq_losses(z_e, z_q)
    loss = jnp.mean(rec) + cfg.commitment * commitment_loss
    vocab_size = codebook["embedding"].shape[0]
    all_codes = gather(codes)
    metrics = {"rec": jnp.mean(rec), "psnr": jnp.mean(L.psnr(mse)), "codebook_loss": codebook_loss,
               "commitment_loss": commitment_loss, **usage_metrics(all_codes, vocab_size)}
    if cfg.codebook_update == "gradient":
        return loss + codebook_loss, metrics
    vectors = gather(jax.lax.stop_gradient(z_e))
    new = vq.ema_update(codebook, vectors.reshape(-1, vectors.shape[-1]), all_codes.reshape(-1),
                        cfg.codebook_decay, cfg.codebook_epsilon)
    size = new["cluster_size"]
    metrics["dead_codes"] = jnp.sum(size < DEAD_CODE_SHARE * jnp.mean(size)).astype(jnp.float32)
    metrics[FROZEN_UPDATES] = {"codebook": new}
    return loss, metrics


# ----------------------------------------------------------------------------- evaluation


def _chunks(images: np.ndarray, size: int):
    return (jnp.asarray(images[i: i + size], jnp.float32) for i in range(0, len(images), size))


def reconstruct(dvae: DVAE, images: np.ndarray, batch_size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """Images [N, H, W, C] in [0, 1] -> (their reconstructions through hard tokens [N, H, W, C] in [0, 1], the
    tokens [N, h, w] int32), in chunks of ``batch_size``."""
    tokens = [dvae.tokens(x) for x in _chunks(images, batch_size)]
    recon = [np.asarray(dvae.decode(t)) for t in tokens]
    return np.concatenate(recon), np.concatenate([np.asarray(t) for t in tokens])


def reconstruction_psnr(dvae: DVAE, images: np.ndarray, batch_size: int = 64) -> float:
    """Mean PSNR (dB) of images [N, H, W, C] in [0, 1] against ``dvae.decode(dvae.tokens(images))``."""
    recon, _ = reconstruct(dvae, images, batch_size)
    return float(np.mean(L.psnr(np.mean(np.square(recon - images), axis=(1, 2, 3)))))


def heldout_report(dvae: DVAE, images: np.ndarray, batch_size: int = 64) -> dict:
    """Reconstruction PSNR and codebook usage of a dVAE on images [N, H, W, C] in [0, 1]: ``{"images", "psnr"
    (dB, hard tokens), "perplexity", "codes_used", "dead_codes" (codes no image uses)}``."""
    recon, tokens = reconstruct(dvae, images, batch_size)
    counts = L.token_counts(jnp.asarray(tokens), dvae.config.vocab_size)
    return {"images": len(images),
            "psnr": round(float(np.mean(L.psnr(np.mean(np.square(recon - images), axis=(1, 2, 3))))), 3),
            "perplexity": round(float(L.perplexity(counts)), 2), "codes_used": round(float(L.codes_used(counts)), 4),
            "dead_codes": int(np.sum(np.asarray(counts) == 0))}


# ----------------------------------------------------------------------------- batches


class NumberedBatches:
    """A batch iterator whose batches carry the number of the step they feed, ``batch["step"]`` int32 [B] (every
    row the same), from the wrapped iterator's data position: each step reads ``local_batch`` readable examples,
    so the next step is ``(consumed - skipped) / local_batch``; a resumed run gets the same numbers."""

    def __init__(self, batches, local_batch: int):
        self.batches, self.local_batch = batches, local_batch

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        position = self.batches.position()
        step = (position["consumed"] - position["skipped"]) // self.local_batch
        batch = next(self.batches)
        return {**batch, "step": np.full((batch_rows(batch),), step, np.int32)}

    def position(self) -> dict:
        return self.batches.position()

    @property
    def skipped(self) -> int:
        return self.batches.skipped

    def close(self):
        self.batches.close()


# ----------------------------------------------------------------------------- the kind


def dvae_config(model: ModelConfig, image_size: int) -> dvae_model.DVAEConfig:
    """The exported dVAE's config: the preset, ``model.config``'s fields over it, ``image_size``."""
    fields = {**dataclasses.asdict(dvae_model.get_config(model.preset)), **dict(model.config or {}),
              "image_size": image_size}
    return from_dict(dvae_model.DVAEConfig, fields, "model.config.")


class DVAEKind(Kind):
    ModelConfig = ModelConfig
    LossConfig = LossConfig
    trainable = ("encoder", "decoder")

    def __init__(self, cfg):
        super().__init__(cfg)
        m = cfg.model
        self.config = dvae_config(m, cfg.data.image_size)
        self.is_vq = m.quantizer == "vq"
        # the VQ encoder outputs code_dim channels, and its decoder reads code vectors of code_dim channels
        inner = dataclasses.replace(self.config, vocab_size=m.code_dim) if self.is_vq else self.config
        self.inner_config = inner
        self.encoder = dvae_model.Encoder(inner, dtype=self.dtype)
        self.decoder = dvae_model.Decoder(inner, dtype=self.dtype)
        if self.is_vq and cfg.loss.codebook_update == "gradient":
            self.trainable = ("encoder", "decoder", "codebook")

    def initializers(self):
        inits = {"encoder": lambda key: dvae_model.init_encoder(self.inner_config, key),
                 "decoder": lambda key: dvae_model.init_decoder(self.inner_config, key)}
        if self.is_vq:
            ema = self.cfg.loss.codebook_update == "ema"
            inits["codebook"] = lambda key: vq.init_codebook(key, self.config.vocab_size, self.cfg.model.code_dim,
                                                             ema=ema)
        return inits

    def batches(self, local_batch, position):
        return NumberedBatches(self.image_batches(local_batch, position), local_batch)

    def loss(self, components, batch, key, first_index, gather):
        x01 = batch["images"].astype(jnp.float32) * 0.5 + 0.5
        if self.is_vq:
            return vq_objective(self.encoder, self.decoder, components, x01, self.cfg.loss, gather)
        keys = example_keys(key, first_index, batch_rows(batch))
        return gumbel_objective(self.encoder, self.decoder, components, x01, keys, batch["step"][0], self.cfg.loss,
                                gather)

    heldout_images = VAEKind.heldout_images  # the same held-out images, [N, S, S, 3] in [-1, 1]

    def trained_dvae(self, state: TrainState) -> DVAE:
        """The trained model as a plain dVAE (a VQ codebook folded into its encoder and decoder)."""
        trees = self.host_components(state, self.cfg.model.export_ema)
        encoder, decoder = trees["encoder"], trees["decoder"]
        if self.is_vq:
            encoder, decoder = vq.fold_into_dvae(encoder, decoder, trees["codebook"]["embedding"])
        return DVAE(self.config, {"encoder": encoder, "decoder": decoder}, self.dtype, str(self.cfg.workdir))

    def export(self, state: TrainState, out: Path, *, overwrite: bool) -> None:
        dvae = self.trained_dvae(state)
        if jax.process_index() != 0:
            return
        report = heldout_report(dvae, self.heldout_images() * 0.5 + 0.5, self.cfg.batch_size)
        print(f"[jaxt2i train] held-out ({report['images']} images, hard tokens): PSNR {report['psnr']:.2f} dB, "
              f"token perplexity {report['perplexity']:.1f} of {self.config.vocab_size}, "
              f"{report['dead_codes']} dead codes", file=sys.stderr, flush=True)
        model = LoadedModel(configs={kind: self.config for kind in COMPONENT_TYPES.values()},
                            params={kind: dvae.params[part] for part, kind in COMPONENT_TYPES.items()},
                            schedule=None, tokenizer={"pad": None, "folder": None}, source=str(self.cfg.workdir),
                            family=None, extras={"heldout": report})
        write_native(str(out), model, overwrite=overwrite)

    def sample(self, state: TrainState, step: int, out_dir: Path) -> Path | None:
        dvae = self.trained_dvae(state)
        if jax.process_index() != 0:
            return None
        images = self.heldout_images(8) * 0.5 + 0.5
        recon, _ = reconstruct(dvae, images)
        return Path(save_png(out_dir / f"step_{step:08d}.png", np.concatenate([images, recon]),
                             metadata={"step": str(step)}, columns=len(images)))
