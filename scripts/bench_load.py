"""Benchmark: loading an SD1.5-size model (random weights, fp32) from disk.

Writes the same weights once as jaxt2i's own format (``jaxt2i convert`` output, :func:`write_native`) and as a
diffusers folder (:func:`write_diffusers_folder`), then times, each in a fresh process and interleaved:

* ``read_any(native)`` and ``load_pipeline(native)`` (the latter also places the arrays on the device),
* ``read_any(diffusers folder)`` and ``load_pipeline(diffusers folder)`` (key table + transposes on the way),
* diffusers' ``StableDiffusionPipeline.from_pretrained(diffusers folder)``.

Only the load call is timed (imports are not). The files were just written, so the OS file cache is warm: this
measures parsing/conversion, not the disk.

    python scripts/bench_load.py --repeats 3

Prints markdown table rows (see docs/benchmarks.md) with the load before and after, then the headline only if the
machine was quiet (the protocol in ``bench_common.py``). ``--keep DIR`` keeps the written folders for reuse.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_common import LoadMeter, Row, command_line, machine, print_report  # noqa: E402

MEASURE = {
    "jaxt2i read_any(native)": "from jaxt2i.convert.load import read_any\nrun = lambda: read_any(PATH_NATIVE)",
    "jaxt2i load_pipeline(native)": ("import jax\nfrom jaxt2i import load_pipeline\n"
                                     "run = lambda: jax.block_until_ready(load_pipeline(PATH_NATIVE).params)"),
    "jaxt2i read_any(diffusers)": "from jaxt2i.convert.load import read_any\nrun = lambda: read_any(PATH_DIFFUSERS)",
    "jaxt2i load_pipeline(diffusers)": ("import jax\nfrom jaxt2i import load_pipeline\n"
                                        "run = lambda: jax.block_until_ready(load_pipeline(PATH_DIFFUSERS).params)"),
    "diffusers from_pretrained": ("from diffusers import StableDiffusionPipeline\n"
                                  "run = lambda: StableDiffusionPipeline.from_pretrained(PATH_DIFFUSERS)"),
}

CHILD = """
import os, time, json
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["JAXT2I_CACHE_DIR"] = "off"
PATH_NATIVE, PATH_DIFFUSERS = {native!r}, {diffusers!r}
{setup}
start = time.perf_counter()
model = run()
print(json.dumps({{"seconds": time.perf_counter() - start}}))
"""


def random_sd15(seed: int = 0):
    """A LoadedModel with SD1.5 shapes and random float32 weights (values do not matter for load time)."""
    import jax

    from jaxt2i import presets
    from jaxt2i.convert.load import LoadedModel

    spec = presets.get("sd15")
    configs = spec.configs()
    rng = np.random.default_rng(seed)
    params = {name: jax.tree.map(lambda a: rng.standard_normal(a.shape, dtype=np.float32) * 0.02,
                                 presets.abstract_params(name, configs[name]))
              for name in ("text_encoder", "vae", "unet")}
    return LoadedModel(configs, params, spec.schedule, {"pad": spec.tokenizer_pad, "folder": None}, "random sd15")


def write_folders(root: str) -> tuple[str, str]:
    """(native folder, diffusers folder) under ``root``, written once and reused afterwards."""
    from jaxt2i.convert.load import write_diffusers_folder, write_native

    native, diffusers = os.path.join(root, "sd15-native"), os.path.join(root, "sd15-diffusers")
    if not (os.path.isdir(native) and os.path.isdir(diffusers)):
        model = random_sd15()
        write_native(native, model, overwrite=True)
        write_diffusers_folder(diffusers, model, overwrite=True)
    return native, diffusers


def folder_gb(path: str) -> float:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files) / 1e9


def time_in_child(setup: str, native: str, diffusers: str) -> float:
    code = CHILD.format(native=native, diffusers=diffusers, setup=setup)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"load benchmark child failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])["seconds"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--keep", default=None, help="folder for the written models (kept); default: a temp dir")
    parser.add_argument("--only", nargs="*", default=None, help="subset of the measurements, by name prefix")
    args = parser.parse_args()
    meter = LoadMeter()

    root = args.keep or tempfile.mkdtemp(prefix="jaxt2i-bench-load-")
    try:
        native, diffusers = write_folders(root)
        print(f"machine: {machine()}")
        print(f"command: {command_line()}")
        print(f"native folder {folder_gb(native):.2f} GB, diffusers folder {folder_gb(diffusers):.2f} GB", flush=True)
        names = [n for n in MEASURE if args.only is None or any(n.startswith(o) for o in args.only)]
        times = {n: [] for n in names}
        for r in range(args.repeats):
            for name in names if r % 2 == 0 else reversed(names):
                times[name].append(time_in_child(MEASURE[name], native, diffusers))
                print(f"  {name}: {times[name][-1]:.2f} s", flush=True)
        load = meter.measure()
        reference = statistics.median(times["diffusers from_pretrained"]) if "diffusers from_pretrained" in times \
            else None
        rows = []
        for name in names:
            med = statistics.median(times[name])
            ratio = f"{med / reference:.2f}x" if reference else "-"
            runs = ", ".join(f"{t:.1f}" for t in times[name])
            headline = f"{name}: {med:.2f} s" + (f", {ratio} diffusers from_pretrained" if reference else "")
            rows.append(Row([name, f"{med:.2f}", ratio, runs, str(args.repeats)], load, headline))
        print_report(["load (SD1.5 fp32, warm OS file cache)", "median s", "vs diffusers from_pretrained", "runs (s)",
                      "repeats"], rows)
    finally:
        if args.keep is None:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
