"""Benchmark: `jaxt2i generate --prompts-file` (batched, one program per settings group, every local device) against
single-prompt ``Pipeline.text_to_image`` calls in a loop, same process, same model and settings.

N shapes-world captions go through the command (wall time from the start of the command to its summary: model load,
compilation, every batch and every PNG written). The single-prompt loop runs on a subset (``--single``; its first
call, which compiles, is left out) and its rate stands for N such calls.

    python scripts/bench_generate.py --n 200 --batch-size 16

Prints the rates (images/s), their ratio and the machine's load.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_unet import command_line, loadavg  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=1000, help="prompts through --prompts-file (default 1000)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--single", type=int, default=20, help="timed single-prompt calls (default 20)")
    parser.add_argument("--model", default="shapes")
    parser.add_argument("--steps", type=int, default=None, help="default: the model's recommendation")
    args = parser.parse_args()

    import jax

    import jaxt2i
    from jaxt2i.cli import main as cli_main
    from jaxt2i.shapes.world import example_caption

    prompts = [example_caption(0, i, "heldout") for i in range(args.n)]
    steps_args = [] if args.steps is None else ["--steps", str(args.steps)]
    print(f"{command_line()}\nload {loadavg()} at start; {len(jax.local_devices())} local device(s) "
          f"({jax.default_backend()})", file=sys.stderr)
    with tempfile.TemporaryDirectory() as folder:
        prompts_file = os.path.join(folder, "prompts.txt")
        with open(prompts_file, "w") as f:
            f.write("\n".join(prompts) + "\n")
        start = time.perf_counter()
        code = cli_main(["generate", "--prompts-file", prompts_file, "--outdir", os.path.join(folder, "out"),
                         "--model", args.model, "--batch-size", str(args.batch_size), *steps_args])
        batched_seconds = time.perf_counter() - start
        if code != 0:
            raise SystemExit(f"jaxt2i generate --prompts-file exited with {code}")
        written = len([n for n in os.listdir(os.path.join(folder, "out")) if n.endswith(".png")])
    assert written == args.n, f"{written} images written for {args.n} prompts"

    pipe = jaxt2i.load_pipeline(args.model)
    steps, guidance = pipe.sampling_defaults(args.steps, None)
    height, width = pipe.default_size

    def single(i: int):
        return pipe.text_to_image([prompts[i]], steps=steps, guidance_scale=guidance, seed=i, height=height,
                                  width=width)

    single(0)  # compiles
    start = time.perf_counter()
    for i in range(1, args.single + 1):
        single(i % args.n)
    single_rate = args.single / (time.perf_counter() - start)
    batched_rate = args.n / batched_seconds
    print(f"--prompts-file: {args.n} images in {batched_seconds:.1f} s = {batched_rate:.2f} images/s "
          f"(batch {args.batch_size}; load, compilation and PNG writing included)")
    print(f"single-prompt text_to_image loop: {args.single} calls = {single_rate:.2f} images/s "
          f"(compilation left out) -> {args.n / single_rate:.1f} s for {args.n}")
    print(f"ratio (--prompts-file / single): {batched_rate / single_rate:.2f}x; {steps} steps, guidance {guidance}, "
          f"{width}x{height}; load {loadavg()} at end")


if __name__ == "__main__":
    main()
