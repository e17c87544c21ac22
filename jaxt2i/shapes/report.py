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

``markdown_report`` renders the result as tables; ``markdown_comparison`` pools several draws (other seeds).
"""

from __future__ import annotations

import json
import os
import time
from typing import Any, Callable, Sequence

import numpy as np

from jaxt2i.eval import clip_metrics, frechet, rerank
from jaxt2i.shapes import adherence, world

REAL_SEED_OFFSET = 3_000_017  # the held-out real images' scene stream, apart from training and prompt streams


# ----------------------------------------------------------------------------- generation


def eval_prompt_set(n: int, seed: int = 0) -> list[world.EvalPrompt]:
    """``n`` prompts of each (split, prompt type): train/heldout x one_object/two_object, 4n in all."""
    return [p for split in world.SPLITS for kind in world.PROMPT_TYPES
            for p in world.eval_prompts(split, kind, n, seed=seed)]


def generate(pipe, prompts: Sequence[str], guidance: float, steps: int, seed: int = 0, batch_size: int = 16,
             sampler: str | None = None) -> np.ndarray:
    """One image per prompt, float32 ``[N, H, W, 3]`` in [0, 1]. Batch k uses seed ``seed + k``; the last batch is
    padded (with its own prompts) to ``batch_size`` so every call runs the same compiled program. ``sampler`` is
    passed on only when given (a diffusion model's choice; other families have none)."""
    extra = {} if sampler is None else {"sampler": sampler}
    out = []
    for k, start in enumerate(range(0, len(prompts), batch_size)):
        chunk = list(prompts[start:start + batch_size])
        padded = chunk + [chunk[-1]] * (min(batch_size, len(prompts)) - len(chunk))
        images = pipe.text_to_image(padded, steps=steps, guidance_scale=guidance, seed=seed + k, **extra)
        out.append(np.asarray(images[:len(chunk)], np.float32))
    return np.concatenate(out)


def real_heldout_images(n: int, seed: int = 0, offset: int = 0) -> np.ndarray:
    """``n`` real renders of the held-out split (float32 ``[n, 64, 64, 3]`` in [0, 1]) from their own stream."""
    return world.batch(seed + REAL_SEED_OFFSET, offset, n, "heldout")["images"]


# ----------------------------------------------------------------------------- evaluation


def _to_uint8(images: np.ndarray) -> np.ndarray:
    return np.clip(np.round(np.asarray(images) * 255.0), 0, 255).astype(np.uint8)


def evaluate_images(prompts: Sequence[world.EvalPrompt], images: np.ndarray, clip=None,
                    real_features: np.ndarray | None = None) -> dict:
    """Scores one guidance scale's images (one per prompt): adherence, CLIP score, Frechet distance."""
    rep, _ = adherence.evaluate_prompts(prompts, list(_to_uint8(images)))
    out: dict[str, Any] = {"adherence": rep, "clip_score": None, "frechet": None}
    if clip is not None:
        encode_images, encode_texts = clip
        img = clip_metrics.image_features(encode_images, images)
        txt = np.asarray(encode_texts([p.prompt for p in prompts]), np.float64)
        splits = np.array([p.split for p in prompts])
        out["clip_score"] = {s: clip_metrics.clip_score(img[splits == s], txt[splits == s])
                             for s in world.SPLITS if np.any(splits == s)}
        out["clip_score"]["all"] = clip_metrics.clip_score(img, txt)
        if real_features is not None:
            out["frechet"] = frechet.frechet_distance_from_features(img, real_features)
    return out


def has_autoencoder(pipe) -> bool:
    """Whether ``pipe`` is a latent model whose autoencoder ``vae_roundtrip`` can measure."""
    return callable(getattr(pipe, "encode_image", None)) and callable(getattr(pipe, "decode_latents", None))


def vae_roundtrip(pipe, prompts: Sequence[world.EvalPrompt], batch_size: int = 16) -> dict:
    """Scores the prompts' real target renders after an autoencoder encode -> decode (``pipe.encode_image``, then
    ``pipe.decode_latents``): what the detector still recognises once images pass through the latent space, i.e.
    the best adherence a latent model can reach."""
    real = np.stack([world.render(p.target) for p in prompts]).astype(np.float32) / 255.0
    out = []
    for start in range(0, len(real), batch_size):
        chunk = real[start:start + batch_size]
        padded = np.concatenate([chunk, np.repeat(chunk[-1:], min(batch_size, len(real)) - len(chunk), 0)])
        out.append(np.asarray(pipe.decode_latents(pipe.encode_image(padded)), np.float32)[:len(chunk)])
    return evaluate_images(prompts, np.concatenate(out))


def evaluate_pipeline(pipe, *, guidance_scales: Sequence[float] = (1.0, 3.0, 5.0), n: int = 25, steps: int = 25,
                      seed: int = 0, batch_size: int = 16, sampler: str | None = None, clip=None,
                      n_real: int | None = None,
                      candidates: int = 1, save_images: str | None = None,
                      given_images: dict[str, np.ndarray] | None = None,
                      log: Callable[[str], None] = lambda s: None) -> dict:
    """The whole evaluation (see the module docstring); returns a JSON-ready dict.

    save_images: an ``.npz`` path that receives the scored images (``save_eval_images``), to look at them or to
    score them again without generating them.
    given_images: {guidance key ("3"): uint8 [N, H, W, 3]} images to score instead of generating them (an earlier
    run's ``save_images``, read by ``load_eval_images``; the prompts must be this ``n`` and ``seed``'s).

    clip: ``(encode_images, encode_texts)`` (``jaxt2i.eval.clip_metrics.load_clip``) or None: CLIP score and
    Frechet distance are then reported as missing.
    candidates > 1 scores best-of-``candidates`` images (``jaxt2i.eval.rerank``: the CLIP keeps, per prompt, the
    candidate closest to the prompt; candidate 0 is the plain draw). The CLIP score is then the selection criterion
    itself, so it is biased upwards; adherence (the detector) and the Frechet distance stay independent of it.
    """
    if candidates > 1 and clip is None:
        raise ValueError("candidates > 1 needs a CLIP to rank them (the model's clip_vision component or --clip)")
    prompts = eval_prompt_set(n, seed=seed)
    texts = [p.prompt for p in prompts]
    result: dict[str, Any] = {
        "settings": {"n_per_group": n, "n_prompts": len(prompts), "steps": steps, "sampler": sampler, "seed": seed,
                     "guidance_scales": list(guidance_scales), "batch_size": batch_size, "candidates": candidates},
        "guidance": {},
    }
    real_features = None
    if clip is not None:
        n_real = n_real or max(len(prompts), 256)
        real_features = clip_metrics.image_features(clip[0], real_heldout_images(n_real, seed))
        other = clip_metrics.image_features(clip[0], real_heldout_images(n_real, seed, offset=n_real))
        result["frechet_real_vs_real"] = frechet.frechet_distance_from_features(other, real_features)
        result["settings"]["n_real"] = n_real
    result["vae_roundtrip"] = vae_roundtrip(pipe, prompts, batch_size)["adherence"] if has_autoencoder(pipe) else None
    if result["vae_roundtrip"] is not None:
        log(f"real target renders through the autoencoder: held-out one/two-object accuracy "
            f"{_get(result['vae_roundtrip'], 'heldout', 'one_object')} / "
            f"{_get(result['vae_roundtrip'], 'heldout', 'two_object')} (the ceiling of any model on it)")
    scored = {}
    for g in guidance_scales:
        t0 = time.perf_counter()
        if given_images is not None:
            images, picked = given_images[_key(g)].astype(np.float32) / 255.0, None
        else:
            images, picked = rerank.best_of(lambda s: generate(pipe, texts, g, steps, s, batch_size, sampler), texts,
                                            candidates, seed, clip)
        seconds = time.perf_counter() - t0
        entry = evaluate_images(prompts, images, clip, real_features)
        entry["generation_seconds"] = None if given_images is not None else seconds
        if picked is not None and candidates > 1:
            entry["reranked_share"] = float(np.mean(picked["chosen"] != 0))  # prompts whose plain draw was replaced
        result["guidance"][_key(g)] = entry
        if save_images:
            scored[_key(g)] = _to_uint8(images)
        acc = entry["adherence"]
        log(f"guidance {g:g}: {len(prompts)} images in {seconds:.0f} s; held-out one/two-object accuracy "
            f"{_get(acc, 'heldout', 'one_object')} / {_get(acc, 'heldout', 'two_object')} (exact: "
            f"{_get(acc, 'heldout', 'one_object', 'exact_accuracy')} / "
            f"{_get(acc, 'heldout', 'two_object', 'exact_accuracy')})")
    if save_images:
        save_eval_images(save_images, texts, scored, settings=result["settings"])
        log(f"wrote the images to {save_images}")
    return result


def save_eval_images(path: str, prompts: Sequence[str], images: dict[str, np.ndarray],
                     settings: dict | None = None) -> None:
    """Writes an evaluation's images: ``images`` maps a guidance key ("3") to uint8 ``[N, H, W, 3]``, one image
    per prompt in ``prompts`` (length N) order; ``settings`` (the report's, JSON-ready) goes with them."""
    arrays = {f"guidance_{k}": np.asarray(v, np.uint8) for k, v in images.items()}
    for k, v in arrays.items():
        if v.ndim != 4 or len(v) != len(prompts):
            raise ValueError(f"{k}: expected [{len(prompts)}, H, W, 3] images, one per prompt, got {v.shape}")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    np.savez_compressed(path, prompts=np.asarray(list(prompts)), settings=np.asarray(json.dumps(settings or {})),
                        **arrays)


def load_eval_images(path: str) -> tuple[list[str], dict[str, np.ndarray], dict]:
    """Reads ``save_eval_images``' file: the prompts, {guidance key: uint8 [N, H, W, 3]} and the settings."""
    with np.load(path) as f:
        prompts = [str(p) for p in f["prompts"]]
        images = {k[len("guidance_"):]: f[k] for k in f.files if k.startswith("guidance_")}
        settings = json.loads(str(f["settings"])) if "settings" in f.files else {}
    return prompts, images, settings


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
