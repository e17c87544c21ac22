"""Benchmark: DALL-E image-token sampling with the key/value cache against recomputing the whole sequence per token.

The cached sampler (:func:`jaxt2i.models.dalle_sampling.sample_image_tokens`: one prefill of the text, then one
``lax.scan`` step per image token) draws all ``image_height * image_width`` tokens of a batch of captions. Without a
cache, each token needs one forward pass over the whole sequence (text + image positions; one compiled program at
the full length, as a causal model can run it); that cost is measured as the median of full forward passes and
multiplied by the number of image tokens. Both run on the same random weights and captions, alternately; the
cached logits are checked against the full forward (teacher forcing) first.

    python scripts/bench_dalle_sampling.py --preset shapes --batch 1 4 --repeats 5

Prints one markdown table row per batch size (see docs/benchmarks.md), with the load average before and after, then
the headline: only rows measured on a quiet machine (the protocol in ``bench_common.py``).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_common import LoadMeter, Row, alternate, command_line, machine, pin_threads, print_report  # noqa: E402

from jaxt2i.models import dalle  # noqa: E402
from jaxt2i.models.dalle_sampling import sample_image_tokens, teacher_forced_logits  # noqa: E402


def random_inputs(config: dalle.DalleConfig, batch: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Captions (int32 [B, T], a few words then per-position pads) and image tokens (int32 [B, h, w])."""
    rng = np.random.default_rng(seed)
    words = rng.integers(0, config.text_vocab_size, (batch, config.text_length)).astype(np.int32)
    pads = config.text_vocab_size + np.arange(config.text_length, dtype=np.int32)
    text = np.where(np.arange(config.text_length) < config.text_length // 2, words, pads[None])
    image = rng.integers(0, config.image_vocab_size, (batch, config.image_height, config.image_width))
    return text.astype(np.int32), image.astype(np.int32)


def max_cache_error(model, params, text, image) -> float:
    """Largest |cached - full forward| image logit over every position (the two paths must agree)."""
    full = jax.jit(lambda p, t, i: model.apply({"params": p}, t, i)[1])(params, text, image)
    cached = jax.jit(lambda p, t, i: teacher_forced_logits(model, p, t, i))(params, text, image)
    return float(jnp.max(jnp.abs(full - cached)))


def bench(config: dalle.DalleConfig, batch: int, repeats: int, seed: int) -> dict:
    model = dalle.DalleTransformer(config)
    text, image = random_inputs(config, batch, seed)
    params = jax.jit(model.init)(jax.random.key(seed), text, image)["params"]
    error = max_cache_error(model, params, text, image)
    sample = jax.jit(lambda p, t, k: sample_image_tokens(model, p, t, k, top_k=32))
    forward = jax.jit(lambda p, t, i: model.apply({"params": p}, t, i)[1])
    key = jax.random.key(seed + 1)
    fns = {"cached": lambda: sample(params, text, key).block_until_ready(),
           "forward": lambda: forward(params, text, image).block_until_ready()}
    for fn in fns.values():  # compile
        fn()
    times = alternate(fns, repeats)
    cached, forward_s = float(np.median(times["cached"])), float(np.median(times["forward"]))
    tokens = batch * config.image_length
    uncached = forward_s * config.image_length
    return {"cached_s": cached, "uncached_s": uncached, "forward_s": forward_s, "cached_tok_s": tokens / cached,
            "uncached_tok_s": tokens / uncached, "speedup": uncached / cached, "error": error}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="shapes", choices=sorted(dalle.PRESETS))
    p.add_argument("--text-vocab-size", type=int, default=None, help="override the preset's text vocabulary")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 4])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=None, help="pin each library's threads (default: all cores)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    meter = LoadMeter(args.threads)
    pin_threads(args.threads)
    config = dalle.get_config(args.preset)
    if args.text_vocab_size:
        config = dataclasses.replace(config, text_vocab_size=args.text_vocab_size)
    print(f"# {machine()}; {command_line()}")
    print(f"# {args.preset}: {config.image_length} image tokens, {config.num_layers} layers of width {config.width}")
    rows = []
    for batch in args.batch:
        r = bench(config, batch, args.repeats, args.seed)
        load = meter.measure()
        print(f"batch {batch}: cached {r['cached_s']:.3f} s, uncached {r['uncached_s']:.2f} s", flush=True)
        rows.append(Row([str(batch), f"{r['cached_s']:.3f}", f"{r['cached_tok_s']:.0f}",
                         f"{r['uncached_s']:.2f} ({config.image_length} x {r['forward_s'] * 1e3:.1f} ms)",
                         f"{r['uncached_tok_s']:.0f}", f"{r['speedup']:.0f}x", f"{r['error']:.1e}"], load,
                        f"{args.preset}, batch {batch}: key/value cache {r['speedup']:.0f}x faster than recomputing"))
    print_report(["batch", "cached s", "cached tokens/s", "uncached s (tokens x forward)", "uncached tokens/s",
                  "speed-up", "max logit diff"], rows)


if __name__ == "__main__":
    main()
