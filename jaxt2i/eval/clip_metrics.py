"""CLIP-based metrics for any text-to-image model: CLIP score, retrieval accuracy, image features for the Frechet
distance, and the CLIP encoders themselves (from parameters, a CLIP folder or a model folder's ``clip_vision``).

* CLIP score: ``100 * max(cos(image, text), 0)`` averaged over pairs (the usual definition, w = 100).
* Image features for the Frechet distance (:mod:`jaxt2i.eval.frechet`): the unit-norm image embeddings.

The encoders come in as functions (``encode_images``, ``encode_texts``) so that the maths here is testable on
hand-made embeddings; :func:`clip_encoders` builds them from trained parameters and :func:`load_clip` from a folder.
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxt2i.convert.io import read_safetensors, write_safetensors
from jaxt2i.convert.native import unflatten_params
from jaxt2i.models.clip_vision import CLIPConfig, CLIPModel
from jaxt2i.tokenizer import CLIPTokenizer

ImageEncoder = Callable[[np.ndarray], np.ndarray]  # images [N, H, W, 3] in [0, 1] -> unit-norm [N, P]
TextEncoder = Callable[[Sequence[str]], np.ndarray]  # prompts -> unit-norm [N, P]
CLIP_VISION_DIR = "clip_vision"  # a model folder's CLIP image tower (its text tower is the model's text encoder)


def clip_score(image_features: np.ndarray, text_features: np.ndarray) -> float:
    """Mean ``100 * max(cos, 0)`` over matching rows of unit-norm ``[N, P]`` image and text features."""
    cos = np.sum(np.asarray(image_features, np.float64) * np.asarray(text_features, np.float64), axis=1)
    return float(np.mean(100.0 * np.maximum(cos, 0.0)))


def retrieval_accuracy(image_features: np.ndarray, text_features: np.ndarray) -> dict:
    """Top-1 image->text and text->image accuracy among N matching pairs (row i matches row i)."""
    sims = np.asarray(image_features) @ np.asarray(text_features).T
    target = np.arange(len(sims))
    return {"image_to_text": float(np.mean(np.argmax(sims, 1) == target)),
            "text_to_image": float(np.mean(np.argmax(sims, 0) == target))}


def image_features(encode_images: ImageEncoder, images: np.ndarray) -> np.ndarray:
    """Features for :func:`jaxt2i.eval.frechet.frechet_distance_from_features`: unit-norm ``[N, P]`` float64."""
    return np.asarray(encode_images(images), np.float64)


def clip_encoders(params: Any, config: CLIPConfig, tokenizer, batch_size: int = 128
                  ) -> tuple[ImageEncoder, TextEncoder]:
    """Batched numpy encoders from CLIP parameters; ``tokenizer`` maps prompts to ``[B, 77]`` ids."""
    model = CLIPModel(config)
    image_fn = jax.jit(lambda p, x: model.apply({"params": p}, x, method=CLIPModel.get_image_features))
    text_fn = jax.jit(lambda p, t: model.apply({"params": p}, t, method=CLIPModel.get_text_features))

    def batched(fn, inputs):
        return np.concatenate([np.asarray(fn(params, jnp.asarray(inputs[i: i + batch_size])))
                               for i in range(0, len(inputs), batch_size)])

    def encode_images(images: np.ndarray) -> np.ndarray:
        return batched(image_fn, np.asarray(images, np.float32))

    def encode_texts(prompts: Sequence[str]) -> np.ndarray:
        return batched(text_fn, tokenizer(list(prompts)))

    return encode_images, encode_texts


def write_clip_vision(folder: str, flat_clip: dict, clip_config: dict, dtype: str = "float16") -> None:
    """Stores the image tower (+ ``logit_scale``) of a full CLIP flat tree in ``folder`` (a model's ``clip_vision``).

    flat_clip: ``{"vision_model/...": array, "text_model/...": array, "logit_scale": array}`` (``/``-flattened);
    clip_config: the CLIP's config dict ``{"text": {...}, "vision": {...}}``.
    """
    os.makedirs(folder, exist_ok=True)
    kept = {k: np.asarray(v).astype(dtype) for k, v in flat_clip.items() if not k.startswith("text_model/")}
    if not any(k.startswith("vision_model/") for k in kept):
        raise ValueError("the CLIP parameters have no vision_model/ entries; pass a full CLIP folder.")
    write_safetensors(os.path.join(folder, "params.safetensors"), kept, metadata={"format": "jaxt2i-flax-flat"})
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(clip_config, f, indent=2)


def find_clip(path: str | None) -> str | None:
    """The CLIP folder at ``path``: itself when it holds ``params.safetensors`` + ``config.json``, its
    ``clip_vision/`` when it is a model folder with one, else None."""
    if path is None or not os.path.isdir(path):
        return None
    for folder in (os.path.join(path, CLIP_VISION_DIR), path):
        if all(os.path.isfile(os.path.join(folder, f)) for f in ("params.safetensors", "config.json")):
            return folder
    return None


def load_clip(path: str | None, text_encoder_params: dict | None = None) -> tuple[ImageEncoder, TextEncoder] | None:
    """``(encode_images, encode_texts)`` of the CLIP at ``path`` (see :func:`find_clip`), or None when there is none.

    A full CLIP folder holds both towers (``text_model/`` and ``vision_model/``). A model's ``clip_vision/`` holds
    the image tower only; its text tower is the model's text encoder, ``text_encoder_params`` (CLIP text-model
    parameters), which must then be given.
    """
    folder = find_clip(path)
    if folder is None:
        return None
    params = unflatten_params({k: np.asarray(v, np.float32)
                               for k, v in read_safetensors(os.path.join(folder, "params.safetensors")).items()})
    if "text_model" not in params:
        if text_encoder_params is None:
            raise ValueError(f"{folder} holds only a CLIP image tower and no text encoder was given; pass a full CLIP "
                             "folder, or load it with the model's text encoder parameters.")
        params["text_model"] = jax.tree.map(lambda a: np.asarray(a, np.float32), text_encoder_params)
    if "logit_scale" in params:
        params["logit_scale"] = np.asarray(params["logit_scale"]).reshape(())
    with open(os.path.join(folder, "config.json")) as f:
        config = CLIPConfig.from_dict(json.load(f))
    return clip_encoders(params, config, CLIPTokenizer.default())


def clip_for_model(pipe, model: str | None, clip: str | None = None) -> tuple[tuple[ImageEncoder, TextEncoder] | None,
                                                                                str | None]:
    """The CLIP that scores or ranks a model's images, and where it was found: ``clip`` (a CLIP folder or a model
    folder with ``clip_vision/``) when given, else the model folder's own ``clip_vision/``; (None, path) when there
    is none. An image tower alone takes the model's text encoder (``pipe.params["text_encoder"]``) as its text
    tower, when the model has one."""
    path = clip or (model if model is not None and os.path.isdir(model) else None)
    text_encoder = getattr(pipe, "params", {}).get("text_encoder")
    return load_clip(path, text_encoder), path
