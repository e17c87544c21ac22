"""Device mesh, logical-axis rules, and the shardings of train state and batches.

The mesh has three named axes: ``data`` (pure data parallelism), ``fsdp`` (data parallelism whose replicas
also split the parameters and optimizer state) and ``tensor`` (reserved for tensor parallelism; size 1 today).

Which array dimension goes to which mesh axis is decided by *logical-axis rules*: plain data, a tuple of
``(logical_name, mesh_axes)`` pairs in the style of ``flax.linen.logical_axis_rules``. The names used here:

* ``batch``: the leading dimension of every batch array (default: split over ``data`` and ``fsdp``).
* ``fsdp``: the one dimension of each parameter that FSDP splits (default: the ``fsdp`` mesh axis). The
  dimension chosen is the largest one divisible by the size of those mesh axes; parameters with fewer than
  ``min_fsdp_size`` elements, or without such a dimension, stay replicated.
* any further names a model annotates its parameters with (``nn.with_logical_partitioning``); parameters
  carrying such annotations are placed by the rules instead of the FSDP heuristic.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")

LogicalRules = Sequence[tuple[str, "str | tuple[str, ...] | None"]]

DEFAULT_RULES: LogicalRules = (
    ("batch", ("data", "fsdp")),
    ("fsdp", "fsdp"),
    # names a model may annotate (room for tensor parallelism)
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
)

# Parameters smaller than this stay replicated: splitting a bias costs more in collectives than it saves.
DEFAULT_MIN_FSDP_SIZE = 1024


class MeshError(ValueError):
    """The mesh or the global batch does not fit the devices and processes of the run."""


@dataclass(frozen=True)
class MeshConfig:
    """Sizes of the mesh axes; -1 (at most one axis) takes all remaining devices."""

    data: int = -1
    fsdp: int = 1
    tensor: int = 1

    def shape(self, num_devices: int) -> tuple[int, int, int]:
        """(data, fsdp, tensor) with the -1 resolved against num_devices."""
        sizes = [self.data, self.fsdp, self.tensor]
        if sum(s == -1 for s in sizes) > 1:
            raise MeshError(f"MeshConfig {self}: at most one axis may be -1 (take the remaining devices).")
        if any(s == 0 or s < -1 for s in sizes):
            raise MeshError(f"MeshConfig {self}: axis sizes must be positive or -1.")
        known = int(np.prod([s for s in sizes if s != -1]))
        if -1 in sizes:
            if num_devices % known:
                raise MeshError(
                    f"MeshConfig {self}: {num_devices} devices are not divisible by the fixed axes' product {known}."
                )
            sizes[sizes.index(-1)] = num_devices // known
        if int(np.prod(sizes)) != num_devices:
            raise MeshError(
                f"MeshConfig {self} needs {int(np.prod(sizes))} devices but {num_devices} are available; "
                "set mesh.data=-1 to use all of them."
            )
        return tuple(sizes)


def make_mesh(cfg: MeshConfig = MeshConfig(), devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A (data, fsdp, tensor) mesh over all (global) devices, or over `devices`."""
    devices = list(jax.devices() if devices is None else devices)
    shape = cfg.shape(len(devices))
    axis_types = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
    return jax.make_mesh(shape, MESH_AXES, axis_types=axis_types, devices=devices)


def mesh_axes_for(name: str, rules: LogicalRules) -> tuple[str, ...]:
    """Mesh axes a logical name maps to under the rules (first match wins); () if unmapped."""
    for logical, axes in rules:
        if logical == name:
            if axes is None:
                return ()
            return (axes,) if isinstance(axes, str) else tuple(axes)
    return ()


def _axes_size(mesh: Mesh, axes: Sequence[str]) -> int:
    return int(np.prod([mesh.shape[a] for a in axes])) if axes else 1


def _spec_entry(axes: tuple[str, ...]):
    return axes[0] if len(axes) == 1 else axes


def replicated(mesh: Mesh) -> NamedSharding:
    """The sharding of an array every device holds whole."""
    return NamedSharding(mesh, P())


def batch_axes(mesh: Mesh, rules: LogicalRules = DEFAULT_RULES) -> tuple[str, ...]:
    """Mesh axes the batch dimension is split over (only those present in the mesh)."""
    return tuple(a for a in mesh_axes_for("batch", rules) if a in mesh.shape)


def batch_sharding(mesh: Mesh, rules: LogicalRules = DEFAULT_RULES) -> NamedSharding:
    """Sharding of a batch array: leading dimension over the batch axes, the rest whole."""
    axes = batch_axes(mesh, rules)
    return NamedSharding(mesh, P(_spec_entry(axes)) if axes else P())


def fsdp_spec(shape: Sequence[int], mesh: Mesh, rules: LogicalRules = DEFAULT_RULES,
              min_size: int = DEFAULT_MIN_FSDP_SIZE) -> P:
    """PartitionSpec splitting the largest dimension divisible by the FSDP axes' size (ties: the last one)."""
    axes = tuple(a for a in mesh_axes_for("fsdp", rules) if a in mesh.shape)
    n = _axes_size(mesh, axes)
    if n == 1 or int(np.prod(shape, dtype=np.int64)) < min_size:
        return P()
    candidates = [i for i, d in enumerate(shape) if d % n == 0 and d >= n]
    if not candidates:
        return P()
    dim = max(candidates, key=lambda i: (shape[i], i))
    spec = [None] * len(shape)
    spec[dim] = _spec_entry(axes)
    return P(*spec)


def _logical_spec(names: Sequence[str | None], mesh: Mesh, rules: LogicalRules) -> P:
    entries, used = [], set()
    for name in names:
        axes = tuple(a for a in (mesh_axes_for(name, rules) if name else ()) if a in mesh.shape and a not in used)
        used.update(axes)
        entries.append(_spec_entry(axes) if axes else None)
    return P(*entries)


def param_shardings(abstract_tree: Any, mesh: Mesh, rules: LogicalRules = DEFAULT_RULES,
                    min_size: int = DEFAULT_MIN_FSDP_SIZE) -> Any:
    """NamedSharding for every leaf of a (possibly abstract) parameter/optimizer-state tree.

    Leaves boxed with logical names (flax ``LogicallyPartitioned``) follow the rules; plain leaves get the FSDP
    placement of :func:`fsdp_spec`; scalars are replicated. Since the placement depends only on the shape,
    Adam's moments land exactly where their parameters are.
    """

    def one(leaf):
        if isinstance(leaf, nn.LogicallyPartitioned):
            return NamedSharding(mesh, _logical_spec(leaf.names, mesh, rules))
        shape = getattr(leaf, "shape", ())
        return NamedSharding(mesh, fsdp_spec(shape, mesh, rules, min_size))

    return jax.tree.map(one, abstract_tree, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))


SHARED_KEYS = ("uncond_text_states",)  # batch entries shared by every row (the empty prompt's text states)


def batch_shardings(batch: Mapping[str, Any], mesh: Mesh, rules: LogicalRules = DEFAULT_RULES) -> dict:
    """Per-key shardings of a batch dict: every array split over the batch axes, except those of
    :data:`SHARED_KEYS` (one value shared by all examples), which are replicated."""
    return {k: replicated(mesh) if k in SHARED_KEYS else batch_sharding(mesh, rules) for k in batch}


def shard_batch(batch: Mapping[str, Any], mesh: Mesh, rules: LogicalRules = DEFAULT_RULES) -> dict:
    """Host-local batch -> global jax.Arrays. Each process passes only its own rows (in process order);
    with one process that is the whole batch. Arrays that already are jax.Arrays are passed through."""
    shardings = batch_shardings(batch, mesh, rules)
    out = {}
    for key, value in batch.items():
        if isinstance(value, jax.Array):
            out[key] = value
        elif key in SHARED_KEYS:
            out[key] = jax.make_array_from_process_local_data(shardings[key], np.asarray(value), np.shape(value))
        else:
            out[key] = jax.make_array_from_process_local_data(shardings[key], np.asarray(value))
    return out


def local_batch_size(global_batch_size: int, mesh: Mesh, rules: LogicalRules = DEFAULT_RULES) -> int:
    """Rows each process feeds: the global batch must split evenly over the batch axes and the processes."""
    n = _axes_size(mesh, batch_axes(mesh, rules))
    if global_batch_size % n:
        raise MeshError(
            f"global batch size {global_batch_size} is not divisible by the {n} devices of the batch axes "
            f"{batch_axes(mesh, rules)}; choose a multiple of {n}."
        )
    if global_batch_size % jax.process_count():
        raise MeshError(
            f"global batch size {global_batch_size} is not divisible by the {jax.process_count()} processes."
        )
    return global_batch_size // jax.process_count()


def host_batch_slice(global_batch_size: int, mesh: Mesh, rules: LogicalRules = DEFAULT_RULES) -> slice:
    """The rows of the global batch this process feeds (its devices' shards of the batch axis, contiguous).

    A data pipeline reads exactly these rows; :func:`shard_batch` then assembles the global batch.
    """
    local_batch_size(global_batch_size, mesh, rules)
    index_map = batch_sharding(mesh, rules).addressable_devices_indices_map((global_batch_size,))
    rows = sorted({(idx[0].start or 0, global_batch_size if idx[0].stop is None else idx[0].stop)
                   for idx in index_map.values()})
    start, stop = rows[0][0], rows[0][0]
    for lo, hi in rows:
        if lo != stop:
            raise MeshError(
                f"this process's devices hold non-contiguous batch rows {rows}; build the mesh with each "
                "process's devices adjacent along the batch axes (make_mesh does)."
            )
        stop = hi
    return slice(start, stop)


def check_host_rows(global_batch_size: int, mesh: Mesh, rules: LogicalRules = DEFAULT_RULES) -> None:
    """Process ``p`` of ``P`` must hold rows ``[p * B / P, (p + 1) * B / P)`` of the global batch ``B``: the block the
    data order gives it (``jaxt2i.data.order``). Raises ``MeshError`` for a mesh whose devices are ordered
    otherwise."""
    rows = host_batch_slice(global_batch_size, mesh, rules)
    local = local_batch_size(global_batch_size, mesh, rules)
    want = slice(jax.process_index() * local, (jax.process_index() + 1) * local)
    if (rows.start, rows.stop) != (want.start, want.stop):
        raise MeshError(f"process {jax.process_index()}'s devices hold batch rows {rows.start}:{rows.stop}, not its "
                        f"block {want.start}:{want.stop}; build the mesh with make_mesh (devices in process order).")
