"""Reading and writing tensor files: safetensors (no torch needed) and PyTorch pickles (torch, weights only).

Every reader returns ``dict[str, np.ndarray]``; bfloat16 tensors come back as ``ml_dtypes.bfloat16`` arrays.
A truncated or corrupt file, or a pickle that carries code, is a :class:`CheckpointReadError` naming the file.
"""

from __future__ import annotations

import collections
import contextlib
import json
import mmap
import os
import pickle
import shutil
import struct
import tempfile
import zipfile
from typing import Iterator, Mapping

import ml_dtypes
import numpy as np

_SAFETENSORS_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}
_PICKLE_SUFFIXES = (".ckpt", ".bin", ".pt", ".pth")


class CheckpointReadError(ValueError):
    """A checkpoint file cannot be read safely (corrupt, truncated, unsupported or unsafe)."""


def read_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Reads all tensors of a ``.safetensors`` file or a PyTorch pickle (``.ckpt``/``.bin``/``.pt``).

    Pickles are read with ``torch.load(weights_only=True)``: a file that needs arbitrary code to unpickle is refused
    and no code from it runs. A Lightning-style ``{"state_dict": {...}}`` wrapper is unwrapped.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"No checkpoint file at {path}.")
    if path.endswith(".safetensors"):
        return read_safetensors(path)
    if path.endswith(_PICKLE_SUFFIXES):
        return read_torch_pickle(path)
    raise CheckpointReadError(
        f"{path}: unknown checkpoint extension; expected .safetensors, {', '.join(_PICKLE_SUFFIXES)}.")


_MAX_HEADER_BYTES = 100_000_000  # the safetensors format's own limit


def read_safetensors(path: str, *, copy: bool = False) -> dict[str, np.ndarray]:
    """Reads a safetensors file into numpy arrays, validating the header.

    The header must be a JSON object of tensor entries whose byte ranges tile the data section exactly (no range
    past its end, no overlap, no hole), each of a known dtype whose size matches its shape; anything else is a
    :class:`CheckpointReadError` naming the file. By default the arrays are read-only views of a memory map of the
    file (no copy: pages are read when first touched, and the map lives as long as any array does); ``copy=True``
    returns ordinary writable arrays.
    """
    path = os.fspath(path)
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        if size < 8:
            raise CheckpointReadError(f"{path}: file is {size} bytes, too short to be safetensors (truncated?).")
        (header_len,) = struct.unpack("<Q", f.read(8))
        if header_len > _MAX_HEADER_BYTES:
            raise CheckpointReadError(f"{path}: corrupt safetensors header (its length field says {header_len} "
                                      f"bytes; the format allows {_MAX_HEADER_BYTES}). Re-download or re-export it.")
        if header_len > size - 8:
            raise CheckpointReadError(f"{path}: corrupt or truncated safetensors header (says {header_len} bytes, "
                                      f"file has {size}). Re-download or re-export the file.")
        header = _parse_header(path, f.read(header_len))
        entries = _tensor_entries(path, header, size - 8 - header_len)
        data_start = 8 + header_len
        buffer = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    tensors = {name: np.frombuffer(buffer, dtype=dtype, count=int(np.prod(shape, dtype=np.int64)),
                                   offset=data_start + begin).reshape(shape)
               for name, (dtype, shape, begin) in entries.items()}
    return {k: v.copy() for k, v in tensors.items()} if copy else tensors


def _parse_header(path: str, raw: bytes) -> dict:
    """The header's JSON object (tensor name -> entry); a clear error for anything else."""
    def unique(pairs):
        out = dict(pairs)
        if len(out) != len(pairs):
            twice = next(k for k, n in collections.Counter(k for k, _ in pairs).items() if n > 1)
            raise CheckpointReadError(f"{path}: the safetensors header names {twice!r} twice; the file is corrupt.")
        return out

    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=unique)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise CheckpointReadError(f"{path}: safetensors header is not valid JSON ({type(e).__name__}: "
                                  f"{str(e)[:200]}); the file is corrupt.") from None
    if not isinstance(header, dict):
        raise CheckpointReadError(f"{path}: the safetensors header is a JSON {type(header).__name__}, not an object "
                                  "of tensors; the file is corrupt.")
    if not isinstance(header.get("__metadata__", {}), dict):
        raise CheckpointReadError(f"{path}: the safetensors header's __metadata__ is not an object; the file is "
                                  "corrupt.")
    return header


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _tensor_entry(path: str, name: str, info) -> tuple[np.dtype, tuple[int, ...], int, int]:
    """One header entry -> (dtype, shape, begin, end), each field checked."""
    where = f"{path}: tensor {name!r}"
    if not isinstance(info, dict):
        raise CheckpointReadError(f"{where} has a header entry {str(info)[:80]!r}, not an object with dtype, shape "
                                  "and data_offsets; the file is corrupt.")
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in _SAFETENSORS_DTYPES:
        raise CheckpointReadError(f"{where} has dtype {dtype!r}, which jaxt2i does not read (it reads "
                                  f"{', '.join(_SAFETENSORS_DTYPES)}).")
    if not isinstance(shape, list) or not all(_is_count(n) for n in shape):
        raise CheckpointReadError(f"{where} has shape {str(shape)[:80]}; a shape is a list of non-negative integers. "
                                  "The file is corrupt.")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(n) for n in offsets)
            and offsets[0] <= offsets[1]):
        raise CheckpointReadError(f"{where} has data_offsets {str(offsets)[:80]}; they must be two non-negative "
                                  "integers [begin, end], begin <= end. The file is corrupt.")
    return np.dtype(_SAFETENSORS_DTYPES[dtype]), tuple(shape), offsets[0], offsets[1]


def _tensor_entries(path: str, header: dict, data_size: int) -> dict[str, tuple[np.dtype, tuple[int, ...], int]]:
    """name -> (dtype, shape, begin) of every tensor, after checking that the byte ranges tile the data section
    (``data_size`` bytes) exactly, as the safetensors format requires."""
    spans = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype, shape, begin, end = _tensor_entry(path, name, info)
        if end > data_size:
            raise CheckpointReadError(f"{path}: tensor {name!r} needs bytes {begin}..{end}, past the end of the "
                                      f"{data_size}-byte data section; the file is truncated. Re-download or "
                                      "re-export it.")
        needed = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if end - begin != needed:
            raise CheckpointReadError(f"{path}: tensor {name!r} ({info['dtype']}, shape {list(shape)}) needs "
                                      f"{needed} bytes but its data_offsets span {end - begin}; the header is "
                                      "inconsistent.")
        spans.append((begin, end, name, dtype, shape))
    spans.sort(key=lambda s: s[:2])
    for (_, prev_end, prev, *_), (begin, _, name, *_) in zip(spans, spans[1:]):
        if begin < prev_end:
            raise CheckpointReadError(f"{path}: tensors {prev!r} and {name!r} overlap in the data section; the "
                                      "header is corrupt.")
    covered = 0
    for begin, end, name, *_ in spans:
        if begin != covered:
            raise CheckpointReadError(f"{path}: bytes {covered}..{begin} of the data section belong to no tensor; "
                                      "a valid file's tensors cover it exactly. The header is corrupt.")
        covered = end
    if covered != data_size:
        raise CheckpointReadError(f"{path}: the tensors cover {covered} of the {data_size} bytes of the data "
                                  "section; the file is corrupt (or has bytes appended).")
    return {name: (dtype, shape, begin) for begin, _, name, dtype, shape in spans}


def write_safetensors(path: str | os.PathLike, tensors: Mapping[str, np.ndarray],
                      metadata: Mapping[str, str] | None = None) -> None:
    """Writes numpy arrays (bfloat16 allowed) to a safetensors file, atomically (temp file + rename)."""
    path = os.fspath(path)
    tmp = path + ".tmp"
    try:
        _write_safetensors_raw(tmp, {k: _contiguous(v) for k, v in tensors.items()}, metadata)
        os.replace(tmp, path)
    except BaseException:  # a full disk, an interrupt: no half-written file stays behind
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _contiguous(value) -> np.ndarray:
    """C-contiguous copy that keeps 0-d arrays 0-d (np.ascontiguousarray would make them [1])."""
    value = np.asarray(value)
    return np.ascontiguousarray(value).reshape(value.shape)


def _write_safetensors_raw(path: str, tensors: Mapping[str, np.ndarray], metadata) -> None:
    names = {np.dtype(v): k for k, v in _SAFETENSORS_DTYPES.items()}
    header, offset = {}, 0
    for k in sorted(tensors):
        v = tensors[k]
        header[k] = {"dtype": names[v.dtype], "shape": list(v.shape), "data_offsets": [offset, offset + v.nbytes]}
        offset += v.nbytes
    if metadata:
        header["__metadata__"] = dict(metadata)
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * ((-len(raw)) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for k in sorted(tensors):
            f.write(tensors[k].tobytes())


def read_torch_pickle(path: str) -> dict[str, np.ndarray]:
    """Reads a PyTorch pickle with the weights-only unpickler; never executes code from the file."""
    try:
        import torch
    except ImportError:
        raise CheckpointReadError(
            f"{path}: reading PyTorch pickles needs torch (pip install 'jaxt2i[torch]'), "
            "or convert the file to .safetensors first.") from None

    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "weights only" not in str(e).lower():  # not a refusal: the pickle stream itself is damaged
            raise CheckpointReadError(f"{path}: cannot read this PyTorch checkpoint; it is corrupt ({_first_line(e)})."
                                      " Re-download it.") from None
        raise CheckpointReadError(
            f"{path}: refused — this pickle needs code beyond plain tensors to load, and running code from a "
            f"checkpoint is unsafe. Nothing from it was executed. If you trust its source, convert it to "
            f".safetensors with its original tooling. (torch said: {_first_line(e)})") from None
    except Exception as e:  # noqa: BLE001 -- whatever a damaged file makes torch raise, the user needs the file's name
        raise CheckpointReadError(f"{path}: cannot read this PyTorch checkpoint; it looks truncated or corrupt "
                                  f"({_first_line(e)}). Re-download it.") from None
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise CheckpointReadError(f"{path}: expected a dict of tensors, found {type(obj).__name__}.")
    return {k: _torch_to_numpy(v) for k, v in obj.items() if isinstance(v, torch.Tensor)}


def _first_line(error: BaseException) -> str:
    """The first line of an exception's message (its type when the message is empty)."""
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__


def _torch_to_numpy(tensor) -> np.ndarray:
    import torch

    tensor = tensor.detach().cpu().contiguous()
    if tensor.dtype == torch.bfloat16:
        return tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return tensor.numpy()


@contextlib.contextmanager
def atomic_folder(path: str | os.PathLike, *, overwrite: bool = False) -> Iterator[str]:
    """Yields a staging folder next to ``path`` that replaces ``path`` only when the block succeeds.

    An existing ``path`` is an error unless ``overwrite``; on any exception the staging folder is removed and
    ``path`` is left as it was.
    """
    path = os.fspath(path)
    if os.path.exists(path) and not overwrite:
        raise FileExistsError(f"{path} already exists; choose a new destination or pass overwrite=True.")
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".jaxt2i-", dir=parent)
    try:
        yield staging
        if os.path.exists(path):
            shutil.rmtree(path)
        os.replace(staging, path)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
