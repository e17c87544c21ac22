"""Assembles a shipped shapes-world model: jaxt2i/assets/shapes_model/ (what `jaxt2i generate` uses by default) or
another latent-diffusion model trained on the shipped model's encoders (jaxt2i/assets/dit_shapes_model/).

    python scripts/build_shapes_model.py \
        --run runs/shapes_unet/final \
        --vae runs/shapes_vae/final \
        --clip runs/shapes_clip_role/final \
        --out jaxt2i/assets/shapes_model

    python scripts/build_shapes_model.py --run runs/shapes_dit/final --clip jaxt2i/assets/shapes_model \
        --share shapes --out jaxt2i/assets/dit_shapes_model --max-mb 10

Takes the denoiser (U-Net or transformer), its conditioner, the schedule, the text layers and the recommended
sampling from the run's final folder (`jaxt2i train configs/shapes_unet.yaml` or `configs/shapes_dit.yaml`), checks
that the run's frozen VAE and text encoder are exactly the VAE run's (configs/shapes_vae.yaml) and the CLIP run's
(configs/shapes_clip_role.yaml), adds the CLIP's image tower (component `clip_vision`, for `jaxt2i eval`'s CLIP score
and Frechet distance; its text tower is the text encoder), and writes a jaxt2i folder with every weight stored in
float16 (the loader casts to the pipeline's dtype). With --share MODEL, components identical to those of the shipped
model MODEL (jaxt2i.shipped) are not copied: the folder refers to them. Prints the sizes; fails when the folder would
exceed --max-mb. scripts/train_shapes_chain.sh runs the trainings and then this script.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

import numpy as np

from jaxt2i.convert import native
from jaxt2i.convert.load import read_native, write_native
from jaxt2i.shipped import SHIPPED_MODELS, model_path
from jaxt2i.train.kinds.base import read_components


def _cast(tree, dtype):
    return {k: _cast(v, dtype) if isinstance(v, dict) else np.asarray(v).astype(dtype) for k, v in tree.items()}


def _check_same(name: str, a: dict, b: dict, where: str) -> None:
    fa, fb = native.flatten_params(a), native.flatten_params(b)
    if set(fa) != set(fb):
        raise SystemExit(f"{name}: {where} has different parameters than the run's frozen copy.")
    worst = max(float(np.max(np.abs(np.asarray(fa[k], np.float32) - np.asarray(fb[k], np.float32)))) for k in fa)
    if worst > 1e-3:
        raise SystemExit(f"{name}: {where} differs from the copy the U-Net was trained with (max |diff| {worst:.3g}); "
                         "pass the folders the run was trained with.")


def identical_components(model, shipped: str) -> dict[str, str]:
    """``{component: shipped}`` for the components of ``model`` that the shipped model ``shipped`` holds with the
    same type, config and weights (float16 copies compared exactly)."""
    theirs = read_native(model_path(shipped))
    shared = {}
    for name, config in model.configs.items():
        if name not in theirs.configs or theirs.configs[name] != config \
                or theirs.component_type(name) != model.component_type(name):
            continue
        ours, other = native.flatten_params(model.params[name]), native.flatten_params(theirs.params[name])
        if set(ours) == set(other) and all(np.array_equal(np.asarray(ours[k], np.float16),
                                                          np.asarray(other[k], np.float16)) for k in ours):
            shared[name] = shipped
    return shared


def folder_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", "--unet", required=True, dest="run",
                   help="the U-Net or DiT run's final/ folder (a jaxt2i model folder)")
    p.add_argument("--vae", help="the VAE run's final/ folder, checked against the U-Net run's frozen copy")
    p.add_argument("--clip", help="the CLIP run's final/ folder (text_encoder + clip_vision)")
    p.add_argument("--out", default=os.path.join("jaxt2i", "assets", "shapes_model"))
    p.add_argument("--dtype", default="float16", choices=("float16", "float32"))
    p.add_argument("--max-mb", type=float, default=20.0)
    p.add_argument("--share", choices=sorted(SHIPPED_MODELS),
                   help="refer to this shipped model's components wherever they are identical instead of copying them")
    p.add_argument("--steps", type=int, help="recommended sampling steps, stored in jaxt2i.json (default: the run's)")
    p.add_argument("--guidance", type=float,
                   help="recommended guidance scale, stored in jaxt2i.json: `jaxt2i generate`'s default "
                        "(default: the run's)")
    args = p.parse_args(argv)

    run = read_native(args.run)
    configs, params, types = dict(run.configs), dict(run.params), dict(run.types)
    if args.vae:
        vae = read_components(args.vae, ("vae",), "--vae")
        _check_same("vae", vae.params["vae"], params["vae"], args.vae)
    if args.clip:
        clip = read_components(args.clip, ("text_encoder", "clip_vision"), "--clip")
        _check_same("text_encoder", clip.params["text_encoder"], params["text_encoder"], args.clip)
        configs["clip_vision"], params["clip_vision"] = clip.configs["clip_vision"], clip.params["clip_vision"]
    sampling = dict(run.sampling)
    sampling.update({k: v for k, v in (("steps", args.steps), ("guidance", args.guidance)) if v is not None})
    dtype = np.dtype(args.dtype)
    model = dataclasses.replace(run, configs=configs, params={k: _cast(v, dtype) for k, v in params.items()},
                                types=types, tokenizer={"pad": run.tokenizer.get("pad") or "eos", "folder": None},
                                sampling=sampling)
    if args.share:
        model = dataclasses.replace(model, shared=identical_components(model, args.share))
        print(f"shared with the shipped model {args.share!r}: {sorted(model.shared)}")
    write_native(args.out, model, overwrite=True)
    sizes = {name: os.path.getsize(os.path.join(args.out, f"{name}.safetensors")) for name in params
             if name not in model.shared}
    total = folder_bytes(args.out)
    for name, size in sizes.items():
        n = sum(int(np.prod(np.shape(x))) for x in native.flatten_params(params[name]).values())
        print(f"{name:13s} {n / 1e6:6.2f}M parameters  {size / 1e6:6.2f} MB")
    print(f"total folder  {total / 1e6:.2f} MB  -> {args.out}")
    if total > args.max_mb * 1e6:
        print(f"error: {args.out} is {total / 1e6:.2f} MB, over --max-mb {args.max_mb}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
