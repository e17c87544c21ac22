"""``jaxt2i train CONFIG --processes N``: N training processes on this machine, joined by JAX's distributed runtime.

Process 0 hosts the coordinator on a free localhost port; every process gets ``JAXT2I_COORDINATOR``,
``JAXT2I_NUM_PROCESSES`` and ``JAXT2I_PROCESS_ID`` (read by :mod:`jaxt2i.train.distributed`) and runs
``python -m jaxt2i.train.cli CONFIG [key=value ...]`` itself. SIGTERM or SIGINT to the launcher goes to every process,
which all save the same step and exit; when one process fails, the others are stopped. On a CPU machine
``cpu_devices`` gives every process that many host devices, so an N x K layout of a pod can be tried on one box.
On TPU pods and SLURM clusters one process per host is started by the cluster instead (see docs/scaling.md).
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from typing import Mapping, Sequence

CPU_DEVICES_FLAG = "--xla_force_host_platform_device_count"


def free_port() -> int:
    """A TCP port on localhost that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def with_cpu_devices(xla_flags: str, count: int) -> str:
    """``XLA_FLAGS`` with the host platform's device count set to ``count`` (replacing any given)."""
    kept = re.sub(rf"{CPU_DEVICES_FLAG}=\S*", "", xla_flags).split()
    return " ".join([*kept, f"{CPU_DEVICES_FLAG}={int(count)}"])


def process_env(base: Mapping[str, str], coordinator: str, num_processes: int, process_id: int,
                cpu_devices: int | None = None) -> dict[str, str]:
    """The environment of training process ``process_id`` of ``num_processes``."""
    env = dict(base)
    env.update(JAXT2I_COORDINATOR=coordinator, JAXT2I_NUM_PROCESSES=str(num_processes),
               JAXT2I_PROCESS_ID=str(process_id))
    if cpu_devices is not None:
        env["XLA_FLAGS"] = with_cpu_devices(env.get("XLA_FLAGS", ""), cpu_devices)
    return env


def _stop(procs: Sequence[subprocess.Popen], sig: int) -> None:
    for p in procs:
        if p.poll() is None:
            try:
                p.send_signal(sig)
            except ProcessLookupError:
                pass


def launch(args: Sequence[str], processes: int, cpu_devices: int | None = None, grace_s: float = 120.0) -> int:
    """Runs ``jaxt2i train ARGS`` as ``processes`` processes on this machine; returns the exit status
    (:func:`supervise`)."""
    if processes < 1:
        raise ValueError(f"--processes must be >= 1, got {processes}")
    coordinator = f"localhost:{free_port()}"
    cmd = [sys.executable, "-m", "jaxt2i.train.cli", *args]
    procs = [subprocess.Popen(cmd, env=process_env(os.environ, coordinator, processes, i, cpu_devices))
             for i in range(processes)]
    return supervise(procs, grace_s)


def supervise(procs: Sequence[subprocess.Popen], grace_s: float = 120.0, poll_s: float = 0.2) -> int:
    """Waits for the processes of one run, passing SIGTERM / SIGINT on to all of them; returns 0 when every one
    exited 0, else the first non-zero status (1 for one killed by a signal).

    A process that fails makes the others stop (SIGTERM, then SIGKILL after ``grace_s``): without it they would
    wait in a collective for a peer that is gone.
    """

    def forward(signum, frame):
        _stop(procs, signal.SIGTERM)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    status, failed_at = 0, None
    try:
        while any(p.poll() is None for p in procs):
            bad = next((p.returncode for p in procs if p.returncode not in (None, 0)), None)
            if bad is not None and failed_at is None:
                status, failed_at = bad, time.monotonic()
                print(f"jaxt2i train: a process exited with status {bad}; stopping the others.", file=sys.stderr)
                _stop(procs, signal.SIGTERM)
            if failed_at is not None and time.monotonic() - failed_at > grace_s:
                _stop(procs, signal.SIGKILL)
            time.sleep(poll_s)
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
        _stop(procs, signal.SIGKILL)
    code = status or next((p.returncode for p in procs if p.returncode), 0)
    return code if code >= 0 else 1
