"""A 2-process run on localhost (jax.distributed, CPU collectives) equals the single-process run.

Each process has 2 CPU devices and feeds only its half of the global batch; the global mesh has 4 devices.
"""

from __future__ import annotations

import os
import socket
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_sharding import assert_same_training, finish, load_results, run_worker, split_results  # noqa: E402

CONFIGS = ["2x2:jit", "4x1:shard_map"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_processes_equal_single_process(tmp_path):
    ref_out, mp_out = tmp_path / "single.npz", tmp_path / "multi.npz"
    port = _free_port()
    workers = [
        run_worker(["multiprocess", "stand_in", ",".join(CONFIGS), str(mp_out)], devices=2, extra_env={
            "JAXT2I_COORDINATOR": f"localhost:{port}",
            "JAXT2I_NUM_PROCESSES": "2",
            "JAXT2I_PROCESS_ID": str(i),
        })
        for i in range(2)
    ]
    try:
        outputs = [finish(w, timeout=600) for w in workers]
    finally:
        for w in workers:
            if w.poll() is None:
                w.kill()
    assert '"process": 0' in outputs[0] and '"process": 1' in outputs[1]
    finish(run_worker(["run", "stand_in", "1x1:jit", str(ref_out)], devices=1))
    ref = split_results(load_results(ref_out), "1x1:jit")
    multi = load_results(mp_out)
    for spec in CONFIGS:
        got = split_results(multi, spec)
        assert_same_training(got, ref)
    assert int(split_results(multi, "2x2:jit")["num_sharded"]) > 0


def test_single_process_initialize_is_noop(monkeypatch):
    from jaxt2i.train import distributed

    for name in ("JAXT2I_COORDINATOR", "JAXT2I_NUM_PROCESSES", "JAXT2I_PROCESS_ID"):
        monkeypatch.delenv(name, raising=False)
    assert distributed.maybe_initialize() is False
    assert distributed.maybe_initialize(num_processes=1) is False
    monkeypatch.setenv("JAXT2I_NUM_PROCESSES", "1")
    assert distributed.maybe_initialize() is False


def test_initialize_reports_missing_settings(monkeypatch):
    from jaxt2i.train import distributed

    for name in ("JAXT2I_COORDINATOR", "JAXT2I_PROCESS_ID"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("JAXT2I_NUM_PROCESSES", "2")
    with pytest.raises(ValueError, match="JAXT2I_COORDINATOR"):
        distributed.maybe_initialize()
    with pytest.raises(ValueError, match="process_id"):
        distributed.maybe_initialize("localhost:1234", 2, 5)
    monkeypatch.setenv("JAXT2I_NUM_PROCESSES", "two")
    with pytest.raises(ValueError, match="JAXT2I_NUM_PROCESSES"):
        distributed.maybe_initialize()
