"""Orbax checkpoints: exact round trip (typed keys included), keep-last-N, restore_or_init, SIGTERM guard."""

from __future__ import annotations

import os
import signal

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxt2i.train.checkpoint import Checkpointer, PreemptionGuard, gather_host_positions, restore_or_init


class State(flax.struct.PyTreeNode):
    step: jax.Array
    params: dict
    ema_params: dict | None
    rng: jax.Array


def make_state(seed: int) -> State:
    k = jax.random.key(seed)
    params = {"w": jax.random.normal(k, (3, 5)), "b": {"x": jnp.arange(4, dtype=jnp.float32) * seed}}
    return State(step=jnp.int32(seed), params=params, ema_params=jax.tree.map(lambda x: x * 2, params),
                 rng=jax.random.fold_in(k, 7))


def assert_same(a: State, b: State):
    la, lb = jax.tree.leaves(jax.tree.map(_data, a)), jax.tree.leaves(jax.tree.map(_data, b))
    assert len(la) == len(lb)
    for x, y in zip(la, lb):
        assert x.dtype == y.dtype and np.array_equal(x, y)


def _data(x):
    return np.asarray(jax.random.key_data(x) if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key) else x)


def test_save_restore_is_exact_and_keeps_last_n(tmp_path):
    ck = Checkpointer(tmp_path / "ck", keep=2, async_save=True)
    for s in (1, 2, 3):
        assert ck.save(s, make_state(s), {"hosts": [{"consumed": 10 * s, "skipped": s}]})
    ck.wait()
    assert ck.all_steps() == [2, 3] and ck.latest_step() == 3
    restored, data = ck.restore(make_state(0))
    assert_same(restored, make_state(3))
    assert jax.dtypes.issubdtype(restored.rng.dtype, jax.dtypes.prng_key)
    assert data == {"hosts": [{"consumed": 30, "skipped": 3}]}
    older, _ = ck.restore(make_state(0), step=2)
    assert_same(older, make_state(2))
    ck.close()


def test_restore_or_init_fresh_then_resumed(tmp_path):
    def init():
        return make_state(0), None

    ck = Checkpointer(tmp_path, keep=1)
    state, _, data, step = restore_or_init(ck, init)
    assert step is None and data == {}
    assert_same(state, make_state(0))
    ck.save(5, make_state(5), {"hosts": []})
    ck.close()
    ck2 = Checkpointer(tmp_path, keep=1)  # a new process would do this
    state, _, data, step = restore_or_init(ck2, init)
    assert step == 5 and data == {"hosts": []}
    assert_same(state, make_state(5))
    ck2.close()


def test_no_checkpoint_is_a_clear_error(tmp_path):
    ck = Checkpointer(tmp_path)
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        ck.restore(make_state(0))
    ck.close()


def test_sigterm_sets_the_flag_and_handlers_come_back():
    before = signal.getsignal(signal.SIGTERM)
    with PreemptionGuard() as guard:
        assert not guard.should_stop()
        os.kill(os.getpid(), signal.SIGTERM)
        assert guard.should_stop() and guard.signal_name == "SIGTERM"
    assert signal.getsignal(signal.SIGTERM) is before


def test_single_host_positions():
    assert gather_host_positions({"consumed": 12, "skipped": 1}) == [{"consumed": 12, "skipped": 1}]
