"""The shapes-world evaluation of a text-to-image pipeline: prompt adherence, CLIP score, Frechet distance.

``evaluate_pipeline(pipe, ...)`` generates one image per prompt of ``shapes.eval_prompts`` (train and held-out
splits, one- and two-object prompts) at each guidance scale -- with the same starting noise at every scale, so
scales are compared on the same draws -- and reports, per guidance scale:

* prompt adherence (``jaxt2i.shapes.adherence``: the deterministic detector's verdict) per split and prompt type;
* CLIP score (``100 * max(cos, 0)`` of image and prompt embeddings of the small shapes CLIP) per split;
* the same adherence for the prompts' real target renders passed through the VAE (encode -> decode): the ceiling
  that any latent model on this VAE can reach (reported once, as ``vae_roundtrip``);
* the Frechet distance between the generated images and held-out real renders, in the small CLIP's image-feature
  space (unit-norm image embeddings), with the real-vs-real distance of two disjoint held-out sets as its floor.

The CLIP parts need the small CLIP (``load_eval_clip``): the shipped model keeps its image tower in
``clip_vision/`` (its text tower is the model's text encoder); a full CLIP folder (``params.safetensors`` +
``config.json`` with "text" and "vision") works too. Without one those metrics are reported as missing (None).
``markdown_report`` renders the result as tables.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any, Callable, Sequence

import numpy as np

from jaxt2i.shapes import world as shapes
from jaxt2i.eval import frechet
from jaxt2i.shapes import adherence

CLIP_VISION_DIR = "clip_vision"
REAL_SEED_OFFSET = 3_000_017  # the held-out real images' scene stream, apart from training and prompt streams


# ----------------------------------------------------------------------------- the small CLIP


def write_clip_vision(folder: str, flat_clip: dict, clip_config: dict, dtype: str = "float16") -> None:
    """Stores the image tower (+ ``logit_scale``) of a full small-CLIP flat tree in ``folder``.

    flat_clip: ``{"vision_model/...": array, "text_model/...": array, "logit_scale": array}`` (``/``-flattened);
    clip_config: the CLIP's config dict ``{"text": {...}, "vision": {...}}``.
    """
    from jaxt2i.convert.io import write_safetensors

    os.makedirs(folder, exist_ok=True)
    kept = {k: np.asarray(v).astype(dtype) for k, v in flat_clip.items() if not k.startswith("text_model/")}
    if not any(k.startswith("vision_model/") for k in kept):
        raise ValueError("the CLIP parameters have no vision_model/ entries; pass a full small-CLIP folder.")
    write_safetensors(os.path.join(folder, "params.safetensors"), kept, metadata={"format": "jaxt2i-flax-flat"})
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(clip_config, f, indent=2)


def load_eval_clip(path: str | None, text_encoder_params: dict | None = None):
    """``(encode_images, encode_texts)`` of the small CLIP (``jaxt2i.shapes.clip_metrics``), or None when absent.

    path: a full CLIP folder (params with ``text_model/``), or an image-tower folder (``clip_vision/``) whose
    text tower is ``text_encoder_params`` (the model's text encoder), or a model folder holding ``clip_vision/``.
    """
    from jaxt2i.convert.io import read_safetensors
    from jaxt2i.convert.native import unflatten_params
    from jaxt2i.eval import clip_metrics
    from jaxt2i.models.clip_vision import CLIPConfig
    from jaxt2i.tokenizer import CLIPTokenizer

    if path is None:
        return None
    if os.path.isdir(os.path.join(path, CLIP_VISION_DIR)):
        path = os.path.join(path, CLIP_VISION_DIR)
    weights, config_file = os.path.join(path, "params.safetensors"), os.path.join(path, "config.json")
    if not (os.path.isfile(weights) and os.path.isfile(config_file)):
        return None
    flat = {k: np.asarray(v, np.float32) for k, v in read_safetensors(weights).items()}
    params = unflatten_params(flat)
    if "text_model" not in params:
        if text_encoder_params is None:
            raise ValueError(f"{path} holds only the CLIP image tower; pass the text encoder's parameters too.")
        params["text_model"] = _as_float32(text_encoder_params)
    if "logit_scale" in params:
        params["logit_scale"] = np.asarray(params["logit_scale"]).reshape(())
    with open(config_file) as f:
        config = CLIPConfig.from_dict(json.load(f))
    return clip_metrics.clip_encoders(params, config, CLIPTokenizer.default())


def _as_float32(tree: dict) -> dict:
    return {k: _as_float32(v) if isinstance(v, dict) else np.asarray(v, np.float32) for k, v in tree.items()}


# ----------------------------------------------------------------------------- generation


def eval_prompt_set(n: int, seed: int = 0) -> list[shapes.EvalPrompt]:
    """``n`` prompts of each (split, prompt type): train/heldout x one_object/two_object, 4n in all."""
    return [p for split in shapes.SPLITS for kind in shapes.PROMPT_TYPES
            for p in shapes.eval_prompts(split, kind, n, seed=seed)]


def generate(pipe, prompts: Sequence[str], guidance: float, steps: int, seed: int = 0, batch_size: int = 16,
             sampler: str = "ddim") -> np.ndarray:
    """One image per prompt, float32 ``[N, H, W, 3]`` in [0, 1]. Batch k uses seed ``seed + k``; the last batch is
    padded (with its own prompts) to ``batch_size`` so every call runs the same compiled program."""
    out = []
    for k, start in enumerate(range(0, len(prompts), batch_size)):
        chunk = list(prompts[start:start + batch_size])
        padded = chunk + [chunk[-1]] * (min(batch_size, len(prompts)) - len(chunk))
        images = pipe.text_to_image(padded, steps=steps, guidance_scale=guidance, sampler=sampler, seed=seed + k)
        out.append(np.asarray(images[:len(chunk)], np.float32))
    return np.concatenate(out)


def real_heldout_images(n: int, seed: int = 0, offset: int = 0) -> np.ndarray:
    """``n`` real renders of the held-out split (float32 ``[n, 64, 64, 3]`` in [0, 1]) from their own stream."""
    return shapes.batch(seed + REAL_SEED_OFFSET, offset, n, "heldout")["images"]


# ----------------------------------------------------------------------------- evaluation


def _to_uint8(images: np.ndarray) -> np.ndarray:
    return np.clip(np.round(np.asarray(images) * 255.0), 0, 255).astype(np.uint8)


def evaluate_images(prompts: Sequence[shapes.EvalPrompt], images: np.ndarray, clip=None,
                    real_features: np.ndarray | None = None) -> dict:
    """Scores one guidance scale's images (one per prompt): adherence, CLIP score, Frechet distance."""
    rep, _ = adherence.evaluate_prompts(prompts, list(_to_uint8(images)))
    out: dict[str, Any] = {"adherence": rep, "clip_score": None, "frechet": None}
    if clip is not None:
        from jaxt2i.eval import clip_metrics

        encode_images, encode_texts = clip
        img = clip_metrics.image_features(encode_images, images)
        txt = np.asarray(encode_texts([p.prompt for p in prompts]), np.float64)
        splits = np.array([p.split for p in prompts])
        out["clip_score"] = {s: clip_metrics.clip_score(img[splits == s], txt[splits == s])
                             for s in shapes.SPLITS if np.any(splits == s)}
        out["clip_score"]["all"] = clip_metrics.clip_score(img, txt)
        if real_features is not None:
            out["frechet"] = frechet.frechet_distance_from_features(img, real_features)
    return out


def vae_roundtrip(pipe, prompts: Sequence[shapes.EvalPrompt], batch_size: int = 16) -> dict:
    """Scores the prompts' real target renders after a VAE encode -> decode (posterior mean): what the detector
    still recognises once images pass through the latent space, i.e. the best adherence a latent model can reach."""
    real = np.stack([shapes.render(p.target) for p in prompts]).astype(np.float32) / 255.0
    out = []
    for start in range(0, len(real), batch_size):
        chunk = real[start:start + batch_size]
        padded = np.concatenate([chunk, np.repeat(chunk[-1:], min(batch_size, len(real)) - len(chunk), 0)])
        out.append(np.asarray(pipe.decode_latents(pipe.encode_image(padded)), np.float32)[:len(chunk)])
    return evaluate_images(prompts, np.concatenate(out))


def evaluate_pipeline(pipe, *, guidance_scales: Sequence[float] = (1.0, 3.0, 5.0), n: int = 25, steps: int = 25,
                      seed: int = 0, batch_size: int = 16, sampler: str = "ddim", clip=None, n_real: int | None = None,
                      candidates: int = 1, save_images: str | None = None,
                      given_images: dict[str, np.ndarray] | None = None,
                      log: Callable[[str], None] = lambda s: None) -> dict:
    """The whole evaluation (see the module docstring); returns a JSON-ready dict.

    save_images: an ``.npz`` path that receives the scored images (``save_eval_images``), to look at them or to
    score them again without generating them.
    given_images: {guidance key ("3"): uint8 [N, H, W, 3]} images to score instead of generating them (an earlier
    run's ``save_images``, read by ``load_eval_images``; the prompts must be this ``n`` and ``seed``'s).

    candidates > 1 scores best-of-``candidates`` images (``jaxt2i.eval.rerank``: the CLIP keeps, per prompt, the
    candidate closest to the prompt; candidate 0 is the plain draw). The CLIP score is then the selection criterion
    itself, so it is biased upwards; adherence (the detector) and the Frechet distance stay independent of it.
    """
    from jaxt2i.eval import rerank

    if candidates > 1 and clip is None:
        raise ValueError("candidates > 1 needs the small CLIP to rank them (the model's clip_vision/ or --clip)")
    prompts = eval_prompt_set(n, seed=seed)
    texts = [p.prompt for p in prompts]
    result: dict[str, Any] = {
        "settings": {"n_per_group": n, "n_prompts": len(prompts), "steps": steps, "sampler": sampler, "seed": seed,
                     "guidance_scales": list(guidance_scales), "batch_size": batch_size, "candidates": candidates},
        "guidance": {},
    }
    real_features = None
    if clip is not None:
        from jaxt2i.eval import clip_metrics

        n_real = n_real or max(len(prompts), 256)
        real_features = clip_metrics.image_features(clip[0], real_heldout_images(n_real, seed))
        other = clip_metrics.image_features(clip[0], real_heldout_images(n_real, seed, offset=n_real))
        result["frechet_real_vs_real"] = frechet.frechet_distance_from_features(other, real_features)
        result["settings"]["n_real"] = n_real
    result["vae_roundtrip"] = vae_roundtrip(pipe, prompts, batch_size)["adherence"]
    log(f"real target renders through the VAE: held-out one/two-object accuracy "
        f"{_get(result['vae_roundtrip'], 'heldout', 'one_object')} / "
        f"{_get(result['vae_roundtrip'], 'heldout', 'two_object')} (the ceiling of any latent model on this VAE)")
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
            f"{_get(acc, 'heldout', 'one_object')} / {_get(acc, 'heldout', 'two_object')}")
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


def markdown_report(result: dict) -> str:
    """Tables of a ``evaluate_pipeline`` result: adherence per split/type and guidance; CLIP score; Frechet."""
    s = result["settings"]
    best_of = s.get("candidates", 1)
    reranked = (f" Best of {best_of} candidates per prompt by the small CLIP's score (so the CLIP score below is "
                "the selection criterion, biased upwards)." if best_of > 1 else "")
    lines = [f"{s['n_per_group']} prompts per split and prompt type ({s['n_prompts']} in all), {s['steps']} "
             f"{s['sampler']} steps, seed {s['seed']}.{reranked}", "",
             "| guidance | split | one object (color+shape) | two objects (both + relation) | two: both objects found "
             "| two: relation given objects |",
             "|---|---|---|---|---|---|"]
    rows = [(g, entry["adherence"]) for g, entry in result["guidance"].items()]
    if result.get("vae_roundtrip"):
        rows.append(("real images through the VAE", result["vae_roundtrip"]))
    for label, rep in rows:
        for split in shapes.SPLITS:
            lines.append(f"| {label} | {split} | {_pct(_get(rep, split, 'one_object'))} | "
                         f"{_pct(_get(rep, split, 'two_object'))} | "
                         f"{_pct(_get(rep, split, 'two_object', 'objects_accuracy'))} | "
                         f"{_pct(_get(rep, split, 'two_object', 'relation_accuracy_given_objects'))} |")
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
        lines += ["", "CLIP score and Frechet distance: missing (no small CLIP found; pass --clip)."]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- pooling draws


def _counts(cell: dict) -> dict:
    """One adherence cell (split x prompt type) -> integer counts, so that independent draws can be summed."""
    n = cell["n"]
    out = {"n": n, "right": round(cell["accuracy"] * n), "objects": round(cell["objects_accuracy"] * n),
           "count": round(cell["count_accuracy"] * n)}
    if "relation_accuracy_given_objects" in cell:
        out["relation"] = round(cell["relation_accuracy_given_objects"] * out["objects"])
    return out


def pooled_adherence(results: Sequence[dict], guidance: float | str) -> dict:
    """Adherence counts summed over ``evaluate_pipeline`` results (independent draws: other prompt seeds) at one
    guidance scale: {(split, prompt_type): {"n", "right", "objects", "count"[, "relation"]}}. Results without that
    scale are left out; raises ValueError if none has it."""
    key = _key(guidance)
    used = [r["guidance"][key]["adherence"] for r in results if key in r["guidance"]]
    if not used:
        raise ValueError(f"no report has guidance {key}")
    total: dict = {}
    for rep in used:
        for split in shapes.SPLITS:
            for kind in shapes.PROMPT_TYPES:
                acc = total.setdefault((split, kind), {})
                for name, value in _counts(rep[split][kind]).items():
                    acc[name] = acc.get(name, 0) + value
    return total


def _pooled_cells(pooled: dict, split: str) -> list[str]:
    one, two = pooled[(split, "one_object")], pooled[(split, "two_object")]

    def frac(num, den):
        return _pct(num / den if den else None)

    return [frac(one["right"], one["n"]), frac(two["right"], two["n"]), frac(two["objects"], two["n"]),
            f"{frac(two['relation'], two['objects'])} of {two['objects']}", frac(one["count"], one["n"])]


def markdown_comparison(results: Sequence[dict], against: Sequence[dict] = ()) -> str:
    """A table of ``evaluate_pipeline`` results pooled over draws (``pooled_adherence``), per guidance scale and
    split: one object, two objects, both objects found, relation given both (with its denominator) and one-object
    count right (exactly one object drawn). ``against`` (another model's results, pooled likewise) goes in
    brackets where it has the scale."""
    scales = sorted({g for r in results for g in r["guidance"]}, key=float)
    lines = ["| guidance | split | n | one object | two objects | two: both found | two: relation given both "
             "| one object: count right |", "|---|---|---|---|---|---|---|---|"]
    for g in scales:
        new = pooled_adherence(results, g)
        old = pooled_adherence(against, g) if any(g in r["guidance"] for r in against) else None
        for split in shapes.SPLITS:
            cells = _pooled_cells(new, split)
            if old is not None:
                cells = [f"{c} ({o})" for c, o in zip(cells, _pooled_cells(old, split))]
            lines.append(f"| {g} | {split} | {new[(split, 'one_object')]['n']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
