"""Benchmark: text-to-image at SD1.5 size (random weights), jaxt2i vs diffusers' StableDiffusionPipeline, same process.

Same weights (the diffusers modules are converted with jaxt2i's key tables), same prompt and negative prompt, same
initial latents, DDIM, classifier-free guidance, batch 1, output as float images. Steady state: the first call of each
library (jaxt2i compiles there) is reported apart and left out of the medians; timed calls alternate between them.

    python scripts/bench_txt2img.py --size 256 --steps 10 --repeats 5

Prints one markdown table row (see docs/benchmarks.md) with the load before and after, then the headline only if the
machine was quiet (the protocol in ``bench_common.py``).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_common import (LoadMeter, alternate, command_line, comparison_header, comparison_row,  # noqa: E402
                          machine, pin_threads, print_report, summary, time_once)
from bench_unet import flax_params_from, torch_sd15_components  # noqa: E402

PROMPT = "a watercolour painting of a lighthouse at dusk"
NEGATIVE = "blurry"


def build_pipelines(tokenizer_dir: str):
    """(diffusers StableDiffusionPipeline with DDIM, jaxt2i Pipeline) sharing random SD1.5 weights."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    from transformers import CLIPTokenizer

    from jaxt2i import presets
    from jaxt2i.convert.load import LoadedModel
    from jaxt2i.diffusion.schedules import ScheduleConfig
    from jaxt2i.pipelines import Pipeline
    from jaxt2i.tokenizer import write_vocab_files

    spec = presets.get("sd15")
    configs = spec.configs()
    unet, vae, text = torch_sd15_components()
    write_vocab_files(tokenizer_dir, pad=spec.tokenizer_pad)
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)
    tpipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=CLIPTokenizer.from_pretrained(tokenizer_dir),
                                    unet=unet, scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                    requires_safety_checker=False)
    tpipe.set_progress_bar_config(disable=True)
    params = {name: flax_params_from(module, name, configs[name], device=False)
              for name, module in (("unet", unet), ("vae", vae), ("text_encoder", text))}
    loaded = LoadedModel(configs, params, ScheduleConfig(), {"pad": spec.tokenizer_pad, "folder": tokenizer_dir},
                         "random-weight sd15")
    return tpipe, Pipeline(loaded)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--guidance", type=float, default=7.5)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--backend", default="auto", help="attention backend for jaxt2i (auto/xla/chunked)")
    parser.add_argument("--threads", type=int, default=None, help="pin both libraries to this many cores")
    args = parser.parse_args()
    meter = LoadMeter(args.threads)
    pin_threads(args.threads)

    import torch

    from jaxt2i.nn.attention import default_backend
    from jaxt2i.pipelines import enable_compilation_cache

    enable_compilation_cache("off")
    with tempfile.TemporaryDirectory() as tok_dir:
        tpipe, jpipe = build_pipelines(tok_dir)
    latents = np.random.default_rng(0).standard_normal((1, args.size // 8, args.size // 8, 4)).astype(np.float32)
    torch_latents = torch.from_numpy(latents.transpose(0, 3, 1, 2).copy())

    def run_jax():
        with default_backend(args.backend):
            return jpipe.text_to_image(PROMPT, negative_prompt=NEGATIVE, steps=args.steps,
                                       guidance_scale=args.guidance, sampler="ddim", latents=latents,
                                       height=args.size, width=args.size)

    def run_torch():
        with torch.inference_mode():
            return tpipe(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=args.steps,
                         guidance_scale=args.guidance, latents=torch_latents, height=args.size, width=args.size,
                         output_type="np").images

    print(f"machine: {machine()}")
    print(f"command: {command_line()}", flush=True)
    first_jax = time_once(run_jax)
    first_torch = time_once(run_torch)
    diff = float(np.max(np.abs(run_jax() - run_torch())))
    times = alternate({"jaxt2i": run_jax, "diffusers": run_torch}, args.repeats)
    load = meter.measure()
    r = summary(times)
    print(f"jaxt2i {[round(v, 2) for v in times['jaxt2i']]} s, diffusers {[round(v, 2) for v in times['diffusers']]} s, "
          f"max|image diff| {diff:.2e}, first call: jaxt2i {first_jax:.1f} s (incl. compile), "
          f"diffusers {first_torch:.1f} s")
    label = (f"txt2img SD1.5 fp32, {args.size}x{args.size}, {args.steps} DDIM steps, CFG {args.guidance}, B=1, "
             f"attention={args.backend}, threads={args.threads or 'all'}")
    row = comparison_row(label, r, f"first call {first_jax:.1f} s vs {first_torch:.1f} s", args.repeats, load)
    print_report(comparison_header(), [row])


if __name__ == "__main__":
    main()
