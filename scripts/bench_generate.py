"""Benchmark: `jaxt2i generate --prompts-file` (batched, one program per settings group, every local device) against
single-prompt ``Pipeline.text_to_image`` calls in a loop, same process, same model and settings.

N shapes-world captions go through what the command runs (``generate_batch.read_prompts``, ``make_items``,
``generate``): its rate counts compilation, every batch and every PNG written; its steady rate leaves the first batch
(which compiles) out. The single-prompt loop runs on a subset (``--single``; its first call, which compiles, is left
out) and its rate stands for N such calls. The model is loaded once, outside both timings.

    python scripts/bench_generate.py --n 200 --batch-size 16

Prints the rates (images/s) and their ratio as a table row with the load before and after, then the headline only if
the machine was quiet (the protocol in ``bench_common.py``).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_common import LoadMeter, Row, command_line, print_report  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=1000, help="prompts through --prompts-file (default 1000)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--single", type=int, default=20, help="timed single-prompt calls (default 20)")
    parser.add_argument("--model", default="shapes")
    parser.add_argument("--steps", type=int, default=None, help="default: the model's recommendation")
    args = parser.parse_args()
    meter = LoadMeter()

    import jax

    import jaxt2i
    from jaxt2i import generate_batch as gb
    from jaxt2i.shapes.world import example_caption

    pipe = jaxt2i.load_pipeline(args.model)
    steps, guidance = pipe.sampling_defaults(args.steps, None)
    height, width = pipe.default_size
    prompts = [example_caption(0, i, "heldout") for i in range(args.n)]
    print(f"{command_line()}\nload {meter.before:.2f} at start; {len(jax.local_devices())} local device(s) "
          f"({jax.default_backend()})", file=sys.stderr)
    with tempfile.TemporaryDirectory() as folder:
        prompts_file = os.path.join(folder, "prompts.txt")
        with open(prompts_file, "w") as f:
            f.write("\n".join(prompts) + "\n")
        items = gb.make_items(gb.read_prompts(prompts_file), num=1, seed=0, steps=steps, guidance=guidance,
                              negative=None, size=(width, height), defaults=pipe.sampling_defaults)
        settings = {"model": args.model, "sampler": "ddim", "karras": False}
        summary = gb.generate(pipe, items, os.path.join(folder, "out"), settings, batch_size=args.batch_size)
    assert summary.written == args.n, f"{summary.written} images written for {args.n} prompts"
    first = gb.device_batch_size(args.batch_size, len(jax.local_devices()))
    steady_rate = (args.n - first) / (summary.seconds - summary.first_batch_seconds) if args.n > first else 0.0

    def single(i: int):
        return pipe.text_to_image([prompts[i]], steps=steps, guidance_scale=guidance, seed=i, height=height,
                                  width=width)

    single(0)  # compiles
    start = time.perf_counter()
    for i in range(1, args.single + 1):
        single(i % args.n)
    single_rate = args.single / (time.perf_counter() - start)
    load = meter.measure()
    print(f"--prompts-file: {args.n} images in {summary.seconds:.1f} s = {summary.images_per_second:.2f} images/s "
          f"(batch {first}; compilation and PNG writing included); after the first batch {steady_rate:.2f} images/s")
    print(f"single-prompt text_to_image loop: {args.single} calls = {single_rate:.2f} images/s "
          f"(compilation left out) -> {args.n / single_rate:.1f} s for {args.n}")
    ratio = (f"{summary.images_per_second / single_rate:.2f}x ({steady_rate / single_rate:.2f}x after the first "
             f"batch)")
    label = f"{args.model}, {args.n} prompts, batch {first}, {steps} steps, guidance {guidance}, {width}x{height}"
    devices = f"{len(jax.local_devices())} {jax.default_backend()}"
    row = Row([label, f"{summary.images_per_second:.2f} overall, {steady_rate:.2f} after the first batch",
               f"{single_rate:.2f} ({args.single} calls)", ratio, devices], load,
              f"{label}: --prompts-file / single-prompt loop {ratio}")
    print_report(["generate", "--prompts-file images/s", "single-prompt loop images/s", "ratio", "devices"], [row])


if __name__ == "__main__":
    main()
