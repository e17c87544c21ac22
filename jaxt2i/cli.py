"""The ``jaxt2i`` command: generate, img2img, inpaint, convert, train, eval."""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Sequence

import jax
import numpy as np
import tqdm

from jaxt2i import generate_batch
from jaxt2i import images as imio
from jaxt2i.convert import load
from jaxt2i.diffusion.samplers import SAMPLERS
from jaxt2i.dtypes import DTYPES
from jaxt2i.eval import clip_metrics
from jaxt2i.eval.rerank import best_of
from jaxt2i.pipelines import load_pipeline
from jaxt2i.pipelines.common import check_sampling_args
from jaxt2i.shapes.cli import eval_main
from jaxt2i.shipped import DEFAULT_MODEL, SHIPPED_MODELS, model_path
from jaxt2i.tokenizer import valid_unicode
from jaxt2i.train import distributed
from jaxt2i.train.cli import train_main
from jaxt2i.usage import Parser


class CLIError(Exception):
    """A problem with the command line the user can fix; printed without a traceback."""


# --------------------------------------------------------------------------------------------- arguments
SIZE_RULE = ("positive multiples of the model's size step: the VAE's factor x the U-Net's downsampling "
             "(2**(blocks-1)) or the DiT's patch size, 16 pixels for the shipped shapes model")


def _parse_size(text: str) -> tuple[int, int]:
    try:
        width, height = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--size must look like 512x512 (WIDTHxHEIGHT); got {text!r}.") from None
    if width <= 0 or height <= 0:
        raise argparse.ArgumentTypeError(f"--size {width}x{height}: width and height must be {SIZE_RULE}.")
    return width, height


def _add_sampling_args(p: argparse.ArgumentParser, default_strength: float | None = None,
                       prompt_optional: bool = False) -> None:
    p.add_argument("prompt", nargs="?" if prompt_optional else None, help="what to draw")
    p.add_argument("--model", default=None, help="diffusers folder, single .safetensors/.ckpt, jaxt2i folder, or the "
                   f"name of a shipped model ({', '.join(SHIPPED_MODELS)}; default: {DEFAULT_MODEL}, the small "
                   "shapes model)")
    p.add_argument("--config", default=None, help="architecture of a single file: preset name or diffusers folder")
    p.add_argument("--negative", default=None, help="negative prompt")
    p.add_argument("--steps", type=int, default=None,
                   help="denoising steps (default: the model's recommendation in its jaxt2i.json, else 50)")
    p.add_argument("--guidance", type=float, default=None,
                   help="classifier-free guidance scale, <= 1 turns it off (default: the model's recommendation in "
                        "its jaxt2i.json, else 7.5)")
    p.add_argument("--sampler", default="ddim", choices=SAMPLERS, help="sampler (default: ddim)")
    p.add_argument("--karras", action="store_true", help="Karras sigmas (lms, euler, heun, dpmpp_2m)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num", type=int, default=1, help="images to generate (saved as a grid)")
    p.add_argument("--candidates", type=int, default=1,
                   help="draw N candidates per image and keep the one the model's small CLIP scores closest to the "
                        "prompt (DALL-E's reranking; needs a CLIP: the shipped model has one; default 1)")
    p.add_argument("--clip", default=None, help="CLIP folder for --candidates (default: the model folder's "
                                                "clip_vision/)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--out", default="jaxt2i.png", help="PNG to write (never overwritten: a free name is chosen)")
    if default_strength is not None:
        p.add_argument("--strength", type=float, default=default_strength,
                       help=f"how much of the image is re-noised, in (0, 1] (default {default_strength})")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="jaxt2i", description="Text-to-image generation in JAX.")
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="text -> image")
    _add_sampling_args(gen, prompt_optional=True)
    gen.add_argument("--size", type=_parse_size, default=None,
                     help=f"WIDTHxHEIGHT, {SIZE_RULE} (default: the model's trained size)")
    gen.add_argument("--prompts-file", default=None,
                     help="many prompts instead of PROMPT: one per line, or JSON Lines with \"prompt\" and optional "
                          "\"seed\", \"steps\", \"guidance\", \"negative\", \"size\"; --num images per prompt "
                          "(seeds SEED, SEED+1, ...), one PNG each in --outdir, batched over every device, resumable")
    gen.add_argument("--outdir", default=None, help="folder of the --prompts-file images (a rerun with the same "
                                                    "arguments finishes it; finished images are never rewritten)")
    gen.add_argument("--batch-size", type=int, default=8,
                     help="--prompts-file images per program call, rounded up to a multiple of the device count "
                          "(default 8)")
    i2i = sub.add_parser("img2img", help="text + image -> image")
    _add_sampling_args(i2i, default_strength=0.8)
    i2i.add_argument("--image", required=True, help="input image file")
    inp = sub.add_parser("inpaint", help="text + image + mask -> image (white mask pixels are repainted)")
    _add_sampling_args(inp, default_strength=1.0)
    inp.add_argument("--image", required=True, help="input image file")
    inp.add_argument("--mask", required=True, help="mask image of the same size; white = repaint")
    conv = sub.add_parser("convert", help="convert a checkpoint (default: to jaxt2i's fast-loading format)")
    conv.add_argument("src", help="diffusers folder, single .safetensors/.ckpt, or jaxt2i folder")
    conv.add_argument("dst", help="destination folder (or .safetensors for --to single-file)")
    conv.add_argument("--to", default="jaxt2i", choices=("jaxt2i", "diffusers", "single-file"))
    conv.add_argument("--config", default=None, help="architecture of a single file: preset name or diffusers folder")
    conv.add_argument("--ema", action="store_true", help="take the EMA U-Net weights of a single file")
    conv.add_argument("--dtype", default=None, choices=("float32", "float16", "bfloat16"),
                      help="storage dtype of the written weights (default: as read)")
    sub.add_parser("train", help="train or fine-tune: jaxt2i train CONFIG.yaml [key=value ...]", add_help=False)
    sub.add_parser("eval", help="prompt-adherence evaluation of a shapes-world model", add_help=False)
    return parser


# ---------------------------------------------------------------------------------------------- commands
def _free_path(path: str) -> str:
    """``path`` if it does not exist, else ``stem-1.png``, ``stem-2.png``, ... (never overwrite a user's file)."""
    if not os.path.exists(path):
        return path
    stem, ext = os.path.splitext(path)
    n = 1
    while os.path.exists(f"{stem}-{n}{ext}"):
        n += 1
    return f"{stem}-{n}{ext}"


def _load(args):
    model = model_path(args.model or DEFAULT_MODEL)
    if args.model is None and not os.path.isdir(model):
        raise CLIError("No --model given and this jaxt2i install ships no default model; pass --model PATH "
                       "(a diffusers folder, a .safetensors/.ckpt file or a `jaxt2i convert` folder).")
    if not os.path.exists(model):
        raise CLIError(f"--model {args.model}: no such file or folder, and no shipped model of that name "
                       f"({', '.join(SHIPPED_MODELS)}).")
    t0 = time.perf_counter()
    pipe = load_pipeline(model, config=args.config, dtype=args.dtype)
    print(f"loaded {model} in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    return pipe, model


def _ranking_clip(args, model: str, pipe):
    """The CLIP encoders that rank ``--candidates``: ``--clip``, else the model's ``clip_vision`` component."""
    clip = clip_metrics.clip_for_model(pipe, args.clip)
    if clip is None:
        raise CLIError(f"--candidates {args.candidates} needs a CLIP to rank the images and {args.clip or model} has "
                       "none (no clip_vision component); pass --clip FOLDER, or leave --candidates at 1.")
    return clip


class _Progress:
    """A tqdm bar (stderr) over the model calls of each sampling run, called as fn(done, total). The first call
    (compiling it, or loading it from the persistent compilation cache) is timed apart; the rate counts the rest."""

    def __init__(self):
        self.start, self.bar = time.perf_counter(), None
        print("preparing (the first run of a shape compiles; later runs reuse the cache)...", file=sys.stderr,
              flush=True)

    def __call__(self, done: int, total: int):
        now = time.perf_counter()
        if done == 0:  # a new run: its setup is done
            self.start = now
        elif done == 1:
            self.bar = tqdm.tqdm(total=total, initial=1, desc="sampling", unit="call", smoothing=0, file=sys.stderr,
                                 postfix=f"first call {now - self.start:.1f} s")
        else:
            self.bar.update(done - self.bar.n)
        if done == total and self.bar is not None:
            self.bar.close()


def _check_output_path(path: str, flag: str) -> None:
    """Refuses an output path whose folder does not exist, or that names a folder (nothing is written then)."""
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise CLIError(f"{flag} {path}: the folder {folder} does not exist; create it first (nothing was written).")
    if os.path.isdir(path):
        raise CLIError(f"{flag} {path} is a folder; give a file name inside it.")


def _validate_sampling_args(args) -> None:
    """Every check of generate / img2img / inpaint's arguments that needs no model, before the model loads (the
    size rule needs the model: the pipeline checks it, with the same message as its Python API). Undecodable bytes
    in the prompts (lone surrogates) become U+FFFD, for the tokenizer and the PNG's text."""
    args.prompt = None if args.prompt is None else valid_unicode(args.prompt)
    args.negative = None if args.negative is None else valid_unicode(args.negative)
    if args.num < 1:
        raise CLIError("--num must be >= 1.")
    if args.candidates < 1:
        raise CLIError("--candidates must be >= 1.")
    try:
        check_sampling_args(steps=args.steps, guidance_scale=args.guidance, strength=getattr(args, "strength", None),
                            sampler=args.sampler)
    except ValueError as e:
        raise CLIError(str(e)) from None
    if getattr(args, "outdir", None) is None:  # --prompts-file writes into --outdir instead
        _check_output_path(args.out, "--out")
        if not args.out.lower().endswith(".png"):
            raise CLIError(f"--out {args.out}: give a .png file name (images are written as PNG).")
    for flag in ("image", "mask"):
        path = getattr(args, flag, None)
        if path is not None and not os.path.isfile(path):
            raise CLIError(f"--{flag} {path}: no such file.")


def _run_sampling(args, kind: str) -> int:
    _validate_sampling_args(args)
    pipe, model = _load(args)
    if kind != "generate" and not hasattr(pipe, "image_to_image"):
        raise CLIError(f"{model} is a {type(pipe).__name__} model; it generates from prompts only (jaxt2i generate), "
                       f"it has no {kind}.")
    clip = _ranking_clip(args, model, pipe) if args.candidates > 1 else None
    steps, guidance = pipe.sampling_defaults(args.steps, args.guidance)
    prompts = [args.prompt] * args.num
    common = dict(negative_prompt=args.negative, steps=steps, guidance_scale=guidance, sampler=args.sampler,
                  use_karras_sigmas=args.karras, progress=_Progress())
    if kind == "generate":
        width, height = args.size or pipe.default_size[::-1]

        def draw(seed):
            return pipe.text_to_image(prompts, height=height, width=width, seed=seed, **common)
    else:
        image = imio.load_image(args.image)
        h, w = image.shape[:2]
        if kind == "img2img":
            def draw(seed):
                return pipe.image_to_image(prompts, image, strength=args.strength, seed=seed, **common)
        else:
            mask = imio.load_mask(args.mask, (w, h))

            def draw(seed):
                return pipe.inpaint(prompts, image, mask, strength=args.strength, seed=seed, **common)
    t0 = time.perf_counter()
    out, _ = best_of(draw, prompts, args.candidates, args.seed, clip)
    elapsed = time.perf_counter() - t0
    meta = {"prompt": args.prompt, "negative_prompt": args.negative or "", "steps": steps, "guidance": guidance,
            "sampler": args.sampler, "karras": args.karras, "seed": args.seed, "size": f"{out.shape[2]}x{out.shape[1]}",
            "model": model, "command": kind, "software": "jaxt2i"}
    if hasattr(pipe, "image_metadata"):  # a family's own settings (DALL-E: sampler, temperature, top-k, top-p)
        meta.update(pipe.image_metadata(guidance_scale=guidance))
    if kind != "generate":
        meta["strength"] = args.strength
    if args.candidates > 1:
        meta["candidates"] = args.candidates
    path = imio.save_png(_free_path(args.out), out, meta)
    print(f"wrote {path} ({len(out)} image(s), {elapsed:.1f} s)", file=sys.stderr)
    return 0


def _generate_many(args) -> int:
    """`jaxt2i generate --prompts-file FILE --outdir DIR` (:mod:`jaxt2i.generate_batch`)."""
    if args.prompt is not None or args.prompts_file is None or args.outdir is None:
        raise CLIError("give PROMPT (one image file, --out), or --prompts-file FILE with --outdir DIR (many images).")
    _validate_sampling_args(args)
    if args.batch_size < 1:
        raise CLIError("--batch-size must be >= 1.")
    rows = generate_batch.read_prompts(args.prompts_file)
    distributed.maybe_initialize()  # several processes (JAXT2I_* variables) share the prompts
    pipe, model = _load(args)
    clip = _ranking_clip(args, model, pipe) if args.candidates > 1 else None
    return generate_batch.run(args, rows, pipe, model, clip)


def _convert(args) -> int:
    if os.path.exists(args.dst):
        raise CLIError(f"{args.dst} already exists; choose a new destination (nothing was written).")
    _check_output_path(args.dst, "destination")
    t0 = time.perf_counter()
    model = load.read_any(model_path(args.src), config=args.config, ema=args.ema)
    if args.dtype:
        dtype = DTYPES[args.dtype]
        model.params = {k: jax.tree.map(lambda a: np.asarray(a, dtype), v) for k, v in model.params.items()}
    writer = {"jaxt2i": load.write_native, "diffusers": load.write_diffusers_folder,
              "single-file": load.write_single_file}[args.to]
    try:
        writer(args.dst, model)
    except OSError as e:  # the writers stage everything and rename at the end: a failure leaves nothing behind
        raise CLIError(f"writing {args.dst} failed ({e.strerror or e}); nothing was written and {args.src} is "
                       "untouched.") from None
    print(f"converted {args.src} -> {args.dst} ({args.to}) in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "train":
        return train_main(argv[1:])
    if argv and argv[0] == "eval":
        return eval_main(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        if args.command == "generate" and (args.prompt is None or args.prompts_file or args.outdir):
            return _generate_many(args)
        if args.command in ("generate", "img2img", "inpaint"):
            return _run_sampling(args, args.command)
        if args.command == "convert":
            return _convert(args)
    except CLIError as e:
        print(f"jaxt2i {args.command}: error: {e}", file=sys.stderr)
        return 2
    except (ValueError, OSError) as e:  # bad inputs and files; OSError: a full disk, a write refused
        print(f"jaxt2i {args.command}: error: {e}", file=sys.stderr)
        return 2
    except jax.errors.JaxRuntimeError as e:
        if not out_of_memory(e):
            raise
        print(f"jaxt2i {args.command}: error: out of device memory ({first_line(e)}); use a smaller --size or "
              "--batch-size, --dtype bfloat16, or a device with more memory.", file=sys.stderr)
        return 1
    return 1


def out_of_memory(error: BaseException) -> bool:
    """Whether a JAX runtime error is an allocation failure (XLA's RESOURCE_EXHAUSTED)."""
    text = str(error)
    return "RESOURCE_EXHAUSTED" in text or "Out of memory" in text or "out of memory" in text


def first_line(error: BaseException, limit: int = 200) -> str:
    """The first line of an error's message, cut to ``limit`` characters."""
    line = (str(error).strip().splitlines() or [type(error).__name__])[0]
    return line if len(line) <= limit else line[: limit - 3] + "..."


if __name__ == "__main__":
    sys.exit(main())
