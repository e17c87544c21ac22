"""The pictures and tables of the shipped shapes model's card (docs/shapes_model.md): training-loss curves, a grid of
generated images, time to first image, and what went wrong with two-object prompts. Drawn with PIL only.

``scripts/shapes_report.py`` is the command line over these functions.
"""

from __future__ import annotations

import collections
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image, ImageDraw, ImageFont

from jaxt2i.models import latent_diffusion
from jaxt2i.shapes import adherence, detector, report

GRID_PROMPTS = [
    ("a red circle", False),
    ("a large green square", False),
    ("a small white triangle", False),
    ("an orange circle", False),
    ("a blue triangle", True),
    ("a yellow square", True),
    ("a purple circle", True),
    ("a large purple square", False),
    ("a red circle to the left of a blue square", False),
    ("a green triangle above a yellow circle", False),
    ("a white square below an orange triangle", False),
    ("a blue circle on the right of a red square", False),
    ("a red circle to the left of a white triangle", True),
    ("a yellow square above a red circle", True),
    ("a green circle below a purple triangle", True),
    ("a blue triangle to the right of an orange square", True),
]


def _font(size: int = 12):
    for path in ("/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
                 "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf"):
        if os.path.isfile(path):
            return ImageFont.truetype(path, size)
    return ImageFont.load_default()


def _read_jsonl(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _smooth(values: list[float], window: int) -> list[float]:
    out, acc = [], []
    for v in values:
        acc.append(v)
        acc = acc[-window:]
        out.append(sum(acc) / len(acc))
    return out


def draw_panel(draw: ImageDraw.ImageDraw, box: tuple[int, int, int, int], series: list[tuple[list, list, tuple]],
               title: str, xlabel: str, log_y: bool = True) -> None:
    """One line chart in ``box`` (x0, y0, x1, y1): axes, ticks, title and each (xs, ys, rgb) series."""
    font, small = _font(13), _font(10)
    x0, y0, x1, y1 = box
    left, bottom, top, right = x0 + 52, y1 - 30, y0 + 24, x1 - 10
    draw.text((x0 + 52, y0 + 4), title, fill=(0, 0, 0), font=font)
    xs_all = [x for xs, _, _ in series for x in xs]
    ys_all = [y for _, ys, _ in series for y in ys if y > 0 or not log_y]
    if not xs_all or not ys_all:
        return
    f = (lambda v: math.log10(v)) if log_y else (lambda v: v)
    xmin, xmax = min(xs_all), max(xs_all)
    ymin, ymax = f(min(ys_all)), f(max(ys_all))
    if ymax - ymin < 1e-9:
        ymax = ymin + 1.0
    px = lambda x: left + (x - xmin) / max(xmax - xmin, 1e-9) * (right - left)  # noqa: E731
    py = lambda y: bottom - (f(y) - ymin) / (ymax - ymin) * (bottom - top)  # noqa: E731
    draw.rectangle((left, top, right, bottom), outline=(0, 0, 0))
    for i in range(5):
        t = ymin + (ymax - ymin) * i / 4
        y = bottom - (t - ymin) / (ymax - ymin) * (bottom - top)
        draw.line((left - 3, y, left, y), fill=(0, 0, 0))
        label = f"{10 ** t:.3g}" if log_y else f"{t:.3g}"
        draw.text((x0 + 2, y - 6), label, fill=(0, 0, 0), font=small)
        xv = xmin + (xmax - xmin) * i / 4
        xp = left + (right - left) * i / 4
        draw.line((xp, bottom, xp, bottom + 3), fill=(0, 0, 0))
        draw.text((xp - 10, bottom + 5), f"{xv:.0f}", fill=(0, 0, 0), font=small)
    draw.text(((left + right) // 2 - 20, bottom + 16), xlabel, fill=(0, 0, 0), font=small)
    for xs, ys, color in series:
        pts = [(px(x), py(y)) for x, y in zip(xs, ys) if y > 0 or not log_y]
        if len(pts) > 1:
            draw.line(pts, fill=color, width=2)


def loss_chart(runs: Sequence[tuple[str, str]], out: str) -> None:
    """One panel per (title, run folder) of ``jaxt2i train`` runs: the loss of every logged step (grey) and its
    running mean (log scale), from the run's ``metrics.jsonl``; written to ``out`` (PNG)."""
    width = 400
    image = Image.new("RGB", (width * len(runs), 330), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    for k, (title, run) in enumerate(runs):
        rows = [r for r in _read_jsonl(os.path.join(run, "metrics.jsonl")) if "loss" in r]
        steps, loss = [r["step"] for r in rows], [r["loss"] for r in rows]
        draw_panel(draw, (k * width, 0, (k + 1) * width, 320),
                   [(steps, loss, (190, 190, 190)), (steps, _smooth(loss, 10), (20, 130, 20))], title, "step")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    image.save(out)


def _wrap(text: str, width: int) -> list[str]:
    lines, line = [], ""
    for word in text.split():
        if len(line) + len(word) + 1 > width and line:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}".strip()
    return lines + [line]


def prompt_grid(pipe, out: str, steps: int, guidance: float, seed: int = 0) -> None:
    """A sheet of ``GRID_PROMPTS`` generated by ``pipe`` (one image each, labelled; held-out prompts in red)."""
    prompts = [p for p, _ in GRID_PROMPTS]
    images = pipe.text_to_image(prompts, steps=steps, guidance_scale=guidance, seed=seed)
    cols, cell, scale, text_h = 4, 200, 2, 56
    rows = math.ceil(len(prompts) / cols)
    sheet = Image.new("RGB", (cols * cell, rows * (cell - 64 + text_h)), (255, 255, 255))
    draw, font = ImageDraw.Draw(sheet), _font(12)
    for i, ((prompt, held), img) in enumerate(zip(GRID_PROMPTS, images)):
        r, c = divmod(i, cols)
        x, y = c * cell, r * (cell - 64 + text_h)
        tile = Image.fromarray(np.clip(np.round(np.asarray(img) * 255), 0, 255).astype(np.uint8))
        tile = tile.resize((64 * scale, 64 * scale), Image.NEAREST)
        sheet.paste(tile, (x + (cell - 64 * scale) // 2, y + 4))
        label = _wrap(prompt + (" (held-out)" if held else ""), 30)
        for k, line in enumerate(label[:3]):
            draw.text((x + 6, y + 8 + 64 * scale + 13 * k), line, fill=(150, 0, 0) if held else (0, 0, 0), font=font)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    sheet.save(out)


def first_image_seconds(prompt: str = "a red circle above a blue square", model: str | None = None) -> dict:
    """Seconds for ``jaxt2i generate`` (``model``, default the shipped one) from a fresh process: without the
    compilation cache, with an empty one and with a filled one."""
    result = {}
    with tempfile.TemporaryDirectory() as tmp:
        cache_dir = os.path.join(tmp, "xla")
        for label, cache in (("fresh_process_no_cache_s", "off"), ("fresh_process_cold_cache_s", cache_dir),
                             ("fresh_process_warm_cache_s", cache_dir)):
            env = dict(os.environ, JAXT2I_CACHE_DIR=cache)
            t0 = time.perf_counter()
            model_args = ["--model", model] if model else []
            subprocess.run([sys.executable, "-m", "jaxt2i.cli", "generate", prompt, *model_args, "--out",
                            os.path.join(tmp, "x.png")], env=env, check=True, capture_output=True)
            result[label] = round(time.perf_counter() - t0, 1)
    return result


def denoiser_cost(pipe) -> dict:
    """A latent-diffusion pipeline's denoiser: parameters and multiply-adds of one forward per image at the trained
    size (XLA's cost analysis of the compiled program, FLOPs / 2), with the text context of one prompt."""
    models, name = pipe.models, pipe.models.denoiser_name
    config = pipe.configs[name]
    side = config.sample_size
    x = jax.ShapeDtypeStruct((1, side, side, pipe.configs["vae"].latent_channels), jnp.float32)
    context = jax.eval_shape(lambda p, ids: latent_diffusion.encode_text(models, p, ids), pipe.params,
                             jax.ShapeDtypeStruct((1, pipe.tokenizer.max_length), jnp.int32))
    forward = jax.jit(lambda p, x, c: latent_diffusion.predict(models, p, x, jnp.zeros((1,), jnp.float32), c))
    cost = forward.lower(pipe.params, x, context).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    params = sum(int(np.prod(np.shape(a))) for a in jax.tree.leaves(pipe.params[name]))
    return {"denoiser": name, "params": params, "gmacs_per_image": round(float(cost["flops"]) / 2e9, 4)}


def warm_seconds_per_image(pipe, steps: int, guidance: float, batches: Sequence[int] = (1, 8)) -> dict:
    """Seconds per image of ``pipe.text_to_image`` once compiled, per batch size."""
    result = {}
    for batch in batches:
        prompts = ["a red circle above a blue square"] * batch
        pipe.text_to_image(prompts, steps=steps, guidance_scale=guidance)  # compile this batch size
        t0 = time.perf_counter()
        pipe.text_to_image(prompts, steps=steps, guidance_scale=guidance, seed=1)
        result[f"warm_per_image_batch{batch}_s"] = round((time.perf_counter() - t0) / batch, 3)
    return result


def _two_object_failure(target, detections) -> str:
    """What went wrong with one two-object prompt's image (or "correct"), from the detector's findings."""
    if adherence.score(target, detections).correct:
        return "correct"
    a, b = target.objects
    found = [(d.color, d.shape) for d in detections]
    has_a, has_b = (a.color, a.shape) in found, (b.color, b.shape) in found
    if has_a and has_b:
        return "both objects, wrong relation" if len(detections) == 2 else "both objects and extra ones"
    if has_a or has_b:
        other = b if has_a else a
        if any(c == other.color for c, _ in found):
            return "one object; the other's shape wrong"
        if any(sh == other.shape for _, sh in found):
            return "one object; the other's color wrong"
        return "one object; the other missing"
    if (a.color, b.shape) in found and (b.color, a.shape) in found:
        return "colors swapped between the shapes"
    return "neither object"


def _placement(target, detections, key: str) -> tuple[bool, bool] | None:
    """Where the two drawn objects are, whatever their other attribute: with exactly two detections, each matching
    one target object by ``key`` ("shape" or "color") alone, ``(axis right, relation right)`` -- the axis is
    horizontal for "left of" / "right of"; None when the objects cannot be told apart that way."""
    if len(detections) != 2:
        return None
    a, b = target.objects
    ia = [i for i, d in enumerate(detections) if getattr(d, key) == getattr(a, key)]
    ib = [i for i, d in enumerate(detections) if getattr(d, key) == getattr(b, key)]
    if len(ia) != 1 or len(ib) != 1 or ia == ib:
        return None
    got = detector.relation(detections[ia[0]], detections[ib[0]])
    horizontal = ("left of", "right of")
    return (got in horizontal) == (target.relation in horizontal), got == target.relation


def two_object_failures(paths: Sequence[str], guidance: float) -> tuple[dict, dict]:
    """Two-object prompts of saved evaluation images (``jaxt2i eval --save-images`` files, pooled) at one guidance
    scale: {split: Counter(outcome)} and {(split, "shape" | "color"): Counter(n, axis, direction)} -- where the two
    objects were placed, told apart by shape alone and by color alone."""
    counts: dict = collections.defaultdict(collections.Counter)
    placed: dict = collections.defaultdict(collections.Counter)
    key = f"{guidance:g}"
    for path in paths:
        texts, images, settings = report.load_eval_images(path)
        if key not in images:
            raise ValueError(f"{path} has no images at guidance {key} (it has {', '.join(images)})")
        prompts = report.eval_prompt_set(settings["n_per_group"], seed=settings["seed"])
        if [p.prompt for p in prompts] != list(texts):
            raise ValueError(f"{path}: its prompts are not the evaluation set its settings name; write it with "
                             f"`jaxt2i eval --save-images`")
        for p, image in zip(prompts, images[key]):
            if p.prompt_type == "two_object":
                detections = detector.detect(image)
                counts[p.split][_two_object_failure(p.target, detections)] += 1
                for by in ("shape", "color"):
                    where = _placement(p.target, detections, by)
                    if where is not None:
                        placed[(p.split, by)].update(n=1, axis=where[0], direction=where[1])
    return counts, placed
