"""`jaxt2i train --processes 2 --cpu-devices 4` (JAX's distributed runtime on localhost, CPU collectives) trains the
same model as one process with 8 devices, reads each example once across processes, agrees on SIGTERM, and resumes
under either process layout.

Five runs of the vae kind on a data x fsdp mesh (2 x 4), 6 steps of global batch 8 over 16 examples (3 epochs):

  A  1 x 8, jit, uninterrupted                                   the reference
  B  1 x 8, jit, SIGTERM at step 2 -> saves step 3 -> C  2 x 4, jit, resumes B's checkpoint to step 6
  D  2 x 4, shard_map, SIGTERM to process 1 only at step 2 -> both save step 3 -> E  1 x 8, shard_map, resumes to 6

Each run's processes record the ``(epoch, index)`` of every example they read (a ``sitecustomize`` module on the
runs' PYTHONPATH wraps the data iterator; nothing in the library is changed for the test).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from jaxt2i.train import distributed, launch

ROOT = Path(__file__).resolve().parents[2]
STEPS, TERM_AT = 6, 2

SITECUSTOMIZE = r'''
import json, os, signal

if os.environ.get("READS_DIR"):
    from jaxt2i.data import pipeline
    from jaxt2i.train import loop

    _next_example, _run = pipeline.BatchIterator._next_example, loop.run
    _process = int(os.environ.get("JAXT2I_PROCESS_ID", "0"))

    def next_example(self):
        epoch, index, example = _next_example(self)
        with open(os.path.join(os.environ["READS_DIR"], f"reads.{_process}.jsonl"), "a") as f:
            f.write(json.dumps([epoch, index]) + "\n")
        return epoch, index, example

    def on_step_end(step, metrics, context):
        if step == int(os.environ.get("TERM_AT", "0")) and _process == int(os.environ.get("TERM_PROCESS", "0")):
            os.kill(os.getpid(), signal.SIGTERM)

    pipeline.BatchIterator._next_example = next_example
    loop.run = lambda cfg, **kw: _run(cfg, on_step_end=on_step_end, **kw)
'''

ARGS = [str(ROOT / "configs" / "shapes_vae.yaml"), f"steps={STEPS}", "batch_size=8", "checkpoint_every=2",
        "keep_checkpoints=3", "log_every=1", "progress=false", "tensorboard=false", "async_checkpoints=false",
        "optim.warmup_steps=1", "data.num_examples=16", "data.image_size=16", "data.prefetch=0",
        "model.heldout_examples=4", "mesh.data=2", "mesh.fsdp=4",
        # 16 channels: the 3x3 convolutions (2304 weights) are above the fsdp size floor and split 4 ways
        "model.config={block_out_channels: [16, 16], layers_per_block: 1, norm_num_groups: 4, latent_channels: 2, "
        "sample_size: 16}"]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    site = tmp_path_factory.mktemp("site")
    (site / "sitecustomize.py").write_text(SITECUSTOMIZE)
    e = dict(os.environ)
    for name in ("JAXT2I_COORDINATOR", "JAXT2I_NUM_PROCESSES", "JAXT2I_PROCESS_ID"):
        e.pop(name, None)
    e.update({
        "JAX_PLATFORMS": "cpu",
        "JAX_COMPILATION_CACHE_DIR": str(tmp_path_factory.mktemp("xla_cache")),
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
        "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
        "XLA_FLAGS": "--xla_backend_optimization_level=0",
        "PYTHONPATH": os.pathsep.join([str(site), str(ROOT), e.get("PYTHONPATH", "")]),
    })
    return e


def train(env: dict, workdir: Path, form: str, processes: int, term_at: int = 0, term_process: int = 0):
    """``jaxt2i train`` as ``processes`` x ``8 / processes`` devices; the reads go to WORKDIR/reads.P.jsonl."""
    workdir.mkdir(parents=True, exist_ok=True)
    e = dict(env, READS_DIR=str(workdir), TERM_AT=str(term_at), TERM_PROCESS=str(term_process))
    layout = ["--processes", "2", "--cpu-devices", "4"] if processes == 2 else []
    if processes == 1:
        e["XLA_FLAGS"] = launch.with_cpu_devices(e["XLA_FLAGS"], 8)
    cmd = [sys.executable, "-m", "jaxt2i.train.cli", *ARGS, f"form={form}", f"workdir={workdir / 'run'}", *layout]
    proc = subprocess.run(cmd, cwd=ROOT, env=e, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-6000:]
    return proc


def reads(workdir: Path) -> dict[int, list[tuple[int, int]]]:
    """``{process: [(epoch, index), ...]}`` in reading order."""
    return {int(f.suffixes[0][1:]): [tuple(r) for r in map(json.loads, f.read_text().splitlines())]
            for f in sorted(workdir.glob("reads.*.jsonl"))}


def losses(run: Path) -> dict[int, float]:
    recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == sorted({r["step"] for r in recs}), "a step logged twice"
    return {r["step"]: r["loss"] for r in recs}


def final(run: Path) -> dict[str, np.ndarray]:
    return load_file(str(run / "final" / "vae.safetensors"))


def checkpoint_steps(run: Path) -> list[int]:
    return sorted(int(p.name) for p in (run / "checkpoints").iterdir() if p.name.isdigit())


@pytest.fixture(scope="module")
def runs(env, tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    out = {"A": train(env, root / "A", "jit", 1)}
    out["B"] = train(env, root / "BC", "jit", 1, term_at=TERM_AT)
    (root / "B").mkdir()
    for f in (root / "BC").glob("reads.*.jsonl"):  # B's reads, kept apart from C's
        f.rename(root / "B" / f.name)
    out["C"] = train(env, root / "BC", "jit", 2)
    out["D"] = train(env, root / "DE", "shard_map", 2, term_at=TERM_AT, term_process=1)
    (root / "D").mkdir()
    for f in (root / "DE").glob("reads.*.jsonl"):
        f.rename(root / "D" / f.name)
    out["D_checkpoints"] = checkpoint_steps(root / "DE" / "run")
    out["E"] = train(env, root / "DE", "shard_map", 1)
    out["root"] = root
    return out


def assert_same(run: Path, ref: Path, rtol: float = 1e-5):
    """Losses and final weights equal to ``rtol`` (per tensor, ||got - want|| / ||want||). Attention key biases are
    left out: softmax ignores a shift shared by all keys, so their gradient is round-off, which Adam turns into
    updates that differ between layouts; they are checked to stay at round-off size instead."""
    got, want = losses(run), losses(ref)
    assert sorted(got) == list(range(1, STEPS + 1)) == sorted(want)
    np.testing.assert_allclose([got[s] for s in sorted(got)], [want[s] for s in sorted(want)], rtol=rtol)
    a, b = final(run), final(ref)
    assert a.keys() == b.keys() and a
    key_biases = [k for k in b if k.endswith("key/bias")]
    assert key_biases and all(float(np.abs(x[k]).max()) < 1e-4 for x in (a, b) for k in key_biases)
    errors = {k: float(np.linalg.norm(a[k] - b[k]) / max(float(np.linalg.norm(b[k])), 1e-30))
              for k in b if k not in key_biases}
    worst = max(errors, key=errors.get)
    assert errors[worst] <= rtol, f"{worst}: relative error {errors[worst]:.2e}"


def test_two_processes_train_the_jit_form_as_one_process_with_8_devices_and_resume_its_checkpoint(runs):
    """B (1 x 8) stopped at step 3; C continued it as 2 x 4: the losses and weights of A, the uninterrupted 1 x 8."""
    root = runs["root"]
    assert "saved step 3" in runs["B"].stderr and "resumed from" in runs["C"].stderr
    assert_same(root / "BC" / "run", root / "A" / "run")


def test_sigterm_to_one_process_stops_both_at_the_same_step_and_either_layout_resumes(runs):
    """D (2 x 4, shard_map): SIGTERM to process 1 at step 2; both processes saved step 3 (one checkpoint, written
    together) and exited 0; E (1 x 8) resumed it: the losses and weights of A."""
    root = runs["root"]
    assert runs["D_checkpoints"] == [2, 3] and "saved step 3" in runs["D"].stderr
    assert_same(root / "DE" / "run", root / "A" / "run")


def test_each_example_is_read_once_across_processes_and_resumes(runs):
    """Every run reads 6 steps x 8 = 3 epochs of 16 examples: each (epoch, index) exactly once over all processes
    of a run and its resumption, each process only its own 4 rows of every step."""
    root = runs["root"]
    everything = {(e, i) for e in range(3) for i in range(16)}
    single = reads(root / "A")
    assert list(single) == [0] and Counter(single[0]) == Counter(everything)
    for first, rest in (("B", "BC"), ("D", "DE")):
        a, b = reads(root / first), reads(root / rest)
        chain = [r for part in (a, b) for p in sorted(part) for r in part[p]]
        assert Counter(chain) == Counter(everything), (first, rest)  # none twice, none skipped
    d = reads(root / "D")
    assert sorted(d) == [0, 1] and len(d[0]) == len(d[1]) == 3 * 4  # steps 1-3, 4 rows each
    steps_a = [single[0][8 * s: 8 * s + 8] for s in range(3)]
    for s in range(3):  # process p read rows 4p..4p+3 of each global batch, as A read them
        assert d[0][4 * s: 4 * s + 4] == steps_a[s][:4] and d[1][4 * s: 4 * s + 4] == steps_a[s][4:]


def test_launcher_environment_and_cpu_devices_flag():
    env = launch.process_env({"XLA_FLAGS": "--a=1 --xla_force_host_platform_device_count=8"}, "localhost:5", 2, 1, 4)
    assert env["JAXT2I_COORDINATOR"] == "localhost:5" and env["JAXT2I_NUM_PROCESSES"] == "2"
    assert env["JAXT2I_PROCESS_ID"] == "1"
    assert env["XLA_FLAGS"].split() == ["--a=1", "--xla_force_host_platform_device_count=4"]


def test_a_failing_process_stops_the_others():
    """One process exits 3 while its peer would wait for it forever: the launcher stops the peer (SIGTERM, then
    SIGKILL for one that ignores it) and returns 3."""
    ignore_term = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(120)"
    procs = [subprocess.Popen([sys.executable, "-c", "import time, sys; time.sleep(0.5); sys.exit(3)"]),
             subprocess.Popen([sys.executable, "-c", ignore_term])]
    assert launch.supervise(procs, grace_s=1, poll_s=0.05) == 3
    assert procs[1].returncode == -signal.SIGKILL


def test_the_launcher_returns_the_processes_status(tmp_path):
    assert launch.launch([str(tmp_path / "missing.yaml")], 2, grace_s=5) == 2  # both report the config error


def test_single_process_initialize_is_noop(monkeypatch):
    for name in ("JAXT2I_COORDINATOR", "JAXT2I_NUM_PROCESSES", "JAXT2I_PROCESS_ID"):
        monkeypatch.delenv(name, raising=False)
    assert distributed.maybe_initialize() is False
    assert distributed.maybe_initialize(num_processes=1) is False
    monkeypatch.setenv("JAXT2I_NUM_PROCESSES", "1")
    assert distributed.maybe_initialize() is False


def test_initialize_reports_missing_settings(monkeypatch):
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


@pytest.mark.parametrize("args, message", [
    (["--cpu-devices", "4"], "--cpu-devices goes with --processes N"),
    (["--processes", "0"], "must be >= 1"),
    (["--processes", "2", "num_processes=2"], "remove num_processes from the config"),
    (["--processes", "2", "--print-config"], "drop it with --export-to or --print-config"),
])
def test_launch_flags_that_do_not_fit_are_one_line_usage_errors(args, message, capsys):
    from jaxt2i.train.cli import train_main

    with pytest.raises(SystemExit) as exit_info:
        train_main([str(ROOT / "configs" / "tiny.yaml"), *args])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1 and message in err, err
