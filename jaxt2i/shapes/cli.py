"""``jaxt2i eval``: the shapes-world evaluation of a model (prompt adherence, CLIP score, Frechet distance).

    jaxt2i eval [--model PATH] [--guidance 1,3,5] [--n N] [--steps S] [--seed SEED] [--candidates N] [--out F]
                [--save-images F.npz] [--from-images F.npz] [--clip FOLDER] [--reference-cache DIR]

Generates ``4 * N`` images (N prompts per split -- train / held-out -- and prompt type -- one / two objects) at each
guidance scale with the model's ``text_to_image`` and scores them (``jaxt2i.shapes.report``), whatever the model's
family. Writes the JSON report to ``--out`` and the same numbers as markdown tables to ``--out`` with ``.md`` (and
prints the tables). The default model is the shipped one.

The metrics are streaming statistics: images are generated, scored and dropped a batch at a time, so memory stays
flat for any N. Batches are split over the local devices, and over processes when the run is started as several
(``JAXT2I_COORDINATOR``, ``JAXT2I_NUM_PROCESSES``, ``JAXT2I_PROCESS_ID``, as for ``jaxt2i train``); process 0 writes
the report. The real renders' feature statistics are cached in ``--reference-cache``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax

from jaxt2i.eval import clip_metrics
from jaxt2i.pipelines import load_pipeline
from jaxt2i.shapes import SHIPPED_MODEL, report
from jaxt2i.shipped import SHIPPED_MODELS, model_path
from jaxt2i.train import distributed


class EvalError(Exception):
    """A user error: printed without a traceback, exit status 2."""


DEFAULT_GUIDANCE, DEFAULT_STEPS = (1.0, 3.0, 5.0), 25


def default_reference_cache() -> str:
    """``$JAXT2I_EVAL_CACHE``, else ``~/.cache/jaxt2i/eval``."""
    return os.environ.get("JAXT2I_EVAL_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "jaxt2i", "eval")


def _parse_guidance(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise EvalError(f"--guidance {text!r}: give comma-separated numbers, e.g. --guidance 1,3,5") from None
    if not values:
        raise EvalError("--guidance needs at least one scale, e.g. --guidance 3")
    return values


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="jaxt2i eval", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help=f"model folder or file, or a shipped model's name "
                   f"({', '.join(SHIPPED_MODELS)}; default: the shipped {SHIPPED_MODEL})")
    p.add_argument("--guidance", default=None, help="comma-separated guidance scales (default 1,3,5 and the "
                                                    "model's recommended scale, from its jaxt2i.json)")
    p.add_argument("--n", type=int, default=25, help="prompts per split and prompt type (default 25: 100 prompts)")
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default: the model's recommendation, "
                                                           "else 25)")
    p.add_argument("--sampler", default=None, help="sampler of a diffusion model (default: the model's, "
                                                "ddim for the latent diffusion pipeline)")
    p.add_argument("--seed", type=int, default=0, help="seed of the prompts and the starting noise")
    p.add_argument("--batch-size", type=int, default=16, help="images generated per call (default 16)")
    p.add_argument("--clip", default=None, help="model folder whose text_encoder + clip_vision make the CLIP "
                                                "for CLIP score / Frechet distance (default: the model's own)")
    p.add_argument("--n-real", type=int, default=None, help="held-out real images for the Frechet distance "
                                                            "(default max(256, 4N))")
    p.add_argument("--candidates", type=int, default=1,
                   help="score the best of N images per prompt, ranked by the CLIP (DALL-E's reranking; "
                        "default 1: the plain draw)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--out", default="report.json", help="JSON report path; the markdown goes beside it (.md)")
    p.add_argument("--save-images", default=None, metavar="NPZ",
                   help="also write the scored images (uint8, per guidance scale, with their prompts) to this .npz")
    p.add_argument("--reference-cache", default=None, metavar="DIR",
                   help="folder caching the held-out real images' CLIP feature statistics, keyed by the CLIP, "
                        "--n-real and --seed (default $JAXT2I_EVAL_CACHE or ~/.cache/jaxt2i/eval; 'off': none)")
    p.add_argument("--from-images", default=None, metavar="NPZ",
                   help="score the images of an earlier --save-images instead of generating them (its prompts, "
                        "guidance scales, steps and sampler replace --n, --seed, --guidance, --steps, --sampler)")
    return p


def eval_main(argv=None) -> int:
    """Runs the evaluation; returns the exit status (0 ok, 2 user error)."""
    try:
        return _run(build_parser().parse_args(argv))
    except EvalError as e:
        print(f"jaxt2i eval: error: {e}", file=sys.stderr)
        return 2


def _read_given_images(args) -> list[str]:
    """--from-images: the saved images' guidance keys; sets args' n, seed, steps and sampler to the file's."""
    if not os.path.isfile(args.from_images):
        raise EvalError(f"--from-images {args.from_images}: no such file (write one with --save-images)")
    if args.candidates != 1:
        raise EvalError("--from-images scores saved images as they are; it takes no --candidates")
    texts, keys, settings = report.eval_images_index(args.from_images)
    if "n_per_group" not in settings or not keys:
        raise EvalError(f"--from-images {args.from_images}: no settings or no images in it; write it with "
                        f"jaxt2i eval --save-images")
    args.n, args.seed = settings["n_per_group"], settings["seed"]
    args.steps, args.sampler = settings["steps"], settings["sampler"]
    if [p.prompt for p in report.eval_prompt_set(args.n, seed=args.seed)] != texts:
        raise EvalError(f"--from-images {args.from_images}: its prompts are not this version's evaluation prompts "
                        f"for n={args.n}, seed={args.seed}")
    return keys


def _run(args) -> int:
    if args.n < 1:
        raise EvalError("--n must be >= 1")
    if args.steps is not None and args.steps < 1:
        raise EvalError("--steps must be >= 1")
    if args.batch_size < 1:
        raise EvalError("--batch-size must be >= 1")
    if args.candidates < 1:
        raise EvalError("--candidates must be >= 1")
    guidance = _parse_guidance(args.guidance) if args.guidance is not None else None
    if args.save_images and not args.save_images.endswith(".npz"):
        raise EvalError(f"--save-images {args.save_images!r}: give a path ending in .npz")
    given = _read_given_images(args) if args.from_images else None
    if given is not None:
        guidance = [float(k) for k in given]
    try:
        distributed.maybe_initialize()
    except ValueError as e:
        raise EvalError(str(e)) from None
    if args.save_images and jax.process_count() > 1:
        raise EvalError(f"--save-images writes one file from one process; this run has {jax.process_count()} "
                        "processes (score with one process to keep the images)")
    model = model_path(args.model or SHIPPED_MODEL)
    if not os.path.exists(model):
        hint = " (the shipped model is missing: run scripts/build_shapes_model.py)" if args.model is None else ""
        raise EvalError(f"no model at {model}{hint}; pass --model PATH")

    def log(msg: str) -> None:
        if jax.process_index() == 0:
            print(f"[jaxt2i eval] {msg}", file=sys.stderr, flush=True)

    t0 = time.perf_counter()
    pipe = load_pipeline(model, dtype=args.dtype)
    recommended = getattr(pipe, "sampling", {})  # the model folder's recommended settings (jaxt2i.json)
    if guidance is None:
        guidance = sorted(set(DEFAULT_GUIDANCE) | ({recommended["guidance"]} if "guidance" in recommended else set()))
    steps = args.steps or recommended.get("steps", DEFAULT_STEPS)
    clip_path = args.clip or model
    clip = clip_metrics.clip_for_model(pipe, args.clip)
    if clip is None:
        if args.candidates > 1:
            raise EvalError(f"--candidates {args.candidates} needs a CLIP to rank the images, and none was found "
                            f"in {clip_path}; pass --clip FOLDER (a model folder with a clip_vision component)")
        log("no CLIP found (pass --clip FOLDER): CLIP score and Frechet distance are reported as missing")
    cache = args.reference_cache or default_reference_cache()
    cache = None if cache.lower() in ("off", "none", "") or clip is None else cache
    result = report.evaluate_pipeline(pipe, guidance_scales=guidance, n=args.n, steps=steps, seed=args.seed,
                                      batch_size=args.batch_size, sampler=args.sampler, clip=clip,
                                      n_real=args.n_real, candidates=args.candidates,
                                      save_images=args.save_images,
                                      given_images=args.from_images if given is not None else None,
                                      reference_cache=cache,
                                      clip_key=clip_metrics.folder_fingerprint(clip_path) if cache else None,
                                      log=log)
    result["settings"]["model"] = os.path.abspath(model)
    if args.from_images:
        result["settings"]["images_from"] = os.path.abspath(args.from_images)
    result["settings"]["clip"] = os.path.abspath(clip_path) if clip is not None else None
    result["settings"]["seconds_total"] = time.perf_counter() - t0
    if jax.process_index() != 0:
        return 0
    out_dir = os.path.dirname(os.path.abspath(args.out))
    os.makedirs(out_dir, exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    table = report.markdown_report(result)
    md_path = os.path.splitext(args.out)[0] + ".md"
    with open(md_path, "w") as f:
        f.write(table)
    print(table)
    log(f"wrote {args.out} and {md_path} ({result['settings']['seconds_total']:.0f} s)")
    return 0
