"""Pictures and timings for docs/shapes_model.md: the loss curves, a grid of generated images, time to first image.

    python scripts/shapes_report.py losses --vae /work/runs/shapes_vae --clip /work/runs/shapes_clip \
        --unet /work/runs/shapes_unet --out docs/images/shapes_losses.png     # scripts/train_shapes_chain.sh's runs
    python scripts/shapes_report.py grid --out docs/images/shapes_grid.png        # the shipped model, defaults
    python scripts/shapes_report.py timing                                         # fresh-process + warm timings
    python scripts/shapes_report.py clip --clip /work/runs/shapes_clip             # what the CLIP text tower encodes
    python scripts/shapes_report.py pairs                                          # one-object errors per color-shape pair
    python scripts/shapes_report.py compare NEW.json [NEW2.json ...] --against OLD.json [OLD2.json ...]
                                                                   # eval reports as a table; several draws pooled
    python scripts/shapes_report.py failures IMAGES.npz [...] --guidance 3   # why two-object prompts fail
    python scripts/shapes_report.py side-probe [--text-encoder DIR]          # linear probes per text layer: where
                                                   # the second object goes; color and shape of unseen pairs
                                                   # (and of what a merging U-Net reads: its merge tags)
    python scripts/shapes_report.py flips IMAGES.npz [...] --detector-from REV --out docs/images/flips.png
                                     # saved eval images (jaxt2i eval --save-images) scored by this checkout's
                                     # detector and by the one at git revision REV: what changed, with pictures

Drawn with PIL only (no matplotlib). `grid` uses the shipped model (or --model) at its default steps (25) and
guidance (3.0); its prompts mix training combinations and held-out ones (marked "held-out").
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
from PIL import Image, ImageDraw, ImageFont

# (steps, guidance) for shapes models built before their folders recorded a recommendation (session 16): what
# they were always sampled and evaluated with.
SHAPES_SAMPLING = (25, 3.0)

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


def losses(args) -> None:
    """Three panels: VAE, CLIP and U-Net training loss. With --vae-clip-from, the VAE and CLIP panels are copied
    from an earlier picture of this command (for a U-Net retrained on the same frozen VAE and CLIP, whose logs
    are not at hand); the U-Net panel is always drawn from --unet's metrics.jsonl."""
    unet = _read_jsonl(os.path.join(args.unet, "metrics.jsonl"))
    image = Image.new("RGB", (1200, 330), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    if args.vae_clip_from:
        earlier = Image.open(args.vae_clip_from).convert("RGB")
        if earlier.size != image.size:
            raise SystemExit(f"{args.vae_clip_from} is {earlier.size[0]}x{earlier.size[1]}, not a picture of this "
                             f"command ({image.size[0]}x{image.size[1]}); pass --vae and --clip run folders instead.")
        image.paste(earlier.crop((0, 0, 800, image.size[1])), (0, 0))
    else:
        vae = _read_jsonl(os.path.join(args.vae, "log.jsonl"))
        clip = _read_jsonl(os.path.join(args.clip, "log.jsonl"))
        draw_panel(draw, (0, 0, 400, 320), [([r["step"] for r in vae], [r["loss"] for r in vae], (200, 30, 30))],
                   "KL-VAE: L2 reconstruction + 1e-4 KL (log)", "step")
        draw_panel(draw, (400, 0, 800, 320), [([r["step"] for r in clip], [r["loss"] for r in clip], (30, 30, 200))],
                   "CLIP: symmetric InfoNCE (log)", "step")
    steps, loss = [r["step"] for r in unet], [r["loss"] for r in unet]
    draw_panel(draw, (800, 0, 1200, 320), [(steps, loss, (190, 190, 190)), (steps, _smooth(loss, 10), (20, 130, 20))],
               "U-Net: min-SNR eps MSE (log; green: mean)", "step")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    image.save(args.out)
    print(f"wrote {args.out}")


def _wrap(text: str, width: int) -> list[str]:
    lines, line = [], ""
    for word in text.split():
        if len(line) + len(word) + 1 > width and line:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}".strip()
    return lines + [line]


def grid(args) -> None:
    from jaxt2i.cli import DEFAULT_MODEL
    from jaxt2i.pipeline import load_pipeline

    pipe = load_pipeline(args.model or DEFAULT_MODEL)
    steps, guidance = pipe.sampling_defaults(args.steps, args.guidance, fallback=SHAPES_SAMPLING)
    prompts = [p for p, _ in GRID_PROMPTS]
    images = pipe.text_to_image(prompts, steps=steps, guidance_scale=guidance, seed=args.seed)
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
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    sheet.save(args.out)
    print(f"wrote {args.out} ({len(prompts)} prompts, {steps} steps, guidance {guidance}, seed {args.seed})")


def timing(args) -> None:
    """Time to first image from a fresh process (cold: no compilation cache; warm: the persistent cache filled),
    and the warm per-image time in one process."""
    from jaxt2i.cli import DEFAULT_MODEL
    from jaxt2i.pipeline import load_pipeline

    result = {}
    with tempfile.TemporaryDirectory() as tmp:
        for label, cache in (("fresh_process_no_cache_s", "off"), ("fresh_process_cold_cache_s", os.path.join(tmp, "xla")),
                             ("fresh_process_warm_cache_s", os.path.join(tmp, "xla"))):
            env = dict(os.environ, JAXT2I_CACHE_DIR=cache)
            t0 = time.perf_counter()
            subprocess.run([sys.executable, "-m", "jaxt2i.cli", "generate", "a red circle above a blue square",
                            "--out", os.path.join(tmp, "x.png")], env=env, check=True, capture_output=True)
            result[label] = round(time.perf_counter() - t0, 1)
            print(label, result[label], flush=True)
    os.environ["JAXT2I_CACHE_DIR"] = "off"
    pipe = load_pipeline(args.model or DEFAULT_MODEL)
    steps, guidance = pipe.sampling_defaults()  # what `jaxt2i generate` uses
    pipe.text_to_image("a red circle", steps=steps, guidance_scale=guidance)
    for batch in (1, 8):
        prompts = ["a red circle above a blue square"] * batch
        pipe.text_to_image(prompts, steps=steps, guidance_scale=guidance)  # compile this batch size
        t0 = time.perf_counter()
        pipe.text_to_image(prompts, steps=steps, guidance_scale=guidance, seed=1)
        result[f"warm_per_image_batch{batch}_s"] = round((time.perf_counter() - t0) / batch, 3)
        print(f"warm_per_image_batch{batch}_s", result[f"warm_per_image_batch{batch}_s"], flush=True)
    print(json.dumps(result))


RELATION_PROBE = ("a red circle above a blue square", "a red circle below a blue square",
                  "a blue square below a red circle", "a blue square above a red circle")


def clip(args) -> None:
    """Per kind of contradiction (color, shape, size, relation, binding), how often an image is closer to its
    caption than to the contradicting one, on train and held-out scenes; and the cosines between the text
    embeddings of one scene's caption with the relation reversed (1.0 = the relation word is ignored)."""
    from jaxt2i.shapes import world as shapes
    from jaxt2i.eval import clip_metrics
    from jaxt2i.tokenizer import CLIPTokenizer
    from jaxt2i.train.clip_trainer import load_clip

    params, config = load_clip(args.clip)
    encode_images, encode_texts = clip_metrics.clip_encoders(params, config, CLIPTokenizer.default())
    result = {}
    for split in shapes.SPLITS:
        data = shapes.batch(args.seed + 3_000_017, 0, args.n, split)  # the CLIP trainer's evaluation stream
        result[split] = clip_metrics.hard_negative_report(encode_images, encode_texts, data["images"],
                                                          data["scenes"], args.seed)
        print(split, json.dumps(result[split]), flush=True)
    text = encode_texts(list(RELATION_PROBE))
    result["relation_probe_cosines"] = {f"{RELATION_PROBE[0]!r} vs {t!r}": round(float(text[0] @ text[i]), 4)
                                        for i, t in enumerate(RELATION_PROBE) if i}
    print(json.dumps(result["relation_probe_cosines"], indent=1))


def _token_state(pipe, prompt: str, position: int) -> np.ndarray:
    return np.asarray(pipe.encode_prompt([prompt]))[0, position].astype(np.float64)


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def pairs(args) -> None:
    """One-object prompts of the evaluation set (``jaxt2i eval``'s prompts and noise at one guidance scale): per
    color-shape pair, how often the detector finds it, and what it finds instead (right color with another shape,
    right shape with another color, neither); then per shape and object size. Then, for each held-out pair, where
    the U-Net's conditioning puts it: the cosine of the text state of "a COLOR SHAPE" at the shape word and at EOS
    (which the padding tokens resemble) with the same state for the other colors' SHAPE, and for COLOR's other
    shapes."""
    import collections

    from jaxt2i.cli import DEFAULT_MODEL
    from jaxt2i.shapes import world as shapes
    from jaxt2i.shapes import detector, report
    from jaxt2i.pipeline import load_pipeline

    pipe = load_pipeline(args.model or DEFAULT_MODEL)
    steps, guidance = pipe.sampling_defaults(args.steps, args.guidance, fallback=SHAPES_SAMPLING)
    prompts = report.eval_prompt_set(args.n, seed=args.seed)
    images = report.generate(pipe, [p.prompt for p in prompts], guidance, steps, args.seed)
    outcomes: dict = collections.defaultdict(collections.Counter)
    by_size: dict = collections.defaultdict(collections.Counter)
    for p, image in zip(prompts, images):
        if p.prompt_type != "one_object":
            continue
        obj = p.target.objects[0]
        found = [(d.color, d.shape) for d in detector.detect(np.clip(np.round(image * 255), 0, 255).astype(np.uint8))]
        if (obj.color, obj.shape) in found:
            kind = "right"
        elif any(c == obj.color for c, _ in found):
            kind = "right color, shape " + "/".join(sorted({sh for c, sh in found if c == obj.color}))
        elif any(sh == obj.shape for _, sh in found):
            kind = "right shape, other color"
        else:
            kind = "neither"
        outcomes[(p.split, obj.color, obj.shape)][kind] += 1
        by_size[(p.split, obj.shape, obj.size)][kind == "right"] += 1
    print(f"one-object prompts, guidance {guidance:g}, {steps} steps, seed {args.seed}:")
    for (split, color, shape), counts in sorted(outcomes.items()):
        n = sum(counts.values())
        others = ", ".join(f"{k} {v}" for k, v in counts.most_common() if k != "right")
        print(f"  {split:8s} {color} {shape}: {counts['right']}/{n} right" + (f" ({others})" if others else ""))
    print("by shape and the scene's object size (the prompt may not name the size):")
    for (split, shape, size), counts in sorted(by_size.items()):
        print(f"  {split:8s} {size} {shape}: {counts[True]}/{counts[True] + counts[False]} right")
    # token positions: [BOS, a/an, COLOR, SHAPE, EOS, ...]: every color and shape word is one BPE token
    print("text states of held-out pairs (cosine; shape word at position 3, EOS at 4):")
    for color, shape in shapes.heldout_combos()["color_shapes"]:
        for position, name in ((3, "shape word"), (4, "EOS")):
            own = _token_state(pipe, f"a {color} {shape}", position)
            same_shape = [_cos(own, _token_state(pipe, f"a {c} {shape}", position)) for c in shapes.COLORS if c != color]
            same_color = {t: round(_cos(own, _token_state(pipe, f"a {color} {t}", position)), 3)
                          for t in shapes.SHAPES if t != shape}
            print(f"  {color} {shape}, {name}: other colors' {shape} {np.mean(same_shape):.3f} (mean); "
                  f"{color} {same_color}")


def _fit_softmax(x: np.ndarray, y: np.ndarray, classes: int, steps: int = 3000, lr: float = 0.5, l2: float = 1e-3):
    """A standardised L2-regularised multinomial logistic regression by gradient descent; returns
    ``predict(x) -> class indices``."""
    mean, std = x.mean(0), x.std(0) + 1e-6
    z = (x - mean) / std
    w, b, onehot = np.zeros((x.shape[1], classes)), np.zeros(classes), np.eye(classes)[y]
    for _ in range(steps):
        logits = z @ w + b
        p = np.exp(logits - logits.max(1, keepdims=True))
        g = p / p.sum(1, keepdims=True) - onehot
        w -= lr * (z.T @ g / len(y) + l2 * w)
        b -= lr * g.mean(0)
    return lambda x_new: np.argmax(((x_new - mean) / std) @ w + b, axis=1)


def side_probe(args) -> None:
    """Where does the text tower say which side the second-named object of a two-object caption goes (right /
    below: 1, left / above: 0; chance 50%)? Per layer (0 = embeddings) and token (the first object's shape word,
    the second's, EOS), a logistic regression on the final-LN'd state is fit on train-split captions and scored on
    fresh train captions and on held-out-split ones. The causal tower cannot know it at the first object's words.
    Then, the same way, the color and the shape of a one-object caption's object from its shape word: on held-out
    captions these are color-shape pairs the text tower never saw. For a model whose U-Net merges two text layers
    (``context_merge_rank``), also the r numbers per token that its merge takes from the second layer."""
    import jax.numpy as jnp

    from jaxt2i.cli import DEFAULT_MODEL
    from jaxt2i.shapes import world as shapes
    from jaxt2i.models import clip as clip_model
    from jaxt2i.pipeline import load_pipeline
    from jaxt2i.train.clip_trainer import caption_parse_targets, load_text_encoder

    pipe = load_pipeline(args.model or DEFAULT_MODEL)
    encoder, params = pipe.models.text_encoder, pipe.params["text_encoder"]
    if args.text_encoder:
        params, config = load_text_encoder(args.text_encoder)
        encoder = clip_model.CLIPTextModel(config)
    # a U-Net that merges two text layers (UNetConfig.context_merge_rank) reads the second one only through its
    # rank-r map: probe those r numbers per token too (they belong to the model's own text encoder)
    merge = None if args.text_encoder else pipe.params["unet"].get("context_merge")

    def features(split: str, n: int, seed: int, n_objects: int):
        """States {(layer, token): [n, D]} and labels {name: [n]} of n fresh captions."""
        captions = [shapes.caption(shapes.scene(seed, i, split, n_objects=n_objects),
                                   np.random.default_rng([seed, i])) for i in range(n)]
        ids = pipe.tokenize(captions)
        targets = caption_parse_targets(pipe.tokenizer, captions, ids.shape[1])
        shape_words = np.array([np.nonzero(row >= 0)[0] for row in targets["color"]])  # [n, n_objects]
        if n_objects == 2:
            side = np.array([row[row >= 0][0] for row in targets["side"]])
            labels = {"side": np.isin(side, [shapes.RELATIONS.index(r) for r in ("right of", "below")]).astype(int)}
            positions = {"object 1": shape_words[:, 0], "object 2": shape_words[:, 1],
                         "EOS": np.argmax(ids == pipe.tokenizer.eos_token_id, axis=1)}
        else:
            labels = {name: np.array([row[row >= 0][0] for row in targets[name]]) for name in ("color", "shape")}
            positions = {"shape word": shape_words[:, 0]}
        states = {}
        for layer in range(encoder.config.num_layers + 1):
            h = np.asarray(encoder.apply({"params": params}, jnp.asarray(ids), layer,
                                         method=clip_model.CLIPTextModel.encode), np.float64)
            states.update({(layer, name): h[np.arange(n), pos] for name, pos in positions.items()})
        if merge is not None:  # what the U-Net's context merge passes on from its second text layer
            layer = pipe.models.text_layer[1] % (encoder.config.num_layers + 1)
            down = {k: np.asarray(v, np.float64) for k, v in merge["down"].items()}
            for name, pos in positions.items():
                h = states[(layer, name)]
                states[(f"merge tags ({down['kernel'].shape[1]} numbers from layer {layer})", name)] = (
                    h @ down["kernel"] + down["bias"])
        return states, labels

    for n_objects, heads in ((2, {"side": 2}), (1, {"color": len(shapes.COLORS), "shape": len(shapes.SHAPES)})):
        fit, y_fit = features("train", args.n, args.seed, n_objects)
        fresh, y_fresh = features("train", args.n // 4, args.seed + 1, n_objects)
        held, y_held = features("heldout", args.n // 4, args.seed, n_objects)
        for head, classes in heads.items():
            print(f"\n{n_objects}-object captions, {head}:")
            print(f"| layer | token | fit (train, {args.n}) | fresh train ({args.n // 4}) | held-out ({args.n // 4}) |")
            print("|---|---|---|---|---|")
            for key, x in fit.items():
                predict = _fit_softmax(x, y_fit[head], classes)
                scores = [np.mean(predict(f[key]) == y[head]) for f, y in ((fit, y_fit), (fresh, y_fresh),
                                                                           (held, y_held))]
                print(f"| {key[0]} | {key[1]} | " + " | ".join(f"{100 * v:.1f}%" for v in scores) + " |")


def parse_heads(args) -> None:
    """How well the parse heads a CLIP run saved (``OUT/parse_heads/``) read fresh captions: per head and class,
    the share of tokens whose argmax is right, on train-split and held-out-split captions of one and two objects,
    tokenised to the full 77 positions (what a U-Net sees; the CLIP trained on the first ``text_length``)."""
    import jax.numpy as jnp

    from jaxt2i.shapes import world as shapes
    from jaxt2i.models import clip as clip_model
    from jaxt2i.tokenizer import CLIPTokenizer
    from jaxt2i.train.clip_trainer import PARSE_TARGETS, caption_parse_targets, load_parse_heads, load_text_encoder

    heads, _ = load_parse_heads(args.clip)
    params, config = load_text_encoder(args.clip)
    encoder, tokenizer = clip_model.CLIPTextModel(config), CLIPTokenizer.default(pad="eos")
    for split in ("train", "heldout"):
        captions = [shapes.caption(shapes.scene(args.seed, i, split), np.random.default_rng([args.seed, i]))
                    for i in range(args.n)]
        ids = np.asarray(tokenizer(captions), np.int32)
        states = np.asarray(encoder.apply({"params": params}, jnp.asarray(ids)).last_hidden_state)
        targets = caption_parse_targets(tokenizer, captions, ids.shape[1])
        print(f"\n{split}: {args.n} captions, {ids.shape[1]} tokens each")
        print("| head | class | tokens | right |")
        print("|---|---|---|---|")
        for name, head in heads.items():
            predicted = np.argmax(states @ np.asarray(head["kernel"]) + np.asarray(head["bias"]), axis=-1)
            for c, label in enumerate(PARSE_TARGETS[name]):
                where = targets[name] == c
                if where.any():
                    print(f"| {name} | {label} | {int(where.sum())} | {100 * np.mean(predicted[where] == c):.2f}% |")


def compare(args) -> None:
    """``jaxt2i.shapes.report.markdown_comparison`` of eval reports: several draws pooled, --against in brackets."""
    from jaxt2i.shapes.report import markdown_comparison

    def read(path):
        with open(path) as f:
            return json.load(f)

    print(markdown_comparison([read(f) for f in args.reports], [read(f) for f in args.against]), end="")


def _two_object_failure(target, detections) -> str:
    """What went wrong with one two-object prompt's image (or "correct"), from the detector's findings."""
    from jaxt2i.shapes import adherence

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
    from jaxt2i.shapes import detector

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


def failures(args) -> None:
    """Two-object prompts of saved evaluation images (``jaxt2i eval --save-images``, several draws pooled) at one
    guidance scale, sorted by what went wrong, per split; then where the two objects were placed (the relation's
    axis and direction, objects told apart by shape alone and by color alone)."""
    import collections

    from jaxt2i.shapes import detector, report

    counts: dict = collections.defaultdict(collections.Counter)
    placed: dict = collections.defaultdict(collections.Counter)
    for path in args.images:
        texts, images, settings = report.load_eval_images(path)
        key = f"{args.guidance:g}"
        if key not in images:
            raise SystemExit(f"{path} has no images at guidance {key} (it has {', '.join(images)})")
        prompts = report.eval_prompt_set(settings["n_per_group"], seed=settings["seed"])
        if [p.prompt for p in prompts] != list(texts):
            raise SystemExit(f"{path}: its prompts are not the evaluation set its settings name; was it written "
                             f"by `jaxt2i eval --save-images`?")
        for p, image in zip(prompts, images[key]):
            if p.prompt_type == "two_object":
                detections = detector.detect(image)
                counts[p.split][_two_object_failure(p.target, detections)] += 1
                for by in ("shape", "color"):
                    where = _placement(p.target, detections, by)
                    if where is not None:
                        placed[(p.split, by)].update(n=1, axis=where[0], direction=where[1])
    for split, c in sorted(counts.items()):
        n = sum(c.values())
        print(f"{split} ({n} two-object prompts, guidance {args.guidance:g}):")
        for kind, k in c.most_common():
            print(f"  {kind:38s} {k:4d}  {100 * k / n:5.1f}%")
        for by in ("shape", "color"):
            c = placed[(split, by)]
            if c["n"]:
                print(f"  placement, two objects told apart by {by} ({c['n']} images): axis right "
                      f"{100 * c['axis'] / c['n']:.0f}%, relation right {100 * c['direction'] / c['n']:.0f}%")


def _detector_at(revision: str):
    """``jaxt2i.shapes.detector`` as it was at git revision ``revision`` of this repository, as a module."""
    import importlib.util

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    source = subprocess.run(["git", "show", f"{revision}:jaxt2i/eval/detector.py"], cwd=root, capture_output=True,
                            text=True)
    if source.returncode != 0:
        raise SystemExit(f"git show {revision}:jaxt2i/eval/detector.py failed: {source.stderr.strip()}")
    path = os.path.join(tempfile.mkdtemp(), f"detector_{revision}.py")
    with open(path, "w") as f:
        f.write(source.stdout)
    spec = importlib.util.spec_from_file_location(f"detector_{revision}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def flips(args) -> None:
    """Saved evaluation images (``jaxt2i eval --save-images``) scored by this checkout's detector and by the one
    at ``--detector-from``: accuracy per guidance, split and prompt type under both, and a sheet of every image
    whose verdict differs, labelled with what each detector found."""
    from jaxt2i.shapes import adherence, detector, report

    old = _detector_at(args.detector_from)
    counts: dict = {}
    tiles = []
    font = _font(10)

    def found(det, image):
        return ", ".join(f"{d.color} {d.shape}" for d in det.detect(image)) or "nothing"

    for path in args.images:
        texts, images, settings = report.load_eval_images(path)
        if "n_per_group" not in settings:
            raise SystemExit(f"{path} holds no settings (n, seed); write it with the current jaxt2i eval --save-images")
        prompts = report.eval_prompt_set(settings["n_per_group"], seed=settings["seed"])
        if [p.prompt for p in prompts] != texts:
            raise SystemExit(f"{path}: its prompts are not jaxt2i eval's for n={settings['n_per_group']}, "
                             f"seed={settings['seed']}")
        for g, batch in images.items():
            for p, image in zip(prompts, batch):
                verdicts = [adherence.score(p.target, d.detect(image)).correct for d in (old, detector)]
                for name, ok in zip(("old", "new"), verdicts):
                    c = counts.setdefault((g, p.split, p.prompt_type, name), [0, 0])
                    c[0] += ok
                    c[1] += 1
                if verdicts[0] != verdicts[1]:
                    tiles.append((p.prompt, g, verdicts[1], found(old, image), found(detector, image), image))
    print(f"accuracy, detector at {args.detector_from} -> this checkout's ({', '.join(args.images)}):")
    for (g, split, kind, name), (ok, n) in sorted(counts.items()):
        if name == "old":
            new_ok = counts[(g, split, kind, "new")][0]
            print(f"  guidance {g:>3s} {split:8s} {kind:10s}: {ok}/{n} = {100 * ok / n:.1f}% -> "
                  f"{new_ok}/{n} = {100 * new_ok / n:.1f}%")
    gained = sum(t[2] for t in tiles)
    print(f"{len(tiles)} verdicts changed: {gained} now right, {len(tiles) - gained} now wrong")
    if not tiles or not args.out:
        return
    cols, cell_w, cell_h, scale = 6, 200, 64 * 3 + 52, 3
    sheet = Image.new("RGB", (cols * cell_w, math.ceil(len(tiles) / cols) * cell_h), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for i, (prompt, g, now_right, before, after, image) in enumerate(tiles):
        x, y = (i % cols) * cell_w, (i // cols) * cell_h
        sheet.paste(Image.fromarray(image).resize((64 * scale, 64 * scale), Image.NEAREST), (x + 4, y + 2))
        lines = [(f"{prompt} (g{g})", (0, 0, 0)), (f"before: {before}", (150, 0, 0)),
                 (f"now: {after}", (0, 110, 0) if now_right else (150, 0, 0))]
        for k, (line, color) in enumerate(lines):
            draw.text((x + 4, y + 64 * scale + 4 + 12 * k), line[:38], fill=color, font=font)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    sheet.save(args.out)
    print(f"wrote {args.out}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="what", required=True)
    lo = sub.add_parser("losses")
    lo.add_argument("--vae", default="/work/runs/shapes_vae")
    lo.add_argument("--clip", default="/work/runs/shapes_clip")
    lo.add_argument("--unet", default="/work/runs/shapes_unet")
    lo.add_argument("--out", default="docs/images/shapes_losses.png")
    lo.add_argument("--vae-clip-from", default=None, metavar="PNG",
                    help="copy the VAE and CLIP panels from an earlier picture instead of drawing them from logs")
    gr = sub.add_parser("grid")
    gr.add_argument("--model", default=None)
    gr.add_argument("--steps", type=int, default=None, help="default: the model's recommendation (else 25)")
    gr.add_argument("--guidance", type=float, default=None, help="default: the model's recommendation (else 3)")
    gr.add_argument("--seed", type=int, default=0)
    gr.add_argument("--out", default="docs/images/shapes_grid.png")
    ti = sub.add_parser("timing")
    ti.add_argument("--model", default=None)
    cl = sub.add_parser("clip")
    cl.add_argument("--clip", default="/work/runs/shapes_clip", help="a scripts/train_shapes_clip.py output folder")
    cl.add_argument("--n", type=int, default=256, help="scenes per split")
    cl.add_argument("--seed", type=int, default=0, help="the CLIP config's seed (held-out numbers then equal "
                                                        "metrics.json's hard_negatives_heldout)")
    pa = sub.add_parser("pairs")
    pa.add_argument("--model", default=None)
    pa.add_argument("--n", type=int, default=50, help="prompts per split and prompt type (as jaxt2i eval --n)")
    pa.add_argument("--guidance", type=float, default=None, help="default: the model's recommendation (else 3)")
    pa.add_argument("--steps", type=int, default=None, help="default: the model's recommendation (else 25)")
    pa.add_argument("--seed", type=int, default=0)
    co = sub.add_parser("compare")
    co.add_argument("reports", nargs="+", help="jaxt2i eval --out JSON files (draws with other seeds are pooled)")
    co.add_argument("--against", nargs="*", default=[], help="reports of the model to compare with, pooled too")
    fa = sub.add_parser("failures")
    fa.add_argument("images", nargs="+", help="jaxt2i eval --save-images files (pooled)")
    fa.add_argument("--guidance", type=float, default=3.0)
    sp = sub.add_parser("side-probe")
    sp.add_argument("--model", default=None, help="model folder (default: the shipped one)")
    sp.add_argument("--text-encoder", default=None, help="a CLIP trainer output folder: probe its text tower instead")
    sp.add_argument("--n", type=int, default=2000, help="train captions to fit on (a quarter as many to score)")
    sp.add_argument("--seed", type=int, default=0)
    ph = sub.add_parser("parse-heads")
    ph.add_argument("--clip", required=True, help="a CLIP trainer output folder with parse_heads/")
    ph.add_argument("--n", type=int, default=500, help="captions per split")
    ph.add_argument("--seed", type=int, default=0)
    fl = sub.add_parser("flips")
    fl.add_argument("images", nargs="+", help="jaxt2i eval --save-images files")
    fl.add_argument("--detector-from", required=True, metavar="REV", help="git revision of the detector to compare")
    fl.add_argument("--out", default=None, help="PNG of the images whose verdict changed")
    args = p.parse_args(argv)
    {"losses": losses, "grid": grid, "timing": timing, "clip": clip, "pairs": pairs,
     "compare": compare, "flips": flips, "failures": failures, "side-probe": side_probe,
     "parse-heads": parse_heads}[args.what](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
