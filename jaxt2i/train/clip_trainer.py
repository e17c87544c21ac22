"""Contrastive training of the small shapes-world CLIP (:mod:`jaxt2i.models.clip_vision`).

Each step takes a batch of (image, caption) pairs from a fixed pool of training scenes (``jaxt2i.shapes.world``,
``split="train"``), encodes both with :class:`CLIPModel` and minimises the symmetric InfoNCE loss with the learned
temperature (clipped at 100). Captions are redrawn every epoch from the scene's caption templates
(``shapes.caption`` with a seeded generator), so the text tower sees the paraphrases of every scene. Captions are
tokenised with the real CLIP BPE tokenizer (``CLIPTokenizer.default()``).

Only the first ``text_length`` token positions are fed in training: the text tower is causal and pools at EOS, so
positions after EOS receive no gradient at all; cutting them is exactly the same training, cheaper. Every caption
must fit (checked); at inference the model takes all 77 positions.

The step is pure and jitted, ``(state, images, ids, key) -> (state, metrics)``; the run is deterministic from the
config's seed. The output folder holds ``params.safetensors`` / ``config.json`` of the whole CLIP (``{"text":
CLIPTextConfig, "vision": CLIPVisionConfig}`` as dicts) and ``text_encoder/`` with the text tower alone (what a
U-Net conditions on), ``metrics.json``, ``train_config.json`` and ``log.jsonl``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct

from jaxt2i.convert.io import read_safetensors
from jaxt2i.convert.native import unflatten_params
from jaxt2i.shapes import world as shapes
from jaxt2i.eval import clip_metrics, frechet
from jaxt2i.shapes.report import CLIP_VISION_DIR
from jaxt2i.models.clip import CLIPTextConfig
from jaxt2i.models.clip_vision import (CLIPConfig, CLIPModel, clipped_scale, contrastive_loss,
                                       init_params, l2_normalize, preset)
from jaxt2i.tokenizer import CLIPTokenizer
from jaxt2i.train.optim import OptimConfig, make_optimizer
from jaxt2i.train.state import leaf_paths, paths_under
from jaxt2i.train.small import (count_params, epoch_batches, load_model_folder, run_logged_steps,
                                save_model_folder)


@dataclasses.dataclass(frozen=True)
class CLIPTrainConfig:
    """Everything a CLIP run depends on.

    model: a preset name of :data:`jaxt2i.models.clip_vision.PRESETS`, or ``{"text": {...}, "vision": {...}}``
      with the fields of CLIPTextConfig / CLIPVisionConfig (missing fields take the ``shapes`` preset's values).
    train_examples: size of the pool of training scenes; eval_examples: one-object images per split for zero-shot.
    hard_negatives: give every image one more candidate caption that contradicts it in one respect
      (``shapes.hard_negative_caption``: an attribute changed, the relation reversed or two objects' attributes
      swapped), so matching needs more than the bag of words. Measured on the shapes CLIP: binding, shape and size
      improve, the relation does not (docs/shapes_model.md).
    relation_negative_probability: with hard negatives, the odds that a two-object scene's negative is its
      relation reversed (otherwise the kind is drawn uniformly among those that apply).
    canonical_steps: a curriculum for the relation: the first ``canonical_steps`` steps state every two-object
      caption (and its negative) from the left / top object (``shapes.caption(canonical=True)``), so word order
      alone gives the layout; later steps use the usual paraphrases, where the layout depends on the order *and*
      the relation word ("A left of B" = "B right of A"), an interaction contrastive training does not find from
      scratch (docs/shapes_model.md, sessions 3 and 12).
    parse_loss_weight: weight of an auxiliary caption-parsing loss on the text tower's last layer (0: none, pure
      InfoNCE). Linear heads read the final-LN'd token states (what a U-Net conditioned on the last layer sees):
      each object's shape word predicts that object's color and shape, and every word of the second-named object
      of a two-object caption predicts on which side of the first it lies (targets from the caption's own grammar,
      :func:`caption_parse_targets`; the causal tower sees the relation word only from the second object on).
      This puts binding and the relation's direction into the per-token states, which InfoNCE on the pooled EOS
      state does not (docs/shapes_model.md, session 13). The heads do not belong to the CLIP; the output folder
      keeps them apart, in ``parse_heads/`` (:func:`load_parse_heads`).
    parse_targets: which of the parsing heads (:data:`PARSE_TARGETS`) the loss trains, e.g. ``["side"]``. The
      ``role`` head tags every token: not an object word, a word of the first-named object, or a word of the
      second-named object together with its side of the first (the side head's classes).
    init_from: start from a trained CLIP instead of a fresh one: a folder :func:`train` wrote, or a jaxt2i model
      folder with ``clip_vision/`` (the shipped model: its text encoder + image tower). Its architecture replaces
      ``model``.
    frozen: ``/``-path prefixes of CLIP parameters the optimizer leaves unchanged (no update, no weight decay),
      e.g. ``["text_model/token_embedding", "text_model/position_embedding", "text_model/final_layer_norm"]``: a
      fine-tune that keeps the text tower's layer-0 states (the embeddings after the final LayerNorm, what a
      ``text_layer: 0`` U-Net reads) bit for bit. Each prefix must name at least one parameter.
    """

    seed: int = 0
    model: Any = "shapes"
    steps: int = 1000
    batch_size: int = 64
    lr: float = 1e-3
    warmup_steps: int = 100
    weight_decay: float = 0.1
    grad_clip_norm: float | None = 1.0
    text_length: int = 32
    train_examples: int = 8192
    eval_examples: int = 300
    heldout_pairs: int = 256
    hard_negatives: bool = False
    relation_negative_probability: float = 0.0
    canonical_steps: int = 0
    parse_loss_weight: float = 0.0
    parse_targets: tuple[str, ...] = ("color", "shape", "side")
    init_from: str | None = None
    frozen: tuple[str, ...] = ()
    log_every: int = 25
    save_dtype: str = "float16"

    @property
    def clip_config(self) -> CLIPConfig:
        if isinstance(self.model, str):
            return preset(self.model)
        base = preset("shapes")
        text = dataclasses.replace(base.text, **dict(self.model.get("text", {})))
        vision = dataclasses.replace(base.vision, **dict(self.model.get("vision", {})))
        return CLIPConfig(text=text, vision=vision)

    @property
    def optim(self) -> OptimConfig:
        return OptimConfig(lr=self.lr, warmup_steps=self.warmup_steps, total_steps=self.steps,
                           weight_decay=self.weight_decay, grad_clip_norm=self.grad_clip_norm, ema_decay=None,
                           final_lr_fraction=0.05)


ROLES: tuple[str, ...] = ("none", "first") + tuple(f"second, {r}" for r in shapes.RELATIONS)
"""Classes of the ``role`` head: a token that is no object's word, a word of the first-named object, a word of the
second-named object and its relation to the first (in ``shapes.RELATIONS`` order)."""

PARSE_TARGETS: dict[str, tuple[str, ...]] = {"color": shapes.COLORS, "shape": shapes.SHAPES,
                                              "side": shapes.RELATIONS, "role": ROLES}
"""Classes of each caption-parsing head; a ``side`` is the second-named object's relation to the first."""


@struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    opt_state: Any
    parse_heads: Any = None


def check_parse_targets(names: Sequence[str]) -> None:
    """Raises ValueError unless ``names`` is a non-empty subset of :data:`PARSE_TARGETS`' keys."""
    if not names or set(names) - set(PARSE_TARGETS):
        raise ValueError(f"parse_targets must be a non-empty subset of {list(PARSE_TARGETS)}; got {list(names)}")


def init_parse_heads(hidden_size: int, key: jax.Array, names: Sequence[str] = tuple(PARSE_TARGETS)) -> dict:
    """Linear heads ``{name: {"kernel": [D, classes], "bias": [classes]}}`` for ``names`` (keys of
    :data:`PARSE_TARGETS`); each head's init depends on its name's place in :data:`PARSE_TARGETS` only."""
    check_parse_targets(names)
    first = ("color", "shape", "side")  # the heads of session 13; later ones take folded keys, so these keep theirs
    keys = dict(zip(first, jax.random.split(key, len(first))))
    keys.update({name: jax.random.fold_in(key, i) for i, name in enumerate(PARSE_TARGETS) if name not in first})
    return {name: {"kernel": jax.random.normal(keys[name], (hidden_size, len(classes))) / np.sqrt(hidden_size),
                   "bias": jnp.zeros((len(classes),))}
            for name, classes in PARSE_TARGETS.items() if name in names}


def init_state(config: CLIPConfig, optimizer: optax.GradientTransformation, key: jax.Array,
               parse_heads: bool | Sequence[str] = False, params: Any = None) -> TrainState:
    """Fresh CLIP parameters, or ``params`` when given (a trained CLIP's tree), and :func:`init_parse_heads` when
    ``parse_heads`` (True for all heads, or their names); the optimizer sees both.

    The CLIP's own initialisation does not depend on ``parse_heads`` (the heads take a key folded from ``key``)."""
    params = init_params(config, key) if params is None else jax.tree.map(jnp.asarray, params)
    heads = None
    if parse_heads:
        names = tuple(PARSE_TARGETS) if parse_heads is True else tuple(parse_heads)
        heads = init_parse_heads(config.text.hidden_size, jax.random.fold_in(key, 1), names)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init((params, heads)),
                      parse_heads=heads)


def frozen_labels(params: Any, prefixes: Sequence[str]) -> Any:
    """The tree of ``params`` with ``"frozen"`` at every leaf under one of ``prefixes`` (``/``-paths,
    :func:`jaxt2i.train.state.paths_under`), ``"train"`` elsewhere. Raises ValueError for a prefix that matches
    nothing."""
    frozen = paths_under(params, prefixes, "CLIP parameter (frozen)")
    labels = ["frozen" if path in frozen else "train" for path in leaf_paths(params)]
    return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(params), labels)


def with_frozen(optimizer: optax.GradientTransformation, params: Any, prefixes: Sequence[str]
                ) -> optax.GradientTransformation:
    """``optimizer`` over ``(clip_params, parse_heads)`` that leaves the CLIP parameters under ``prefixes``
    (:func:`frozen_labels`) unchanged: zero update, no weight decay, and no part in gradient clipping."""
    if not prefixes:
        return optimizer
    clip_labels = frozen_labels(params, prefixes)

    def labels(trainable):
        _, heads = trainable
        return clip_labels, jax.tree.map(lambda _: "train", heads)

    return optax.multi_transform({"train": optimizer, "frozen": optax.set_to_zero()}, labels)


def _word_spans(tokenizer: CLIPTokenizer, text: str) -> list[tuple[int, int, int]]:
    """``(char_end, first_token, end_token)`` of each space-separated word of ``text``; token 0 is BOS."""
    spans, position, char = [], 1, 0
    for word in text.split(" "):
        n = len(tokenizer.encode(word))
        char += len(word)
        spans.append((char, position, position + n))
        position, char = position + n, char + 1
    return spans


def caption_parse_targets(tokenizer: CLIPTokenizer, captions: list[str], length: int) -> dict[str, np.ndarray]:
    """Per-token targets of the caption-parsing loss: ``{name: int32 [B, length]}``, -1 where there is none.

    ``color`` / ``shape``: at each object's shape word, that object's class index in ``shapes.COLORS`` /
    ``shapes.SHAPES``. ``side``: at every word of a two-object caption's second-named object (size, color, shape),
    its relation to the first, an index in ``shapes.RELATIONS`` ("a red circle above a blue square": the blue
    square is "below"). ``role``: every token, an index in :data:`ROLES` (0 where no object's word is).
    Captions must be lower-case single-spaced shapes-world captions (``shapes.parse_caption``);
    token positions count BOS at 0, as the tokenizer lays them out.
    """
    targets = {name: np.full((len(captions), length), -1, np.int32) for name in PARSE_TARGETS}
    targets["role"][:] = ROLES.index("none")
    for row, text in enumerate(captions):
        objects, relation = shapes.parse_caption(text)
        spans = _word_spans(tokenizer, text)
        for i, ((start, end), (color, shape, _)) in enumerate(zip(shapes.object_spans(text), objects)):
            words = [s for s in spans if start < s[0] <= end]
            if words[-1][2] > length:
                raise ValueError(f"caption {text!r} does not fit in {length} tokens; raise text_length.")
            shape_token = words[-1][2] - 1
            targets["color"][row, shape_token] = shapes.COLORS.index(color)
            targets["shape"][row, shape_token] = shapes.SHAPES.index(shape)
            if i == 0:
                role = ROLES.index("first")
            else:
                side = shapes.RELATIONS.index(shapes.INVERSE_RELATION[relation])
                role = ROLES.index("second, " + shapes.RELATIONS[side])
                for _, first, end in words:
                    targets["side"][row, first:end] = side
            for _, first, end in words:
                targets["role"][row, first:end] = role
    return targets


CLASS_BALANCED_TARGETS = ("role",)
"""Heads whose loss is the mean over classes of each class's mean cross-entropy (the ``role`` head's "none" tokens
outnumber a second object's words ~80 to 1; a plain token mean would let it ignore the side)."""


def parse_loss(heads: dict, states: jax.Array, targets: dict) -> tuple[jax.Array, dict]:
    """Cross-entropy of the heads over the tokens that have targets, summed over heads (a mean over tokens, or for
    :data:`CLASS_BALANCED_TARGETS` over the classes present of the per-class means), and each head's accuracy
    (over tokens; for balanced heads also the least accurate class's). ``states``: ``[B, L, D]`` final-LN'd token
    states; ``targets``: ``{name: [B, L]}``, -1 = none."""
    loss, metrics = 0.0, {}
    for name, head in heads.items():
        labels = targets[name]
        mask = labels >= 0
        logits = states @ head["kernel"] + head["bias"]
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.maximum(labels, 0))
        right = jnp.argmax(logits, -1) == labels
        count = jnp.maximum(jnp.sum(mask), 1)
        if name in CLASS_BALANCED_TARGETS:
            onehot = jax.nn.one_hot(labels, logits.shape[-1]) * mask[..., None]  # [B, L, C]; -1 gives zeros
            per_class = jnp.sum(onehot, axis=(0, 1))
            present = per_class > 0
            class_ce = jnp.einsum("blc,bl->c", onehot, ce) / jnp.maximum(per_class, 1)
            loss = loss + jnp.sum(jnp.where(present, class_ce, 0.0)) / jnp.maximum(jnp.sum(present), 1)
            class_acc = jnp.einsum("blc,bl->c", onehot, right.astype(ce.dtype)) / jnp.maximum(per_class, 1)
            metrics[f"parse_{name}_worst_class_accuracy"] = jnp.min(jnp.where(present, class_acc, 1.0))
        else:
            loss = loss + jnp.sum(jnp.where(mask, ce, 0.0)) / count
        metrics[f"parse_{name}_accuracy"] = jnp.sum(mask & right) / count
    return loss, metrics


def make_train_step(config: CLIPConfig, optimizer: optax.GradientTransformation, parse_loss_weight: float = 0.0
                    ) -> Callable[..., tuple[TrainState, dict]]:
    """Jitted ``(state, images [B, H, W, 3] in [0, 1], ids [B, L] int32, key, negative_ids [N, L] or None,
    parse_targets {name: [B, L]} or None) -> (state, metrics)``; ``negative_ids`` are hard-negative captions (see
    ``contrastive_loss``); ``parse_targets`` (:func:`caption_parse_targets`) feed the parsing loss, weighted by
    ``parse_loss_weight``, when the state has parse heads.

    The model has no randomness; ``key`` (with the step folded in) is taken for the uniform step signature.
    """
    model = CLIPModel(config)

    def loss_fn(trainable, images, ids, negative_ids, parse_targets):
        params, heads = trainable
        n = ids.shape[0]
        all_ids = ids if negative_ids is None else jnp.concatenate([ids, negative_ids])
        text = model.apply({"params": params}, all_ids, method=lambda m, i: m.text_model(i))
        image_embeds = model.apply({"params": params}, images, method=CLIPModel.get_image_features)
        logit_scale = params["logit_scale"]
        text_embeds = l2_normalize(text.text_embeds)
        text_embeds, negative_embeds = text_embeds[:n], (None if negative_ids is None else text_embeds[n:])
        loss = contrastive_loss(image_embeds, text_embeds, logit_scale, negative_embeds)
        sims = image_embeds @ text_embeds.T
        metrics = {"i2t_accuracy": jnp.mean(jnp.argmax(sims, axis=1) == jnp.arange(n)),
                   "temperature_inv": clipped_scale(logit_scale)}
        if negative_embeds is not None:  # image i's own hard negative is negative_ids[i] when N == B
            own = jnp.sum(image_embeds * negative_embeds[:n], axis=1)
            metrics["beats_hard_negative"] = jnp.mean(jnp.diagonal(sims) > own)
        if heads is not None:
            aux, parse_metrics = parse_loss(heads, text.last_hidden_state[:n], parse_targets)
            metrics.update(parse_metrics, contrastive_loss=loss, parse_loss=aux)
            loss = loss + parse_loss_weight * aux
        return loss, metrics

    def step(state: TrainState, images, ids, key, negative_ids=None, parse_targets=None):
        del key
        if (state.parse_heads is None) != (parse_targets is None):
            raise ValueError("parse_targets go with a state that has parse heads (init_state(parse_heads=True)).")
        trainable = (state.params, state.parse_heads)
        (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(trainable, images, ids, negative_ids,
                                                                           parse_targets)
        updates, opt_state = optimizer.update(grads, state.opt_state, trainable)
        params, heads = optax.apply_updates(trainable, updates)
        metrics = dict(metrics, loss=loss, grad_norm=optax.global_norm(grads))
        return TrainState(step=state.step + 1, params=params, opt_state=opt_state, parse_heads=heads), metrics

    return jax.jit(step)


def negative_caption(scene: shapes.Scene, rng: np.random.Generator, relation_probability: float = 0.0,
                     canonical: bool = False) -> str:
    """One hard negative of ``scene``: its relation reversed with odds ``relation_probability`` (two objects),
    else an edit of a kind drawn uniformly (``shapes.hard_negative_caption``). With ``relation_probability`` 0 it
    draws nothing more than ``shapes.hard_negative_caption(scene, rng)``: the stream earlier runs trained on."""
    if relation_probability > 0 and len(scene.objects) == 2 and rng.random() < relation_probability:
        negative = shapes.hard_negative_caption(scene, rng, "relation", canonical=canonical)
        if negative is not None:
            return negative
    return shapes.hard_negative_caption(scene, rng, canonical=canonical)


def epoch_negative_captions(scenes: list, indices: np.ndarray, seed: int, epoch: int,
                            relation_probability: float = 0.0, canonical: bool = False) -> list[str]:
    """One hard-negative caption per ``scenes[i]`` (:func:`negative_caption`), drawn per (seed, epoch, i)."""
    return [negative_caption(scenes[i], np.random.default_rng([seed, epoch, int(i), 1]), relation_probability,
                             canonical) for i in indices]


def epoch_captions(scenes: list, indices: np.ndarray, seed: int, epoch: int, canonical: bool = False) -> list[str]:
    """Captions of ``scenes[i]`` for ``i`` in ``indices``, drawn afresh for each (seed, epoch, index);
    ``canonical`` states two-object scenes from their left / top object."""
    return [shapes.caption(scenes[i], np.random.default_rng([seed, epoch, int(i)]), canonical=canonical)
            for i in indices]


def tokenize_checked(tokenizer: CLIPTokenizer, captions: list[str], length: int) -> np.ndarray:
    """``[B, length]`` ids; raises if a caption (with BOS/EOS) does not fit in ``length`` positions."""
    ids = tokenizer(captions)
    if np.any(ids[:, length:] != tokenizer.pad_token_id) or np.any(
            ~np.any(ids[:, :length] == tokenizer.eos_token_id, axis=1)):
        raise ValueError(f"a caption does not fit in text_length={length} tokens; raise text_length in the config.")
    return ids[:, :length]


def evaluate(params, config: CLIPConfig, tokenizer: CLIPTokenizer, cfg: "CLIPTrainConfig") -> dict:
    """Zero-shot accuracy (train / held-out one-object images), held-out retrieval, CLIP score and a Frechet
    distance between held-out and training real images in the image-feature space (a reference value)."""
    encode_images, encode_texts = clip_metrics.clip_encoders(params, config, tokenizer)
    result = {f"zero_shot_{split}": clip_metrics.zero_shot_report(encode_images, encode_texts, split,
                                                                  cfg.eval_examples, cfg.seed)
              for split in ("train", "heldout")}
    held = shapes.batch(cfg.seed + 3_000_017, 0, cfg.heldout_pairs, "heldout")
    train = shapes.batch(cfg.seed + 3_000_017, 0, cfg.heldout_pairs, "train")
    held_img, held_txt = encode_images(held["images"]), encode_texts(held["captions"])
    result["heldout_retrieval"] = clip_metrics.retrieval_accuracy(held_img, held_txt)
    result["hard_negatives_heldout"] = clip_metrics.hard_negative_report(
        encode_images, encode_texts, held["images"], held["scenes"], cfg.seed)
    result["clip_score_heldout_matching"] = clip_metrics.clip_score(held_img, held_txt)
    result["clip_score_heldout_shuffled"] = clip_metrics.clip_score(held_img, np.roll(held_txt, 1, axis=0))
    result["frechet_heldout_vs_train_real"] = frechet.frechet_distance_from_features(
        clip_metrics.image_features(encode_images, held["images"]),
        clip_metrics.image_features(encode_images, train["images"]))
    return result


def save(out_dir: str | os.PathLike, params, config: CLIPConfig, dtype: str) -> dict:
    """Writes the whole CLIP to ``out_dir`` and the text tower to ``out_dir/text_encoder``; returns byte counts."""
    full = save_model_folder(out_dir, params, dataclasses.asdict(config), dtype)
    text = save_model_folder(Path(out_dir) / "text_encoder", params["text_model"],
                             dataclasses.asdict(config.text), dtype)
    return {"clip_bytes": full, "text_encoder_bytes": text}


def save_parse_heads(out_dir: str | os.PathLike, heads: dict) -> int:
    """Writes trained parse heads (``{name: {"kernel": [D, classes], "bias": [classes]}}``) to
    ``out_dir/parse_heads`` in float32, with each head's class names; returns the bytes."""
    config = {"layer": -1, "classes": {name: list(PARSE_TARGETS[name]) for name in heads}}
    return save_model_folder(Path(out_dir) / "parse_heads", jax.tree.map(np.asarray, heads), config, "float32")


def load_parse_heads(folder: str | os.PathLike) -> tuple[dict, dict]:
    """``(heads, config)`` from a CLIP output folder (or its ``parse_heads/``) written by :func:`train` with
    ``parse_loss_weight > 0``: ``heads[name]`` = ``{"kernel": [D, classes], "bias": [classes]}`` float32, reading the
    text tower's final-LN'd last layer; ``config["classes"][name]`` names the classes in order."""
    folder = Path(folder)
    if (folder / "parse_heads").is_dir():
        folder = folder / "parse_heads"
    elif not (folder / "params.safetensors").is_file():
        raise FileNotFoundError(f"{folder} has no parse_heads/: it was trained without the parsing loss "
                                "(parse_loss_weight=0) or before the heads were saved (session 14).")
    return load_model_folder(folder)


def load_clip(folder: str | os.PathLike) -> tuple[dict, CLIPConfig]:
    """``(params float32, CLIPConfig)`` of a CLIP written by :func:`train`, or of a jaxt2i model folder that ships
    one as ``text_encoder.safetensors`` + ``clip_vision/`` (the text encoder is the CLIP's text tower)."""
    folder = Path(folder)
    if (folder / CLIP_VISION_DIR).is_dir() and not (folder / "params.safetensors").is_file():
        if not (folder / "text_encoder.safetensors").is_file():
            raise FileNotFoundError(f"{folder} has {CLIP_VISION_DIR}/ but no text_encoder.safetensors; expected a "
                                    "jaxt2i model folder (scripts/build_shapes_model.py) or a CLIP folder.")
        params, config = load_model_folder(folder / CLIP_VISION_DIR)
        text = unflatten_params({k: np.asarray(v, np.float32)
                                 for k, v in read_safetensors(str(folder / "text_encoder.safetensors")).items()})
        params["text_model"] = jax.tree.map(jnp.asarray, text)
    else:
        params, config = load_model_folder(folder)
    # jaxt2i.convert.io.write_safetensors stores 0-d arrays as shape [1] (np.ascontiguousarray promotes them).
    params["logit_scale"] = params["logit_scale"].reshape(())
    return params, CLIPConfig.from_dict(config)


def load_text_encoder(folder: str | os.PathLike) -> tuple[dict, CLIPTextConfig]:
    """``(params float32, CLIPTextConfig)`` from ``folder`` (a CLIP output folder or its ``text_encoder/``)."""
    folder = Path(folder)
    if (folder / "text_encoder").is_dir():
        folder = folder / "text_encoder"
    params, config = load_model_folder(folder)
    return params, CLIPTextConfig(**config)


def train(cfg: CLIPTrainConfig, out_dir: str | os.PathLike | None = None, log: Callable[[str], None] = print) -> dict:
    """Trains the CLIP described by ``cfg``; writes the output folder when ``out_dir`` is given. Returns metrics."""
    config, initial = cfg.clip_config, None
    if cfg.init_from is not None:
        initial, config = load_clip(cfg.init_from)
        log(f"init: the CLIP in {cfg.init_from}")
    if config.vision.image_size != shapes.IMAGE_SIZE:
        raise ValueError(f"vision.image_size must be {shapes.IMAGE_SIZE} for the shapes world; got "
                         f"{config.vision.image_size}.")
    if cfg.parse_loss_weight < 0:
        raise ValueError(f"parse_loss_weight must be >= 0 (0 turns the parsing loss off); got {cfg.parse_loss_weight}")
    if cfg.parse_loss_weight > 0:
        check_parse_targets(tuple(cfg.parse_targets))
    t0 = time.time()
    tokenizer = CLIPTokenizer.default()
    pool = shapes.batch(cfg.seed, 0, cfg.train_examples, "train")
    images, scenes = pool["images"], pool["scenes"]
    log(f"data: {len(images)} training scenes in {time.time() - t0:.1f}s")
    if initial is None:
        initial = init_params(config, jax.random.key(cfg.seed))
    optimizer = with_frozen(make_optimizer(cfg.optim), initial, tuple(cfg.frozen))
    state = init_state(config, optimizer, jax.random.key(cfg.seed),
                       parse_heads=tuple(cfg.parse_targets) if cfg.parse_loss_weight > 0 else False,
                       params=initial)
    n_text = count_params(state.params["text_model"])
    n_total = count_params(state.params)
    log(f"model: {n_total:,} parameters (text {n_text:,}, of which token embedding "
        f"{config.text.vocab_size * config.text.hidden_size:,}); {n_total * 4 / 2**20:.1f} MiB float32, "
        f"{n_total * 2 / 2**20:.1f} MiB float16")
    train_step = make_train_step(config, optimizer, cfg.parse_loss_weight)
    key = jax.random.key(cfg.seed + 1)
    per_epoch = len(images) // cfg.batch_size
    def step_fn(step):
        nonlocal state
        idx = epoch_batches(len(images), cfg.batch_size, cfg.seed, step)
        epoch = step // per_epoch
        canonical = step < cfg.canonical_steps
        captions = epoch_captions(scenes, idx, cfg.seed, epoch, canonical)
        ids = tokenize_checked(tokenizer, captions, cfg.text_length)
        targets = None
        if state.parse_heads is not None:
            targets = {k: jnp.asarray(v) for k, v in caption_parse_targets(tokenizer, captions, cfg.text_length).items()}
        negative_ids = None
        if cfg.hard_negatives:
            negative_ids = jnp.asarray(tokenize_checked(
                tokenizer, epoch_negative_captions(scenes, idx, cfg.seed, epoch, cfg.relation_negative_probability,
                                                   canonical), cfg.text_length))
        state, metrics = train_step(state, jnp.asarray(images[idx]), jnp.asarray(ids), key, negative_ids, targets)
        return metrics

    history, train_time = run_logged_steps(cfg.steps, cfg.log_every, step_fn, cfg, out_dir, log, digits=5)
    result = {"train_time_s": round(train_time, 1), "steps": cfg.steps, "parameters": n_total,
              "text_parameters": n_text, "final_train_loss": history[-1]["loss"]}
    result.update(evaluate(state.params, config, tokenizer, cfg))
    if out_dir is not None:
        result.update(save(out_dir, state.params, config, cfg.save_dtype))
        if state.parse_heads is not None:
            result["parse_heads_bytes"] = save_parse_heads(out_dir, state.parse_heads)
        (Path(out_dir) / "metrics.json").write_text(json.dumps(result, indent=2))
    log("eval: " + json.dumps(result))
    result["params"] = state.params
    result["history"] = history
    return result
