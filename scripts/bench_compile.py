"""Benchmark: compile time of the text-to-image program (SD1.5, 256x256, 10 DDIM steps, CFG, batch 1).

Two fresh processes share one persistent compilation cache directory, emptied first:
1. cold: the cache is empty, so the first ``text_to_image`` call traces, lowers and compiles with XLA;
2. warm: a second process loads the same model and makes the same call; XLA's work comes from the cache.

For each process it reports the first-call overhead (first call minus a second, steady call with another prompt and
seed) and JAX's own timings of tracing, lowering and backend compilation (``jax.monitoring`` events). The model is a
folder in jaxt2i's format (``jaxt2i convert`` output); without ``--model`` one with random SD1.5 weights is written.

    python scripts/bench_compile.py --model /tmp/jaxt2i-bench/sd15-native

Prints markdown table rows (see docs/benchmarks.md) with the load before and after each process, then the headline
only for rows measured on a quiet machine (the protocol in ``bench_common.py``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_common import LoadMeter, Row, command_line, machine, print_report  # noqa: E402

CHILD = """
import json, os, time
os.environ.setdefault("JAX_PLATFORMS", "cpu")
import jax
durations, counts = {{}}, {{}}
def on_duration(event, seconds, **kwargs):
    durations[event] = durations.get(event, 0.0) + seconds
def on_event(event, **kwargs):
    counts[event] = counts.get(event, 0) + 1
jax.monitoring.register_event_duration_secs_listener(on_duration)
jax.monitoring.register_event_listener(on_event)
from jaxt2i import load_pipeline
pipe = load_pipeline({model!r}, compilation_cache={cache!r})
kwargs = dict(steps={steps}, guidance_scale=7.5, sampler="ddim", height={size}, width={size})
start = time.perf_counter()
pipe.text_to_image("a lighthouse at dusk", negative_prompt="blurry", seed=1, **kwargs)
first = time.perf_counter() - start
first_durations, first_counts = dict(durations), dict(counts)
start = time.perf_counter()
pipe.text_to_image("a red bicycle in the snow", seed=2, **kwargs)
second = time.perf_counter() - start
print(json.dumps(dict(first=first, second=second, durations=first_durations, counts=first_counts,
                      recompiled=counts != first_counts)))
"""

# jax.monitoring event names (jax 0.10): time spent per phase of the first call.
PHASES = {
    "trace": "/jax/core/compile/jaxpr_trace_duration",
    "lower": "/jax/core/compile/jaxpr_to_mlir_module_duration",
    "compile (XLA or cache)": "/jax/core/compile/backend_compile_duration",
}


def run_child(model: str, cache: str, steps: int, size: int) -> dict:
    code = CHILD.format(model=model, cache=cache, steps=steps, size=size)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"compile benchmark child failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None, help="a jaxt2i-format folder (default: write random SD1.5 weights)")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warm-runs", type=int, default=2, help="how many warm-cache processes to run")
    args = parser.parse_args()
    meter = LoadMeter()

    scratch = tempfile.mkdtemp(prefix="jaxt2i-bench-compile-")
    try:
        model = args.model
        if model is None:
            from bench_load import random_sd15

            from jaxt2i.convert.load import write_native

            model = os.path.join(scratch, "sd15-native")
            write_native(model, random_sd15())
        cache = os.path.join(scratch, "xla-cache")
        print(f"machine: {machine()}")
        print(f"command: {command_line()}", flush=True)
        rows = []
        for label in ["cold (empty cache)"] + [f"warm cache, process {i + 2}" for i in range(args.warm_runs)]:
            r = run_child(model, cache, args.steps, args.size)
            load = meter.measure()
            phases = ", ".join(f"{name} {r['durations'].get(event, 0.0):.1f} s" for name, event in PHASES.items())
            hits = r["counts"].get("/jax/compilation_cache/cache_hits", 0)
            overhead = r["first"] - r["second"]
            print(f"{label}: first call {r['first']:.1f} s, second call {r['second']:.1f} s; {phases}; "
                  f"cache hits {hits}; recompiled on new prompt/seed: {r['recompiled']}", flush=True)
            name = f"txt2img program SD1.5 {args.size}x{args.size}, {args.steps} DDIM steps, CFG: {label}"
            rows.append(Row([name, f"{overhead:.1f}", phases, f"{r['first']:.1f} / {r['second']:.1f}"], load,
                            f"{name}: first-call overhead {overhead:.1f} s"))
        print_report(["compile", "first-call overhead s (first - second call)", "jax phases of the first call",
                      "first / second call s"], rows)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
