"""Pickles: a checkpoint that carries code is refused and nothing from it runs (no marker file appears), and damaged
pickles (.ckpt/.pt state dicts through torch's weights-only reader, whole-module pickles through the restricted
reader of jaxt2i.convert.module_pickle) are CheckpointReadErrors naming the file, whatever bytes were damaged."""

from __future__ import annotations

import os
import pickle
import zipfile

import numpy as np
import pytest
import torch

from jaxt2i.convert import load
from jaxt2i.convert.io import CheckpointReadError, read_state_dict
from jaxt2i.convert.module_pickle import UnsafePickleError, read_module_pickle


class _RunsCommand:
    """Unpickling this runs a shell command that creates ``marker``."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _state_dict() -> dict:
    return {"w": torch.arange(12, dtype=torch.float32).reshape(3, 4), "b": torch.ones(4)}


def _check_refused(path, marker=None, error=CheckpointReadError, reader=read_state_dict) -> str:
    with pytest.raises(error) as info:
        reader(path)
    message = str(info.value)
    assert str(path) in message and "\n" not in message, message
    if marker is not None:
        assert not os.path.exists(marker), "code from the pickle ran"
    return message


# ------------------------------------------------------------------------------------------- state-dict pickles
@pytest.mark.parametrize("suffix", [".ckpt", ".pt", ".pth", ".bin"])
@pytest.mark.parametrize("layout", ["torch-zip", "torch-legacy", "plain-pickle"])
def test_a_state_dict_pickle_carrying_code_is_refused_and_nothing_runs(tmp_path, suffix, layout):
    marker = tmp_path / "marker"
    path = tmp_path / f"evil{suffix}"
    obj = {"state_dict": _state_dict(), "payload": _RunsCommand(marker)}
    if layout == "plain-pickle":
        path.write_bytes(pickle.dumps(obj, protocol=2))
    else:
        torch.save(obj, path, _use_new_zipfile_serialization=layout == "torch-zip")
    assert "refused" in _check_refused(path, marker)
    with pytest.raises(CheckpointReadError, match="refused"):
        load.read_any(str(path), config="tiny_sd1")
    assert not marker.exists()


def test_the_same_pickle_does_run_code_in_an_ordinary_unpickler(tmp_path):
    """The payload above is real: an ordinary unpickler runs it (so the refusals above mean something)."""
    marker = tmp_path / "marker"
    pickle.loads(pickle.dumps(_RunsCommand(marker)))
    assert marker.exists()


@pytest.mark.parametrize("keep", [0, 1, 30, 0.5, -1], ids=["empty", "1-byte", "30-bytes", "half", "last-byte-cut"])
@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_truncated_state_dict_pickles(tmp_path, keep, legacy):
    path = tmp_path / "model.ckpt"
    torch.save({"state_dict": _state_dict()}, path, _use_new_zipfile_serialization=not legacy)
    raw = path.read_bytes()
    path.write_bytes(raw[:int(len(raw) * keep)] if isinstance(keep, float) else raw[:keep])
    _check_refused(path)


def test_a_pickle_of_something_else_than_tensors(tmp_path):
    path = tmp_path / "model.pt"
    torch.save([torch.zeros(2)], path)
    assert "expected a dict of tensors" in _check_refused(path)
    (tmp_path / "text.ckpt").write_text("this is not a checkpoint")
    _check_refused(tmp_path / "text.ckpt")


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_random_byte_damage_to_a_state_dict_pickle_is_always_a_read_error(tmp_path, legacy):
    path = tmp_path / "model.ckpt"
    torch.save({"state_dict": _state_dict()}, path, _use_new_zipfile_serialization=not legacy)
    raw = bytearray(path.read_bytes())
    rng = np.random.default_rng(0)
    outcomes = set()
    for trial in range(60):
        damaged = bytearray(raw)
        for i in rng.integers(0, len(raw), 3):
            damaged[i] = int(rng.integers(0, 256))
        target = tmp_path / f"d{trial}.ckpt"
        target.write_bytes(bytes(damaged))
        try:
            got = read_state_dict(target)
            outcomes.add("read")  # damage inside tensor bytes: the values change, the file still parses
            assert set(got) <= {"w", "b"}
        except CheckpointReadError as e:
            assert str(target) in str(e)
            outcomes.add("refused")
    assert "refused" in outcomes


# ----------------------------------------------------------------------------------------- whole-module pickles
def _module() -> torch.nn.Module:
    linear = torch.nn.Linear(3, 4)
    return torch.nn.Sequential(linear, torch.nn.ReLU())


LINEAR = [("torch.nn.modules.linear", "Linear")]


def _read_module(path):
    return read_module_pickle(path, LINEAR)


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_a_module_pickle_carrying_code_is_refused_and_nothing_runs(tmp_path, legacy):
    marker = tmp_path / "marker"
    module = _module()
    module.payload = _RunsCommand(marker)
    path = tmp_path / "encoder.pkl"
    torch.save(module, path, _use_new_zipfile_serialization=not legacy)
    assert "posix.system" in _check_refused(path, marker, UnsafePickleError, _read_module)


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_random_byte_damage_to_a_module_pickle_is_always_a_read_error(tmp_path, legacy):
    """Bytes overwritten anywhere (pickle opcodes, zip records, storage sizes, tensor data): the reader returns a
    module or raises CheckpointReadError naming the file -- never another exception."""
    path = tmp_path / "encoder.pkl"
    torch.save(_module(), path, _use_new_zipfile_serialization=not legacy)
    assert _read_module(path).children["0"].parameters["weight"].shape == (4, 3)
    raw = path.read_bytes()
    rng = np.random.default_rng(1)
    refused = 0
    for trial in range(150):
        damaged = bytearray(raw)
        for i in rng.integers(0, len(raw), int(rng.integers(1, 4))):
            damaged[i] = int(rng.integers(0, 256))
        target = tmp_path / f"d{trial}.pkl"
        target.write_bytes(bytes(damaged))
        try:
            _read_module(target)
        except CheckpointReadError as e:
            assert str(target) in str(e), e
            refused += 1
    assert refused > 0


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_truncated_module_pickles(tmp_path, legacy):
    path = tmp_path / "encoder.pkl"
    torch.save(_module(), path, _use_new_zipfile_serialization=not legacy)
    raw = path.read_bytes()
    for keep in (0, 1, 10, len(raw) // 3, len(raw) // 2, len(raw) - 1):
        target = tmp_path / f"cut{keep}.pkl"
        target.write_bytes(raw[:keep])
        _check_refused(target, reader=_read_module)


def test_a_zip_member_with_a_bad_checksum(tmp_path):
    path = tmp_path / "encoder.pkl"
    torch.save(_module(), path)
    damaged = tmp_path / "crc.pkl"
    with zipfile.ZipFile(path) as source, zipfile.ZipFile(damaged, "w") as target:
        for info in source.infolist():
            data = source.read(info)
            target.writestr(info, data)
    raw = bytearray(damaged.read_bytes())
    with zipfile.ZipFile(damaged) as archive:
        member = next(i for i in archive.infolist() if "/data/" in i.filename)
    start = member.header_offset + 30 + len(member.filename) + len(member.extra)
    raw[start] ^= 0xFF  # one byte of a storage changes; the stored CRC no longer matches
    damaged.write_bytes(bytes(raw))
    _check_refused(damaged, reader=_read_module)
