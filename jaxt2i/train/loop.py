"""The training loop of every component kind: state + data + step + checkpoints + metrics, from a ``TrainConfig``.

``run(cfg)`` does, in order:

1. joins a multi-host run when configured (``coordinator_address`` / ``num_processes`` / ``process_id``);
2. builds the kind (``cfg.kind``, :mod:`jaxt2i.train.kinds`): its modules and starting weights;
3. builds the mesh and the sharded train state, or restores the latest checkpoint in
   ``WORKDIR/checkpoints/`` together with the data position (so a restarted run continues exactly);
4. iterates: batch -> step -> metrics (loss, the kind's metrics, grad norm, lr, steps/s, examples/s, MFU) to
   ``WORKDIR/metrics.jsonl`` (+ TensorBoard when available) and a tqdm progress bar on stderr; the kind's
   samples every ``sample.every`` steps; a checkpoint every ``checkpoint_every`` steps;
5. on SIGTERM: finishes the current step, saves, returns normally (the CLI exits 0);
6. at the end: saves a last checkpoint and exports the model folder to ``WORKDIR/final/``.

A NaN/Inf loss either aborts (``nan_policy="abort"``: ``NonFiniteLossError``) or discards that
step's update (``"skip"``: the step counter advances, weights and optimizer state do not; this
keeps a copy of the state, i.e. twice its memory).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Callable

import jax
import numpy as np
from tqdm import tqdm

from jaxt2i.train import checkpoint as ckpt_lib
from jaxt2i.train import distributed
from jaxt2i.train.config import TrainConfig, to_dict
from jaxt2i.train.kinds import kind_class
from jaxt2i.train.kinds.base import Kind
from jaxt2i.train.metrics import MetricsWriter, compiled_flops, mfu, peak_flops_per_device
from jaxt2i.train.sharding import check_host_rows, local_batch_size, make_mesh
from jaxt2i.train.state import init_train_state
from jaxt2i.train.step import make_train_step


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or Inf and ``nan_policy`` is "abort"."""


def _log(msg: str):
    if jax.process_index() == 0:
        print(f"[jaxt2i train] {msg}", file=sys.stderr, flush=True)


def build_kind(cfg: TrainConfig) -> Kind:
    """The run's component kind (modules and starting weights built)."""
    return kind_class(cfg.kind)(cfg)


def init_state(kind: Kind, cfg: TrainConfig, mesh):
    """``(state, state_shardings)``: the kind's components, fresh or loaded, sharded on ``mesh``."""
    return init_train_state(kind.initializers(), kind.initial_params(), kind.trainable, cfg.optim, cfg.trainable,
                            mesh, seed=cfg.seed, overrides=kind.overrides())


def make_batches(kind: Kind, local_batch: int, position: dict | None):
    """This host's batch iterator at ``position`` (``position()``, ``skipped``, ``close()``)."""
    return kind.batches(local_batch, position)


def host_position(hosts: list[dict], step: int, local_batch: int, host: int, num_hosts: int) -> dict:
    """This host's data position from the positions a checkpoint of ``step`` saved for each of its hosts.

    Under the same number of hosts, each host continues from its own position. Under another number, the
    position follows from the step (every host consumes ``local_batch`` stream items per step, see
    ``jaxt2i.data.order``): exact while no example was skipped as unreadable, else approximate (a warning says so).
    """
    if len(hosts) == num_hosts:
        return hosts[host]
    skipped = sum(int(h.get("skipped", 0)) for h in hosts)
    if skipped:
        _log(f"warning: the checkpoint was written by {len(hosts)} hosts, this run has {num_hosts}, and "
             f"{skipped} unreadable examples were skipped; the data order restarts at an approximate position")
    return {"consumed": step * local_batch, "skipped": 0}


# ----------------------------------------------------------------------------- FLOPs


def step_flops(step_fn, state, batch) -> float | None:
    """FLOPs of one train step (forward + backward, global batch) from XLA's cost analysis of the lowered step,
    plus a dozen per parameter for the optimizer update; None when XLA does not say."""
    try:
        lowered = step_fn.lower(state, batch)
    except Exception as e:  # noqa: BLE001 -- MFU is informative only
        _log(f"MFU unavailable: lowering for the cost analysis failed ({type(e).__name__}: {e})")
        return None
    flops = compiled_flops(lowered)
    if flops is None:
        return None
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.params))
    return flops + 12.0 * n_params  # AdamW + clipping + EMA: roughly a dozen FLOPs per parameter


# ----------------------------------------------------------------------------- export


def export_checkpoint(cfg: TrainConfig, out: str | os.PathLike, step: int | None = None) -> tuple[Path, int]:
    """Writes checkpoint ``step`` (default: the newest) of ``cfg.workdir`` as a model folder at ``out``.

    The same folder the run's end would write had it stopped there. Opens the checkpoints read-only, so it is
    safe while the run is still training. Returns ``(folder, step)``; ``out`` must not exist yet.
    """
    out = Path(out)
    if out.exists():
        raise FileExistsError(f"{out} already exists; choose a new folder (nothing is overwritten).")
    workdir = Path(cfg.workdir).absolute()
    checkpointer = ckpt_lib.Checkpointer(workdir / "checkpoints", read_only=True)
    try:
        step = checkpointer.latest_step() if step is None else int(step)
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {checkpointer.directory} yet; train first (or wait for "
                                    f"checkpoint_every={cfg.checkpoint_every} steps).")
        kind = build_kind(cfg)
        state, _ = init_state(kind, cfg, make_mesh(cfg.mesh))
        state, _ = checkpointer.restore(state, step)
    finally:
        checkpointer.close()
    kind.export(state, out, overwrite=False)
    return out, step


# ----------------------------------------------------------------------------- the loop


@dataclasses.dataclass
class RunResult:
    """What ``run`` returns: the last step reached, whether it stopped on a signal, and where things are."""

    step: int
    preempted: bool
    workdir: Path
    final_dir: Path | None
    last_metrics: dict
    skipped_examples: int
    skipped_steps: int


def handle_nonfinite(loss: float, step: int, policy: str, prev_state, where: str = "WORKDIR/checkpoints"):
    """What to do after step ``step`` produced a NaN/Inf ``loss``.

    ``policy="abort"`` raises ``NonFiniteLossError``; ``"skip"`` returns ``prev_state`` (the state before
    the step) with its step counter advanced, so the update is discarded but the run moves on to the
    next batch and RNG stream, exactly as a resumed run would.
    """
    if policy == "abort":
        raise NonFiniteLossError(
            f"loss is {loss} at step {step}; stopping. Lower optim.lr, keep optim.grad_clip_norm, check the "
            f"data, or set nan_policy=skip to discard such steps (the last checkpoint is in {where})."
        )
    if prev_state is None:
        raise ValueError("nan_policy='skip' needs the state from before the step")
    _log(f"step {step}: loss is {loss}; update discarded (nan_policy=skip)")
    return prev_state.replace(step=prev_state.step + 1)


def _copy_state(state):
    return jax.tree.map(lambda x: x.copy() if isinstance(x, jax.Array) else x, state)


def run(
    cfg: TrainConfig,
    *,
    on_step_end: Callable[[int, dict, dict], None] | None = None,
    guard: ckpt_lib.PreemptionGuard | None = None,
) -> RunResult:
    """Trains per ``cfg`` (see the module docstring). ``on_step_end(step, metrics, context)`` is called after
    every step (context: ``{"checkpointer", "state"}``), for tools and tests. The SIGTERM handler is installed
    first thing, so a signal during start-up also ends in a saved checkpoint (after the first step)."""
    if guard is not None:
        return _run(cfg, on_step_end, guard)
    with ckpt_lib.PreemptionGuard() as guard:
        return _run(cfg, on_step_end, guard)


def _metrics_record(metrics: dict) -> dict:
    """Step metrics (device scalars) -> floats, ``loss`` first."""
    return {"loss": float(metrics["loss"]), **{k: float(v) for k, v in sorted(metrics.items()) if k != "loss"}}


def _run(cfg: TrainConfig, on_step_end, guard: ckpt_lib.PreemptionGuard) -> RunResult:
    if distributed.maybe_initialize(cfg.coordinator_address, cfg.num_processes, cfg.process_id):
        guard.reinstall()
    primary = jax.process_index() == 0
    mesh = make_mesh(cfg.mesh)
    local_batch = local_batch_size(cfg.batch_size, mesh)
    check_host_rows(cfg.batch_size, mesh)
    workdir = Path(cfg.workdir).absolute()
    workdir.mkdir(parents=True, exist_ok=True)
    if primary:
        (workdir / "config.json").write_text(json.dumps(to_dict(cfg), indent=1, default=str))

    kind = build_kind(cfg)
    checkpointer = ckpt_lib.Checkpointer(workdir / "checkpoints", keep=cfg.keep_checkpoints,
                                         async_save=cfg.async_checkpoints)
    state, shardings, data_item, restored = ckpt_lib.restore_or_init(checkpointer, lambda: init_state(kind, cfg, mesh))
    start = 0 if restored is None else int(restored)
    if restored is not None:
        _log(f"resumed from {checkpointer.directory}/{restored}")
    kind.prepare(state)
    position = (host_position(data_item.get("hosts") or [], start, local_batch, jax.process_index(),
                              jax.process_count()) if restored is not None else None)
    batches = make_batches(kind, local_batch, position)

    step_fn = make_train_step(kind.loss, cfg.optim, cfg.trainable, mesh=mesh, state_shardings=shardings,
                              form=cfg.form)
    writer = MetricsWriter(workdir, tensorboard=cfg.tensorboard, truncate_after=start if restored is not None else None,
                           enabled=primary, log=_log)
    progress = tqdm(total=cfg.steps, initial=start, disable=not (cfg.progress and primary), unit="step",
                    dynamic_ncols=True, file=sys.stderr)
    peak = peak_flops_per_device(jax.devices()[0].device_kind, cfg.peak_tflops)
    flops = None
    sample_dir = workdir / "samples"
    saved = {start} if restored is not None else set()
    skipped_steps = int(data_item.get("skipped_steps", 0)) if restored is not None else 0

    def save(step: int):
        hosts = ckpt_lib.gather_host_positions(batches.position())
        checkpointer.save(step, state, {"step": step, "hosts": hosts, "skipped_steps": skipped_steps})
        saved.add(step)

    step, preempted, last = start, False, {}
    t_last, examples_since, steps_since = None, 0, 0
    try:
        while step < cfg.steps:
            batch = next(batches)
            prev = _copy_state(state) if cfg.nan_policy == "skip" else None
            if flops is None and peak is not None and step == start:
                flops = step_flops(step_fn, state, batch)
            state, metrics = step_fn(state, batch)
            rec = _metrics_record(metrics)  # waits for the step
            step += 1
            if not math.isfinite(rec["loss"]):
                state = handle_nonfinite(rec["loss"], step, cfg.nan_policy, prev, where=str(checkpointer.directory))
                skipped_steps += 1
            prev = None
            now = time.perf_counter()
            if t_last is None:
                t_last = now  # the first step includes compilation; rates start after it
            else:
                steps_since += 1
                examples_since += cfg.batch_size
            if step % cfg.log_every == 0 or step == cfg.steps:
                if steps_since:
                    dt = now - t_last
                    rec["steps_per_s"] = steps_since / dt
                    rec["images_per_s"] = examples_since / dt
                    u = mfu(flops, rec["steps_per_s"], jax.device_count(), peak)
                    if u is not None:
                        rec["mfu"] = u
                    t_last, examples_since, steps_since = now, 0, 0
                rec["skipped_examples"] = batches.skipped
                writer.write(step, rec)
            last = rec
            progress.set_postfix(loss=f"{rec['loss']:.4f}", refresh=False)
            progress.update(step - progress.n)
            if cfg.sample.every and step % cfg.sample.every == 0:
                kind.sample(state, step, sample_dir)
            stop = guard.should_stop()
            if step % cfg.checkpoint_every == 0 or stop:
                save(step)
            if on_step_end is not None:
                on_step_end(step, rec, {"checkpointer": checkpointer, "state": state})
            if stop:
                preempted = True
                _log(f"{guard.signal_name or 'a stop request (another process)'} received: saved step {step}, exiting")
                break
        final_dir = None
        if not preempted:
            if step not in saved:
                save(step)
            final_dir = workdir / "final"
            kind.export(state, final_dir, overwrite=True)
            if cfg.sample.every and step % cfg.sample.every:
                kind.sample(state, step, sample_dir)
    finally:
        progress.close()
        batches.close()
        checkpointer.close()
        writer.close()
    return RunResult(step, preempted, workdir, final_dir, last, batches.skipped, skipped_steps)
