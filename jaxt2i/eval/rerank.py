"""Best-of-N sampling by CLIP score: draw N candidate images per prompt, keep the one a CLIP ranks highest.

This is the reranking step of DALL-E (Ramesh et al., 2021), which drew many samples per caption and kept those a
contrastive model scored best against the caption. Here the scorer is any CLIP given as a pair of encoders
``(encode_images, encode_texts)`` (``jaxt2i.eval.clip_metrics.clip_for_model``: a model's ``text_encoder`` and
``clip_vision`` components).

Candidate ``c`` of a generation with seed ``s`` is drawn with seed ``candidate_seed(s, c)``; candidate 0 uses ``s``
itself, so the plain (N = 1) image is always among the candidates and best-of-N can only replace it by one the
CLIP prefers.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

CANDIDATE_SEED_STRIDE = 1_000_003  # apart from the per-batch seed offsets (seed + k) that generation loops use


def candidate_seed(seed: int, candidate: int) -> int:
    """The seed of candidate ``candidate`` (0-based) of a generation with ``seed``; candidate 0 is ``seed``."""
    return seed + candidate * CANDIDATE_SEED_STRIDE


def clip_scores(clip, candidates: np.ndarray, prompts: Sequence[str]) -> np.ndarray:
    """Cosine similarity of every candidate with its prompt under the CLIP.

    clip: ``(encode_images, encode_texts)``, unit-norm features (``clip_metrics.clip_encoders``).
    candidates: ``[N, P, H, W, 3]`` float in [0, 1] (candidate, prompt); prompts: ``P`` strings.
    Returns ``[N, P]`` float64.
    """
    encode_images, encode_texts = clip
    candidates = np.asarray(candidates, np.float32)
    n, p = candidates.shape[:2]
    if p != len(prompts):
        raise ValueError(f"{p} images per candidate but {len(prompts)} prompts; give one prompt per image")
    image_features = np.asarray(encode_images(candidates.reshape(n * p, *candidates.shape[2:])), np.float64)
    text_features = np.asarray(encode_texts(list(prompts)), np.float64)
    return np.einsum("npd,pd->np", image_features.reshape(n, p, -1), text_features)


def pick_best(candidates: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per prompt, the candidate with the highest score (the first one on ties).

    candidates: ``[N, P, ...]``; scores: ``[N, P]``. Returns ``(images [P, ...], chosen [P] int)``.
    """
    candidates, scores = np.asarray(candidates), np.asarray(scores)
    if scores.shape != candidates.shape[:2]:
        raise ValueError(f"scores {scores.shape} must be [N, P] for candidates {candidates.shape[:2]} + image")
    chosen = np.argmax(scores, axis=0)
    return candidates[chosen, np.arange(candidates.shape[1])], chosen


def best_of(draw: Callable[[int], np.ndarray], prompts: Sequence[str], n: int, seed: int, clip
            ) -> tuple[np.ndarray, dict]:
    """Best-of-``n`` images for ``prompts``.

    draw: ``seed -> [P, H, W, 3]`` float images in [0, 1], one per prompt (a sampler call with that seed).
    Returns ``(images [P, H, W, 3], info)`` with ``info = {"chosen": [P] candidate index, "scores": [n, P] cosine}``.
    With ``n == 1`` this is ``draw(seed)`` and no CLIP is needed.
    """
    if n < 1:
        raise ValueError(f"the number of candidates must be >= 1; got {n}")
    if n == 1:
        return np.asarray(draw(seed)), {"chosen": np.zeros(len(prompts), int), "scores": None}
    if clip is None:
        raise ValueError("best-of-N needs a CLIP to rank the candidates: a model's clip_vision component or a "
                         "CLIP model folder")
    candidates = np.stack([np.asarray(draw(candidate_seed(seed, c)), np.float32) for c in range(n)])
    scores = clip_scores(clip, candidates, prompts)
    images, chosen = pick_best(candidates, scores)
    return images, {"chosen": chosen, "scores": scores}
