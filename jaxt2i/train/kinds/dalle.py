"""Kind ``dalle``: DALL-E's transformer (:mod:`jaxt2i.models.dalle`) over [caption tokens; image tokens of a frozen
dVAE]; exports a ``dalle``-family model folder (``jaxt2i.load_pipeline(...).text_to_image``).

Components: ``transformer`` (type ``dalle_transformer``) trains; ``dvae_encoder`` and ``dvae_decoder`` are the
frozen dVAE of ``model.dvae_from`` (a folder ``jaxt2i.load_dvae`` reads: a dVAE run's WORKDIR/final, or
``DVAE.save``'s), of which only the encoder runs in training: an image's tokens are the argmax of its logits,
computed inside the step. Captions go through the project's CLIP tokenizer at ``text_length`` positions, then
:func:`jaxt2i.models.dalle.prepare_text_tokens` (a distinct pad per position after the EOS). Each example's caption
is replaced by the empty caption (pads only) with probability ``loss.cond_dropout``, so guidance against it
("super-conditioning") works at sampling time. The loss is :func:`jaxt2i.models.dalle.weighted_loss`: cross-entropy
on the text and image tokens, weighted ``loss.text_weight`` / ``loss.image_weight`` (the paper's 1/8 and 7/8).

The transformer's config is a preset (``model.transformer``) with ``model.transformer_config`` over it; the image
token grid (``data.image_size`` / the dVAE's factor) and image vocabulary follow the dVAE, the text vocabulary the
tokenizer, the loss weights the loss section. The export holds the transformer, the dVAE, optionally the CLIP of
``model.clip_from`` (``text_encoder`` + ``clip_vision``, which rank ``--candidates``), and the recommended sampling:
``sample.guidance_scale`` and ``model.temperature`` / ``top_k`` / ``top_p``.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from jaxt2i.convert.load import LoadedModel, write_native
from jaxt2i.data.sources import make_source
from jaxt2i.dvae import load_dvae
from jaxt2i.images import save_png
from jaxt2i.models import dalle, dvae
from jaxt2i.models.attention_masks import PATTERNS, layer_kinds
from jaxt2i.pipelines.dalle import (DECODER_TYPE, ENCODER_TYPE, TEXT_VOCABULARY, TOKEN_SAMPLING, TRANSFORMER_TYPE,
                                    DallePipeline,
                                    check_temperature, check_top_k, check_top_p)
from jaxt2i.shipped import model_path
from jaxt2i.tokenizer import CLIPTokenizer, SubsetTokenizer, vocabulary_from_captions
from jaxt2i.train.config import from_dict
from jaxt2i.train.kinds.base import Kind, read_components
from jaxt2i.train.state import TrainState
from jaxt2i.train.step import batch_rows, example_keys

CLIP_COMPONENTS = ("text_encoder", "clip_vision")
TEXT_VOCABULARIES = ("clip", "captions")
# Sub-streams of an example's key.
CAPTION_DROP, DROPOUT = range(2)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Which models to train.

    transformer: a ``jaxt2i.models.dalle.PRESETS`` name ("tiny", "shapes", "shapes_8x8", ...).
    transformer_config: ``DalleConfig`` fields over the preset (``num_layers``, ``text_length``, ``layer_kinds``:
        a schedule name or one kind per layer, ...). ``image_height`` / ``image_width`` / ``image_vocab_size``
        follow the dVAE and ``data.image_size``, ``text_vocab_size`` the tokenizer, the loss weights the loss
        section: giving them another value is an error.
    dvae / dvae_from: the frozen dVAE: a folder ``jaxt2i.load_dvae`` reads with both encoder and decoder (a dVAE
        run's WORKDIR/final), or a ``jaxt2i.models.dvae.PRESETS`` name with fresh weights (for tests only).
    clip_from: a model folder, or a shipped model's name ("shapes"), whose ``text_encoder`` + ``clip_vision`` (a CLIP
        run's WORKDIR/final) are copied into the export to rank candidates; its images must be ``data.image_size``.
    temperature / top_k / top_p: the recommended sampling the export writes (with ``sample.guidance_scale``); the
        sample grids use them too.
    text_vocabulary: "clip" (the text table covers CLIP's whole BPE vocabulary) or "captions" (only the ids the
        captions of the first ``vocabulary_examples`` training examples use, plus one unknown id: a compact table
        for a small world's few words; the export stores the kept ids, and prompts read through a
        ``jaxt2i.tokenizer.SubsetTokenizer``).
    remat: rematerialise the transformer blocks in the backward pass. export_ema: write the EMA weights.
    """

    transformer: str = "tiny"
    transformer_config: Any = None
    dvae: str = "tiny"
    dvae_from: str | None = None
    clip_from: str | None = None
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    text_vocabulary: str = "clip"
    vocabulary_examples: int = 8192
    remat: bool = False
    export_ema: bool = True

    def __post_init__(self):
        if self.text_vocabulary not in TEXT_VOCABULARIES:
            raise ValueError(f"model.text_vocabulary={self.text_vocabulary!r}; choose one of "
                             f"{', '.join(TEXT_VOCABULARIES)}.")
        if self.vocabulary_examples < 1:
            raise ValueError(f"model.vocabulary_examples={self.vocabulary_examples} must be >= 1.")
        check_temperature(self.temperature, "model.temperature")
        check_top_k(self.top_k, "model.top_k")
        check_top_p(self.top_p, "model.top_p")


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """cond_dropout: probability of replacing a caption by the empty caption. text_weight / image_weight: weights
    of the text and image cross-entropies (the paper's 1/8 and 7/8)."""

    cond_dropout: float = 0.1
    text_weight: float = dalle.TEXT_LOSS_WEIGHT
    image_weight: float = dalle.IMAGE_LOSS_WEIGHT

    def __post_init__(self):
        if not 0.0 <= self.cond_dropout < 1.0:
            raise ValueError(f"loss.cond_dropout={self.cond_dropout} must be in [0, 1).")
        if min(self.text_weight, self.image_weight) < 0 or self.text_weight + self.image_weight <= 0:
            raise ValueError(f"loss.text_weight={self.text_weight} and loss.image_weight={self.image_weight} must be "
                             ">= 0 and not both 0.")


def _schedule(kinds: tuple[str, ...]) -> str | tuple[str, ...]:
    """A preset's per-layer kinds as the name of their schedule when they follow one (so a new depth follows it)."""
    for name in PATTERNS:
        if tuple(kinds) == layer_kinds(name, len(kinds)):
            return name
    return tuple(kinds)


def transformer_config(m: ModelConfig, loss: LossConfig, dvae_config: dvae.DVAEConfig, image_size: int,
                       text_vocab_size: int) -> dalle.DalleConfig:
    """The run's ``DalleConfig``: the preset, then ``m.transformer_config``, then what follows the dVAE at
    ``image_size``, the tokenizer's ``text_vocab_size`` and the loss weights (see ``ModelConfig``)."""
    if m.transformer not in dalle.PRESETS:
        raise ValueError(f"model.transformer={m.transformer!r} is not a DALL-E transformer preset; choose one of "
                         f"{', '.join(dalle.PRESETS)}.")
    overrides = m.transformer_config or {}
    if not isinstance(overrides, Mapping):
        raise ValueError(f"model.transformer_config must be a mapping of DalleConfig fields, got {overrides!r}")
    factor = dvae_config.downsample_factor
    if image_size % factor:
        raise ValueError(f"data.image_size={image_size} must be a multiple of the dVAE's downsampling factor {factor}.")
    follows = {"image_height": image_size // factor, "image_width": image_size // factor,
               "image_vocab_size": dvae_config.vocab_size, "text_vocab_size": text_vocab_size,
               "text_loss_weight": loss.text_weight, "image_loss_weight": loss.image_weight}
    clash = sorted(k for k in overrides if k in follows and overrides[k] != follows[k])
    if clash:
        raise ValueError(f"model.transformer_config.{clash[0]}={overrides[clash[0]]!r}, but it follows the dVAE, the "
                         f"tokenizer or the loss section ({follows[clash[0]]!r} here); leave it out.")
    preset = dalle.PRESETS[m.transformer]
    fields = {**dataclasses.asdict(preset), "layer_kinds": _schedule(preset.layer_kinds), **overrides, **follows}
    kinds = fields.pop("layer_kinds")
    config = from_dict(dalle.DalleConfig, fields, "model.transformer_config.")
    try:
        return dataclasses.replace(config, layer_kinds=tuple(kinds) if isinstance(kinds, list) else kinds)
    except ValueError as e:
        raise ValueError(f"model.transformer_config: {e}") from None


class DalleKind(Kind):
    ModelConfig = ModelConfig
    LossConfig = LossConfig
    trainable = ("transformer",)

    def __init__(self, cfg):
        super().__init__(cfg)
        m = cfg.model
        self.dvae_config, self._given = self._dvae(m)
        clip = CLIPTokenizer.default(pad="eos")
        config = transformer_config(m, cfg.loss, self.dvae_config, cfg.data.image_size, clip.vocab_size)
        self.tokenizer = self._text_tokenizer(m, cfg.data, CLIPTokenizer(clip.backend, config.text_length))
        self.config = dataclasses.replace(config, text_vocab_size=self.tokenizer.vocab_size)
        self.transformer = dalle.DalleTransformer(self.config, dtype=self.dtype, param_dtype=jnp.float32,
                                                  remat=m.remat)
        self.clip = self._clip(m.clip_from, cfg.data.image_size) if m.clip_from else None

    @staticmethod
    def _text_tokenizer(m: ModelConfig, data, tokenizer: CLIPTokenizer) -> CLIPTokenizer | SubsetTokenizer:
        """``tokenizer``, or for ``text_vocabulary: captions`` its restriction to the ids of the first
        ``vocabulary_examples`` examples' captions (the source is deterministic, so a resumed run gets the same)."""
        if m.text_vocabulary == "clip":
            return tokenizer
        source = make_source(data)
        count = min(m.vocabulary_examples, len(source))
        captions = (c for i in range(count) for c in source.example(i).captions)
        return SubsetTokenizer(tokenizer, vocabulary_from_captions(tokenizer, captions))

    @staticmethod
    def _dvae(m: ModelConfig) -> tuple[dvae.DVAEConfig, dict]:
        """The dVAE's config and given weights (``{}`` for a fresh preset)."""
        if not m.dvae_from:
            if m.dvae not in dvae.PRESETS:
                raise ValueError(f"model.dvae={m.dvae!r} is not a dVAE preset; choose one of {', '.join(dvae.PRESETS)} "
                                 "or set model.dvae_from.")
            return dvae.PRESETS[m.dvae], {}
        try:
            loaded = load_dvae(m.dvae_from)
        except (FileNotFoundError, ValueError) as e:
            raise ValueError(f"model.dvae_from={m.dvae_from}: {e}") from None
        missing = sorted({"encoder", "decoder"} - set(loaded.params))
        if missing:
            raise ValueError(f"model.dvae_from={m.dvae_from}: the dVAE has no {missing[0]}; the kind needs both (the "
                             "encoder makes the training tokens, the decoder goes into the export).")
        trees = {ENCODER_TYPE: loaded.params["encoder"], DECODER_TYPE: loaded.params["decoder"]}
        return loaded.config, jax.tree.map(np.asarray, trees)

    @staticmethod
    def _clip(folder: str, image_size: int) -> LoadedModel:
        got = read_components(model_path(folder), CLIP_COMPONENTS, "model.clip_from")
        side = got.configs["clip_vision"].image_size
        if side != image_size:
            raise ValueError(f"model.clip_from={folder}: its CLIP reads {side}x{side} images, the model draws "
                             f"{image_size}x{image_size} (data.image_size); it could not rank them.")
        return got

    # -- the state
    def initializers(self):
        def init_transformer(key):
            return self.transformer.init(key, *jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype),
                                                            dalle.dummy_inputs(self.config)))["params"]

        return {"transformer": init_transformer,
                ENCODER_TYPE: lambda key: dvae.init_encoder(self.dvae_config, key),
                DECODER_TYPE: lambda key: dvae.init_decoder(self.dvae_config, key)}

    def initial_params(self):
        return self._given

    # -- training
    def image_tokens(self, encoder_params, images: jax.Array) -> jax.Array:
        """Images [B, H, W, 3] in [-1, 1] (as batches hold them) -> the frozen encoder's tokens [B, h, w] int32."""
        x = (images.astype(jnp.float32) + 1.0) * 0.5
        logits = dvae.encode(encoder_params, x, self.dvae_config, dtype=self.dtype)
        return jax.lax.stop_gradient(jnp.argmax(logits, axis=-1).astype(jnp.int32))

    def _forward(self, params, text: jax.Array, image: jax.Array, keys: jax.Array):
        """(text [B, T], image tokens [B, h, w], per-example dropout keys [B]) -> (text logits, image logits)."""
        if self.config.dropout == 0:
            return self.transformer.apply({"params": params}, text, image)

        def one(t, i, key):  # each example's dropout from its own key: the same masks in every step form
            tl, il = self.transformer.apply({"params": params}, t[None], i[None], deterministic=False,
                                            rngs={"dropout": key})
            return tl[0], il[0]

        return jax.vmap(one)(text, image, keys)

    def loss(self, components, batch, key, first_index, gather):
        cfg = self.cfg.loss
        keys = example_keys(key, first_index, batch_rows(batch))
        streams = jnp.swapaxes(jax.vmap(lambda k: jax.random.split(k, 2))(keys), 0, 1)  # [2, B] keys
        image = self.image_tokens(components[ENCODER_TYPE], batch["images"])
        text = jnp.asarray(batch["text_tokens"], jnp.int32)
        if cfg.cond_dropout > 0:
            dropped = jax.vmap(lambda k: jax.random.bernoulli(k, cfg.cond_dropout))(streams[CAPTION_DROP])
            text = jnp.where(dropped[:, None], jnp.asarray(dalle.empty_caption(self.config)), text)
        text_logits, image_logits = self._forward(components["transformer"], text, image, streams[DROPOUT])
        return dalle.weighted_loss(text_logits, image_logits, text, image, text_weight=cfg.text_weight,
                                   image_weight=cfg.image_weight)

    def text_fields(self, captions) -> dict[str, np.ndarray]:
        """Captions -> ``{"text_tokens": int32 [B, text_length]}`` (tokenized, pads per position)."""
        ids = self.tokenizer(list(captions))
        return {"text_tokens": dalle.prepare_text_tokens(ids, self.tokenizer.eos_token_id, self.config)}

    def batches(self, local_batch, position):
        return self.image_batches(local_batch, position, fields=self.text_fields)

    # -- samples and export
    def model_folder(self, state: TrainState, ema: bool) -> LoadedModel:
        """The trained model as a ``dalle`` model folder's contents (host arrays)."""
        trees = self.host_components(state, ema)
        m, sc = self.cfg.model, self.cfg.sample
        configs = {"transformer": self.config, ENCODER_TYPE: self.dvae_config, DECODER_TYPE: self.dvae_config}
        params = {name: trees[name] for name in configs}
        if self.clip is not None:
            configs.update(self.clip.configs)
            params.update(self.clip.params)
        token_sampling = {"temperature": m.temperature, "top_k": m.top_k, "top_p": m.top_p}
        return LoadedModel(configs=configs, params=params, schedule=None, tokenizer={"pad": "eos", "folder": None},
                           source=str(self.cfg.workdir), sampling={"guidance": sc.guidance_scale}, family="dalle",
                           types={"transformer": TRANSFORMER_TYPE}, extras={TOKEN_SAMPLING: token_sampling, **self._vocabulary_extras()})

    def _vocabulary_extras(self) -> dict[str, list[int]]:
        """The folder's record of a compact text table: ``{"text_vocabulary": kept CLIP ids}`` (else empty)."""
        if isinstance(self.tokenizer, SubsetTokenizer):
            return {TEXT_VOCABULARY: self.tokenizer.kept.tolist()}
        return {}

    def export(self, state: TrainState, out: Path, *, overwrite: bool) -> None:
        """The trained transformer with the frozen dVAE (and the CLIP of ``model.clip_from``) at ``out``."""
        model = self.model_folder(state, self.cfg.model.export_ema)
        if jax.process_index() == 0:
            write_native(str(out), model, overwrite=overwrite)

    def sample(self, state: TrainState, step: int, out_dir: Path) -> Path | None:
        """Draws ``sample.prompts`` (seed ``sample.seed``, the recommended sampling) and writes a PNG grid."""
        sc = self.cfg.sample
        pipe = DallePipeline(self.model_folder(state, sc.use_ema), dtype=self.cfg.compute_dtype)
        images = pipe.text_to_image(list(sc.prompts), seed=sc.seed)
        if jax.process_index() != 0:
            return None
        path = out_dir / f"step_{step:08d}.png"
        save_png(path, images, metadata={"step": str(step), "prompts": json.dumps(list(sc.prompts)),
                                         **pipe.image_metadata()})
        return path
