"""Memory and scale figures of Stable Diffusion 1.5 training and sampling, read from XLA's analyses of the real
programs (the tables of docs/scaling.md).

1. Per-device bytes of the train state (U-Net parameters + AdamW moments + EMA) at fsdp = 1, 2, 4, 8 on 8 host
   devices (mesh data x fsdp, data = 8 / fsdp): ``memory_analysis()`` of the compiled train step
   (``make_train_step``'s jit form; arguments, outputs, aliased (donated) and temporary bytes per device), against the
   exact ideal ``params x 4 bytes x (1 + 2 moments + EMA) / fsdp``.
2. The step's temporary (peak working) memory with and without rematerialisation, bf16 and fp32 compute.
3. FLOPs from XLA's cost analysis: one train step (forward + backward + update) per example, and one 50-step
   guided sample (U-Net at batch 2 x 50, VAE decode, text encoder); the plan table derives step times, images/s and
   checkpoint sizes from them and the public hardware figures in ``PLAN``.

Nothing of SD1.5's size is allocated: the state is abstract (``jaxt2i.train.state.abstract_train_state``: shapes and
shardings only), the batch is cached latents + text states (what ``data.use_cache`` feeds; the frozen VAE and text
encoder are then not part of the step). The run config is configs/sd15_finetune.yaml with ``key=value`` overrides.

    python scripts/scaling_memory.py                                  # SD1.5, every table (7 compiles, minutes each)
    python scripts/scaling_memory.py --preset tiny_sd1 --latent 8     # the same tables for the tiny U-Net
    python scripts/scaling_memory.py --only fsdp --fsdp 1,8 --json out.json

XLA's CPU backend compiles with ``--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true``
(faster LLVM code generation; XLA's buffer assignment, which the memory figures come from, runs before it and is
the same); ``--llvm-opt`` turns them off. Prints markdown tables.
"""

from __future__ import annotations

import os
import sys

HOST_DEVICES = 8


def _set_xla_flags(argv: list[str]) -> None:
    """8 host devices (and fast LLVM code generation unless --llvm-opt); before jax is imported."""
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" not in flags:
        flags += f" --xla_force_host_platform_device_count={HOST_DEVICES}"
    if "--llvm-opt" not in argv and "xla_backend_optimization_level" not in flags:
        flags += " --xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
    os.environ["XLA_FLAGS"] = flags.strip()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")


if __name__ == "__main__":
    _set_xla_flags(sys.argv)

import argparse  # noqa: E402 -- XLA_FLAGS must be set before jax is imported
import json  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from jaxt2i import presets  # noqa: E402
from jaxt2i.models import latent_diffusion  # noqa: E402
from jaxt2i.train.config import TrainConfig, load_config  # noqa: E402
from jaxt2i.train.kinds.base import Kind  # noqa: E402
from jaxt2i.train.loop import build_kind  # noqa: E402
from jaxt2i.train.metrics import compiled_flops  # noqa: E402
from jaxt2i.train.sharding import batch_shardings, make_mesh  # noqa: E402
from jaxt2i.train.state import abstract_train_state, count_params  # noqa: E402
from jaxt2i.train.step import make_train_step  # noqa: E402

CONFIG = Path(__file__).resolve().parent.parent / "configs" / "sd15_finetune.yaml"
MIB = 2**20
GB = 1e9

# Public figures the plan uses (docs/scaling.md cites each source).
PLAN = {
    "v5p_chips": 128,             # v5p-256: 256 TensorCores = 128 chips (Cloud TPU v5p docs, topology 4x4x8)
    "v5p_peak": 459e12,           # bf16 FLOP/s per v5p chip (Cloud TPU v5p docs)
    "v5p_hbm_gib": 95,            # HBM per v5p chip (Cloud TPU v5p docs)
    "h100_peak": 989e12,          # dense bf16 FLOP/s per H100 SXM (NVIDIA datasheet: 1,979 with 2:4 sparsity)
    "gpus": 8,
    "train_batch_per_chip": 4,    # global batch 512: what the measured per-example memory fits in 95 GiB
    "dataset": 2.32e9,            # LAION-2B-en image-text pairs (LAION-5B paper)
    "steps": 100_000,
    "mfus": (0.4, 0.6),
    "sample_steps": 50,
    "sample_mfu": 0.4,
    "write_gb_per_s": (1.0, 10.0),
}


# ----------------------------------------------------------------------------- what is measured


def run_config(preset: str, fsdp: int, *, remat: bool, dtype: str, global_batch: int,
               extra: tuple[str, ...] = ()) -> TrainConfig:
    """configs/sd15_finetune.yaml with the preset, mesh (data = devices / fsdp), remat, compute dtype and batch set."""
    return load_config(CONFIG, [f"model.preset={preset}", "mesh.data=-1", f"mesh.fsdp={fsdp}",
                                f"model.remat={str(remat).lower()}", f"compute_dtype={dtype}",
                                f"batch_size={global_batch}", *extra])


def abstract_state(kind: Kind, cfg: TrainConfig, mesh, components: tuple[str, ...] | None = None):
    """``(abstract TrainState, shardings)`` of the kind's ``components`` (default: the trainable ones)."""
    initializers = kind.initializers()
    names = kind.trainable if components is None else components
    return abstract_train_state({n: initializers[n] for n in names}, None, kind.trainable, cfg.optim, cfg.trainable,
                                mesh, seed=cfg.seed)


def per_device_bytes(tree: Any) -> int:
    """Bytes one device holds of a tree of sharded ``ShapeDtypeStruct``s (the largest shard of each leaf)."""
    return int(sum(np.prod(leaf.sharding.shard_shape(leaf.shape), dtype=np.int64) * leaf.dtype.itemsize
                   for leaf in jax.tree.leaves(tree)))


def replicated_count(tree: Any) -> int:
    """Scalars of a tree of sharded ``ShapeDtypeStruct``s that every device holds whole."""
    return int(sum(np.prod(leaf.shape, dtype=np.int64) for leaf in jax.tree.leaves(tree)
                   if leaf.sharding.is_fully_replicated))


def global_bytes(tree: Any) -> int:
    """Bytes of a tree's leaves, whole."""
    return int(sum(np.prod(leaf.shape, dtype=np.int64) * np.dtype(leaf.dtype).itemsize for leaf in jax.tree.leaves(tree)))


def cached_batch(kind: Kind, global_batch: int, side: int) -> dict[str, np.ndarray]:
    """A batch as ``data.use_cache`` feeds it: latents [B, side, side, C], text states [B, 77, D] and the empty
    prompt's states [77, D] (zeros: only shapes matter)."""
    channels = kind.configs["vae"].latent_channels
    tokens, width = kind.tokenizer.max_length, kind.configs["text_encoder"].hidden_size
    return {"latents": np.zeros((global_batch, side, side, channels), np.float32),
            "text_states": np.zeros((global_batch, tokens, width), np.float32),
            "uncond_text_states": np.zeros((tokens, width), np.float32)}


def batch_bytes_per_device(batch: dict, mesh) -> int:
    shardings = batch_shardings(batch, mesh)
    return int(sum(np.prod(shardings[k].shard_shape(v.shape)) * v.dtype.itemsize for k, v in batch.items()))


def ideal_state_bytes(num_params: int, ema: bool, fsdp: int) -> float:
    """params x 4 bytes x (params + 2 Adam moments + EMA) / fsdp."""
    return num_params * 4 * (3 + int(ema)) / fsdp


def measure_step(preset: str, fsdp: int, *, remat: bool, dtype: str, batch_per_device: int, side: int,
                 compile_step: bool = True) -> dict:
    """One train step of the U-Net on ``HOST_DEVICES`` devices: its state's per-device bytes (from the shardings),
    and with ``compile_step`` the compiled program's memory analysis (bytes per device) and its global FLOPs."""
    devices = jax.device_count()
    global_batch = batch_per_device * devices
    cfg = run_config(preset, fsdp, remat=remat, dtype=dtype, global_batch=global_batch)
    kind = build_kind(cfg)
    mesh = make_mesh(cfg.mesh)
    state, shardings = abstract_state(kind, cfg, mesh)
    batch = cached_batch(kind, global_batch, side)
    num_params = count_params(state.params)
    ema = state.ema_params is not None
    row = {
        "preset": preset, "fsdp": fsdp, "data": devices // fsdp, "remat": remat, "dtype": dtype,
        "global_batch": global_batch, "latent": side, "params": num_params, "ema": ema,
        "state_from_shardings": per_device_bytes(state),
        "params_bytes": per_device_bytes(state.params), "opt_bytes": per_device_bytes(state.opt_state),
        "ema_bytes": per_device_bytes(state.ema_params) if ema else 0,
        "replicated_params": replicated_count(state.params),
        "batch_bytes": batch_bytes_per_device(batch, mesh),
        "ideal_state": ideal_state_bytes(num_params, ema, fsdp),
    }
    if not compile_step:
        return row
    step = make_train_step(kind.loss, cfg.optim, cfg.trainable, mesh=mesh, state_shardings=shardings, form=cfg.form)
    start = time.perf_counter()
    lowered = step.lower(state, batch)
    row["lower_s"] = time.perf_counter() - start
    row["step_flops"] = compiled_flops(lowered)  # the whole (global) program, before partitioning
    start = time.perf_counter()
    compiled = lowered.compile()
    row["compile_s"] = time.perf_counter() - start
    mem = compiled.memory_analysis()
    row.update(argument=mem.argument_size_in_bytes, output=mem.output_size_in_bytes,
               alias=mem.alias_size_in_bytes, temp=mem.temp_size_in_bytes)
    row["state_measured"] = row["argument"] - row["batch_bytes"]
    row["ratio"] = row["state_measured"] / row["ideal_state"]
    return row


def run_state_bytes(preset: str) -> dict:
    """Global bytes of the whole run state the fine-tune builds (what a checkpoint holds: U-Net params, EMA, AdamW
    moments, the frozen VAE and text encoder, step, rng) and of the exported model (U-Net + VAE + text encoder)."""
    cfg = run_config(preset, 1, remat=True, dtype="bfloat16", global_batch=jax.device_count())
    kind = build_kind(cfg)
    state, _ = abstract_state(kind, cfg, make_mesh(cfg.mesh), tuple(kind.initializers()))
    return {"checkpoint": global_bytes(state), "params": global_bytes(state.params), "ema": global_bytes(state.ema_params),
            "opt_state": global_bytes(state.opt_state), "frozen": global_bytes(state.frozen),
            "export": global_bytes(state.params) + global_bytes(state.frozen)}


def _lowered_flops(fn, *args) -> float:
    flops = compiled_flops(jax.jit(fn).lower(*args))
    if flops is None:
        raise RuntimeError("XLA reported no FLOPs for the lowered program; this backend lacks cost analysis.")
    return flops


def sampling_flops(preset: str, side: int) -> dict:
    """Forward FLOPs (XLA cost analysis of the lowered programs) of what one guided text-to-image sample runs:
    the U-Net at batch 2 (conditional + unconditional) per step, the VAE decoder for one image and the text
    encoder for 2 prompts."""
    spec = presets.get(preset)
    configs = spec.configs()
    models = latent_diffusion.build_models(configs, dtype=jnp.bfloat16, param_dtype=jnp.float32)
    params = {name: presets.abstract_params(name, configs[name]) for name in ("unet", "vae", "text_encoder")}
    unet_cfg, vae_cfg, text_cfg = configs["unet"], configs["vae"], configs["text_encoder"]
    sds = jax.ShapeDtypeStruct
    latents = sds((2, side, side, vae_cfg.latent_channels), jnp.float32)
    context = sds((2, 77, unet_cfg.cross_attention_dim), jnp.float32)
    timesteps = sds((2,), jnp.float32)
    ids = sds((2, 77), jnp.int32)
    one_latent = sds((1, side, side, vae_cfg.latent_channels), jnp.float32)
    images = sds((1, side * vae_cfg.downsample_factor, side * vae_cfg.downsample_factor, 3), jnp.float32)
    return {
        "unet_forward_b2": _lowered_flops(lambda p, x, t, c: latent_diffusion.predict(models, p, x, t, c),
                                          params, latents, timesteps, context),
        "vae_decode_b1": _lowered_flops(lambda p, z: latent_diffusion.vae_decode(models.vae, p, z),
                                        params["vae"], one_latent),
        "vae_encode_b1": _lowered_flops(lambda p, x: models.vae.apply({"params": p}, x, method="encode").mean,
                                        params["vae"], images),
        "text_encoder_b2": _lowered_flops(lambda p, i: latent_diffusion.text_states(models, p, i), params, ids),
        "text_params": count_params(params["text_encoder"]), "vae_params": count_params(params["vae"]),
        "text_dims": (text_cfg.num_layers, text_cfg.hidden_size),
    }


# ----------------------------------------------------------------------------- tables


def _mib(x) -> str:
    return f"{x / MIB:,.1f}"


def _tflops(x) -> str:
    return f"{x / 1e12:.4g} TFLOP"


def markdown_table(columns: dict[str, Any], rows: list[dict]) -> str:
    """``columns``: {header: row -> cell text}; one line per row."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r) for cell in columns.values()) + " |" for r in rows]
    return "\n".join(lines)


def fsdp_table(rows: list[dict]) -> str:
    return markdown_table({
        "fsdp x data": lambda r: f"{r['fsdp']} x {r['data']}", "argument": lambda r: _mib(r["argument"]),
        "batch": lambda r: _mib(r["batch_bytes"]), "state (argument - batch)": lambda r: _mib(r["state_measured"]),
        "ideal state": lambda r: _mib(r["ideal_state"]), "measured / ideal": lambda r: f"{r['ratio']:.4f}",
        "output": lambda r: _mib(r["output"]), "alias": lambda r: _mib(r["alias"]), "temp": lambda r: _mib(r["temp"]),
        "compile (s)": lambda r: f"{r['compile_s']:.0f}"}, rows)


def shard_table(rows: list[dict]) -> str:
    return markdown_table({
        "fsdp": lambda r: str(r["fsdp"]), "params": lambda r: _mib(r["params_bytes"]),
        "AdamW state": lambda r: _mib(r["opt_bytes"]), "EMA": lambda r: _mib(r["ema_bytes"]),
        "state total": lambda r: _mib(r["state_from_shardings"]), "ideal": lambda r: _mib(r["ideal_state"]),
        "from shardings / ideal": lambda r: f"{r['state_from_shardings'] / r['ideal_state']:.4f}",
        "params held whole": lambda r: f"{r['replicated_params']:,}"}, rows)


def remat_table(rows: list[dict]) -> str:
    return markdown_table({
        "compute": lambda r: r["dtype"], "remat": lambda r: "on" if r["remat"] else "off",
        "temp (peak working memory)": lambda r: _mib(r["temp"]), "argument": lambda r: _mib(r["argument"]),
        "output": lambda r: _mib(r["output"]),
        "train-step FLOPs per example": lambda r: _tflops(r["step_flops"] / r["global_batch"]),
        "compile (s)": lambda r: f"{r['compile_s']:.0f}"}, rows)


def plan_numbers(train_flops: float, sample: dict, sizes: dict, plan: dict = PLAN) -> dict:
    """The plan's derived numbers. train_flops: FLOPs per example of a train step on cached latents, without remat
    (model FLOPs); the uncached variant adds the frozen VAE encoder and text encoder forward per example."""
    chips, peak = plan["v5p_chips"], plan["v5p_peak"]
    global_batch = chips * plan["train_batch_per_chip"]
    per_example = {"cached latents": train_flops,
                   "images (VAE + text encoder in the step)": train_flops + sample["vae_encode_b1"]
                   + sample["text_encoder_b2"] / 2}
    train = []
    for data, flops in per_example.items():
        for m in plan["mfus"]:
            images_s = chips * peak * m / flops
            train.append({"data": data, "mfu": m, "flops": flops, "step_s": global_batch / images_s,
                          "images_s": images_s, "epoch_days": plan["dataset"] / images_s / 86400,
                          "steps_hours": plan["steps"] * global_batch / images_s / 3600})
    per_image = plan["sample_steps"] * sample["unet_forward_b2"] + sample["vae_decode_b1"] + sample["text_encoder_b2"]
    return {"global_batch": global_batch, "train": train,
            "sample": {"flops_per_image": per_image,
                       "images_s": plan["gpus"] * plan["h100_peak"] * plan["sample_mfu"] / per_image},
            "checkpoint_write_s": {bw: sizes["checkpoint"] / (bw * GB) for bw in plan["write_gb_per_s"]}}


def plan_table(train_flops: float, train_flops_remat: float, sample: dict, sizes: dict, plan: dict = PLAN) -> str:
    """Three markdown tables: training on a v5p-256, sampling on 8 H100s, checkpoints."""
    p = plan_numbers(train_flops, sample, sizes, plan)
    train = [f"Training on a v5p-256 ({plan['v5p_chips']} chips x {plan['v5p_peak'] / 1e12:g} TFLOP/s), global batch "
             f"{p['global_batch']}; remat executes {_tflops(train_flops_remat)} per example (cached latents) but "
             "MFU counts model FLOPs.\n",
             f"| data | MFU | FLOPs per example | step time | images/s | one epoch of {plan['dataset'] / 1e9:.2f} B | "
             f"{plan['steps']:,} steps |", "|---|---|---|---|---|---|---|"]
    train += [f"| {t['data']} | {t['mfu']:.0%} | {_tflops(t['flops'])} | {t['step_s']:.3f} s | {t['images_s']:,.0f} | "
              f"{t['epoch_days']:.1f} days | {t['steps_hours']:.1f} h |" for t in p["train"]]
    s = p["sample"]
    sampling = [f"Sampling: {plan['sample_steps']} steps with classifier-free guidance, 512 px.\n",
                "| part | FLOPs |", "|---|---|",
                f"| U-Net forward, batch 2 (one step) | {_tflops(sample['unet_forward_b2'])} |",
                f"| VAE decode, one image | {_tflops(sample['vae_decode_b1'])} |",
                f"| text encoder, 2 prompts | {_tflops(sample['text_encoder_b2'])} |",
                f"| one image ({plan['sample_steps']} x U-Net + decode + text) | {_tflops(s['flops_per_image'])} |",
                f"| images/s on {plan['gpus']} x H100 ({plan['h100_peak'] / 1e12:g} TFLOP/s) at MFU "
                f"{plan['sample_mfu']:.0%} | {s['images_s']:.1f} |"]
    ckpt = ["| checkpoint | bytes |", "|---|---|",
            f"| whole train state (U-Net, EMA, AdamW moments, frozen VAE + text encoder) | {sizes['checkpoint'] / GB:.2f} GB |",
            f"| of which AdamW moments | {sizes['opt_state'] / GB:.2f} GB |",
            f"| exported model folder, fp32 (U-Net + VAE + text encoder) | {sizes['export'] / GB:.2f} GB |"]
    ckpt += [f"| time to write the train state at {bw:g} GB/s | {t:.1f} s |" for bw, t in p["checkpoint_write_s"].items()]
    return "\n".join(train) + "\n\n" + "\n".join(sampling) + "\n\n" + "\n".join(ckpt)


# ----------------------------------------------------------------------------- main


def measure_all(args) -> dict:
    """Every measurement ``args`` asks for -> a JSON-able dict (``fsdp``, ``remat`` rows; ``sampling``, ``sizes``)."""
    common = dict(batch_per_device=args.batch_per_device, side=args.latent)
    results: dict[str, Any] = {"argv": sys.argv[1:], "jax": jax.__version__, "preset": args.preset,
                               "batch_per_device": args.batch_per_device, "latent": args.latent}

    def measure(**kw):
        row = measure_step(args.preset, **kw, **common)
        print(f"[scaling] {json.dumps(row)}", file=sys.stderr, flush=True)
        return row

    if args.only in (None, "fsdp"):
        results["fsdp"] = [measure(fsdp=f, remat=True, dtype="bfloat16") for f in args.fsdp]
    if args.only in (None, "remat", "plan"):
        done = {(r["dtype"], r["remat"]): r for r in results.get("fsdp", []) if r["fsdp"] == 1}
        results["remat"] = [done.get((dtype, remat)) or measure(fsdp=1, remat=remat, dtype=dtype)
                            for dtype in args.dtypes for remat in (True, False)]
    if args.only in (None, "plan"):
        results["sampling"] = sampling_flops(args.preset, args.latent)
        results["sizes"] = run_state_bytes(args.preset)
    return results


def print_tables(results: dict) -> None:
    """The markdown tables of ``measure_all``'s results."""
    per_device, side = results["batch_per_device"], results["latent"]
    if "fsdp" in results:
        rows = results["fsdp"]
        print(f"\n### Per-device bytes of the train step, bf16 compute, remat on (MiB)\n\n{fsdp_table(rows)}\n")
        print(f"### Per-device state from the shardings (MiB)\n\n{shard_table(rows)}\n")
    if "remat" in results:
        print(f"### One train step per device, fsdp 1 x data {HOST_DEVICES}, batch {per_device} per device, "
              f"{side}x{side} latents (MiB)\n\n{remat_table(results['remat'])}\n")
    if "sampling" in results:
        per_example = {r["remat"]: r["step_flops"] / r["global_batch"] for r in results["remat"]
                       if r["dtype"] == "bfloat16"}
        print(f"### Plan\n\n{plan_table(per_example[False], per_example[True], results['sampling'], results['sizes'])}\n")


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="sd15", help="jaxt2i.presets name (sd15; tiny_sd1 to try the script)")
    parser.add_argument("--latent", type=int, default=64, help="latent side (64 = 512 px images)")
    parser.add_argument("--batch-per-device", type=int, default=1)
    parser.add_argument("--fsdp", type=_ints, default=[1, 2, 4, 8])
    parser.add_argument("--only", choices=("fsdp", "remat", "plan"), default=None)
    parser.add_argument("--dtypes", type=lambda t: t.split(","), default=["bfloat16", "float32"],
                        help="compute dtypes of the remat table (bfloat16 first: the plan uses it)")
    parser.add_argument("--json", default=None, help="also write every measured number to this JSON file")
    parser.add_argument("--tables-from", default=None, help="print the tables of a --json file (no compiling)")
    parser.add_argument("--llvm-opt", action="store_true", help="XLA's default LLVM optimisation (slower compiles)")
    args = parser.parse_args()
    if args.tables_from:
        print_tables(json.loads(Path(args.tables_from).read_text()))
        return
    if jax.device_count() != HOST_DEVICES:
        raise SystemExit(f"expected {HOST_DEVICES} host devices, got {jax.device_count()}; XLA_FLAGS is "
                         f"{os.environ.get('XLA_FLAGS')!r}")
    results = measure_all(args)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    print_tables(results)


if __name__ == "__main__":
    main()
