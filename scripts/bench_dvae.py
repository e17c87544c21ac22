"""Benchmark: the dVAE encoder and decoder forward, jaxt2i vs OpenAI's ``dall_e`` package in the same process.

Both libraries carry the same random weights (``dall_e`` modules built at the preset's size, their state dicts
converted with jaxt2i's key table) and get the same inputs; timed calls alternate between the two so that load
from other processes falls on both alike. Three rows per batch size:

- encoder: images -> token logits (``dall_e``: ``enc(map_pixels(x))``; jaxt2i: ``DVAE.encode``, map_pixels inside);
- decoder: one-hot tokens -> logit-Laplace statistics, the same float input to both;
- decode: int tokens -> images, each library's way (``dall_e``: one-hot, decoder, sigmoid, unmap_pixels, as
  OpenAI's usage notebook does; jaxt2i: ``DVAE.decode``, which looks the input rows up instead of a one-hot).

    python scripts/bench_dvae.py --preset openai --batch 1 4 --repeats 5

Prints one markdown table row per measurement (see docs/benchmarks.md), with the load average before and after, then
the headline: only rows measured on a quiet machine (the protocol in ``bench_common.py``).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_common import (LoadMeter, alternate, command_line, comparison_header, comparison_row,  # noqa: E402
                          machine, pin_threads, print_report, summary, time_once)


def reference_modules(config, seed: int = 0):
    """``dall_e`` Encoder and Decoder with ``config``'s architecture and random weights (dall_e's own init)."""
    import dall_e
    import torch

    if config.group_count != 4:
        raise SystemExit(f"dall_e has exactly 4 groups; preset has group_count={config.group_count}.")
    torch.manual_seed(seed)
    kwargs = dict(n_hid=config.n_hid, n_blk_per_group=config.n_blk_per_group, vocab_size=config.vocab_size)
    encoder = dall_e.Encoder(input_channels=config.input_channels, **kwargs).eval()
    decoder = dall_e.Decoder(n_init=config.n_init, output_channels=config.output_channels, **kwargs).eval()
    return encoder, decoder


def jaxt2i_dvae(encoder, decoder, config):
    """A jaxt2i DVAE with the weights of the two ``dall_e`` modules."""
    import jax

    from jaxt2i.convert.components import params_from_torch
    from jaxt2i.dvae import DVAE

    params = {}
    for part, module in (("encoder", encoder), ("decoder", decoder)):
        state_dict = {k: v.detach().numpy() for k, v in module.state_dict().items()}
        params[part] = jax.tree.map(jax.device_put, params_from_torch(f"dvae_{part}", state_dict, config,
                                                                        source=f"random dall_e {part}"))
    return DVAE(config, params)


def bench(batch: int, size: int, repeats: int, encoder, decoder, model, meter: LoadMeter) -> list[dict]:
    import dall_e
    import torch
    import torch.nn.functional as F

    config = model.config
    grid = size // config.downsample_factor
    rng = np.random.default_rng(batch)
    images = rng.random((batch, size, size, config.input_channels), dtype=np.float32)
    tokens = rng.integers(0, config.vocab_size, (batch, grid, grid)).astype(np.int32)
    one_hot = np.eye(config.vocab_size, dtype=np.float32)[tokens]
    t_images = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))
    t_tokens = torch.from_numpy(tokens).long()
    t_one_hot = torch.from_numpy(np.ascontiguousarray(one_hot.transpose(0, 3, 1, 2)))

    def torch_decode():
        z = F.one_hot(t_tokens, num_classes=config.vocab_size).permute(0, 3, 1, 2).float()
        return dall_e.unmap_pixels(torch.sigmoid(decoder(z).float()[:, :config.output_channels]))

    cases = {
        "encoder": (lambda: model.encode(images), lambda: encoder(dall_e.map_pixels(t_images))),
        "decoder": (lambda: model.decoder_stats(one_hot), lambda: decoder(t_one_hot)),
        "decode": (lambda: model.decode(tokens), torch_decode),
    }
    rows = []
    for name, (ours, theirs) in cases.items():
        with torch.inference_mode():
            first_s = time_once(lambda: ours().block_until_ready())  # compiles
            diff = float(np.max(np.abs(np.asarray(ours()) - theirs().numpy().transpose(0, 2, 3, 1))))
            times = alternate({"jaxt2i": lambda: ours().block_until_ready(), "dall_e": theirs}, repeats)
        rows.append({"name": name, "batch": batch, "size": size, "first_s": first_s, "max_abs_diff": diff,
                     "load": meter.measure(), "times": times, **summary(times, "jaxt2i", "dall_e")})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="openai", help="jaxt2i.models.dvae preset (4 groups, like dall_e)")
    parser.add_argument("--n-hid", type=int, default=None, help="override the preset's n_hid (>= 64 for dall_e)")
    parser.add_argument("--vocab-size", type=int, default=None, help="override the preset's vocabulary (>= 512)")
    parser.add_argument("--image-size", type=int, default=None, help="image side (default: the preset's)")
    parser.add_argument("--batch", type=int, nargs="+", default=[1])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="pin both libraries to this many cores")
    args = parser.parse_args()
    meter = LoadMeter(args.threads)
    pin_threads(args.threads)

    from jaxt2i.models import dvae

    config = dvae.get_config(args.preset)
    overrides = {k: v for k, v in (("n_hid", args.n_hid), ("vocab_size", args.vocab_size)) if v is not None}
    config = dataclasses.replace(config, **overrides)
    size = args.image_size or config.image_size
    encoder, decoder = reference_modules(config)
    model = jaxt2i_dvae(encoder, decoder, config)
    print(f"machine: {machine()}")
    print(f"command: {command_line()}")
    print(f"config: {config}")
    rows = []
    for batch in args.batch:
        for r in bench(batch, size, args.repeats, encoder, decoder, model, meter):
            print(f"{r['name']} batch {batch}: jaxt2i {[round(v, 3) for v in r['times']['jaxt2i']]} s, "
                  f"dall_e {[round(v, 3) for v in r['times']['dall_e']]} s, max|diff| {r['max_abs_diff']:.2e}, "
                  f"first call {r['first_s']:.1f} s", flush=True)
            label = (f"dVAE {r['name']} fp32, B={batch}, {size}x{size}, n_hid={config.n_hid}, "
                     f"vocab={config.vocab_size}, threads={args.threads or 'all'}")
            rows.append(comparison_row(label, r, f"first call {r['first_s']:.1f} s", args.repeats, r["load"], "dall_e",
                                       digits=3))
    print_report(comparison_header("dall_e"), rows)


if __name__ == "__main__":
    main()
