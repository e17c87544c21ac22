"""Multi-host start-up: `jax.distributed.initialize` from explicit arguments or environment variables.

Environment variables (used for any argument left as None):
  JAXT2I_COORDINATOR     host:port of process 0's coordinator service
  JAXT2I_NUM_PROCESSES   total number of processes
  JAXT2I_PROCESS_ID      this process's index in [0, num_processes)
  JAXT2I_LOCAL_DEVICE_IDS  optional comma-separated local device ids
With one process (or none of the values set) this is a no-op. On Cloud TPU pods and SLURM, where JAX discovers
the cluster by itself, set the coordinator to ``auto`` (``coordinator_address=auto`` in a train config, or
JAXT2I_COORDINATOR=auto), or pass ``auto=True``: `jax.distributed.initialize()` then runs without arguments.
"""

from __future__ import annotations

import os

import jax

_ENV = {
    "coordinator_address": "JAXT2I_COORDINATOR",
    "num_processes": "JAXT2I_NUM_PROCESSES",
    "process_id": "JAXT2I_PROCESS_ID",
    "local_device_ids": "JAXT2I_LOCAL_DEVICE_IDS",
}

_STATE = {"initialized": False}
AUTO = "auto"  # the coordinator address that asks JAX to discover the cluster (TPU pods, SLURM)


def _from_env(name: str, cast):
    raw = os.environ.get(_ENV[name])
    if raw in (None, ""):
        return None
    try:
        return cast(raw)
    except ValueError as e:
        raise ValueError(f"environment variable {_ENV[name]}={raw!r} is not valid: {e}") from None


def _device_ids(raw: str) -> list[int]:
    return [int(x) for x in raw.split(",") if x.strip()]


def maybe_initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    local_device_ids: list[int] | None = None,
    *,
    auto: bool = False,
) -> bool:
    """Joins the multi-process JAX runtime when more than one process is configured.

    Returns True when `jax.distributed.initialize` was called (now or by an earlier call), False for a
    single-process run. Must run before anything touches a JAX device.
    """
    if _STATE["initialized"]:
        return True
    coordinator_address = coordinator_address or _from_env("coordinator_address", str)
    num_processes = num_processes if num_processes is not None else _from_env("num_processes", int)
    process_id = process_id if process_id is not None else _from_env("process_id", int)
    if local_device_ids is None:
        local_device_ids = _from_env("local_device_ids", _device_ids)

    if coordinator_address == AUTO:
        auto, coordinator_address = True, None
    if auto:  # JAX detects what is not given from the cluster (TPU metadata, SLURM variables)
        jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                                   process_id=process_id, local_device_ids=local_device_ids)
        _STATE["initialized"] = True
        return True
    if num_processes is None or num_processes <= 1:
        return False
    missing = [name for name, v in (("coordinator_address", coordinator_address), ("process_id", process_id))
               if v is None]
    if missing:
        raise ValueError(
            f"num_processes={num_processes} but {', '.join(missing)} is not set; pass it (flag) or set "
            + ", ".join(_ENV[m] for m in missing)
            + "."
        )
    if not 0 <= process_id < num_processes:
        raise ValueError(f"process_id={process_id} must lie in [0, num_processes={num_processes}).")
    jax.distributed.initialize(
        coordinator_address=coordinator_address,
        num_processes=num_processes,
        process_id=process_id,
        local_device_ids=local_device_ids,
    )
    _STATE["initialized"] = True
    return True
