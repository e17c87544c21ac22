"""What a CLIP knows about the shapes world: zero-shot color / shape classification of one-object renders, and
hard negatives (does an image sit closer to its caption than to one that contradicts it in one respect?).

* Zero-shot classification: every image is scored against one prompt per class ("a red circle" for each of the
  21 color-shape pairs); the best prompt is the prediction. Color accuracy counts the color of the predicted pair,
  shape accuracy its shape, so a held-out combination (e.g. "a blue triangle", never seen in training) is judged
  on each attribute and on the pair.

The encoders are ``(encode_images, encode_texts)`` functions (:func:`jaxt2i.eval.clip_metrics.clip_encoders`).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from jaxt2i.eval.clip_metrics import ImageEncoder, TextEncoder
from jaxt2i.shapes import world

ONE_OBJECT_SEED_OFFSET = 2_000_003  # the one-object evaluation images' scene stream, apart from training streams


def pair_prompts(template: str = "a {color} {shape}") -> tuple[list[str], list[tuple[str, str]]]:
    """One prompt per color-shape pair (21 in the shapes world) and the (color, shape) labels, same order."""
    labels = [(c, s) for c in world.COLORS for s in world.SHAPES]
    return [template.format(color=c, shape=s) for c, s in labels], labels


def zero_shot_predict(image_features: np.ndarray, class_features: np.ndarray) -> np.ndarray:
    """Index of the most similar class for each image: ``[N, P]``, ``[K, P]`` (unit-norm) -> ``[N]`` int."""
    return np.argmax(np.asarray(image_features) @ np.asarray(class_features).T, axis=1)


def zero_shot_accuracy(image_features: np.ndarray, class_features: np.ndarray,
                       labels: Sequence[tuple[str, str]], targets: Sequence[tuple[str, str]]) -> dict:
    """Color, shape and pair accuracy of zero-shot pair classification.

    Args:
      image_features: ``[N, P]`` unit-norm image embeddings.
      class_features: ``[K, P]`` unit-norm embeddings of the K class prompts.
      labels: the (color, shape) of each class prompt (K entries).
      targets: the true (color, shape) of each image (N entries).
    Returns: {"color": acc, "shape": acc, "pair": acc, "n": N}.
    """
    if len(targets) != len(image_features) or len(labels) != len(class_features):
        raise ValueError(f"got {len(image_features)} images for {len(targets)} targets and {len(class_features)} "
                         f"class prompts for {len(labels)} labels; each list must match its features.")
    predicted = [labels[i] for i in zero_shot_predict(image_features, class_features)]
    color = np.mean([p[0] == t[0] for p, t in zip(predicted, targets)])
    shape = np.mean([p[1] == t[1] for p, t in zip(predicted, targets)])
    pair = np.mean([p == t for p, t in zip(predicted, targets)])
    return {"color": float(color), "shape": float(shape), "pair": float(pair), "n": len(targets)}


def one_object_eval_set(split: str, n: int, seed: int = 0) -> tuple[np.ndarray, list[tuple[str, str]]]:
    """``n`` one-object images of ``split`` ([n, 64, 64, 3] in [0, 1]) and their (color, shape).

    Uses its own scene stream (``seed + ONE_OBJECT_SEED_OFFSET``), apart from training streams. In ``"heldout"``
    every image is one of the held-out color-shape pairs, which the training split never shows.
    """
    scenes = [world.scene(seed + ONE_OBJECT_SEED_OFFSET, i, split, n_objects=1) for i in range(n)]
    images = np.stack([world.render(s) for s in scenes]).astype(np.float32) / 255.0
    return images, [(s.objects[0].color, s.objects[0].shape) for s in scenes]


def zero_shot_report(encode_images: ImageEncoder, encode_texts: TextEncoder, split: str, n: int,
                     seed: int = 0) -> dict:
    """Zero-shot color / shape / pair accuracy over the 21 "a {color} {shape}" prompts on one-object images."""
    images, targets = one_object_eval_set(split, n, seed)
    prompts, labels = pair_prompts()
    return zero_shot_accuracy(encode_images(images), encode_texts(prompts), labels, targets)


def hard_negative_report(encode_images: ImageEncoder, encode_texts: TextEncoder, images: np.ndarray,
                         scenes: Sequence[world.Scene], seed: int = 0) -> dict:
    """How often an image is closer to a true caption than to one it contradicts, per kind of contradiction.

    For each kind in ``world.NEGATIVE_KINDS`` (color / shape / size / relation / binding) and each scene where it
    applies: is ``cos(image, caption) > cos(image, hard negative of that kind)``? True captions name every size
    (size negatives always do). ``{kind: accuracy, ..., "n_<kind>": count}``; 0.5 is chance.
    """
    rng = np.random.default_rng(seed)
    image_feats = encode_images(images)
    report = {}
    for kind in world.NEGATIVE_KINDS:
        rows, true_caps, neg_caps = [], [], []
        for i, scene in enumerate(scenes):
            negative = world.hard_negative_caption(scene, rng, kind)
            if negative is not None:
                rows.append(i)
                true_caps.append(world.caption(scene, rng, name_sizes=True))
                neg_caps.append(negative)
        if rows:
            feats = image_feats[rows]
            true_sim = np.sum(feats * encode_texts(true_caps), axis=1)
            neg_sim = np.sum(feats * encode_texts(neg_caps), axis=1)
            report[kind] = float(np.mean(true_sim > neg_sim))
        report[f"n_{kind}"] = len(rows)
    return report


def clip_report(encode_images: ImageEncoder, encode_texts: TextEncoder, n: int = 300, seed: int = 0) -> dict:
    """Zero-shot accuracy on ``n`` one-object renders of each split, and hard-negative accuracy on ``n`` held-out
    scenes: ``{"zero_shot": {"train": ..., "heldout": ...}, "hard_negatives": {kind: accuracy, ...}}``."""
    scenes = [world.scene(seed, i, "heldout") for i in range(n)]
    images = np.stack([world.render(s) for s in scenes]).astype(np.float32) / 255.0
    return {"zero_shot": {split: zero_shot_report(encode_images, encode_texts, split, n, seed)
                          for split in ("train", "heldout")},
            "hard_negatives": hard_negative_report(encode_images, encode_texts, images, scenes, seed)}
