"""End-to-end runs of ``configs/tiny.yaml`` in subprocesses: exact resume after SIGKILL, SIGTERM, NaN policy, export of
a checkpoint, the latent cache's checks, a conditioner that starts from a parse head with a frozen part.

Every run goes through ``jaxt2i.train.cli.train_main`` in a fresh Python process (a small harness below adds
the interruption at a chosen step). The runs share a persistent XLA compilation cache and a low XLA
optimisation level, so only the first one pays for compilation; all runs use the same flags, so they run
the same executables.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from jaxt2i.convert.load import read_native
from jaxt2i.convert.native import flatten_params
from jaxt2i.data.cache import read_fingerprint

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_kinds import cli_calls  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "configs" / "tiny.yaml"

HARNESS = r'''
import json, os, signal, sys
import numpy as np
from jaxt2i.train import loop
from jaxt2i.train.cli import train_main

opts = json.loads(os.environ.get("HARNESS_OPTS", "{}"))
real_run, real_batches = loop.run, loop.make_batches

def on_step_end(step, metrics, ctx):
    if step == opts.get("signal_at"):
        if opts["signal"] == "KILL":
            ctx["checkpointer"].wait()  # make sure the first checkpoint is complete: we test resuming from it
            os.kill(os.getpid(), signal.SIGKILL)
        else:
            os.kill(os.getpid(), signal.SIGTERM)

class NaNAt:
    """Delegates to the real iterator; batch number opts["nan_at"] (1-based) gets NaN images."""
    def __init__(self, it):
        self.it, self.n = it, 0
    def __next__(self):
        b = next(self.it)
        self.n += 1
        if self.n == opts.get("nan_at"):
            b = dict(b, images=np.full_like(b["images"], np.nan))
        return b
    def __getattr__(self, name):
        return getattr(self.it, name)

loop.run = lambda cfg, **kw: real_run(cfg, on_step_end=on_step_end, **kw)
loop.make_batches = lambda *a, **k: NaNAt(real_batches(*a, **k))
sys.exit(train_main(sys.argv[1:]))
'''


@pytest.fixture(scope="module")
def env(tmp_path_factory, parse_clip):
    """The subprocesses' environment; ``env["TEST_PARSE_CLIP"]``: the folder of a CLIP run with parse heads."""
    cache = tmp_path_factory.mktemp("xla_cache")
    e = dict(os.environ)
    e.update({
        "JAX_PLATFORMS": "cpu",
        "JAX_COMPILATION_CACHE_DIR": str(cache),
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
        "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
        "XLA_FLAGS": (e.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip(),
        "PYTHONPATH": str(ROOT) + os.pathsep + e.get("PYTHONPATH", ""),
        "TEST_PARSE_CLIP": str(parse_clip[0] / "clip"),
    })
    return e


def run_args(env, workdir: Path, *overrides: str) -> list[str]:
    """`jaxt2i train` arguments of the runs here. A conditioner merging text layers 0 and -1, started from the
    parse_role head of its text encoder's CLIP run with that map (down) frozen: every run here also checks that a
    conditioner trains with the U-Net, resumes, is cached before (text states of two layers), keeps its frozen part
    and is recorded in the exported folder."""
    clip = env["TEST_PARSE_CLIP"]
    return [str(CONFIG), f"workdir={workdir}", "progress=false", "model.text_layer=[0, -1]",
            "model.conditioner={rank: 6}", f"model.text_encoder_from={clip}", f"model.conditioner_init_from={clip}",
            "trainable.freeze=[conditioner/down]", "sample.steps=7", "sample.guidance_scale=2.5", *overrides]


def train(env, workdir: Path, *overrides: str, **opts) -> subprocess.CompletedProcess:
    harness = workdir.parent / "harness.py"
    harness.write_text(HARNESS)
    e = dict(env, HARNESS_OPTS=json.dumps(opts))
    return subprocess.run([sys.executable, str(harness), *run_args(env, workdir, *overrides)], cwd=ROOT, env=e,
                          capture_output=True, text=True, timeout=900)


def losses(workdir: Path) -> dict[int, float]:
    recs = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in recs]
    assert steps == sorted(set(steps)), f"each step must be logged once, got {steps}"
    return {r["step"]: r["loss"] for r in recs}


def folder_params(folder: Path) -> dict[str, np.ndarray]:
    """``{"component/key": array}`` of a jaxt2i model folder."""
    out = {}
    for name in ("unet", "conditioner", "vae", "text_encoder"):
        out.update({f"{name}/{k}": v for k, v in load_file(str(folder / f"{name}.safetensors")).items()})
    return out


def final_params(workdir: Path) -> dict[str, np.ndarray]:
    return folder_params(workdir / "final")


def checkpoint_steps(workdir: Path) -> list[int]:
    return sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())


@pytest.fixture(scope="module")
def reference(env, tmp_path_factory):
    """The uninterrupted 8-step run."""
    workdir = tmp_path_factory.mktemp("ref") / "run"
    proc = train(env, workdir)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return workdir


def test_uninterrupted_run_writes_metrics_checkpoints_and_final(reference):
    recs = [json.loads(line) for line in (reference / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == list(range(1, 9))
    for r in recs:
        assert np.isfinite(r["loss"]) and np.isfinite(r["grad_norm"]) and r["lr"] >= 0
    assert all("steps_per_s" in r and "images_per_s" in r for r in recs[1:])
    assert checkpoint_steps(reference) == [4, 8]
    manifest = json.loads((reference / "final" / "jaxt2i.json").read_text())
    assert set(manifest["components"]) == {"unet", "conditioner", "vae", "text_encoder"}
    assert manifest["family"] == "latent_diffusion" and manifest["text_layer"] == [0, -1]
    assert manifest["components"]["conditioner"]["config"] == {"width": 32, "rank": 6, "num_inputs": 2}
    assert json.loads((reference / "config.json").read_text())["steps"] == 8


def test_a_run_keeps_a_frozen_conditioner_map_at_its_parse_head(reference, parse_clip):
    final = read_native(str(reference / "final"))
    assert final.family == "latent_diffusion" and final.text_layer == (0, -1)
    assert final.sampling == {"steps": 7, "guidance": 2.5}
    conditioner = flatten_params(final.params["conditioner"])
    np.testing.assert_array_equal(conditioner["down/kernel"], parse_clip[1]["parse_role"]["kernel"])
    assert np.abs(conditioner["up/kernel"]).max() > 0  # the rest trained (up starts at zero)


def test_export_a_checkpoint_as_a_model_folder(env, reference, tmp_path):
    export = lambda out, *step: run_args(env, reference, "--export-to", str(tmp_path / out), *step)
    last, early, again, missing = cli_calls(env, [export("step8"), export("step4", "--step", "4"),
                                                  export("step8"), export("x", "--step", "5")])
    assert last["code"] == 0, last["stderr"][-4000:]
    assert "wrote step 8" in last["stderr"]
    got, want = folder_params(tmp_path / "step8"), final_params(reference)
    assert got.keys() == want.keys() and all(np.array_equal(got[k], want[k]) for k in want)  # same as final/

    assert early["code"] == 0, early["stderr"][-4000:]
    got4 = folder_params(tmp_path / "step4")
    trained = ("unet/", "conditioner/")
    for part in trained:
        assert any(not np.array_equal(got4[k], want[k]) for k in want if k.startswith(part)), part
    assert all(np.array_equal(got4[k], want[k]) for k in want if not k.startswith(trained))  # frozen encoders

    assert again["code"] == 2 and "already exists" in again["stderr"]  # never overwrites
    assert missing["code"] == 2 and "no checkpoint of step 5" in missing["stderr"] and "[4, 8]" in missing["stderr"]
    assert checkpoint_steps(reference) == [4, 8]  # the read-only export touched nothing


def test_sigkill_then_sigterm_then_finish_equals_uninterrupted(env, reference, tmp_path):
    workdir = tmp_path / "run"
    killed = train(env, workdir, signal_at=6, signal="KILL")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-4000:]
    assert checkpoint_steps(workdir) == [4]
    assert not (workdir / "final").exists()

    # resumes from step 4; a SIGTERM after step 6 makes it finish step 7, save it and exit 0
    termed = train(env, workdir, signal_at=6, signal="TERM")
    assert termed.returncode == 0, termed.stderr[-4000:]
    assert "resumed from" in termed.stderr and "SIGTERM received: saved step 7" in termed.stderr
    assert 7 in checkpoint_steps(workdir)
    assert not (workdir / "final").exists()

    finished = train(env, workdir)
    assert finished.returncode == 0, finished.stderr[-4000:]
    assert losses(workdir) == losses(reference)  # bit-identical per-step losses (JSON floats round-trip exactly)
    got, want = final_params(workdir), final_params(reference)
    assert got.keys() == want.keys()
    for k in want:
        assert np.array_equal(got[k], want[k]), k


CACHED = ("data.write_cache=true", "data.use_cache=true")


def shard_times(cache: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in cache.glob("shard_*")}


# encodes and trains on three caches in subprocesses (~100-200 s on 2 cores): -m slow, for the default run's budget
@pytest.mark.slow
def test_cached_run_refuses_a_cache_of_other_data_or_encoders(env, tmp_path):
    cache = tmp_path / "cache"
    first = train(env, tmp_path / "first", *CACHED, f"data.cache_dir={cache}", "steps=1")
    assert first.returncode == 0, first.stderr[-4000:]
    assert "writing latent cache of 64 examples" in first.stderr and read_fingerprint(cache) is not None
    written = shard_times(cache)
    assert len(written) == 1

    other, reader = cli_calls(env, [
        run_args(env, tmp_path / "other", *CACHED, f"data.cache_dir={cache}", "data.num_examples=32"),
        run_args(env, tmp_path / "reader", "data.use_cache=true", f"data.cache_dir={cache}", "seed=1")])
    assert other["code"] == 2 and "other encoder weights or data settings" in other["stderr"], other["stderr"][-4000:]
    assert reader["code"] == 2 and "new folder" in reader["stderr"]  # seed 1 draws another random VAE
    assert shard_times(cache) == written  # nothing re-encoded or overwritten
    assert not (tmp_path / "other" / "final").exists() and not (tmp_path / "reader" / "final").exists()


@pytest.mark.slow  # ~2.5 min on 2 cores; the uncached path's exact resume is in the default run above
def test_cached_run_resumes_exactly(env, tmp_path):
    cache = tmp_path / "cache"
    reference = train(env, tmp_path / "ref", *CACHED, f"data.cache_dir={cache}")
    assert reference.returncode == 0, reference.stderr[-4000:]
    written = shard_times(cache)
    # the same data and encoders: the cache is reused; a SIGTERM after step 5 saves step 6, the rerun finishes
    termed = train(env, tmp_path / "run", *CACHED, f"data.cache_dir={cache}", signal_at=5, signal="TERM")
    assert termed.returncode == 0 and "SIGTERM received: saved step 6" in termed.stderr, termed.stderr[-4000:]
    finished = train(env, tmp_path / "run", *CACHED, f"data.cache_dir={cache}")
    assert finished.returncode == 0, finished.stderr[-4000:]
    assert losses(tmp_path / "run") == losses(tmp_path / "ref")
    got, want = final_params(tmp_path / "run"), final_params(tmp_path / "ref")
    assert all(np.array_equal(got[k], want[k]) for k in want)
    assert shard_times(cache) == written  # never re-encoded


@pytest.mark.slow  # the policy itself is unit-tested in test_loop.py; this is the whole path through the CLI
def test_nan_loss_aborts_with_a_clear_message(env, tmp_path):
    proc = train(env, tmp_path / "run", "steps=4", nan_at=3)
    assert proc.returncode == 1
    assert "loss is nan at step 3" in proc.stderr and "nan_policy=skip" in proc.stderr
    assert not (tmp_path / "run" / "final").exists()


@pytest.mark.slow
def test_nan_loss_skipped_when_configured(env, tmp_path):
    proc = train(env, tmp_path / "run", "steps=4", "nan_policy=skip", nan_at=3)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "update discarded" in proc.stderr
    rec = losses(tmp_path / "run")
    assert rec[3] == "nan" and all(np.isfinite(rec[s]) for s in (1, 2, 4))
    assert (tmp_path / "run" / "final" / "unet.safetensors").exists()
