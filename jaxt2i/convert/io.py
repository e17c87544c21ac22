"""Reading and writing tensor files: safetensors (no torch needed) and PyTorch pickles (torch, weights only).

Every reader returns ``dict[str, np.ndarray]``; bfloat16 tensors come back as ``ml_dtypes.bfloat16`` arrays.
A truncated or corrupt file, or a pickle that carries code, is a :class:`CheckpointReadError` naming the file.
"""

from __future__ import annotations

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


def read_safetensors(path: str, *, copy: bool = False) -> dict[str, np.ndarray]:
    """Reads a safetensors file into numpy arrays, validating the header.

    By default the arrays are read-only views of a memory map of the file (no copy: pages are read when first
    touched, and the map lives as long as any array does); ``copy=True`` returns ordinary writable arrays.
    """
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        if size < 8:
            raise CheckpointReadError(f"{path}: file is {size} bytes, too short to be safetensors (truncated?).")
        (header_len,) = struct.unpack("<Q", f.read(8))
        if header_len > size - 8 or header_len > 100_000_000:
            raise CheckpointReadError(f"{path}: corrupt or truncated safetensors header (says {header_len} bytes, "
                                      f"file has {size}). Re-download or re-export the file.")
        try:
            header = json.loads(f.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointReadError(f"{path}: safetensors header is not valid JSON ({e}); the file is corrupt.")
        data_start = 8 + header_len
        buffer = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    tensors = {name: _safetensors_tensor(path, name, info, buffer, data_start, size)
               for name, info in header.items() if name != "__metadata__"}
    return {k: v.copy() for k, v in tensors.items()} if copy else tensors


def _safetensors_tensor(path, name, info, buffer, data_start, size) -> np.ndarray:
    try:
        dtype = _SAFETENSORS_DTYPES[info["dtype"]]
        begin, end = info["data_offsets"]
        shape = tuple(info["shape"])
    except (KeyError, TypeError, ValueError):
        raise CheckpointReadError(f"{path}: tensor {name!r} has an unsupported or malformed header entry {info}.")
    expected = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
    if end - begin != expected or data_start + end > size:
        raise CheckpointReadError(
            f"{path}: tensor {name!r} needs bytes {begin}..{end} of the data section but the file "
            f"{'is truncated' if data_start + end > size else 'header is inconsistent'}. Re-download or re-export it.")
    return np.frombuffer(buffer, dtype=dtype, count=expected // np.dtype(dtype).itemsize,
                         offset=data_start + begin).reshape(shape)


def write_safetensors(path: str | os.PathLike, tensors: Mapping[str, np.ndarray],
                      metadata: Mapping[str, str] | None = None) -> None:
    """Writes numpy arrays (bfloat16 allowed) to a safetensors file, atomically (temp file + rename)."""
    path = os.fspath(path)
    tmp = path + ".tmp"
    _write_safetensors_raw(tmp, {k: _contiguous(v) for k, v in tensors.items()}, metadata)
    os.replace(tmp, path)


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
        raise CheckpointReadError(
            f"{path}: refused — this pickle needs code beyond plain tensors to load, and running code from a "
            f"checkpoint is unsafe. Nothing from it was executed. If you trust its source, convert it to "
            f".safetensors with its original tooling. (torch said: {str(e).splitlines()[0]})") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as e:
        raise CheckpointReadError(f"{path}: cannot read this PyTorch checkpoint; it looks truncated or corrupt "
                                  f"({str(e).splitlines()[0]}). Re-download it.") from None
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise CheckpointReadError(f"{path}: expected a dict of tensors, found {type(obj).__name__}.")
    return {k: _torch_to_numpy(v) for k, v in obj.items() if isinstance(v, torch.Tensor)}


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
