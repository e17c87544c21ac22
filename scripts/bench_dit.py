"""Benchmark: one DiT forward (default DiT-XL/2 at 256 px: 32x32x4 latents, batch 2 = one guided step, fp32),
jaxt2i vs diffusers' DiTTransformer2DModel in the same process, plus XLA's count of its FLOPs.

Both models carry the same random weights (the diffusers model built from the preset, its state dict converted with
jaxt2i's key table) and get the same inputs; timed calls alternate between the two libraries so that load from
other processes falls on both alike. XLA's cost analysis of the compiled forward gives its FLOPs, printed as
multiply-adds (FLOPs / 2) next to the paper's 118.6 G for XL/2 at 256 px, batch 1.

    python scripts/bench_dit.py --preset DiT-XL/2 --batch 2 --repeats 5

Prints one markdown table row per batch size (see docs/benchmarks.md) with the load average before and after, then
the headline: only rows measured on a quiet machine (the protocol in ``bench_common.py``).
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_common import (LoadMeter, alternate, command_line, comparison_header, comparison_row,  # noqa: E402
                          machine, pin_threads, print_report, summary, time_once)
from bench_unet import flax_params_from  # noqa: E402

PAPER_GMACS = {"DiT-XL/2": 118.6, "DiT-L/2": 80.7, "DiT-B/2": 23.0, "DiT-S/2": 6.06}  # 256 px, batch 1


def torch_dit(config, seed: int = 0):
    """diffusers DiTTransformer2DModel with random weights and ``config``'s architecture."""
    import torch
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(seed)
    return DiTTransformer2DModel(**{k: v for k, v in config.to_diffusers().items() if not k.startswith("_")}).eval()


def forward_gmacs(forward, *args) -> float:
    """Multiply-adds (G) of one call of the jitted ``forward`` by XLA's cost analysis (FLOPs / 2)."""
    cost = forward.lower(*args).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost["flops"]) / 2e9


def bench(config, batch: int, repeats: int, torch_model, params, meter: LoadMeter) -> dict:
    import jax
    import jax.numpy as jnp
    import torch

    from jaxt2i.models.dit import DiT

    rng = np.random.default_rng(batch)
    side = config.sample_size
    latents = rng.standard_normal((batch, side, side, config.in_channels)).astype(np.float32)
    timesteps = np.full((batch,), 500.0, np.float32)
    labels = rng.integers(0, config.num_classes, batch).astype(np.int32)

    model = DiT(config)
    forward = jax.jit(lambda p, x, t, y: model.apply({"params": p}, x, t, y))
    x, t, y = jnp.asarray(latents), jnp.asarray(timesteps), jnp.asarray(labels)
    compile_s = time_once(lambda: forward.lower(params, x, t, y).compile())
    first_s = time_once(lambda: forward(params, x, t, y).block_until_ready())
    gmacs = forward_gmacs(forward, params, x[:1], t[:1], y[:1])

    tx = torch.from_numpy(latents.transpose(0, 3, 1, 2).copy())
    tt, ty = torch.from_numpy(timesteps), torch.from_numpy(labels.astype(np.int64))

    def run_torch():
        with torch.inference_mode():
            return torch_model(tx, timestep=tt, class_labels=ty).sample

    torch_first_s = time_once(run_torch)
    diff = float(np.max(np.abs(np.asarray(forward(params, x, t, y)) - run_torch().numpy().transpose(0, 2, 3, 1))))
    times = alternate({"jaxt2i": lambda: forward(params, x, t, y).block_until_ready(), "diffusers": run_torch},
                      repeats)
    return {"compile_s": compile_s, "first_s": first_s, "torch_first_s": torch_first_s, "gmacs": gmacs,
            "max_abs_diff": diff, "load": meter.measure(), "times": times, **summary(times)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="DiT-XL/2")
    parser.add_argument("--batch", type=int, nargs="+", default=[2])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="pin both libraries to this many cores")
    args = parser.parse_args()
    meter = LoadMeter(args.threads)
    pin_threads(args.threads)

    from jaxt2i.models.dit import PRESETS

    config = PRESETS[args.preset]
    torch_model = torch_dit(config)
    params = flax_params_from(torch_model, "dit", config)
    print(f"machine: {machine()}")
    print(f"command: {command_line()}")
    rows = []
    for batch in args.batch:
        r = bench(config, batch, args.repeats, torch_model, params, meter)
        paper = PAPER_GMACS.get(args.preset)
        print(f"batch {batch}: jaxt2i {[round(v, 2) for v in r['times']['jaxt2i']]} s, "
              f"diffusers {[round(v, 2) for v in r['times']['diffusers']]} s, max|diff| {r['max_abs_diff']:.2e}, "
              f"compile {r['compile_s']:.1f} s, first call {r['first_s']:.1f} s (torch first {r['torch_first_s']:.1f} "
              f"s); XLA: {r['gmacs']:.2f} GMACs per image" + (f" (paper: {paper})" if paper else ""), flush=True)
        label = (f"{args.preset} fwd fp32, B={batch}, {config.sample_size}x{config.sample_size} latents, "
                 f"threads={args.threads or 'all'}")
        rows.append(comparison_row(label, r, f"compile {r['compile_s']:.1f} s", args.repeats, r["load"]))
    print_report(comparison_header(), rows)


if __name__ == "__main__":
    main()
