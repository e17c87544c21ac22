"""Pieces shared by the small single-device trainers (the shapes world's KL-VAE and CLIP).

Those trainers draw batches from a fixed in-memory pool, run a pure jitted step in a Python loop and write a
plain output folder (``params.safetensors`` + ``config.json`` + ``metrics.json`` + ``log.jsonl``). The sharded,
checkpointed U-Net trainer (:mod:`jaxt2i.train.loop`) does not use this module.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import yaml

from jaxt2i.convert.io import read_safetensors, write_safetensors
from jaxt2i.convert.native import flatten_params, unflatten_params

# ----------------------------------------------------------------------------- configs


def load_yaml_config(path: str | os.PathLike, cls, overrides: Mapping[str, Any] | None = None):
    """A frozen train-config dataclass from a YAML file of its fields plus overrides; unknown keys and values of the
    wrong type are errors, and values are coerced to the fields' types (YAML reads ``5e-4`` as a string)."""
    from jaxt2i.train.config import from_dict

    data = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    data.update(overrides or {})
    try:
        return from_dict(cls, data)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None


def script_main(argv: Sequence[str] | None, description: str, config_cls, train: Callable, out_help: str) -> None:
    """Command line of a small trainer: ``--config FILE.yaml --out DIR [--set KEY=VALUE ...]``.

    ``--set`` values are read as YAML (``--set steps=50`` gives an int); the config is built with
    :func:`load_yaml_config` and passed to ``train(cfg, out_dir, log=...)``.
    """
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", required=True, help=f"YAML file of {config_cls.__name__} fields")
    parser.add_argument("--out", required=True, help=out_help)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field")
    args = parser.parse_args(argv)
    overrides = {}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep or not key:
            parser.error(f"--set expects KEY=VALUE, got {item!r}")
        overrides[key] = yaml.safe_load(value)
    try:
        cfg = load_yaml_config(args.config, config_cls, overrides)
    except (OSError, ValueError, TypeError) as e:
        parser.error(str(e))
    train(cfg, args.out, log=lambda line: print(line, flush=True))


# ----------------------------------------------------------------------------- saving


def save_model_folder(folder: str | os.PathLike, params: Mapping[str, Any], config_dict: Mapping[str, Any],
                      dtype: str = "float32") -> int:
    """Writes ``params.safetensors`` (floating leaves cast to ``dtype``) and ``config.json``; returns the bytes."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    flat = {k: v.astype(dtype) if np.issubdtype(v.dtype, np.floating) else v
            for k, v in flatten_params(params).items()}
    write_safetensors(folder / "params.safetensors", flat, metadata={"format": "jaxt2i-flax-flat", "sep": "/"})
    (folder / "config.json").write_text(json.dumps(dict(config_dict), indent=2, default=list), encoding="utf-8")
    return (folder / "params.safetensors").stat().st_size


def load_model_folder(folder: str | os.PathLike, dtype: Any = jnp.float32) -> tuple[dict, dict]:
    """``(params, config_dict)`` from a folder written by :func:`save_model_folder`; params cast to ``dtype``."""
    folder = Path(folder)
    for name in ("params.safetensors", "config.json"):
        if not (folder / name).is_file():
            raise FileNotFoundError(f"{folder / name} is missing; expected a folder written by save_model_folder.")
    flat = read_safetensors(str(folder / "params.safetensors"))
    params = jax.tree.map(jnp.asarray, unflatten_params({k: v.astype(np.dtype(dtype)) for k, v in flat.items()}))
    return params, json.loads((folder / "config.json").read_text(encoding="utf-8"))


# ----------------------------------------------------------------------------- the loop


def count_params(params) -> int:
    """Number of scalars in a parameter tree."""
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(params)))


def epoch_batches(pool_size: int, batch_size: int, seed: int, step: int) -> np.ndarray:
    """Indices ``[batch_size]`` into the training pool for ``step``: a seeded permutation per epoch, remainder dropped."""
    per_epoch = pool_size // batch_size
    if per_epoch < 1:
        raise ValueError(f"batch_size {batch_size} is larger than the training pool ({pool_size} examples); "
                         "lower batch_size or raise the number of training examples.")
    epoch, offset = divmod(step, per_epoch)
    order = np.random.default_rng([seed, epoch]).permutation(pool_size)
    return order[offset * batch_size: (offset + 1) * batch_size]


def run_logged_steps(num_steps: int, log_every: int, step_fn: Callable[[int], Mapping[str, Any]],
                     cfg: Any, out_dir: str | os.PathLike | None, log: Callable[[str], None],
                     digits: int = 6) -> tuple[list[dict], float]:
    """Calls ``step_fn(step)`` for ``step`` in ``range(num_steps)``; returns ``(history, seconds)``.

    ``step_fn`` runs one training step and returns its metrics (scalars). Every ``log_every`` steps and at the last
    one, a row ``{"step": step + 1, "time_s", **metrics}`` (values rounded to ``digits``) goes to ``log``, to the
    returned history and, when ``out_dir`` is given, to ``OUT/log.jsonl``; ``OUT/train_config.json`` gets ``cfg``.
    """
    log_file = None
    if out_dir is not None:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        (Path(out_dir) / "train_config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2, default=list))
        log_file = open(Path(out_dir) / "log.jsonl", "w", encoding="utf-8")
    history, t0 = [], time.time()
    try:
        for step in range(num_steps):
            metrics = step_fn(step)
            if step % log_every == 0 or step == num_steps - 1:
                row = {"step": step + 1, "time_s": round(time.time() - t0, 2),
                       **{k: round(float(v), digits) for k, v in metrics.items()}}
                history.append(row)
                log(json.dumps(row))
                if log_file:
                    log_file.write(json.dumps(row) + "\n")
                    log_file.flush()
    finally:
        if log_file:
            log_file.close()
    return history, time.time() - t0
