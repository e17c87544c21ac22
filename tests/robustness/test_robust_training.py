"""Training under failure, through the real loop (jaxt2i.train.loop.run) with a stand-in component kind -- a linear
model on synthetic rows -- so each run takes seconds: a checkpoint write that fails midway (a full disk) leaves the
previous checkpoint intact and the run resumable to the same result; a NaN loss aborts or skips as configured and
the message names the step."""

from __future__ import annotations

import errno
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from jaxt2i.train import loop
from jaxt2i.train.checkpoint import Checkpointer, CheckpointWriteError
from jaxt2i.train.cli import train_main
from jaxt2i.train.config import load_config
from jaxt2i.train.kinds.base import Kind


class _Rows:
    """Batches of a fixed synthetic regression set, row ``i`` of the stream being ``i mod 64``; ``nan_at`` (1-based
    batch numbers, counted from the start of the run) get NaN inputs."""

    def __init__(self, batch: int, consumed: int, nan_at: tuple[int, ...]):
        self.batch, self.consumed, self.nan_at, self.skipped = batch, consumed, nan_at, 0
        rng = np.random.default_rng(0)
        self.x = rng.standard_normal((64, 3)).astype(np.float32)
        self.y = self.x @ np.array([1.0, -2.0, 0.5], np.float32)

    def __next__(self):
        rows = (self.consumed + np.arange(self.batch)) % 64
        number = self.consumed // self.batch + 1
        self.consumed += self.batch
        x = self.x[rows]
        if number in self.nan_at:
            x = np.full_like(x, np.nan)
        return {"x": x, "y": self.y[rows]}

    def position(self) -> dict:
        return {"consumed": self.consumed, "skipped": 0}

    def close(self):
        pass


class _LinearKind(Kind):
    trainable = ("linear",)
    nan_at: tuple[int, ...] = ()

    def initializers(self):
        return {"linear": lambda key: {"w": jnp.zeros((3,), jnp.float32)}}

    def loss(self, components, batch, key, first_index, gather):
        error = batch["x"] @ components["linear"]["w"] - batch["y"]
        return jnp.mean(error ** 2), {}

    def batches(self, local_batch, position):
        return _Rows(local_batch, int((position or {}).get("consumed", 0)), self.nan_at)

    def export(self, state, out, *, overwrite):
        Path(out).mkdir(parents=True, exist_ok=overwrite)
        np.save(Path(out) / "w.npy", np.asarray(state.params["linear"]["w"]))


@pytest.fixture
def linear_kind(monkeypatch):
    monkeypatch.setattr(loop, "build_kind", lambda cfg: _LinearKind(cfg))
    return _LinearKind


def _config(workdir, *overrides):
    return load_config(None, [f"workdir={workdir}", "steps=6", "batch_size=4", "checkpoint_every=2", "log_every=1",
                              "progress=false", "tensorboard=false", "keep_checkpoints=5", "optim.lr=0.05",
                              "optim.warmup_steps=0", "optim.ema_decay=null", *overrides])


def _final(workdir) -> np.ndarray:
    return np.load(Path(workdir) / "final" / "w.npy")


def _losses(workdir) -> dict[int, float]:
    lines = (Path(workdir) / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r["loss"] for r in map(json.loads, lines)}


def _fail_writes_from(monkeypatch, step: int):
    """Array writes of the checkpoint of ``step`` and later start, then fail as a full disk does."""
    real = ocp.type_handlers.ArrayHandler.serialize
    state = {"step": None}

    async def serialize(self, values, infos, args=None):
        futures = await real(self, values, infos, args)
        if state["step"] is not None and state["step"] >= step:
            for future in futures:  # part of the arrays reach the disk ...
                future.result()
            raise OSError(errno.ENOSPC, "No space left on device")  # ... then the disk is full
        return futures

    real_save = Checkpointer.save

    def save(self, s, *args, **kwargs):
        state["step"] = s
        return real_save(self, s, *args, **kwargs)

    monkeypatch.setattr(ocp.type_handlers.ArrayHandler, "serialize", serialize)
    monkeypatch.setattr(Checkpointer, "save", save)


# ------------------------------------------------------------------------------------------- checkpoint writes
def test_a_failed_save_keeps_the_previous_checkpoint_and_says_so(tmp_path, monkeypatch):
    ck = Checkpointer(tmp_path / "ck", async_save=True)
    ck.save(1, {"w": jnp.ones(3)}, {"step": 1})
    ck.wait()
    _fail_writes_from(monkeypatch, 2)
    with pytest.raises(CheckpointWriteError, match=r"step 2 .*No space left.*step 1 is intact.*resume"):
        ck.save(2, {"w": jnp.full(3, 2.0)}, {"step": 2})
        ck.wait()
    ck.close()
    monkeypatch.undo()
    assert any("tmp" in p.name for p in (tmp_path / "ck").iterdir())  # the failed save's unfinished folder
    again = Checkpointer(tmp_path / "ck")
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == ["1"]  # removed before any new save
    assert again.all_steps() == [1]
    restored, data = again.restore({"w": jnp.zeros(3)})
    assert np.array_equal(restored["w"], np.ones(3)) and data == {"step": 1}
    assert again.save(2, {"w": jnp.full(3, 2.0)}, {"step": 2})  # the leftover of the failed save is no obstacle
    again.close()
    assert Checkpointer(tmp_path / "ck").all_steps() == [1, 2]


def test_a_run_whose_checkpoint_write_fails_resumes_to_the_same_result(tmp_path, monkeypatch, linear_kind, capsys):
    reference = tmp_path / "reference"
    loop.run(_config(reference))
    want = _final(reference)

    workdir = tmp_path / "run"
    with monkeypatch.context() as m:
        _fail_writes_from(m, 4)
        m.setattr("jaxt2i.train.cli.load_config", lambda path, overrides: _config(workdir))
        assert train_main(["unused.yaml"]) == 1
    err = capsys.readouterr().err
    assert "the checkpoint of step 2 is intact" in err and "Traceback" not in err
    assert Checkpointer(workdir / "checkpoints").all_steps() == [2]
    assert not (workdir / "final").exists()

    result = loop.run(_config(workdir))  # the same command again, with room on the disk
    assert result.step == 6 and np.array_equal(_final(workdir), want)
    assert _losses(workdir) == _losses(reference)


# ---------------------------------------------------------------------------------------------------- NaN loss
def test_a_nan_loss_aborts_naming_the_step(tmp_path, linear_kind, monkeypatch, capsys):
    monkeypatch.setattr(linear_kind, "nan_at", (3,))
    monkeypatch.setattr("jaxt2i.train.cli.load_config", lambda path, overrides: _config(tmp_path / "run"))
    assert train_main(["unused.yaml"]) == 1
    err = capsys.readouterr().err
    assert "loss is nan at step 3; stopping" in err and "nan_policy=skip" in err
    assert Checkpointer(tmp_path / "run" / "checkpoints").all_steps() == [2]  # the last good checkpoint stays
    assert not (tmp_path / "run" / "final").exists()


def test_a_nan_loss_is_skipped_when_configured_naming_the_step(tmp_path, linear_kind, monkeypatch, capsys):
    monkeypatch.setattr(linear_kind, "nan_at", (3,))
    result = loop.run(_config(tmp_path / "run", "nan_policy=skip"))
    assert "step 3: loss is nan; update discarded (nan_policy=skip)" in capsys.readouterr().err
    assert result.step == 6 and result.skipped_steps == 1
    losses = _losses(tmp_path / "run")
    assert np.isnan(losses[3]) if isinstance(losses[3], float) else losses[3] == "nan"
    assert all(np.isfinite(losses[s]) for s in (1, 2, 4, 5, 6))
    assert np.isfinite(_final(tmp_path / "run")).all()
