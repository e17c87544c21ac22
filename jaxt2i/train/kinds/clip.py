"""Kind ``clip``: a CLIP (text tower + ViT image tower) trained contrastively, optionally with per-token heads.

Each step encodes the batch's (image, caption) pairs and minimises the symmetric InfoNCE loss with the learned
temperature (clipped at 100) over the *global* batch (in the shard_map form the embeddings are gathered). Captions
are drawn afresh from an image's captions each epoch (the data pipeline) and tokenised to ``model.text_length``
positions: the text tower is causal and pools at EOS, so later positions get no gradient; every caption must fit.

``model.heads``: batch fields (per-token integer labels, -1 = none, that the data source provides, e.g. the shapes
source's ``parse_role``) that linear heads on the text tower's last (final-LN'd) token states learn to predict;
their cross-entropy, weighted by ``loss.heads_weight``, joins InfoNCE. ``loss.balanced`` heads take the mean over
classes of each class's mean cross-entropy (for labels dominated by one class). The heads' class names come from
the source (``label_classes``).

Export: a model folder of components alone with ``text_encoder`` (the text tower), ``clip_vision`` (the image tower
and the temperature) and, with heads, ``parse_heads`` (of type ``token_heads``).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxt2i.data.sources import make_source
from jaxt2i.models import token_heads
from jaxt2i.models.clip import CLIPTextConfig
from jaxt2i.models.clip_vision import (CLIPConfig, CLIPModel, CLIPVisionConfig, clipped_scale, contrastive_loss,
                                       init_params, l2_normalize, preset)
from jaxt2i.models.token_heads import TokenHeadsConfig
from jaxt2i.tokenizer import CLIPTokenizer
from jaxt2i.train.config import from_dict
from jaxt2i.train.kinds.base import Kind, read_components, write_components
from jaxt2i.train.state import TrainState


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """preset: a ``jaxt2i.models.clip_vision`` preset; text / vision: ``CLIPTextConfig`` / ``CLIPVisionConfig``
    fields that replace the preset's. init_from: a model folder with ``text_encoder`` and ``clip_vision`` (a CLIP
    run's output) to start from; its architecture replaces the preset's. text_length: token positions fed in
    training. heads: batch fields the per-token heads predict (none: pure InfoNCE). export_ema: export the EMA
    weights when kept."""

    preset: str = "shapes"
    text: Any = None
    vision: Any = None
    init_from: str | None = None
    text_length: int = 32
    heads: tuple[str, ...] = ()
    export_ema: bool = True


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """heads_weight: weight of the heads' cross-entropy; balanced: heads whose loss is class-balanced."""

    heads_weight: float = 1.0
    balanced: tuple[str, ...] = ()

    def __post_init__(self):
        if self.heads_weight < 0:
            raise ValueError(f"loss.heads_weight must be >= 0; got {self.heads_weight}")


def heads_loss(logits: dict[str, jax.Array], labels: dict[str, jax.Array], balanced: tuple[str, ...]
               ) -> tuple[jax.Array, dict]:
    """Cross-entropy of per-token heads over the tokens that have labels, summed over heads, and each head's
    accuracy (for balanced heads also the least accurate class's). ``logits[name]``: ``[B, L, C]``;
    ``labels[name]``: ``[B, L]`` int, -1 = none. A balanced head's loss is the mean over the classes present of
    each class's mean cross-entropy, the others' the mean over labelled tokens."""
    loss, metrics = 0.0, {}
    for name, head_logits in logits.items():
        target = labels[name]
        mask = target >= 0
        ce = optax.softmax_cross_entropy_with_integer_labels(head_logits, jnp.maximum(target, 0))
        right = jnp.argmax(head_logits, -1) == target
        count = jnp.maximum(jnp.sum(mask), 1)
        if name in balanced:
            onehot = jax.nn.one_hot(target, head_logits.shape[-1]) * mask[..., None]  # [B, L, C]; -1 gives zeros
            per_class = jnp.sum(onehot, axis=(0, 1))
            present = per_class > 0
            class_ce = jnp.einsum("blc,bl->c", onehot, ce) / jnp.maximum(per_class, 1)
            loss = loss + jnp.sum(jnp.where(present, class_ce, 0.0)) / jnp.maximum(jnp.sum(present), 1)
            class_acc = jnp.einsum("blc,bl->c", onehot, right.astype(ce.dtype)) / jnp.maximum(per_class, 1)
            metrics[f"{name}_worst_class_accuracy"] = jnp.min(jnp.where(present, class_acc, 1.0))
        else:
            loss = loss + jnp.sum(jnp.where(mask, ce, 0.0)) / count
        metrics[f"{name}_accuracy"] = jnp.sum(mask & right) / count
    return loss, metrics


def tokenize_checked(tokenizer: CLIPTokenizer, captions, length: int) -> np.ndarray:
    """``[B, length]`` ids; raises ValueError if a caption (with BOS/EOS) does not fit in ``length`` positions."""
    ids = np.asarray(tokenizer(list(captions)))
    if np.any(ids[:, length:] != tokenizer.pad_token_id) or np.any(
            ~np.any(ids[:, :length] == tokenizer.eos_token_id, axis=1)):
        raise ValueError(f"a caption does not fit in model.text_length={length} tokens; raise it.")
    return ids[:, :length].astype(np.int32)


class CLIPKind(Kind):
    ModelConfig = ModelConfig
    LossConfig = LossConfig

    def __init__(self, cfg):
        super().__init__(cfg)
        m = cfg.model
        self.initial = {}
        if m.init_from:
            start = read_components(m.init_from, ("text_encoder", "clip_vision"), "model.init_from")
            self.config = CLIPConfig(text=start.configs["text_encoder"], vision=start.configs["clip_vision"])
            clip_params = dict(start.params["clip_vision"], text_model=start.params["text_encoder"])
            clip_params["logit_scale"] = np.asarray(clip_params["logit_scale"], np.float32).reshape(())
            self.initial["clip"] = clip_params
        else:
            base = preset(m.preset)
            self.config = CLIPConfig(
                text=from_dict(CLIPTextConfig, {**dataclasses.asdict(base.text), **dict(m.text or {})}, "model.text."),
                vision=from_dict(CLIPVisionConfig, {**dataclasses.asdict(base.vision), **dict(m.vision or {})},
                                 "model.vision."))
        self.module = CLIPModel(self.config, dtype=self.dtype, param_dtype=jnp.float32)
        self.tokenizer = CLIPTokenizer.default()
        self.source = make_source(cfg.data)
        self.heads = None
        if m.heads:
            unknown = sorted(set(cfg.loss.balanced) - set(m.heads))
            if unknown:
                raise ValueError(f"loss.balanced names {unknown}, which are not in model.heads {list(m.heads)}.")
            if not hasattr(self.source, "label_classes"):
                raise ValueError(f"model.heads={list(m.heads)}: data source {cfg.data.source!r} provides no "
                                 "per-token labels (it has no label_classes / batch_fields).")
            self.heads = TokenHeadsConfig(width=self.config.text.hidden_size, names=tuple(m.heads),
                                          classes=tuple(tuple(self.source.label_classes(h)) for h in m.heads))
        self.trainable = ("clip",) + (("parse_heads",) if self.heads else ())

    def initializers(self):
        inits = {"clip": lambda key: init_params(self.config, key)}
        if self.heads:
            inits["parse_heads"] = lambda key: token_heads.init_params(self.heads, key)
        return inits

    def initial_params(self):
        return self.initial

    def batches(self, local_batch, position):
        length, fields = self.cfg.model.text_length, self.cfg.model.heads

        def tokenize(captions):
            return tokenize_checked(self.tokenizer, captions, length)

        def labels(captions):
            return self.source.batch_fields(captions, fields, self.tokenizer, length)

        return self.image_batches(local_batch, position, tokenize=tokenize, fields=labels if fields else None,
                                  source=self.source)

    def loss(self, components, batch, key, first_index, gather):
        params = components["clip"]
        text = self.module.apply({"params": params}, batch["input_ids"], method=lambda m, i: m.text_model(i))
        images = batch["images"].astype(jnp.float32) * 0.5 + 0.5  # the CLIP reads [0, 1]
        image_embeds = gather(self.module.apply({"params": params}, images, method=CLIPModel.get_image_features))
        text_embeds = gather(l2_normalize(text.text_embeds))
        loss = contrastive_loss(image_embeds, text_embeds, params["logit_scale"])
        sims = image_embeds @ text_embeds.T
        metrics = {"i2t_accuracy": jnp.mean(jnp.argmax(sims, axis=1) == jnp.arange(sims.shape[0])),
                   "temperature_inv": clipped_scale(params["logit_scale"])}
        if self.heads:
            states = gather(text.last_hidden_state.astype(jnp.float32))
            labels = {name: gather(batch[name]) for name in self.heads.names}
            aux, head_metrics = heads_loss(token_heads.logits(components["parse_heads"], states), labels,
                                           tuple(self.cfg.loss.balanced))
            metrics.update(head_metrics, contrastive_loss=loss, heads_loss=aux)
            loss = loss + self.cfg.loss.heads_weight * aux
        return loss, metrics

    def export(self, state: TrainState, out: Path, *, overwrite: bool) -> None:
        trees = self.host_components(state, self.cfg.model.export_ema)
        if jax.process_index() != 0:
            return
        clip = trees["clip"]
        configs = {"text_encoder": self.config.text, "clip_vision": self.config.vision}
        params = {"text_encoder": clip["text_model"],
                  "clip_vision": {k: v for k, v in clip.items() if k != "text_model"}}
        if self.heads:
            configs["parse_heads"], params["parse_heads"] = self.heads, trees["parse_heads"]
        write_components(out, configs, params, overwrite=overwrite, source=str(self.cfg.workdir),
                         types={"parse_heads": "token_heads"} if self.heads else None)

