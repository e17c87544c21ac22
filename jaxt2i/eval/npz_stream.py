"""``.npz`` files (the ``np.savez_compressed`` format, read back by ``np.load``) written and read a block of rows at a
time, so that an array of tens of thousands of images never has to be in memory at once.

``NpzWriter`` writes to ``PATH.<pid>.partial`` and renames it to ``PATH`` when closed without an error, so a failed run
leaves no half-written file and leaves a file already at ``PATH`` untouched. ``read_rows`` streams the
rows of one array of any ``.npz`` (compressed or not).
"""

from __future__ import annotations

import os
import zipfile
from typing import Iterator

import numpy as np

_FORMAT = np.lib.format


class NpzWriter:
    """Writes a compressed ``.npz``: whole arrays with ``add``, large ones block by block with ``begin`` + ``write``
    (one array at a time, its length known up front). A context manager: ``close`` on success, ``abort`` on error."""

    def __init__(self, path: str):
        self.path = path
        self._partial = f"{path}.{os.getpid()}.partial"  # two writers of one path never share a partial file
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self._zip = zipfile.ZipFile(self._partial, "w", zipfile.ZIP_DEFLATED, allowZip64=True)
        self._open = None  # (name, file, rows expected, row shape, dtype, rows written)

    def add(self, name: str, array) -> None:
        """The whole ``array`` as entry ``name``."""
        self._finish_rows()
        with self._zip.open(f"{name}.npy", "w", force_zip64=True) as f:
            _FORMAT.write_array(f, np.asanyarray(array), allow_pickle=False)

    def begin(self, name: str, shape: tuple[int, ...], dtype) -> None:
        """Starts entry ``name``, an array of ``shape`` (rows first) and ``dtype`` written by ``write``."""
        self._finish_rows()
        f = self._zip.open(f"{name}.npy", "w", force_zip64=True)
        header = {"descr": _FORMAT.dtype_to_descr(np.dtype(dtype)), "fortran_order": False, "shape": tuple(shape)}
        _FORMAT.write_array_header_2_0(f, header)
        self._open = [name, f, shape[0], tuple(shape[1:]), np.dtype(dtype), 0]

    def write(self, rows: np.ndarray) -> None:
        """The next rows [b, *shape[1:]] of the entry ``begin`` started."""
        if self._open is None:
            raise ValueError("call begin(name, shape, dtype) before write")
        name, f, expected, row_shape, dtype, done = self._open
        rows = np.ascontiguousarray(rows, dtype)
        if rows.shape[1:] != row_shape or done + len(rows) > expected:
            raise ValueError(f"{name}: rows of shape {rows.shape} do not continue a [{expected}, "
                             f"{', '.join(map(str, row_shape))}] array after {done} rows")
        f.write(rows.tobytes())
        self._open[5] = done + len(rows)

    def _finish_rows(self) -> None:
        if self._open is None:
            return
        name, f, expected, _, _, done = self._open
        self._open = None
        f.close()
        if done != expected:
            raise ValueError(f"{name}: {done} rows written of the {expected} announced")

    def close(self) -> None:
        """Finishes the file and gives it its name."""
        self._finish_rows()
        self._zip.close()
        os.replace(self._partial, self.path)

    def abort(self) -> None:
        """Drops the partial file; ``path`` is left untouched."""
        if self._open is not None:
            self._open[1].close()
            self._open = None
        self._zip.close()
        if os.path.exists(self._partial):
            os.remove(self._partial)

    def __enter__(self) -> "NpzWriter":
        return self

    def __exit__(self, kind, value, traceback) -> None:
        if kind is None:
            self.close()
        else:
            self.abort()


def _read_header(f) -> tuple[tuple[int, ...], np.dtype]:
    version = _FORMAT.read_magic(f)
    read = {(1, 0): _FORMAT.read_array_header_1_0, (2, 0): _FORMAT.read_array_header_2_0}.get(version)
    if read is None:
        raise ValueError(f"unsupported .npy format version {version}")
    shape, fortran_order, dtype = read(f)
    if fortran_order or dtype.hasobject:
        raise ValueError("only C-ordered arrays of plain numbers can be streamed")
    return shape, dtype


def array_shape(path: str, name: str) -> tuple[int, ...]:
    """The shape of entry ``name`` of the ``.npz`` at ``path``, read from its header alone."""
    with zipfile.ZipFile(path) as z, z.open(f"{name}.npy") as f:
        return _read_header(f)[0]


def read_rows(path: str, name: str, ranges) -> Iterator[np.ndarray]:
    """The rows ``start:stop`` of entry ``name`` of the ``.npz`` at ``path`` for each ``(start, stop)`` of
    ``ranges`` (increasing, not overlapping), one block at a time; rows between them are read and dropped."""
    with zipfile.ZipFile(path) as z, z.open(f"{name}.npy") as f:
        shape, dtype = _read_header(f)
        row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize
        position = 0
        for start, stop in ranges:
            if start < position or stop > shape[0] or stop < start:
                raise ValueError(f"rows {start}:{stop} of {name} {shape}: ranges must increase and lie inside")
            _skip(f, (start - position) * row_bytes)
            data = f.read((stop - start) * row_bytes)
            if len(data) != (stop - start) * row_bytes:
                raise ValueError(f"{path}: {name} ends before row {stop}; the file is cut short")
            position = stop
            yield np.frombuffer(data, dtype).reshape(stop - start, *shape[1:])


def _skip(f, n_bytes: int, block: int = 1 << 24) -> None:
    while n_bytes > 0:
        got = len(f.read(min(block, n_bytes)))
        if got == 0:
            raise ValueError("the array ends before the rows asked for; the file is cut short")
        n_bytes -= got
