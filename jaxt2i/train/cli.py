"""``jaxt2i train CONFIG.yaml [key=value ...]``: train (or resume) a run described by a YAML config.

Also runnable as ``python -m jaxt2i.train.cli CONFIG.yaml [key=value ...]``. Exit status: 0 when the
run finished or was stopped by SIGTERM after saving a checkpoint (run the same command again to
continue); 2 for a bad config; 1 for a failed run (for example a NaN loss with nan_policy=abort, or a
checkpoint that could not be written: the previous one is intact and the same command resumes from it).
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

import jax
import yaml

from jaxt2i.data.cache import CacheMismatchError
from jaxt2i.train import loop
from jaxt2i.train.checkpoint import CheckpointWriteError
from jaxt2i.train.config import ConfigError, load_config, to_dict
from jaxt2i.train.launch import launch
from jaxt2i.train.loop import NonFiniteLossError, export_checkpoint
from jaxt2i.train.sharding import MeshError
from jaxt2i.usage import Parser

USAGE_EPILOG = """\
overrides (dotted keys, YAML values), for example:
  workdir=runs/a steps=2000 seed=1 batch_size=32 checkpoint_every=500
  mesh.data=-1 mesh.fsdp=4 optim.lr=1e-5 data.path=/data/flickr30k
  coordinator_address=10.0.0.1:1234 num_processes=2 process_id=0
  coordinator_address=auto   (TPU pods, SLURM: JAX finds the cluster)
A run restarts from the newest checkpoint in WORKDIR/checkpoints by itself,
under the same or another number of processes.

--processes N starts N processes on this machine, joined by JAX's distributed
runtime (--cpu-devices K: K host devices each, to try a pod's layout on a CPU).

--export-to DIR writes the newest checkpoint (or --step N) as a model folder for
`jaxt2i generate --model DIR` and exits without training; safe while the run trains.
"""


def _parser() -> argparse.ArgumentParser:
    p = Parser(
        prog="jaxt2i train",
        description="Train or fine-tune a text-to-image model from a YAML config.",
        epilog=USAGE_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("config", help="YAML config file (see configs/)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    p.add_argument("--print-config", action="store_true", help="print the resolved config as YAML and exit")
    p.add_argument("--export-to", metavar="DIR", help="write a checkpoint of WORKDIR as a jaxt2i model folder DIR "
                   "(must not exist) and exit without training")
    p.add_argument("--step", type=int, help="with --export-to: the checkpoint's step (default: the newest)")
    p.add_argument("--processes", type=int, metavar="N", help="start N training processes on this machine")
    p.add_argument("--cpu-devices", type=int, metavar="K", help="with --processes: K CPU host devices per process")
    return p


def _check_launch(parser: argparse.ArgumentParser, args, cfg) -> None:
    """``--processes`` / ``--cpu-devices`` fit together and with the config, or a usage error."""
    if args.cpu_devices is not None and args.processes is None:
        parser.error("--cpu-devices goes with --processes N")
    if args.processes is None:
        return
    if args.processes < 1 or (args.cpu_devices is not None and args.cpu_devices < 1):
        parser.error("--processes and --cpu-devices must be >= 1")
    if args.export_to or args.print_config:
        parser.error("--processes starts a training run; drop it with --export-to or --print-config")
    given = [k for k in ("coordinator_address", "num_processes", "process_id") if getattr(cfg, k) is not None]
    if given:
        parser.error(f"--processes sets the processes itself; remove {', '.join(given)} from the config")


def train_main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``jaxt2i train``; returns the process exit status."""
    parser = _parser()
    args = parser.parse_intermixed_args(list(sys.argv[1:] if argv is None else argv))
    args.config_args = [args.config, *args.overrides]
    if args.step is not None and not args.export_to:
        parser.error("--step goes with --export-to DIR")
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"jaxt2i train: config error: {e}", file=sys.stderr)
        return 2
    _check_launch(parser, args, cfg)
    if args.processes is not None:
        return launch(args.config_args, args.processes, args.cpu_devices)
    if args.print_config:
        print(yaml.safe_dump(to_dict(cfg), sort_keys=False), end="")
        return 0

    if args.export_to:
        try:
            folder, step = export_checkpoint(cfg, args.export_to, args.step)
        except (FileExistsError, FileNotFoundError, MeshError) as e:
            print(f"jaxt2i train: {e}", file=sys.stderr)
            return 2
        print(f"jaxt2i train: wrote step {step} of {cfg.workdir} to {folder}", file=sys.stderr)
        return 0

    try:
        result = loop.run(cfg)
    except (NonFiniteLossError, CheckpointWriteError) as e:
        print(f"jaxt2i train: {e}", file=sys.stderr)
        return 1
    except (CacheMismatchError, MeshError) as e:
        print(f"jaxt2i train: {e}", file=sys.stderr)
        return 2
    if jax.process_index() != 0:  # one summary per run, from process 0
        return 0
    if result.preempted:
        print(f"jaxt2i train: stopped at step {result.step} and saved a checkpoint; run the same command to "
              "continue.", file=sys.stderr)
    else:
        print(f"jaxt2i train: done, {result.step} steps; final weights in {result.final_dir}, metrics in "
              f"{result.workdir / 'metrics.jsonl'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(train_main())
