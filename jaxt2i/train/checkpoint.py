"""Orbax checkpoints of a training run, automatic resume, and clean exit on SIGTERM.

A checkpoint at step ``s`` lives in ``WORKDIR/checkpoints/<s>/`` and holds two items:

* ``state``: the whole ``TrainState`` pytree (trainable params, frozen params, EMA params, optimizer
  state, step, RNG) saved with Orbax's standard (tensorstore) handler, sharded arrays included;
* ``data``: a JSON dict with the data position of every host (see ``jaxt2i.data.pipeline``) and
  whatever the loop adds (the config, for the record).

Saves are asynchronous (training continues while the arrays are written), atomic (Orbax writes
into a temporary folder and renames it when complete, so a killed run leaves either the whole
checkpoint or none) and only the newest ``keep`` are kept.
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import threading
from pathlib import Path
from typing import Any, Callable

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils


class CheckpointWriteError(OSError):
    """Writing a checkpoint failed (a full disk, a lost mount); the checkpoints completed before it are intact."""


_TMP_SUFFIX = ".orbax-checkpoint-tmp"  # how Orbax names a checkpoint folder until it is complete


def _is_key(x) -> bool:
    return isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def keys_to_data(tree):
    """Typed PRNG key leaves -> their uint32 key data (what a checkpoint can store)."""
    return jax.tree.map(lambda x: jax.random.key_data(x) if _is_key(x) else x, tree)


def keys_from_data(tree, like):
    """Inverse of ``keys_to_data``: wraps the leaves that are typed keys in ``like`` back into keys."""
    def one(x, ref):
        if _is_key(ref):
            return jax.random.wrap_key_data(x, impl=jax.random.key_impl(ref))
        return x

    return jax.tree.map(one, tree, like)


def abstract_like(tree):
    """Concrete (possibly sharded) arrays -> ShapeDtypeStructs with the same shardings (a restore target)."""
    def one(x):
        if isinstance(x, jax.Array):
            return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
        if isinstance(x, (np.ndarray, np.generic)):
            return jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype)
        return x

    return jax.tree.map(one, tree)


class Checkpointer:
    """Saves and restores ``(state, data position)`` under ``directory``.

    Args:
      directory: the checkpoints folder (created if missing).
      keep: how many of the newest checkpoints to keep.
      async_save: write arrays in the background (``wait()`` blocks until they are on disk).
      read_only: only read (for exporting from a folder that a running job may be writing to): nothing is
        created, cleaned up or deleted, and ``save`` is refused.
    """

    def __init__(self, directory: str | Path, keep: int = 3, async_save: bool = True, read_only: bool = False):
        self.directory = Path(directory).absolute()
        if read_only and not self.directory.is_dir():
            raise FileNotFoundError(f"no checkpoints folder at {self.directory}")
        self.read_only = read_only
        if not read_only and jax.process_index() == 0:
            remove_unfinished_saves(self.directory)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            enable_async_checkpointing=async_save,
            create=not read_only,
            cleanup_tmp_directories=False,  # done above, before any save can reuse a leftover's name
            read_only=read_only,
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "data"))

    def latest_step(self) -> int | None:
        """The newest complete checkpoint's step, or None."""
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, step: int, state, data: dict, *, force: bool = True) -> bool:
        """Starts saving ``state`` and the JSON-able ``data`` as step ``step``; returns whether a save began."""
        if self.read_only:
            raise PermissionError(f"{self.directory} was opened read-only; it cannot save.")
        if step in self.manager.all_steps():
            return False
        args = ocp.args.Composite(state=ocp.args.StandardSave(keys_to_data(state)), data=ocp.args.JsonSave(data))
        with self._writing(f"the checkpoint of step {step}"):
            return self.manager.save(int(step), args=args, force=force)

    @contextlib.contextmanager
    def _writing(self, what: str):
        """Turns a failure while ``what`` is written (or while an earlier asynchronous save completes) into a
        CheckpointWriteError that says which checkpoint a restart resumes from. Orbax writes each checkpoint into
        a temporary folder and renames it when complete, so a failed one never counts as a checkpoint."""
        try:
            yield
        except Exception as e:  # noqa: BLE001 -- orbax re-raises a background writer's error of any type
            latest = self.manager.latest_step()
            resume = (f"the checkpoint of step {latest} is intact: free space and run the same command to resume "
                      f"from it" if latest is not None else "there is no complete checkpoint yet")
            raise CheckpointWriteError(f"writing {what} in {self.directory} failed ({type(e).__name__}: "
                                       f"{str(e).splitlines()[0] if str(e) else ''}); {resume}.") from e

    def restore(self, state_like, step: int | None = None) -> tuple[Any, dict]:
        """Restores step ``step`` (default: the latest) into the shapes, dtypes and shardings of ``state_like``."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        if step not in self.all_steps():
            raise FileNotFoundError(f"no checkpoint of step {step} in {self.directory}; it has steps "
                                    f"{self.all_steps()}.")
        target = abstract_like(keys_to_data(state_like))
        args = ocp.args.Composite(state=ocp.args.StandardRestore(target), data=ocp.args.JsonRestore())
        restored = self.manager.restore(int(step), args=args)
        return keys_from_data(restored["state"], state_like), dict(restored["data"] or {})

    def wait(self):
        """Blocks until pending asynchronous saves are complete (CheckpointWriteError if one failed)."""
        with self._writing("a checkpoint"):
            self.manager.wait_until_finished()

    def close(self):
        """Waits for pending saves and releases the manager, even when a save failed (which is then raised)."""
        try:
            self.wait()
        finally:
            self.manager.close()


def remove_unfinished_saves(directory: Path) -> list[str]:
    """Deletes the temporary folders (``<step>.orbax-checkpoint-tmp...``) of saves that never completed -- a run
    killed mid-save, a full disk -- and returns their names. Runs before the checkpoint manager starts: Orbax's own
    clean-up runs in the background and can delete the folder of the first new save of the same step."""
    if not directory.is_dir():
        return []
    leftovers = sorted(p for p in directory.iterdir() if _TMP_SUFFIX in p.name)
    for path in leftovers:
        shutil.rmtree(path, ignore_errors=True)
    return [p.name for p in leftovers]


def restore_or_init(checkpointer: Checkpointer, init_fn: Callable[[], tuple[Any, Any]]):
    """Resumes from the latest checkpoint if there is one, else starts fresh.

    ``init_fn() -> (state, state_shardings)`` builds the initial state (``init_train_state``); its
    shapes and shardings are the restore target. Returns ``(state, state_shardings, data, step)``
    where ``data`` is the checkpoint's JSON item (``{}`` for a fresh start) and ``step`` the
    restored step (None for a fresh start).
    """
    state, shardings = init_fn()
    step = checkpointer.latest_step()
    if step is None:
        return state, shardings, {}, None
    restored, data = checkpointer.restore(state, step)
    del state
    return restored, shardings, data, step


class PreemptionGuard:
    """Turns SIGTERM (and optionally SIGINT) into a flag the loop checks after each step.

    Use as a context manager; the previous handlers come back on exit. The loop finishes the step
    it is in, saves a checkpoint and exits with status 0 when ``requested`` is set. In a
    multi-process run ``should_stop()`` agrees across processes (any one signalled stops all).
    """

    def __init__(self, signals=(signal.SIGTERM,)):
        self.signals = tuple(signals)
        self._event = threading.Event()
        self._previous: dict = {}
        self.signal_name: str | None = None

    def _handler(self, signum, frame):
        self.signal_name = signal.Signals(signum).name
        self._event.set()

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for s in self.signals:
                self._previous[s] = signal.signal(s, self._handler)
        return self

    def __exit__(self, *exc):
        for s, h in self._previous.items():
            signal.signal(s, h)
        self._previous.clear()
        return False

    @property
    def requested(self) -> bool:
        return self._event.is_set()

    def request(self):
        """Asks for a stop as a signal would (for tests and callers)."""
        self._event.set()

    def should_stop(self) -> bool:
        """Whether to stop now; every process gets the same answer."""
        flag = self._event.is_set()
        if jax.process_count() == 1:
            return flag
        flags = multihost_utils.process_allgather(np.asarray([flag], np.int32))
        return bool(np.any(flags))


def gather_host_positions(position: dict) -> list[dict]:
    """Every host's data position (in process order); with one process, ``[position]``."""
    if jax.process_count() == 1:
        return [dict(position)]
    keys = sorted(position)
    local = np.asarray([int(position[k]) for k in keys], np.int64)
    allv = np.asarray(multihost_utils.process_allgather(local)).reshape(jax.process_count(), len(keys))
    return [dict(zip(keys, (int(v) for v in row))) for row in allv]
