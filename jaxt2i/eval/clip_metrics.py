"""CLIP-based metrics for any text-to-image model: CLIP score, retrieval accuracy, image features for the Frechet
distance, and the CLIP encoders themselves (from parameters, or a model folder's ``text_encoder`` + ``clip_vision``
components).

* CLIP score: ``100 * max(cos(image, text), 0)`` averaged over pairs (the usual definition, w = 100).
* Image features for the Frechet distance (:mod:`jaxt2i.eval.frechet`): the unit-norm image embeddings.

The encoders come in as functions (``encode_images``, ``encode_texts``) so that the maths here is testable on
hand-made embeddings; :func:`clip_encoders` builds them from parameters, :func:`load_clip` from a model folder.
"""

from __future__ import annotations

import hashlib
import os
from typing import Any, Callable, Mapping, Sequence

import jax
import numpy as np

from jaxt2i.convert import native
from jaxt2i.convert.load import read_any
from jaxt2i.devices import batch_sharding, device_batch_size, pad_rows, place, replicate
from jaxt2i.models.clip_vision import CLIPConfig, CLIPModel
from jaxt2i.tokenizer import CLIPTokenizer

ImageEncoder = Callable[[np.ndarray], np.ndarray]  # images [N, H, W, 3] in [0, 1] -> unit-norm [N, P]
TextEncoder = Callable[[Sequence[str]], np.ndarray]  # prompts -> unit-norm [N, P]


def clip_score_terms(image_features: np.ndarray, text_features: np.ndarray) -> np.ndarray:
    """``100 * max(cos, 0)`` of each matching row of unit-norm ``[N, P]`` image and text features: float64 [N]. Their
    sum and count, gathered batch by batch, give the CLIP score of any number of images."""
    cos = np.sum(np.asarray(image_features, np.float64) * np.asarray(text_features, np.float64), axis=1)
    return 100.0 * np.maximum(cos, 0.0)


def clip_score(image_features: np.ndarray, text_features: np.ndarray) -> float:
    """Mean ``100 * max(cos, 0)`` over matching rows of unit-norm ``[N, P]`` image and text features."""
    return float(np.mean(clip_score_terms(image_features, text_features)))


def retrieval_accuracy(image_features: np.ndarray, text_features: np.ndarray) -> dict:
    """Top-1 image->text and text->image accuracy among N matching pairs (row i matches row i)."""
    sims = np.asarray(image_features) @ np.asarray(text_features).T
    target = np.arange(len(sims))
    return {"image_to_text": float(np.mean(np.argmax(sims, 1) == target)),
            "text_to_image": float(np.mean(np.argmax(sims, 0) == target))}


def image_features(encode_images: ImageEncoder, images: np.ndarray) -> np.ndarray:
    """Features for :func:`jaxt2i.eval.frechet.frechet_distance_from_features`: unit-norm ``[N, P]`` float64."""
    return np.asarray(encode_images(images), np.float64)


def folder_fingerprint(path: str) -> str:
    """What identifies the model at ``path`` (a folder or a file) without reading it: a hash of its absolute path and
    each file's relative path, size and modification time, so that statistics computed with its CLIP can be cached
    and any change to a file invalidates them."""
    path = os.path.abspath(path)
    files = ([os.path.join(root, name) for root, _, names in os.walk(path) for name in names]
             if os.path.isdir(path) else [path])
    digest = hashlib.sha256(path.encode())
    for file in sorted(files):
        info = os.stat(file)
        digest.update(f"{os.path.relpath(file, path)}\0{info.st_size}\0{info.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:32]


def clip_encoders(params: Any, config: CLIPConfig, tokenizer, batch_size: int = 128,
                  devices: Sequence[jax.Device] | None = None) -> tuple[ImageEncoder, TextEncoder]:
    """Batched numpy encoders from CLIP parameters; ``tokenizer`` maps prompts to ``[B, 77]`` ids.

    Inputs go through in chunks of ``batch_size`` rows, each split over ``devices`` (default
    ``jax.local_devices()``; the parameters are replicated on each) and padded to a multiple of their count; the
    padding rows are dropped from the output."""
    model = CLIPModel(config)
    image_fn = jax.jit(lambda p, x: model.apply({"params": p}, x, method=CLIPModel.get_image_features))
    text_fn = jax.jit(lambda p, t: model.apply({"params": p}, t, method=CLIPModel.get_text_features))
    devices = list(devices or jax.local_devices())
    sharding = batch_sharding(devices)
    params = replicate(params, sharding)

    def run(fn, chunk):
        padded = pad_rows(chunk, device_batch_size(len(chunk), len(devices)))
        return np.asarray(fn(params, place(padded, sharding)))[:len(chunk)]

    def batched(fn, inputs):
        return np.concatenate([run(fn, inputs[i: i + batch_size]) for i in range(0, len(inputs), batch_size)])

    def encode_images(images: np.ndarray) -> np.ndarray:
        return batched(image_fn, np.asarray(images, np.float32))

    def encode_texts(prompts: Sequence[str]) -> np.ndarray:
        return batched(text_fn, tokenizer(list(prompts)))

    return encode_images, encode_texts


def clip_from_components(configs: Mapping[str, Any], params: Mapping[str, Any]
                         ) -> tuple[ImageEncoder, TextEncoder] | None:
    """Encoders of the CLIP made of a model's ``text_encoder`` and ``clip_vision`` components (config dataclasses
    and parameter trees by component name, as a loaded model folder holds them), or None without both."""
    if not all(name in params and name in configs for name in ("text_encoder", "clip_vision")):
        return None
    config = CLIPConfig(text=configs["text_encoder"], vision=configs["clip_vision"])
    tree = jax.tree.map(lambda a: np.asarray(a, np.float32),
                        {**params["clip_vision"], "text_model": params["text_encoder"]})
    tree["logit_scale"] = np.asarray(tree["logit_scale"]).reshape(())
    return clip_encoders(tree, config, CLIPTokenizer.default())


def load_clip(path: str) -> tuple[ImageEncoder, TextEncoder] | None:
    """Encoders of the CLIP in the model folder at ``path`` (its ``text_encoder`` and ``clip_vision`` components:
    a text-to-image model that carries a CLIP image tower, or a CLIP that ``jaxt2i train`` wrote), or None when the
    folder has no ``clip_vision``."""
    if not native.is_native_folder(path):
        raise FileNotFoundError(f"{path} is not a jaxt2i model folder (no {native.MANIFEST}); pass a model folder "
                                "with text_encoder and clip_vision components.")
    loaded = read_any(path)
    return clip_from_components(loaded.configs, loaded.params)


def clip_for_model(pipe, clip: str | None = None) -> tuple[ImageEncoder, TextEncoder] | None:
    """The CLIP that scores or ranks a model's images: the model folder at ``clip`` when given, else the model's
    own ``text_encoder`` + ``clip_vision`` components (``pipe.configs`` / ``pipe.params``, when it has them); None
    when there is none."""
    if clip is not None:
        return load_clip(clip)
    return clip_from_components(getattr(pipe, "configs", {}), getattr(pipe, "params", {}))
