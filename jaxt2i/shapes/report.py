"""The shapes-world evaluation of any text-to-image model: prompt adherence, CLIP score, Frechet distance.

``evaluate_pipeline(pipe, ...)`` works with any model object that has ``text_to_image(prompts, seed=..., steps=...,
guidance_scale=...)`` returning float images ``[N, H, W, 3]`` in [0, 1]. It generates one image per prompt of
``world.eval_prompts`` (train and held-out splits, one- and two-object prompts) at each guidance scale -- with the
same seeds at every scale, so scales are compared on the same draws -- and reports, per guidance scale:

* prompt adherence (``jaxt2i.world.adherence``: the geometric detector's verdict) per split and prompt type, both
  GenEval-style (extra objects ignored) and exact (nothing drawn besides the targets);
* CLIP score (``100 * max(cos, 0)`` of image and prompt embeddings) per split, when a CLIP is given;
* the Frechet distance between the generated images and held-out real renders, in the CLIP's image-feature space
  (unit-norm image embeddings), with the real-vs-real distance of two disjoint held-out sets as its floor;
* for a latent model (one with ``encode_image`` and ``decode_latents``) the same adherence for the prompts' real
  target renders passed through its autoencoder: the ceiling any model on that autoencoder can reach.

Every number comes from streaming statistics (``ScoreState``: adherence counts, CLIP-score sums, the running mean and
covariance of the image features), so memory does not grow with the number of prompts: images are generated,
scored, featurised and dropped one batch at a time. A batch is split over the local devices when the model's
``text_to_image`` takes ``sharding=`` (its size rounded up to a multiple of the device count, the padding never
counted); with several processes batch ``k`` belongs to process ``k % count`` and the statistics are merged across
processes (``jaxt2i.eval.distribute``). The real renders' statistics can be cached (``reference_statistics``).

``markdown_report`` renders the result as tables; ``markdown_comparison`` pools several draws (other seeds).
"""

from __future__ import annotations

import copy
import functools
import hashlib
import inspect
import json
import os
import sys
import time
from typing import Any, Callable, Iterator, Mapping, NamedTuple, Sequence

import jax
import numpy as np
import tqdm

from jaxt2i.devices import batch_sharding, device_batch_size, pad_rows, replicate
from jaxt2i.eval import clip_metrics, distribute, frechet, npz_stream, rerank
from jaxt2i.shapes import adherence, world

REAL_SEED_OFFSET = 3_000_017  # the held-out real images' scene stream, apart from training and prompt streams
REAL_BATCH = 256  # real renders featurised at a time for the reference statistics


# ----------------------------------------------------------------------------- generation


def eval_prompt_set(n: int, seed: int = 0) -> list[world.EvalPrompt]:
    """``n`` prompts of each (split, prompt type): train/heldout x one_object/two_object, 4n in all."""
    return [p for split in world.SPLITS for kind in world.PROMPT_TYPES
            for p in world.eval_prompts(split, kind, n, seed=seed)]


def draw_batch(pipe, texts: Sequence[str], size: int, guidance: float, steps: int, seed: int,
               sampler: str | None = None, candidates: int = 1, clip=None, sharding=None
               ) -> tuple[np.ndarray, np.ndarray]:
    """One image per prompt of ``texts``: ``(float32 [len(texts), H, W, 3] in [0, 1], chosen candidate [len(texts)])``.

    The prompts are padded (with the last one) to ``size`` so every call runs the same compiled program, and the
    padding images are dropped. ``seed`` draws the batch (candidate ``c`` of best-of-``candidates``:
    ``rerank.candidate_seed(seed, c)``). ``sampler`` and ``sharding`` are passed on only when given (a diffusion
    model's choice; placing the batch over devices)."""
    extra = {} if sampler is None else {"sampler": sampler}
    if sharding is not None:
        extra["sharding"] = sharding
    padded = pad_rows(list(texts), size)
    images, info = rerank.best_of(
        lambda s: pipe.text_to_image(padded, steps=steps, guidance_scale=guidance, seed=s, **extra), padded,
        candidates, seed, clip)
    return np.asarray(images[:len(texts)], np.float32), np.asarray(info["chosen"][:len(texts)])


def real_heldout_images(n: int, seed: int = 0, offset: int = 0) -> np.ndarray:
    """``n`` real renders of the held-out split (float32 ``[n, 64, 64, 3]`` in [0, 1]) from their own stream; image
    ``i`` of ``(n, offset)`` is image ``i + offset`` of the stream, so the stream can be read in pieces."""
    return world.batch(seed + REAL_SEED_OFFSET, offset, n, "heldout")["images"]


def takes_sharding(pipe) -> bool:
    """Whether ``pipe.text_to_image`` accepts ``sharding=`` (places its batch over devices)."""
    try:
        parameters = inspect.signature(pipe.text_to_image).parameters
    except (TypeError, ValueError):
        return False
    return "sharding" in parameters or any(p.kind is p.VAR_KEYWORD for p in parameters.values())


def sharded_pipe(pipe, sharding):
    """A shallow copy of ``pipe`` whose parameters are replicated over ``sharding``'s devices (``pipe`` itself when
    it has no ``params`` or ``sharding`` is None)."""
    if sharding is None or not hasattr(pipe, "params"):
        return pipe
    out = copy.copy(pipe)
    out.params = replicate(pipe.params, sharding)
    return out


# ----------------------------------------------------------------------------- streaming statistics


def _to_uint8(images: np.ndarray) -> np.ndarray:
    return np.clip(np.round(np.asarray(images) * 255.0), 0, 255).astype(np.uint8)


class ScoreState(NamedTuple):
    """What the scoring of one guidance scale's images has gathered; its size does not depend on how many.

    adherence: ``adherence.score_counts`` int64 [splits, prompt types, fields] (splits: ``world.SPLITS``);
    clip_sum / clip_count: float64 / int64 [splits], the sum of ``100 * max(cos, 0)`` and the number of images;
    features: the image features' ``RunningStatistics`` (None without a CLIP); reranked: images whose plain draw a
    best-of-N candidate replaced; seconds: time spent generating (merged: the slowest process's).
    """

    adherence: np.ndarray
    clip_sum: np.ndarray
    clip_count: np.ndarray
    features: frechet.RunningStatistics | None
    reranked: int = 0
    seconds: float = 0.0

    @classmethod
    def empty(cls, feature_dim: int | None) -> "ScoreState":
        """Nothing scored; ``feature_dim``: the CLIP's feature size, or None without a CLIP."""
        splits = len(world.SPLITS)
        counts = np.zeros((splits, len(world.PROMPT_TYPES), len(adherence.COUNT_FIELDS)), np.int64)
        features = None if feature_dim is None else frechet.RunningStatistics.empty(feature_dim)
        return cls(counts, np.zeros(splits), np.zeros(splits, np.int64), features)

    def merge(self, other: "ScoreState") -> "ScoreState":
        """The state of both (disjoint) sets of images."""
        features = None if self.features is None else self.features.merge(other.features)
        return ScoreState(self.adherence + other.adherence, self.clip_sum + other.clip_sum,
                          self.clip_count + other.clip_count, features, int(self.reranked + other.reranked),
                          max(float(self.seconds), float(other.seconds)))


def score_batch(state: ScoreState, prompts: Sequence[world.EvalPrompt], images: np.ndarray, clip=None,
                chosen: np.ndarray | None = None) -> ScoreState:
    """``state`` with one batch of images (float ``[b, H, W, 3]`` in [0, 1], one per prompt) scored: adherence, and
    with ``clip`` (``(encode_images, encode_texts)``) CLIP score and image features. ``chosen``: each image's
    best-of-N candidate (0: the plain draw)."""
    scores = adherence.score_images([p.target for p in prompts], list(_to_uint8(images)))
    counts = state.adherence + adherence.score_counts(scores, [p.split for p in prompts], world.SPLITS)
    clip_sum, clip_count, features = state.clip_sum, state.clip_count, state.features
    if clip is not None:
        img = clip_metrics.image_features(clip[0], images)
        txt = np.asarray(clip[1]([p.prompt for p in prompts]), np.float64)
        split = np.array([world.SPLITS.index(p.split) for p in prompts])
        clip_sum = clip_sum + np.bincount(split, clip_metrics.clip_score_terms(img, txt), len(world.SPLITS))
        clip_count = clip_count + np.bincount(split, minlength=len(world.SPLITS))
        features = features.update(img)
    reranked = state.reranked + (0 if chosen is None else int(np.sum(np.asarray(chosen) != 0)))
    return ScoreState(counts, clip_sum, clip_count, features, reranked, state.seconds)


def merged(state):
    """Every process's ``state`` (a ``ScoreState`` or ``RunningStatistics``) merged; with one process, ``state``."""
    return functools.reduce(lambda a, b: a.merge(b), distribute.gather(state))


def state_entry(state: ScoreState, reference: frechet.RunningStatistics | None = None) -> dict:
    """The report of one guidance scale: ``{"adherence", "clip_score", "frechet"}`` (the last two None without a
    CLIP; the Frechet distance also without ``reference``, the real renders' statistics)."""
    out: dict[str, Any] = {"adherence": adherence.report_from_counts(state.adherence, world.SPLITS),
                           "clip_score": None, "frechet": None}
    if state.features is not None:
        out["clip_score"] = {s: float(state.clip_sum[i] / state.clip_count[i])
                             for i, s in enumerate(world.SPLITS) if state.clip_count[i]}
        out["clip_score"]["all"] = float(state.clip_sum.sum() / state.clip_count.sum())
        if reference is not None:
            out["frechet"] = frechet.frechet_distance_from_statistics(state.features, reference)
    return out


def feature_dim(clip, texts: Sequence[str] = ("a red circle",)) -> int | None:
    """The size of ``clip``'s features (None without a CLIP), from the encoding of ``texts`` (give a batch the
    evaluation encodes anyway: the program is compiled for that batch size once)."""
    return None if clip is None else int(np.asarray(clip[1](list(texts))).shape[1])


def evaluate_images(prompts: Sequence[world.EvalPrompt], images: np.ndarray, clip=None,
                    reference: frechet.RunningStatistics | None = None) -> dict:
    """Scores one guidance scale's images (float ``[N, H, W, 3]`` in [0, 1], one per prompt) at once: adherence,
    CLIP score, Frechet distance against ``reference`` (see ``state_entry``)."""
    return state_entry(score_batch(ScoreState.empty(feature_dim(clip)), prompts, images, clip), reference)


# ----------------------------------------------------------------------------- real renders


def _world_fingerprint() -> str:
    with open(world.__file__, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()[:16]


def reference_statistics(encode_images, n: int, seed: int = 0, offset: int = 0, *, dim: int,
                         cache_dir: str | None = None, clip_key: str | None = None, batch_size: int = REAL_BATCH,
                         process: tuple[int, int] | None = None) -> frechet.RunningStatistics:
    """Feature statistics of ``real_heldout_images(n, seed, offset)``, featurised ``batch_size`` at a time (shared
    between processes and merged).

    With ``cache_dir`` and ``clip_key`` (what identifies the CLIP, e.g. ``clip_metrics.folder_fingerprint``) they
    are read from, or written to, ``cache_dir/<hash>.npz``, keyed by the CLIP, ``n``, ``seed``, ``offset`` and the
    renderer's source."""
    index, count = process or distribute.this_process()
    key = {"kind": "shapes held-out renders, CLIP image features", "clip": clip_key, "n": n, "seed": seed,
           "offset": offset, "world": _world_fingerprint()}
    path = None
    if cache_dir and clip_key:
        name = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
        path = os.path.join(cache_dir, f"reference-{name}.npz")
        if distribute.all_processes(os.path.isfile(path) and _cached_key(path) == key):
            with np.load(path) as f:
                return frechet.RunningStatistics(int(f["n"]), f["mean"], f["m2"])
    stats = frechet.RunningStatistics.empty(dim)
    for _, start, stop in distribute.process_batches(n, batch_size, index, count):
        stats = stats.update(clip_metrics.image_features(encode_images,
                                                         real_heldout_images(stop - start, seed, offset + start)))
    stats = merged(stats)
    if path is not None and index == 0:
        os.makedirs(cache_dir, exist_ok=True)
        with npz_stream.NpzWriter(path) as w:
            for name, value in (("n", stats.n), ("mean", stats.mean), ("m2", stats.m2),
                                ("key", json.dumps(key, sort_keys=True))):
                w.add(name, value)
    return stats


def _cached_key(path: str) -> dict | None:
    try:
        with np.load(path) as f:
            return json.loads(str(f["key"]))
    except (OSError, ValueError, KeyError):
        return None


# ----------------------------------------------------------------------------- evaluation


def has_autoencoder(pipe) -> bool:
    """Whether ``pipe`` is a latent model whose autoencoder ``vae_roundtrip`` can measure."""
    return callable(getattr(pipe, "encode_image", None)) and callable(getattr(pipe, "decode_latents", None))


def vae_roundtrip(pipe, prompts: Sequence[world.EvalPrompt], batch_size: int = 16,
                  process: tuple[int, int] | None = None) -> dict:
    """Scores the prompts' real target renders after an autoencoder encode -> decode (``pipe.encode_image``, then
    ``pipe.decode_latents``), batch by batch: what the detector still recognises once images pass through the
    latent space, i.e. the best adherence a latent model can reach."""
    index, count = process or distribute.this_process()
    size = min(batch_size, len(prompts))
    state = ScoreState.empty(None)
    for _, start, stop in distribute.process_batches(len(prompts), size, index, count):
        chunk = prompts[start:stop]
        real = np.stack([world.render(p.target) for p in chunk]).astype(np.float32) / 255.0
        decoded = pipe.decode_latents(pipe.encode_image(pad_rows(real, size)))
        state = score_batch(state, chunk, np.asarray(decoded, np.float32)[:len(chunk)])
    return state_entry(merged(state))


def _given_rows(given, key: str, ranges: list[tuple[int, int]]) -> Iterator[np.ndarray]:
    """Rows ``start:stop`` of the given images of guidance ``key``: from a ``save_eval_images`` file, read a batch
    at a time, or from a mapping {key: uint8 [N, H, W, 3]}."""
    if isinstance(given, (str, os.PathLike)):
        return npz_stream.read_rows(os.fspath(given), f"guidance_{key}", ranges)
    return (np.asarray(given[key][a:b]) for a, b in ranges)


class _Run(NamedTuple):
    """What every guidance scale of one evaluation shares."""

    pipe: Any
    prompts: list
    batches: list  # this process's (k, start, stop)
    size: int  # prompts per text_to_image call
    steps: int
    seed: int
    sampler: str | None
    candidates: int
    clip: Any
    sharding: Any
    given_images: Any


def _image_batches(run: _Run, guidance: float) -> Iterator[tuple[np.ndarray, np.ndarray | None, float]]:
    """``(images float32 [b, H, W, 3] in [0, 1], chosen candidates or None, seconds drawing)`` for each of this
    process's batches, drawn one at a time (or read from the given images)."""
    if run.given_images is not None:
        for rows in _given_rows(run.given_images, _key(guidance), [(a, b) for _, a, b in run.batches]):
            yield np.asarray(rows, np.float32) / 255.0, None, 0.0
        return
    for k, a, b in run.batches:
        t0 = time.perf_counter()
        images, chosen = draw_batch(run.pipe, [p.prompt for p in run.prompts[a:b]], run.size, guidance, run.steps,
                                    run.seed + k, run.sampler, run.candidates, run.clip, run.sharding)
        yield images, chosen, time.perf_counter() - t0


def _score_guidance(run: _Run, guidance: float, dim: int | None, writer: npz_stream.NpzWriter | None) -> ScoreState:
    """One guidance scale's images drawn, scored (and written) batch by batch; the state merged over processes."""
    state = ScoreState.empty(dim)
    progress = tqdm.tqdm(zip(run.batches, _image_batches(run, guidance)), total=len(run.batches), unit="batch",
                         leave=False, desc=f"guidance {guidance:g}", file=sys.stderr, disable=None)
    for (_, a, b), (images, chosen, seconds) in progress:
        state = score_batch(state, run.prompts[a:b], images, run.clip, chosen)
        state = state._replace(seconds=state.seconds + seconds)
        if writer is not None:
            if a == 0:
                writer.begin(f"guidance_{_key(guidance)}", (len(run.prompts), *images.shape[1:]), np.uint8)
            writer.write(_to_uint8(images))
    return merged(state)


def evaluate_pipeline(pipe, *, guidance_scales: Sequence[float] = (1.0, 3.0, 5.0), n: int = 25, steps: int = 25,
                      seed: int = 0, batch_size: int = 16, sampler: str | None = None, clip=None,
                      n_real: int | None = None, candidates: int = 1, save_images: str | None = None,
                      given_images: str | Mapping[str, np.ndarray] | None = None,
                      reference_cache: str | None = None, clip_key: str | None = None,
                      devices: Sequence[jax.Device] | None = None, process: tuple[int, int] | None = None,
                      log: Callable[[str], None] = lambda s: None) -> dict:
    """The whole evaluation (see the module docstring); returns a JSON-ready dict (the same on every process).

    batch_size: images per ``text_to_image`` call (rounded up to a multiple of the device count when the batch is
    split over ``devices``, default ``jax.local_devices()``); the images of one batch are scored and dropped before
    the next is drawn. process: ``(index, count)``, default ``(jax.process_index(), jax.process_count())``.

    save_images: an ``.npz`` path that receives the scored images (``save_eval_images``' format, written a batch at a
    time; one process only), to look at them or to score them again without generating them.
    given_images: images to score instead of generating them: an earlier run's ``save_images`` file (read a batch at a
    time) or {guidance key ("3"): uint8 [N, H, W, 3]}; the prompts must be this ``n`` and ``seed``'s.

    clip: ``(encode_images, encode_texts)`` (``jaxt2i.eval.clip_metrics.load_clip``) or None: CLIP score and
    Frechet distance are then reported as missing. reference_cache, clip_key: a folder for the real renders'
    feature statistics and what identifies the CLIP (``reference_statistics``); no cache without both.
    candidates > 1 scores best-of-``candidates`` images (``jaxt2i.eval.rerank``: the CLIP keeps, per prompt, the
    candidate closest to the prompt; candidate 0 is the plain draw). The CLIP score is then the selection criterion
    itself, so it is biased upwards; adherence (the detector) and the Frechet distance stay independent of it.
    """
    if candidates > 1 and clip is None:
        raise ValueError("candidates > 1 needs a CLIP to rank them (the model's clip_vision component or --clip)")
    process = process or distribute.this_process()
    if save_images and process[1] > 1:
        raise ValueError(f"save_images writes one file from one process; this run has {process[1]} processes")
    devices = list(devices or jax.local_devices())
    sharding = batch_sharding(devices) if given_images is None and takes_sharding(pipe) else None
    prompts = eval_prompt_set(n, seed=seed)
    size = min(batch_size, len(prompts))
    size = size if sharding is None else device_batch_size(size, len(devices))
    result: dict[str, Any] = {
        "settings": {"n_per_group": n, "n_prompts": len(prompts), "steps": steps, "sampler": sampler, "seed": seed,
                     "guidance_scales": list(guidance_scales), "batch_size": batch_size, "candidates": candidates,
                     "devices": 1 if sharding is None else len(devices), "processes": process[1]},
        "guidance": {},
    }
    dim, reference = feature_dim(clip, [p.prompt for p in prompts[:size]]), None
    if clip is not None:
        n_real = n_real or max(len(prompts), 256)
        real = [reference_statistics(clip[0], n_real, seed, offset, dim=dim, cache_dir=reference_cache,
                                     clip_key=clip_key, process=process) for offset in (0, n_real)]
        result["frechet_real_vs_real"] = frechet.frechet_distance_from_statistics(real[1], real[0])
        result["settings"]["n_real"] = n_real
        reference = real[0]
    roundtrip = vae_roundtrip(pipe, prompts, batch_size, process)["adherence"] if has_autoencoder(pipe) else None
    result["vae_roundtrip"] = roundtrip
    if roundtrip is not None:
        log(f"real target renders through the autoencoder: held-out one/two-object accuracy "
            f"{_get(roundtrip, 'heldout', 'one_object')} / {_get(roundtrip, 'heldout', 'two_object')} "
            f"(the ceiling of any model on it)")
    run = _Run(sharded_pipe(pipe, sharding), prompts, list(distribute.process_batches(len(prompts), size, *process)),
               size, steps, seed, sampler, candidates, clip, sharding, given_images)
    writer = npz_stream.NpzWriter(save_images) if save_images else None
    try:
        for g in guidance_scales:
            state = _score_guidance(run, g, dim, writer)
            result["guidance"][_key(g)] = entry = state_entry(state, reference)
            entry["generation_seconds"] = None if given_images is not None else state.seconds
            if candidates > 1 and given_images is None:
                entry["reranked_share"] = state.reranked / len(prompts)  # prompts whose plain draw was replaced
            acc = entry["adherence"]
            log(f"guidance {g:g}: {len(prompts)} images in {state.seconds:.0f} s; held-out one/two-object accuracy "
                f"{_get(acc, 'heldout', 'one_object')} / {_get(acc, 'heldout', 'two_object')} (exact: "
                f"{_get(acc, 'heldout', 'one_object', 'exact_accuracy')} / "
                f"{_get(acc, 'heldout', 'two_object', 'exact_accuracy')})")
        if writer is not None:
            writer.add("prompts", np.asarray([p.prompt for p in prompts]))
            writer.add("settings", np.asarray(json.dumps(result["settings"])))
            writer.close()
            log(f"wrote the images to {save_images}")
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    return result


def save_eval_images(path: str, prompts: Sequence[str], images: dict[str, np.ndarray],
                     settings: dict | None = None) -> None:
    """Writes an evaluation's images: ``images`` maps a guidance key ("3") to uint8 ``[N, H, W, 3]``, one image
    per prompt in ``prompts`` (length N) order; ``settings`` (the report's, JSON-ready) goes with them.
    ``evaluate_pipeline(save_images=...)`` writes the same format a batch at a time."""
    arrays = {f"guidance_{k}": np.asarray(v, np.uint8) for k, v in images.items()}
    for k, v in arrays.items():
        if v.ndim != 4 or len(v) != len(prompts):
            raise ValueError(f"{k}: expected [{len(prompts)}, H, W, 3] images, one per prompt, got {v.shape}")
    with npz_stream.NpzWriter(path) as w:
        w.add("prompts", np.asarray(list(prompts)))
        w.add("settings", np.asarray(json.dumps(settings or {})))
        for k, v in arrays.items():
            w.add(k, v)


def load_eval_images(path: str) -> tuple[list[str], dict[str, np.ndarray], dict]:
    """Reads ``save_eval_images``' file: the prompts, {guidance key: uint8 [N, H, W, 3]} and the settings (all
    images in memory; ``eval_images_index`` + ``evaluate_pipeline(given_images=path)`` read them a batch at a time)."""
    prompts, keys, settings = eval_images_index(path)
    with np.load(path) as f:
        images = {k: f[f"guidance_{k}"] for k in keys}
    return prompts, images, settings


def eval_images_index(path: str) -> tuple[list[str], list[str], dict]:
    """``save_eval_images``' file without its images: the prompts, the guidance keys and the settings."""
    with np.load(path) as f:
        prompts = [str(p) for p in f["prompts"]]
        keys = [k[len("guidance_"):] for k in f.files if k.startswith("guidance_")]
        settings = json.loads(str(f["settings"])) if "settings" in f.files else {}
    return prompts, keys, settings


def _key(g: float) -> str:
    return f"{float(g):g}"


def _get(rep: dict, split: str, kind: str, field: str = "accuracy"):
    value = rep.get(split, {}).get(kind, {}).get(field)
    return None if value is None else round(float(value), 3)


# ----------------------------------------------------------------------------- markdown


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _num(x, digits: int = 2) -> str:
    return "missing" if x is None else f"{x:.{digits}f}"


def _settings_line(s: dict) -> str:
    sampler = f" {s['sampler']}" if s.get("sampler") else ""
    best_of = s.get("candidates", 1)
    reranked = (f" Best of {best_of} candidates per prompt by the CLIP's score (so the CLIP score below is the "
                "selection criterion, biased upwards)." if best_of > 1 else "")
    return (f"{s['n_per_group']} prompts per split and prompt type ({s['n_prompts']} in all), {s['steps']}{sampler} "
            f"steps, seed {s['seed']}.{reranked}")


ADHERENCE_HEADER = ("| one object | one object, exact | two objects | two objects, exact | two: both found "
                    "| two: relation given both |")


def markdown_report(result: dict) -> str:
    """Tables of a ``evaluate_pipeline`` result: adherence per split/type and guidance (GenEval-style: extra objects
    ignored; exact: nothing besides the targets); CLIP score; Frechet distance."""
    s = result["settings"]
    lines = [_settings_line(s), "", "| guidance | split " + ADHERENCE_HEADER, "|---" * 8 + "|"]
    rows = [(g, entry["adherence"]) for g, entry in result["guidance"].items()]
    if result.get("vae_roundtrip"):
        rows.append(("real images through the autoencoder", result["vae_roundtrip"]))
    for label, rep in rows:
        for split in world.SPLITS:
            cells = [_get(rep, split, "one_object"), _get(rep, split, "one_object", "exact_accuracy"),
                     _get(rep, split, "two_object"), _get(rep, split, "two_object", "exact_accuracy"),
                     _get(rep, split, "two_object", "objects_accuracy"),
                     _get(rep, split, "two_object", "relation_accuracy_given_objects")]
            lines.append(f"| {label} | {split} | " + " | ".join(_pct(c) for c in cells) + " |")
    lines += ["", "| guidance | CLIP score train | CLIP score held-out | Frechet distance vs held-out real "
              "(CLIP image features) | seconds to generate |", "|---|---|---|---|---|"]
    for g, entry in result["guidance"].items():
        cs = entry.get("clip_score") or {}
        seconds = entry.get("generation_seconds")
        lines.append(f"| {g} | {_num(cs.get('train'))} | {_num(cs.get('heldout'))} | {_num(entry.get('frechet'), 4)} "
                     f"| {'(saved images)' if seconds is None else _num(seconds, 0)} |")
    if result.get("frechet_real_vs_real") is not None:
        lines += ["", f"Frechet distance between two disjoint sets of {s.get('n_real')} held-out real images "
                  f"(the floor): {result['frechet_real_vs_real']:.4f}."]
    else:
        lines += ["", "CLIP score and Frechet distance: missing (no CLIP found; pass --clip)."]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- pooling draws


def _counts(cell: dict) -> dict:
    """One adherence cell (split x prompt type) -> integer counts, so that independent draws can be summed."""
    if "exact_accuracy" not in cell:
        raise ValueError("an adherence cell without exact_accuracy: score the report's images with this version "
                         "(`jaxt2i eval --from-images IMAGES.npz`)")
    n = cell["n"]
    out = {"n": n, "right": round(cell["accuracy"] * n), "exact": round(cell["exact_accuracy"] * n),
           "objects": round(cell["objects_accuracy"] * n), "count": round(cell["count_accuracy"] * n)}
    if "relation_accuracy_given_objects" in cell:  # None when no image had both objects
        out["relation"] = round((cell["relation_accuracy_given_objects"] or 0.0) * out["objects"])
    return out


def pooled_adherence(results: Sequence[dict], guidance: float | str) -> dict:
    """Adherence counts summed over ``evaluate_pipeline`` results (independent draws: other prompt seeds) at one
    guidance scale: {(split, prompt_type): {"n", "right", "exact", "objects", "count"[, "relation"]}}. Results
    without that scale are left out; raises ValueError if none has it."""
    key = _key(guidance)
    used = [r["guidance"][key]["adherence"] for r in results if key in r["guidance"]]
    if not used:
        raise ValueError(f"no report has guidance {key}")
    total: dict = {}
    for rep in used:
        for split in world.SPLITS:
            for kind in world.PROMPT_TYPES:
                acc = total.setdefault((split, kind), {})
                for name, value in _counts(rep[split][kind]).items():
                    acc[name] = acc.get(name, 0) + value
    return total


def _pooled_cells(pooled: dict, split: str) -> list[str]:
    one, two = pooled[(split, "one_object")], pooled[(split, "two_object")]

    def frac(num, den):
        return _pct(num / den if den else None)

    return [frac(one["right"], one["n"]), frac(one["exact"], one["n"]), frac(two["right"], two["n"]),
            frac(two["exact"], two["n"]), frac(two["objects"], two["n"]),
            f"{frac(two['relation'], two['objects'])} of {two['objects']}"]


def markdown_comparison(results: Sequence[dict], against: Sequence[dict] = ()) -> str:
    """A table of ``evaluate_pipeline`` results pooled over draws (``pooled_adherence``), per guidance scale and
    split: one object and two objects, GenEval-style and exact, both objects found and relation given both (with
    its denominator). ``against`` (another model's results, pooled likewise) goes in
    brackets where it has the scale."""
    scales = sorted({g for r in results for g in r["guidance"]}, key=float)
    lines = ["| guidance | split | n " + ADHERENCE_HEADER, "|---" * 9 + "|"]
    for g in scales:
        new = pooled_adherence(results, g)
        old = pooled_adherence(against, g) if any(g in r["guidance"] for r in against) else None
        for split in world.SPLITS:
            cells = _pooled_cells(new, split)
            if old is not None:
                cells = [f"{c} ({o})" for c, o in zip(cells, _pooled_cells(old, split))]
            lines.append(f"| {g} | {split} | {new[(split, 'one_object')]['n']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
