"""Kind ``dit_class``: a class-conditional DiT (:mod:`jaxt2i.models.dit`, adaLN-Zero, diffusers' DiTPipeline layout)
on frozen-VAE latents; exports a ``dit``-family model folder (``jaxt2i.load_pipeline(...).class_to_image``).

A caption names its example's class: one of ``model.classes`` (the class names in id order, which the export keeps
as ``id2label``); without ``model.classes``, a classification source's own class captions (a TFDS label feature:
"a photo of a {name}", its names kept as ``id2label``), else the class id itself ("0", "1", ...).
Label dropout (``loss.cond_dropout``) replaces an example's class by the null class (id ``num_classes``), which
guidance contrasts with. The loss is the ``unet`` kind's denoising objective; with a learned variance it is DiT's
hybrid objective (:func:`jaxt2i.train.kinds.diffusion.denoising_loss`).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxt2i.convert.load import LoadedModel, write_native
from jaxt2i.data.sources import make_source
from jaxt2i.diffusion import losses, schedules
from jaxt2i.models import dit, vae
from jaxt2i.train.config import from_dict
from jaxt2i.train.kinds.base import Kind, read_components
from jaxt2i.train.kinds.diffusion import (DROPOUT, POSTERIOR, batch_latents, denoising_loss, diffuse,
                                          example_streams)
from jaxt2i.train.state import TrainState


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Which models to train.

    transformer: a ``jaxt2i.models.dit.PRESETS`` name with class conditioning ("tiny", "DiT-S/2", ..., "DiT-XL/2").
    transformer_config: ``DiTConfig`` fields over the preset; ``in_channels`` and ``sample_size`` follow the VAE
        and ``data.image_size``, ``num_classes`` follows ``classes`` when given.
    vae / vae_from: the frozen VAE: a ``jaxt2i.models.vae.PRESETS`` name (fresh weights: for tests only), or a
        model folder that has a ``vae`` component (e.g. a ``vae`` run's WORKDIR/final or a converted DiT model).
    classes: class names in id order (a caption must be one of them); None: the source's class captions (TFDS
        label features), else captions are class ids.
    remat: rematerialise the transformer blocks in the backward pass. export_ema: write the EMA weights.
    """

    transformer: str = "tiny"
    transformer_config: Any = None
    vae: str = "tiny"
    vae_from: str | None = None
    classes: tuple[str, ...] | None = None
    remat: bool = False
    export_ema: bool = True


def class_transformer_config(m: ModelConfig, vae_config, image_size: int) -> dit.DiTConfig:
    """The run's class-conditional ``DiTConfig`` (preset, then what follows the VAE, data and classes, then
    ``m.transformer_config``)."""
    if m.transformer not in dit.PRESETS:
        raise ValueError(f"model.transformer={m.transformer!r} is not a DiT preset; choose one of "
                         f"{', '.join(dit.PRESETS)}.")
    if m.transformer_config is not None and not isinstance(m.transformer_config, Mapping):
        raise ValueError(f"model.transformer_config must be a mapping of DiTConfig fields, got {m.transformer_config!r}")
    fields = dict(dataclasses.asdict(dit.PRESETS[m.transformer]), in_channels=vae_config.latent_channels,
                  sample_size=image_size // vae_config.downsample_factor, out_channels=None)
    if m.classes:
        fields["num_classes"] = len(m.classes)
    fields.update(m.transformer_config or {})
    config = from_dict(dit.DiTConfig, fields, "model.transformer_config.")
    if config.conditioning != "class":
        raise ValueError(f"the dit_class kind trains a class-conditional transformer; model.transformer="
                         f"{m.transformer!r} is {config.conditioning!r}-conditioned (the dit kind trains text ones).")
    if m.classes and config.num_classes != len(m.classes):
        raise ValueError(f"model.transformer_config.num_classes={config.num_classes} but model.classes names "
                         f"{len(m.classes)}.")
    return config


def caption_labels(captions_by_id: Sequence[str] | None, num_classes: int):
    """``captions -> {"labels": int32 [B]}`` for the batch iterator: a caption is the caption of class i in
    ``captions_by_id``, or (without them) the id itself; any other caption is a ValueError naming it."""
    index = {name: i for i, name in enumerate(captions_by_id)} if captions_by_id else None

    def one(caption: str) -> int:
        text = caption.strip()
        if index is not None:
            if text not in index:
                raise ValueError(f"caption {caption!r} is none of the classes' captions ({', '.join(list(index)[:4])}"
                                 f", ...): set model.classes to the class names the captions use.")
            return index[text]
        if not text.lstrip("-").isdigit() or not 0 <= int(text) < num_classes:
            raise ValueError(f"caption {caption!r} is not a class id in 0..{num_classes - 1}; set model.classes to "
                             "the class names the captions use.")
        return int(text)

    return lambda captions: {"labels": np.asarray([one(c) for c in captions], np.int32)}


class ClassDiTKind(Kind):
    ModelConfig = ModelConfig
    LossConfig = losses.LossConfig
    trainable = ("transformer",)

    def __init__(self, cfg):
        super().__init__(cfg)
        m = cfg.model
        if m.vae_from:
            got = read_components(m.vae_from, ("vae",), "model.vae_from")
            vae_config, self._given = got.configs["vae"], {"vae": got.params["vae"]}
        else:
            if m.vae not in vae.PRESETS:
                raise ValueError(f"model.vae={m.vae!r} is not a VAE preset; choose one of {', '.join(vae.PRESETS)} "
                                 "or set model.vae_from.")
            vae_config, self._given = vae.PRESETS[m.vae], {}
        source = make_source(cfg.data)
        self.class_captions = list(m.classes) if m.classes else getattr(source, "class_captions", None)
        self.class_names = list(m.classes) if m.classes else getattr(source, "label_names", None)
        if self.class_names and not m.classes and (m.transformer_config or {}).get("num_classes") is None:
            m = dataclasses.replace(m, classes=tuple(self.class_names))
        self.configs = {"transformer": class_transformer_config(m, vae_config, cfg.data.image_size), "vae": vae_config}
        self.transformer = dit.DiT(self.configs["transformer"], dtype=self.dtype, param_dtype=jnp.float32,
                                   remat=m.remat)
        self.vae = vae.AutoencoderKL(vae_config, param_dtype=jnp.float32)
        self.schedule = dataclasses.replace(cfg.schedule, prediction_type=cfg.loss.prediction_target)
        self.alphas_cumprod = jnp.asarray(schedules.alphas_cumprod(cfg.schedule), jnp.float32)

    def initializers(self):
        def init_transformer(key):
            args, kwargs = dit.dummy_inputs(self.configs["transformer"])
            zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), (args, kwargs))
            return self.transformer.init(key, *zeros[0], **zeros[1])["params"]

        def init_vae(key):
            side = self.vae.config.downsample_factor
            return self.vae.init(key, jnp.zeros((1, side, side, self.vae.config.in_channels)))["params"]

        return {"transformer": init_transformer, "vae": init_vae}

    def initial_params(self):
        return self._given

    def loss(self, components, batch, key, first_index, gather):
        config, cfg = self.configs["transformer"], self.cfg.loss
        streams = example_streams(key, first_index, batch)
        x0 = batch_latents(self.vae, components["vae"], batch, streams[POSTERIOR])
        t, noise, abar, x_t = diffuse(streams, x0, self.alphas_cumprod)
        labels = jnp.asarray(batch["labels"], jnp.int32)
        if cfg.cond_dropout > 0:
            labels = jnp.where(losses.dropout_mask(streams[DROPOUT], cfg.cond_dropout), config.num_classes, labels)
        prediction = self.transformer.apply({"params": components["transformer"]}, x_t.astype(self.dtype),
                                            t.astype(jnp.float32), labels).astype(jnp.float32)
        per_example = denoising_loss(prediction, x0, noise, x_t, t, self.schedule, cfg, abar, config.learn_sigma)
        return per_example.mean(), {}

    def batches(self, local_batch, position):
        config = self.configs["transformer"]
        return self.image_batches(local_batch, position, fields=caption_labels(self.class_captions, config.num_classes))

    def export(self, state: TrainState, out: Path, *, overwrite: bool) -> None:
        """The trained transformer with the frozen VAE as a ``dit``-family model folder at ``out``."""
        trees = self.host_components(state, self.cfg.model.export_ema)
        classes = self.class_names
        sc = self.cfg.sample
        model = LoadedModel(configs=dict(self.configs), params={k: trees[k] for k in self.configs},
                            schedule=self.schedule, tokenizer={"pad": None, "folder": None},
                            source=str(self.cfg.workdir), sampling={"steps": sc.steps, "guidance": sc.guidance_scale},
                            family="dit", types={"transformer": "dit"},
                            extras={"id2label": {str(i): name for i, name in enumerate(classes)}} if classes else {})
        if jax.process_index() == 0:
            write_native(str(out), model, overwrite=overwrite)
