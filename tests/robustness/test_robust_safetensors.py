"""Damaged safetensors files: every reader path gives a CheckpointReadError that names the file, never an error from
deep inside numpy, json or mmap, and never reads past the data or one tensor's bytes as another's."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest

from jaxt2i.convert import load
from jaxt2i.convert.io import CheckpointReadError, read_safetensors, read_state_dict, write_safetensors

TENSORS = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.arange(4, dtype=np.int64)}


def _valid(path) -> tuple[dict, bytes]:
    """Writes a valid two-tensor file; returns its (header, data section)."""
    write_safetensors(path, TENSORS)
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def _write(path, header, data: bytes, *, header_bytes: bytes | None = None, header_len: int | None = None) -> None:
    body = json.dumps(header).encode() if header_bytes is None else header_bytes
    path.write_bytes(struct.pack("<Q", len(body) if header_len is None else header_len) + body + data)


def _refused(path, match: str = "") -> str:
    with pytest.raises(CheckpointReadError) as info:
        read_state_dict(path)
    message = str(info.value)
    assert str(path) in message and "\n" not in message
    assert match.lower() in message.lower(), message
    return message


def test_the_valid_file_reads(tmp_path):
    path = tmp_path / "ok.safetensors"
    _valid(path)
    got = read_state_dict(path)
    assert set(got) == {"a", "b"} and np.array_equal(got["a"], TENSORS["a"]) and np.array_equal(got["b"], TENSORS["b"])


@pytest.mark.parametrize("keep", [0, 7, 8, 20, -1, -17], ids=["empty", "7-bytes", "length-only", "mid-header",
                                                              "last-byte-cut", "mid-data"])
def test_truncated_files(tmp_path, keep):
    path = tmp_path / "m.safetensors"
    _valid(path)
    raw = path.read_bytes()
    path.write_bytes(raw[:keep])
    _refused(path)


def test_a_one_gigabyte_header_length_in_a_small_file(tmp_path):
    path = tmp_path / "m.safetensors"
    header, data = _valid(path)
    _write(path, header, data, header_len=2 ** 30)
    _refused(path, "header")


def test_a_one_gigabyte_header_is_refused_without_reading_it(tmp_path):
    """A (sparse) file large enough to hold a 1 GiB header: refused by the header size limit, not parsed."""
    path = tmp_path / "m.safetensors"
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", 2 ** 30))
        f.truncate(8 + 2 ** 30 + 16)
    _refused(path, "header")


@pytest.mark.parametrize("change, match", [
    (lambda h, n: h["b"].update(data_offsets=[24, n + 8]), "past the end"),
    (lambda h, n: h["b"].update(data_offsets=[0, 32]), "overlap"),
    (lambda h, n: h["a"].update(data_offsets=[8, 32]), "overlap"),
    (lambda h, n: h["b"].update(data_offsets=[-8, 24]), "offsets"),
    (lambda h, n: h["b"].update(data_offsets=[24.0, 56.0]), "offsets"),
    (lambda h, n: h["b"].update(data_offsets=[24]), "offsets"),
    (lambda h, n: h["b"].update(dtype="F99"), "F99"),
    (lambda h, n: h["b"].update(dtype="F8_E4M3"), "F8_E4M3"),
    (lambda h, n: h["b"].update(dtype="F16"), "F16"),
    (lambda h, n: h["b"].update(dtype=7), "dtype"),
    (lambda h, n: h["b"].update(shape=[-2, -2]), "shape"),
    (lambda h, n: h["b"].update(shape=[2, 2.0]), "shape"),
    (lambda h, n: h["b"].update(shape="4"), "shape"),
    (lambda h, n: h["b"].pop("dtype"), "dtype"),
    (lambda h, n: h.update(b="not an entry"), "'b'"),
    (lambda h, n: h.update(c={"dtype": "F32", "shape": [0], "data_offsets": [56, 56]}) or h.pop("b"), "cover"),
], ids=["past-the-end", "overlap-same-start", "overlap-inside", "negative-offset", "float-offsets", "one-offset",
        "unknown-dtype", "unsupported-dtype", "dtype-size-mismatch", "dtype-not-a-string", "negative-shape",
        "float-shape", "shape-not-a-list", "no-dtype", "entry-not-an-object", "hole-in-data"])
def test_corrupt_header_entries(tmp_path, change, match):
    path = tmp_path / "m.safetensors"
    header, data = _valid(path)
    change(header, len(data))
    _write(path, header, data)
    _refused(path, match)


@pytest.mark.parametrize("header_bytes, match", [
    (b"[1, 2, 3]", "object"),
    (b'"just a string"', "object"),
    (b"{not json", "JSON"),
    (b"\xff\xfe{}", "JSON"),
    (b"[" * 100_000 + b"]" * 100_000, "JSON"),
    (b'{"a": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]}, "a": {"dtype": "F32", "shape": [0], '
     b'"data_offsets": [0, 0]}}', "twice"),
    (b'{"__metadata__": [1]}', "__metadata__"),
], ids=["list", "string", "not-json", "not-utf8", "deeply-nested", "duplicate-name", "metadata-not-an-object"])
def test_header_that_is_not_a_tensor_table(tmp_path, header_bytes, match):
    path = tmp_path / "m.safetensors"
    _write(path, {}, b"", header_bytes=header_bytes)
    _refused(path, match)


def test_trailing_bytes_after_the_last_tensor(tmp_path):
    path = tmp_path / "m.safetensors"
    header, data = _valid(path)
    _write(path, header, data + b"\0" * 8)
    _refused(path, "cover")


def test_read_safetensors_itself_names_the_file(tmp_path):
    path = tmp_path / "m.safetensors"
    header, data = _valid(path)
    header["b"]["data_offsets"] = [0, 32]
    _write(path, header, data)
    with pytest.raises(CheckpointReadError, match=str(path)):
        read_safetensors(str(path))


def test_a_single_file_checkpoint_with_a_broken_header_is_named_by_the_loader(tmp_path):
    path = tmp_path / "model.safetensors"
    header, data = _valid(path)
    header["a"]["dtype"] = "F99"
    _write(path, header, data)
    with pytest.raises(CheckpointReadError, match=str(path)):
        load.read_any(str(path), config="tiny_sd1")
