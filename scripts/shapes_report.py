"""The pictures and tables of docs/shapes_model.md (the command line over ``jaxt2i.shapes.model_card``).

    python scripts/shapes_report.py losses --vae RUN --clip RUN --unet RUN --out docs/images/shapes_losses.png
    python scripts/shapes_report.py grid --out docs/images/shapes_grid.png      # the shipped model, its settings
    python scripts/shapes_report.py timing [--model M]                           # fresh-process + warm timings
    python scripts/shapes_report.py compute [--model M ...]                      # denoiser parameters, MACs/image
    python scripts/shapes_report.py compare R1.json [R2.json ...] [--against O1.json ...]   # eval reports, pooled
    python scripts/shapes_report.py failures I1.npz [I2.npz ...] --guidance 4   # why two-object prompts fail
    python scripts/shapes_report.py clip --clip RUN/final                        # what a CLIP knows of the world

RUN: a ``jaxt2i train`` work folder (its ``metrics.jsonl``); R*.json: ``jaxt2i eval --out`` reports; I*.npz:
``jaxt2i eval --save-images`` files.
"""

from __future__ import annotations

import argparse
import json
import sys

from jaxt2i.eval.clip_metrics import load_clip
from jaxt2i.pipelines import load_pipeline
from jaxt2i.shapes import SHIPPED_MODEL, clip_probes, model_card
from jaxt2i.shapes.report import markdown_comparison


def losses(args) -> None:
    model_card.loss_chart([("KL-VAE: reconstruction + KL (log)", args.vae),
                           ("CLIP: symmetric InfoNCE (log)", args.clip),
                           ("U-Net: min-SNR eps MSE (log; green: mean)", args.unet)], args.out)
    print(f"wrote {args.out}")


def grid(args) -> None:
    pipe = load_pipeline(args.model or SHIPPED_MODEL)
    steps, guidance = pipe.sampling_defaults(args.steps, args.guidance)
    model_card.prompt_grid(pipe, args.out, steps, guidance, args.seed)
    print(f"wrote {args.out} ({len(model_card.GRID_PROMPTS)} prompts, {steps} steps, guidance {guidance}, "
          f"seed {args.seed})")


def timing(args) -> None:
    result = model_card.first_image_seconds(model=args.model)
    pipe = load_pipeline(args.model or SHIPPED_MODEL)
    result.update(model_card.warm_seconds_per_image(pipe, *pipe.sampling_defaults()))
    print(json.dumps(result))


def compute(args) -> None:
    for model in args.model or [SHIPPED_MODEL]:
        print(json.dumps({"model": model, **model_card.denoiser_cost(load_pipeline(model))}))


def compare(args) -> None:
    def read(path):
        with open(path) as f:
            return json.load(f)

    print(markdown_comparison([read(f) for f in args.reports], [read(f) for f in args.against]), end="")


def failures(args) -> None:
    counts, placed = model_card.two_object_failures(args.images, args.guidance)
    for split, c in sorted(counts.items()):
        n = sum(c.values())
        print(f"{split} ({n} two-object prompts, guidance {args.guidance:g}):")
        for kind, k in c.most_common():
            print(f"  {kind:38s} {k:4d}  {100 * k / n:5.1f}%")
        for by in ("shape", "color"):
            p = placed[(split, by)]
            if p["n"]:
                print(f"  placement, two objects told apart by {by} ({p['n']} images): axis right "
                      f"{100 * p['axis'] / p['n']:.0f}%, relation right {100 * p['direction'] / p['n']:.0f}%")


def clip(args) -> None:
    encoders = load_clip(args.clip or SHIPPED_MODEL)
    if encoders is None:
        raise SystemExit(f"{args.clip}: no clip_vision component; pass a CLIP run's final folder or a model with one.")
    print(json.dumps(clip_probes.clip_report(*encoders, n=args.n, seed=args.seed), indent=1))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="what", required=True)
    lo = sub.add_parser("losses")
    for stage in ("vae", "clip", "unet"):
        lo.add_argument(f"--{stage}", required=True, help=f"the {stage} stage's jaxt2i train work folder")
    lo.add_argument("--out", default="docs/images/shapes_losses.png")
    gr = sub.add_parser("grid")
    gr.add_argument("--model", default=None)
    gr.add_argument("--steps", type=int, default=None, help="default: the model's recommendation")
    gr.add_argument("--guidance", type=float, default=None, help="default: the model's recommendation")
    gr.add_argument("--seed", type=int, default=0)
    gr.add_argument("--out", default="docs/images/shapes_grid.png")
    ti = sub.add_parser("timing")
    ti.add_argument("--model", default=None)
    cp = sub.add_parser("compute")
    cp.add_argument("--model", nargs="*", default=None, help="model folders or shipped names (default: shipped)")
    co = sub.add_parser("compare")
    co.add_argument("reports", nargs="+", help="jaxt2i eval --out JSON files (draws with other seeds are pooled)")
    co.add_argument("--against", nargs="*", default=[], help="reports of the model to compare with, pooled too")
    fa = sub.add_parser("failures")
    fa.add_argument("images", nargs="+", help="jaxt2i eval --save-images files (pooled)")
    fa.add_argument("--guidance", type=float, default=4.0)
    cl = sub.add_parser("clip")
    cl.add_argument("--clip", default=None, help="a model folder with text_encoder + clip_vision (default: shipped)")
    cl.add_argument("--n", type=int, default=300)
    cl.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    {"losses": losses, "grid": grid, "timing": timing, "compute": compute, "compare": compare, "failures": failures,
     "clip": clip}[args.what](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
