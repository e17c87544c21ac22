"""Benchmark: one U-Net forward at SD1.5 size (fp32, 64x64 latents), jaxt2i vs diffusers in the same process.

Both models carry the same random weights (the diffusers model is built from our ``sd15`` preset and its state dict
converted with jaxt2i's key table) and get the same inputs. Timed calls alternate between the two libraries so that
load from other processes falls on both alike; the ratio of medians is the number to trust on a shared machine.

    python scripts/bench_unet.py --batch 1 2 --repeats 5

Prints one markdown table row per batch size (see docs/benchmarks.md) with the load before and after (the protocol in
``bench_common.py``), then the headline: only rows measured on a quiet machine. Also imported by the other bench
scripts for the random-weight SD1.5 models below.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_common import (LoadMeter, alternate, command_line, comparison_header, comparison_row,  # noqa: E402
                          machine, pin_threads, print_report, summary, time_once)


# ------------------------------------------------------------------------------ random-weight SD1.5 models
def torch_sd15_unet(seed: int = 0):
    """diffusers UNet2DConditionModel with random weights and jaxt2i's sd15 architecture."""
    import torch
    from diffusers import UNet2DConditionModel

    from jaxt2i import presets

    torch.manual_seed(seed)
    return UNet2DConditionModel(**presets.get("sd15").configs()["unet"].to_diffusers()).eval()


def torch_sd15_components(seed: int = 0):
    """(unet, vae, text_encoder) torch modules with random weights and jaxt2i's sd15 architectures."""
    import torch
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel

    from jaxt2i import presets

    configs = presets.get("sd15").configs()
    unet = torch_sd15_unet(seed)
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(**configs["vae"].to_diffusers()).eval()
    text = CLIPTextModel(CLIPTextConfig(**configs["text_encoder"].to_diffusers())).eval()
    return unet, vae, text


def flax_params_from(module, name: str, config, device: bool = True) -> dict:
    """The Flax parameters of a torch module's weights (jaxt2i's key table), as jax arrays (numpy if not device)."""
    import jax

    from jaxt2i.convert.components import params_from_torch

    state_dict = {k: v.detach().numpy() for k, v in module.state_dict().items()}
    params = params_from_torch(name, state_dict, config, source=f"random torch {name}")
    return jax.tree.map(jax.device_put, params) if device else params


# ------------------------------------------------------------------------------------------------- benchmark
def bench_unet(batch: int, repeats: int, backend: str, torch_unet, params, config, meter: LoadMeter) -> dict:
    import jax
    import jax.numpy as jnp
    import torch

    from jaxt2i.models import unet
    from jaxt2i.nn.attention import default_backend

    rng = np.random.default_rng(batch)
    latents = rng.standard_normal((batch, 64, 64, 4)).astype(np.float32)
    context = rng.standard_normal((batch, 77, 768)).astype(np.float32)
    timesteps = np.full((batch,), 500.0, np.float32)

    model = unet.UNet(config)
    with default_backend(backend):
        forward = jax.jit(lambda p, x, t, c: model.apply({"params": p}, x, t, c))
        x, t, c = jnp.asarray(latents), jnp.asarray(timesteps), jnp.asarray(context)
        compile_s = time_once(lambda: forward.lower(params, x, t, c).compile())
        first_s = time_once(lambda: forward(params, x, t, c).block_until_ready())

    tx = torch.from_numpy(latents.transpose(0, 3, 1, 2).copy())
    tt, tc = torch.from_numpy(timesteps), torch.from_numpy(context)

    def run_torch():
        with torch.inference_mode():
            return torch_unet(tx, tt, encoder_hidden_states=tc).sample

    torch_first_s = time_once(run_torch)
    diff = float(np.max(np.abs(np.asarray(forward(params, x, t, c)) - run_torch().numpy().transpose(0, 2, 3, 1))))
    times = alternate({"jaxt2i": lambda: forward(params, x, t, c).block_until_ready(), "diffusers": run_torch},
                      repeats)
    return {"batch": batch, "compile_s": compile_s, "first_s": first_s, "torch_first_s": torch_first_s,
            "max_abs_diff": diff, "load": meter.measure(), "times": times, **summary(times)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--backend", default="auto", help="attention backend for jaxt2i (auto/xla/chunked)")
    parser.add_argument("--threads", type=int, default=None, help="pin both libraries to this many cores")
    args = parser.parse_args()
    meter = LoadMeter(args.threads)
    pin_threads(args.threads)

    from jaxt2i import presets

    config = presets.get("sd15").configs()["unet"]
    torch_unet = torch_sd15_unet()
    params = flax_params_from(torch_unet, "unet", config)
    print(f"machine: {machine()}")
    print(f"command: {command_line()}")
    rows = []
    for batch in args.batch:
        r = bench_unet(batch, args.repeats, args.backend, torch_unet, params, config, meter)
        print(f"batch {batch}: jaxt2i {[round(v, 2) for v in r['times']['jaxt2i']]} s, "
              f"diffusers {[round(v, 2) for v in r['times']['diffusers']]} s, max|diff| {r['max_abs_diff']:.2e}, "
              f"compile {r['compile_s']:.1f} s, first call {r['first_s']:.1f} s (torch first {r['torch_first_s']:.1f} s)",
              flush=True)
        label = (f"U-Net fwd SD1.5 fp32, B={batch}, 64x64 latents, attention={args.backend}, "
                 f"threads={args.threads or 'all'}")
        rows.append(comparison_row(label, r, f"compile {r['compile_s']:.1f} s", args.repeats, r["load"]))
    print_report(comparison_header(), rows)


if __name__ == "__main__":
    main()
