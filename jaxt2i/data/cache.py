"""Disk cache of VAE latents and text states, for training with frozen encoders.

With the VAE and the text encoder frozen, their outputs for a given image and caption never
change; encoding them once saves most of a fine-tuning step's work on small GPUs.

Layout of a cache folder::

    cache.json                 {"num_examples", "shard_size", "scaling_factor", "image_size", "dtype", ...}
    shard_00000.safetensors    latent_mean [m, h, w, 4], latent_std [m, h, w, 4], valid uint8 [m],
                               text_states [c, 77, D] or [c, k, 77, D] (all captions of the shard's images:
                               the text encoder's output at the model's text layer(s), before any conditioner),
                               caption_offsets int64 [m + 1] (image j's captions: offsets[j]..offsets[j+1])
    uncond.safetensors         uncond_text_states [77, D] or [k, 77, D] (the empty prompt, for condition dropout)
    fingerprint.json           {"fingerprint": ...}: what the cache was encoded from (``cache_fingerprint``), written
                               before the first shard, so a cache is never resumed or read with other encoders or data

Images are centre-cropped and never flipped when cached. The latent distribution's mean and
standard deviation are stored, so each use of an image still draws a fresh latent sample
(``mean + std * noise``, noise from the example's generator), and each use draws one caption.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from pathlib import Path
from typing import Callable, Sequence

import jax
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from jaxt2i.data.example import Example, UnreadableExample
from jaxt2i.data.transforms import preprocess

CACHE_META = "cache.json"
FINGERPRINT_FILE = "fingerprint.json"
# images [B, S, S, 3] in [-1, 1] -> (mean, std), each [B, h, w, 4] (unscaled)
EncodeImages = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]
EncodeTexts = Callable[[Sequence[str]], np.ndarray]  # B strings -> text states [B, 77, D] or [B, k, 77, D]


def _shard_name(i: int) -> str:
    return f"shard_{i:05d}.safetensors"


def _encode_texts_padded(encode_texts, texts: list[str], batch_size: int, dtype) -> np.ndarray:
    """``encode_texts`` over ``texts`` in batches of exactly ``batch_size`` (the last one padded by
    repeating its final text, so a jitted encoder compiles once) -> [len(texts), ...] text states."""
    out = []
    for i in range(0, len(texts), batch_size):
        chunk = texts[i : i + batch_size]
        padded = chunk + [chunk[-1]] * (batch_size - len(chunk))
        out.append(np.asarray(encode_texts(padded), dtype)[: len(chunk)])
    return np.concatenate(out)


def _encode_shard(source, indices, image_size, encode_images, encode_texts, batch_size, dtype):
    """One shard's examples -> per-example latent mean/std, validity, caption text states and offsets.

    Each distinct caption of the shard is encoded once (the shapes world repeats about half of
    its captions within a 1024-example shard); images are encoded ``batch_size`` at a time.
    """
    examples = []
    for i in indices:
        try:
            examples.append(source.example(int(i)))
        except UnreadableExample as e:
            warnings.warn(f"cache: skipping unreadable example {i}: {e}")
            examples.append(None)
    readable = [ex for ex in examples if ex is not None]
    if not readable:
        return [None] * len(examples), [None] * len(examples), [False] * len(examples), [], [0] * (len(examples) + 1)
    images = np.stack([preprocess(ex.image, image_size, crop="center") for ex in readable])
    mean_std = [encode_images(images[i : i + batch_size]) for i in range(0, len(images), batch_size)]
    mean = np.concatenate([np.asarray(m, dtype) for m, _ in mean_std])
    std = np.concatenate([np.asarray(s, dtype) for _, s in mean_std])
    captions = [c for ex in readable for c in ex.captions]
    unique = list(dict.fromkeys(captions))
    row = {c: k for k, c in enumerate(unique)}
    ctx = _encode_texts_padded(encode_texts, unique, 4 * batch_size, dtype)[[row[c] for c in captions]]
    means, stds, valid, states, offsets = [], [], [], [], [0]
    j = c = 0
    for ex in examples:
        valid.append(ex is not None)
        if ex is None:
            means.append(None)
            stds.append(None)
            offsets.append(offsets[-1])
            continue
        means.append(mean[j])
        stds.append(std[j])
        states.append(ctx[c : c + len(ex.captions)])
        offsets.append(offsets[-1] + len(ex.captions))
        j += 1
        c += len(ex.captions)
    return means, stds, valid, states, offsets


class CacheMismatchError(ValueError):
    """A cache folder holds a cache of other encoders or data (or of unknown origin) than the run asks for."""


def cache_fingerprint(encoder_params, settings: dict) -> str:
    """A sha256 hex digest of the frozen encoders' parameters (any pytree of arrays, hashed leaf by leaf in
    flattening order with each leaf's path, dtype and shape) and of ``settings`` (a JSON-able dict: the data
    source and everything else that changes what gets cached)."""
    h = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode())
    for path, leaf in jax.tree_util.tree_flatten_with_path(encoder_params)[0]:
        a = np.ascontiguousarray(np.asarray(leaf))
        h.update(f"{jax.tree_util.keystr(path)}|{a.dtype}|{a.shape}".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def read_fingerprint(cache_dir: str | os.PathLike) -> str | None:
    """The fingerprint a cache folder was written with, or None (no cache there, or one written before
    jaxt2i recorded fingerprints)."""
    path = Path(cache_dir) / FINGERPRINT_FILE
    return json.loads(path.read_text())["fingerprint"] if path.exists() else None


def check_fingerprint(cache_dir: str | os.PathLike, fingerprint: str) -> None:
    """Raises ``CacheMismatchError`` when the cache in ``cache_dir`` was encoded from other encoders or data."""
    found = read_fingerprint(cache_dir)
    if found is not None and found != fingerprint:
        raise CacheMismatchError(
            f"the latent cache in {cache_dir} was written from other encoder weights or data settings than this "
            "run's (its fingerprint differs); set data.cache_dir to a new folder, or delete that one to re-encode"
        )


def write_cache(
    source,
    cache_dir: str | os.PathLike,
    encode_images: EncodeImages,
    encode_texts: EncodeTexts,
    *,
    image_size: int,
    scaling_factor: float,
    batch_size: int = 8,
    shard_size: int = 1024,
    dtype=np.float32,
    fingerprint: str | None = None,
) -> Path:
    """Encodes every example of ``source`` and writes a cache folder; returns its path.

    Unreadable images are marked invalid (the cached source then skips them like the image
    pipeline would). Shards already present are kept, so an interrupted cache run continues --
    unless ``fingerprint`` (``cache_fingerprint`` of the encoders and data) differs from the one the
    folder was started with, or the folder holds shards but no fingerprint: then ``CacheMismatchError``,
    and nothing in the folder is touched.
    """
    cache_dir = Path(cache_dir)
    if fingerprint is not None:
        check_fingerprint(cache_dir, fingerprint)
        if read_fingerprint(cache_dir) is None and any(cache_dir.glob("shard_*.safetensors")):
            raise CacheMismatchError(
                f"{cache_dir} holds cache shards of unknown origin (no {FINGERPRINT_FILE}: written by an older jaxt2i "
                "or another tool); set data.cache_dir to a new folder, or delete that one to re-encode"
            )
    cache_dir.mkdir(parents=True, exist_ok=True)
    if fingerprint is not None:
        (cache_dir / FINGERPRINT_FILE).write_text(json.dumps({"fingerprint": fingerprint}))
    n = len(source)
    num_shards = -(-n // shard_size)
    d_model = None
    for s in range(num_shards):
        path = cache_dir / _shard_name(s)
        if path.exists():
            continue
        indices = np.arange(s * shard_size, min(n, (s + 1) * shard_size))
        means, stds, valid, states, offsets = _encode_shard(
            source, indices, image_size, encode_images, encode_texts, batch_size, dtype
        )
        ref = next((m for m in means if m is not None), None)
        if ref is None:
            raise RuntimeError(f"cache: every image of shard {s} (examples {indices[0]}..{indices[-1]}) is unreadable")
        d_model = states[0].shape[-1]
        fill = np.zeros_like(ref)
        tensors = {
            "latent_mean": np.stack([m if m is not None else fill for m in means]),
            "latent_std": np.stack([v if v is not None else fill for v in stds]),
            "valid": np.asarray(valid, np.uint8),
            "text_states": np.concatenate(states),
            "caption_offsets": np.asarray(offsets, np.int64),
        }
        tmp = path.with_suffix(".tmp")
        save_file(tensors, str(tmp))
        os.replace(tmp, path)  # a shard is either complete or absent
    uncond = np.asarray(encode_texts([""]), dtype)[0]
    save_file({"uncond_text_states": uncond}, str(cache_dir / "uncond.safetensors"))
    meta = {
        "num_examples": n,
        "shard_size": shard_size,
        "num_shards": num_shards,
        "scaling_factor": float(scaling_factor),
        "image_size": int(image_size),
        "dtype": np.dtype(dtype).name,
        "text_dim": int(d_model if d_model is not None else uncond.shape[-1]),
    }
    (cache_dir / CACHE_META).write_text(json.dumps(meta, indent=1))
    return cache_dir


class CachedSource:
    """A cache folder written by ``write_cache``, read as a source (``example(i).arrays``)."""

    def __init__(self, cache_dir: str | os.PathLike):
        self.dir = Path(cache_dir)
        meta_path = self.dir / CACHE_META
        if not meta_path.exists():
            raise FileNotFoundError(
                f"{meta_path} does not exist: write the cache first (`jaxt2i train CONFIG data.write_cache=true`)"
            )
        self.meta = json.loads(meta_path.read_text())
        self.scaling_factor = float(self.meta["scaling_factor"])
        with safe_open(str(self.dir / "uncond.safetensors"), framework="numpy") as f:
            self.uncond_text_states = f.get_tensor("uncond_text_states").astype(np.float32)  # [77, D] / [k, 77, D]
        self._open: dict[int, object] = {}

    def __len__(self) -> int:
        return int(self.meta["num_examples"])

    def _shard(self, s: int):
        if s not in self._open:
            if len(self._open) >= 4:
                self._open.pop(next(iter(self._open))).__exit__(None, None, None)
            handle = safe_open(str(self.dir / _shard_name(s)), framework="numpy")
            self._open[s] = handle.__enter__()
        return self._open[s]

    def example(self, index: int) -> Example:
        s, j = divmod(int(index), int(self.meta["shard_size"]))
        f = self._shard(s)
        if not f.get_slice("valid")[j : j + 1][0]:
            raise UnreadableExample(f"cached example {index} was unreadable when the cache was written")
        lo, hi = (int(v) for v in f.get_slice("caption_offsets")[j : j + 2])
        arrays = {
            "mean": f.get_slice("latent_mean")[j : j + 1][0].astype(np.float32),
            "std": f.get_slice("latent_std")[j : j + 1][0].astype(np.float32),
            "text_states": f.get_slice("text_states")[lo:hi].astype(np.float32),
            "scaling_factor": self.scaling_factor,
            "uncond_text_states": self.uncond_text_states,
        }
        return Example(index=int(index), arrays=arrays)


def assemble_cached(examples: Sequence[Example], rngs: Sequence[np.random.Generator]) -> dict:
    """Cached examples -> ``{"latents": [B, h, w, 4] scaled, "text_states": [B, 77, D] (or [B, k, 77, D]),
    "uncond_text_states": [77, D] (or [k, 77, D])}``.

    Each example draws its caption first, then its latent noise, from its own generator.
    """
    latents, states = [], []
    for ex, rng in zip(examples, rngs):
        a = ex.arrays
        k = int(rng.integers(len(a["text_states"]))) if len(a["text_states"]) > 1 else 0
        states.append(a["text_states"][k])
        noise = rng.standard_normal(a["mean"].shape).astype(np.float32)
        latents.append((a["mean"] + a["std"] * noise) * a["scaling_factor"])
    return {
        "latents": np.stack(latents).astype(np.float32),
        "text_states": np.stack(states).astype(np.float32),
        "uncond_text_states": np.asarray(examples[0].arrays["uncond_text_states"], np.float32),  # one, shared
    }
