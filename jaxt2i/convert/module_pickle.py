"""Reading whole pickled PyTorch modules (``torch.save(module)``) as data, without torch and without running code.

A pickle of a module names its classes (``dall_e.encoder.Encoder``, ``torch.nn.modules.container.Sequential``, ...)
and rebuild functions, which an ordinary unpickler imports and calls. :func:`read_module_pickle` instead resolves
every global through an allow-list: each allowed module class becomes a :class:`ModuleRecord` (its class name, its
plain attributes, parameters, buffers and child modules, taken from the recorded instance state), tensors become
numpy arrays read from the file's own storage records, and a handful of plain builders (``OrderedDict``, ``set``,
``torch.device``) are replaced by harmless stand-ins. Any other global is refused with :class:`UnsafePickleError`
naming it, before anything is called; nothing is imported.

Both layouts ``torch.save`` has written since PyTorch 1.0 are read: the zip archive (``torch.save``'s default since
1.6: ``<name>/data.pkl`` plus ``<name>/data/<key>``) and the legacy stream (magic number, protocol, system info,
the pickle, storage keys, then each storage's raw bytes). The tar layout of PyTorch < 0.4 is not.
"""

from __future__ import annotations

import collections
import dataclasses
import io
import os
import pickle
import struct
import zipfile
import zlib
from typing import Any, Callable, Mapping

import ml_dtypes
import numpy as np

from jaxt2i.convert.io import CheckpointReadError

_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001
_MAX_DEPTH = 64  # modules nested deeper than this are not a model

STORAGE_DTYPES = {
    "FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
    "BFloat16Storage": ml_dtypes.bfloat16, "LongStorage": np.int64, "IntStorage": np.int32,
    "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8, "BoolStorage": np.bool_,
}
# The torch.nn modules that carry no weights and that a pickled model may contain.
TORCH_MODULES = {
    ("torch.nn.modules.container", "Sequential"), ("torch.nn.modules.activation", "ReLU"),
    ("torch.nn.modules.pooling", "MaxPool2d"), ("torch.nn.modules.upsampling", "Upsample"),
    ("torch.nn.modules.linear", "Identity"),
}


# What reading a damaged file can raise from the zip, pickle and numpy layers underneath (each becomes a
# CheckpointReadError naming the file).
_DAMAGE = (zipfile.BadZipFile, zlib.error, struct.error, pickle.UnpicklingError, EOFError, OverflowError,
           RuntimeError, MemoryError, OSError, TypeError, ValueError, KeyError, IndexError, AttributeError)


class UnsafePickleError(CheckpointReadError):
    """A pickle names a global (a class or function) that the reader does not allow; nothing from it ran."""


@dataclasses.dataclass
class ModuleRecord:
    """One pickled ``nn.Module`` as data.

    cls: the qualified class name (``"dall_e.utils.Conv2d"``); fields: its other recorded attributes (ints,
    floats, bools, strings, ``torch.device`` as a string, tuples); parameters / buffers: name -> array (None for an
    unset one); children: name -> record (None for an unset one), in registration order.
    """

    cls: str
    fields: dict[str, Any]
    parameters: dict[str, np.ndarray | None]
    buffers: dict[str, np.ndarray | None]
    children: dict[str, "ModuleRecord | None"]

    def state_dict(self, prefix: str = "") -> dict[str, np.ndarray]:
        """Parameters and buffers by dotted name, as ``module.state_dict()`` names them."""
        out = {f"{prefix}{k}": v for k, v in {**self.parameters, **self.buffers}.items() if v is not None}
        for name, child in self.children.items():
            if child is not None:
                out.update(child.state_dict(f"{prefix}{name}."))
        return out


# ------------------------------------------------------------------------------------------- stand-ins for globals
class _PickledModule:
    """What an allowed module class is replaced by while unpickling: it only stores the recorded state."""

    qualname = "?"

    def __setstate__(self, state):
        if isinstance(state, tuple) and len(state) == 2:  # (dict state, slots state)
            state = {**(state[0] or {}), **(state[1] or {})}
        if not isinstance(state, dict):
            raise CheckpointReadError(f"the state of a pickled {self.qualname} is a {type(state).__name__}, "
                                      "not a dict of attributes.")
        self.recorded = state


@dataclasses.dataclass(frozen=True)
class _StorageType:
    name: str

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(STORAGE_DTYPES[self.name])


def _device(kind, index=None) -> str:
    if not isinstance(kind, str) or not (index is None or isinstance(index, int)):
        raise CheckpointReadError(f"torch.device({kind!r}, {index!r}) is not a device.")
    return kind if index is None else f"{kind}:{index}"


def _rebuild_tensor(storage, offset, size, stride, *_ignored) -> np.ndarray:
    """A copy of the strided view ``(offset, size, stride)`` of ``storage``, checked to lie inside it."""
    if not isinstance(storage, np.ndarray) or storage.ndim != 1:
        raise CheckpointReadError("a tensor record does not point at a storage.")
    size, stride = tuple(size), tuple(stride)
    ints = (offset, *size, *stride)
    if len(size) != len(stride) or not all(isinstance(v, int) and v >= 0 for v in ints):
        raise CheckpointReadError(f"a tensor record has an invalid layout (size {size}, stride {stride}, "
                                  f"offset {offset}).")
    if 0 not in size:
        last = offset + sum((n - 1) * s for n, s in zip(size, stride))
        if last >= storage.size:
            raise CheckpointReadError(f"a tensor of size {size} reaches element {last} of a storage of "
                                      f"{storage.size}; the file is corrupt.")
    view = np.lib.stride_tricks.as_strided(storage[offset:] if storage.size else storage, shape=size,
                                           strides=tuple(s * storage.itemsize for s in stride), writeable=False)
    return np.array(view)


@dataclasses.dataclass
class _LegacyStorage:
    """A storage of the legacy layout, whose bytes follow the pickle in the file: read after it."""

    key: str
    view: Any


@dataclasses.dataclass
class _LegacyTensor:
    """A tensor on a :class:`_LegacyStorage`, rebuilt (by :func:`_resolve_legacy`) once its bytes are read."""

    storage: _LegacyStorage
    args: tuple


def _rebuild_any_tensor(storage, *args):
    """``torch._utils._rebuild_tensor(_v2)``: now (zip layout) or once the storages are read (legacy layout)."""
    if isinstance(storage, _LegacyStorage):
        return _LegacyTensor(storage, args)
    return _rebuild_tensor(storage, *args)


def _rebuild_parameter(data, *_ignored):
    """``torch._utils._rebuild_parameter(_with_state)``: the parameter's data."""
    return data


def _new_set(items=()):
    return set(items)


_BUILDERS: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("builtins", "set"): _new_set,
    ("__builtin__", "set"): _new_set,  # protocol-2 pickles name builtins the Python 2 way
    ("torch", "device"): _device,
    ("torch._utils", "_rebuild_tensor"): _rebuild_any_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_any_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
}


# ------------------------------------------------------------------------------------------------- the unpickler
class _Unpickler(pickle.Unpickler):
    """Resolves globals from the allow-list only; storages through ``load_storage(type, key, numel, view)``."""

    def __init__(self, file, source: str, module_classes, load_storage: Callable[..., np.ndarray]):
        super().__init__(file)
        self.source = source
        self.load_storage = load_storage
        self.classes = {key: type(key[1], (_PickledModule,), {"qualname": ".".join(key)})
                        for key in set(module_classes) | TORCH_MODULES}

    def find_class(self, module: str, name: str):
        key = (module, name)
        if key in self.classes:
            return self.classes[key]
        if key in _BUILDERS:
            return _BUILDERS[key]
        # torch < 2 names the storage of a tensor saved from a GPU torch.cuda.FloatStorage (and so on)
        if module in ("torch", "torch.cuda") and name in STORAGE_DTYPES:
            return _StorageType(name)
        raise UnsafePickleError(
            f"{self.source}: refused — the pickle asks for {module}.{name}, which is not a part of the models this "
            f"reader knows. Nothing from the file was run or imported. Use a file of the expected model.")

    def persistent_load(self, pid):
        if not isinstance(pid, tuple) or not pid:
            raise CheckpointReadError(f"{self.source}: unknown persistent record {pid!r}.")
        kind = pid[0].decode("ascii") if isinstance(pid[0], bytes) else pid[0]
        if kind == "module" and len(pid) == 4 and isinstance(pid[1], type) and issubclass(pid[1], _PickledModule):
            return pid[1]  # the legacy layout records each module class with its source text, which is ignored
        if kind == "storage" and len(pid) in (5, 6) and isinstance(pid[1], _StorageType):
            view = pid[5] if len(pid) == 6 else None
            return self.load_storage(pid[1], str(pid[2]), pid[4], view)
        raise CheckpointReadError(f"{self.source}: unknown persistent record {pid[:1]!r}.")


def _unpickle(data, source: str, module_classes, load_storage) -> Any:
    try:
        return _Unpickler(data, source, module_classes, load_storage).load()
    except CheckpointReadError:
        raise
    except (pickle.UnpicklingError, EOFError, TypeError, ValueError, AttributeError, KeyError, IndexError) as e:
        raise CheckpointReadError(f"{source}: cannot read this pickle ({type(e).__name__}: {e}); it is corrupt or "
                                  "not a pickled PyTorch module.") from None


def _load_zip(path: str, module_classes) -> Any:
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
        pickles = [n for n in names if n.endswith("/data.pkl") and n.count("/") == 1]
        if len(pickles) != 1:
            raise CheckpointReadError(f"{path}: a zip archive but not one torch.save wrote (no single "
                                      f"<name>/data.pkl; found {names[:5]}).")
        prefix = pickles[0][: -len("data.pkl")]
        order = archive.read(prefix + "byteorder").decode().strip() if prefix + "byteorder" in names else "little"
        storages: dict[str, np.ndarray] = {}

        def load_storage(storage_type: _StorageType, key: str, numel, view) -> np.ndarray:
            if key not in storages:
                try:
                    raw = archive.read(f"{prefix}data/{key}")
                except KeyError:
                    raise CheckpointReadError(f"{path}: storage {key} is missing from the archive.") from None
                storages[key] = _storage_array(raw, storage_type, numel, order, f"{path}: storage {key}")
            return _view(storages[key], view, path)

        return _unpickle(io.BytesIO(archive.read(pickles[0])), path, module_classes, load_storage)


def _load_legacy(path: str, module_classes) -> Any:
    with open(path, "rb") as f:
        header = [_unpickle(f, path, (), _no_storage) for _ in range(3)]
        if header[0] != _LEGACY_MAGIC or header[1] != _LEGACY_PROTOCOL or not isinstance(header[2], dict):
            raise CheckpointReadError(f"{path}: neither a zip archive nor a legacy torch.save stream (no magic "
                                      "number); not a PyTorch file, or a corrupt one.")
        order = "little" if header[2].get("little_endian", True) else "big"
        pending: dict[str, tuple[_StorageType, int]] = {}
        arrays: dict[str, np.ndarray] = {}

        def load_storage(storage_type: _StorageType, key: str, numel, view) -> np.ndarray:
            pending.setdefault(key, (storage_type, numel))
            return _LegacyStorage(key, view)

        result = _unpickle(f, path, module_classes, load_storage)
        keys = _unpickle(f, path, (), _no_storage)
        if not isinstance(keys, list) or set(map(str, keys)) != set(pending):
            raise CheckpointReadError(f"{path}: the storage list does not match the tensors; the file is corrupt.")
        for key in map(str, keys):
            storage_type, numel = pending[key]
            head = f.read(8)
            if len(head) != 8 or struct.unpack("<q" if order == "little" else ">q", head)[0] != numel:
                raise CheckpointReadError(f"{path}: storage {key} has a wrong size record; the file is truncated "
                                          "or corrupt.")
            raw = f.read(numel * storage_type.dtype.itemsize)
            arrays[key] = _storage_array(raw, storage_type, numel, order, f"{path}: storage {key}")
    return _resolve_legacy(result, arrays, path)


def _no_storage(*_args):
    raise CheckpointReadError("a tensor inside a torch.save header record; the file is corrupt.")


def _storage_array(raw: bytes, storage_type: _StorageType, numel, order: str, what: str) -> np.ndarray:
    dtype = storage_type.dtype.newbyteorder("<" if order == "little" else ">")
    if not isinstance(numel, int) or len(raw) != numel * dtype.itemsize:
        raise CheckpointReadError(f"{what} has {len(raw)} bytes, expected {numel} x {dtype.itemsize}; the file "
                                  "is truncated or corrupt.")
    return np.frombuffer(raw, dtype=dtype).astype(storage_type.dtype, copy=False)


def _view(storage: np.ndarray, view, source: str) -> np.ndarray:
    """A storage, or the ``(key, offset, size)`` slice of it that old files record for views."""
    if view is None:
        return storage
    _key, offset, size = view
    if not (isinstance(offset, int) and isinstance(size, int) and 0 <= offset and offset + size <= storage.size):
        raise CheckpointReadError(f"{source}: a storage view {view!r} lies outside its storage.")
    return storage[offset: offset + size]


def _resolve_legacy(obj: Any, arrays: Mapping[str, np.ndarray], path: str, depth: int = 0) -> Any:
    """``obj`` with every :class:`_LegacyTensor` inside its modules and dicts rebuilt from the storages read."""
    if depth > 2 * _MAX_DEPTH:
        raise CheckpointReadError(f"{path}: modules nested more than {_MAX_DEPTH} deep.")
    if isinstance(obj, _LegacyTensor):
        return _rebuild_tensor(_view(arrays[obj.storage.key], obj.storage.view, path), *obj.args)
    if isinstance(obj, _PickledModule):
        obj.recorded = _resolve_legacy(getattr(obj, "recorded", {}), arrays, path, depth + 1)
    elif isinstance(obj, dict):
        for k in list(obj):
            obj[k] = _resolve_legacy(obj[k], arrays, path, depth + 1)
    return obj


# ---------------------------------------------------------------------------------------------- records
def _record(obj: Any, source: str, path: str, depth: int = 0) -> ModuleRecord:
    if not isinstance(obj, _PickledModule):
        raise CheckpointReadError(f"{source}: {path or 'the pickle'} is a {type(obj).__name__}, not a module.")
    if depth > _MAX_DEPTH:
        raise CheckpointReadError(f"{source}: modules nested more than {_MAX_DEPTH} deep.")
    state = dict(getattr(obj, "recorded", {}))
    parameters = _tensors(state.pop("_parameters", {}), source, f"{path}_parameters")
    buffers = _tensors(state.pop("_buffers", {}), source, f"{path}_buffers")
    children_raw = state.pop("_modules", {})
    if not isinstance(children_raw, dict):
        raise CheckpointReadError(f"{source}: {path}_modules is not a dict.")
    children = {str(k): None if v is None else _record(v, source, f"{path}{k}.", depth + 1)
                for k, v in children_raw.items()}
    fields = {k: v for k, v in state.items() if not k.startswith("_") and isinstance(v, (int, float, str, tuple))}
    return ModuleRecord(type(obj).qualname, fields, parameters, buffers, children)


def _tensors(raw: Any, source: str, what: str) -> dict[str, np.ndarray | None]:
    if not isinstance(raw, dict) or not all(v is None or isinstance(v, np.ndarray) for v in raw.values()):
        raise CheckpointReadError(f"{source}: {what} is not a dict of tensors.")
    return {str(k): v for k, v in raw.items()}


def read_module_pickle(path: str | os.PathLike, module_classes) -> ModuleRecord:
    """Reads a file written by ``torch.save(module)`` as a :class:`ModuleRecord` tree, safely.

    Args:
      path: the file (zip or legacy ``torch.save`` layout).
      module_classes: ``(module, class name)`` pairs of the model's own classes to accept, e.g.
        ``("dall_e.encoder", "Encoder")``; the weightless ``torch.nn`` containers and activations in
        :data:`TORCH_MODULES` are always accepted. Nothing is imported.

    Raises:
      UnsafePickleError: the pickle names any other global (its name is in the message); nothing was run.
      CheckpointReadError: the file is truncated, corrupt or not a pickled module.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"No file at {path}.")
    try:
        obj = _load_zip(path, module_classes) if zipfile.is_zipfile(path) else _load_legacy(path, module_classes)
        return _record(obj, path, "")
    except CheckpointReadError as e:
        if path in str(e):
            raise
        raise type(e)(f"{path}: {e}") from None
    except _DAMAGE as e:
        raise CheckpointReadError(f"{path}: cannot read this pickle ({type(e).__name__}: {e}); the file is "
                                  "truncated, corrupt or unreadable.") from None
