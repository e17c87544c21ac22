"""Deterministic, host-sharded example order.

The order in which examples are read is a pure function of ``(seed, epoch, index, host)``:

* every epoch has its own permutation of ``range(n)``, drawn from ``(seed, epoch)``;
* host ``h`` of ``H`` takes ``perm[h::H]``, cut to ``n // H`` items so that all hosts see the same
  number of examples per epoch (the at most ``H - 1`` examples left over change every epoch);
* a host reads its items as one endless stream: item ``k`` is in epoch ``k // (n // H)``.

The only state a reader needs is ``k``, the number of stream items it has consumed (including
items skipped because they were unreadable). Saving ``k`` in a checkpoint and restarting from it
gives exactly the batches the uninterrupted run would have seen.

Per-example randomness (which caption, which crop, flip or not) comes from ``example_rng(seed,
epoch, index)``: independent of the host and of the batch an example lands in.
"""

from __future__ import annotations

import numpy as np

_PERM_STREAM = 0x9E3779B1  # keeps permutation draws apart from per-example draws
_EXAMPLE_STREAM = 0x85EBCA77


def epoch_permutation(seed: int, epoch: int, n: int) -> np.ndarray:
    """The permutation of ``range(n)`` used in ``epoch``.  # [n] int64"""
    rng = np.random.default_rng([int(seed), int(epoch), _PERM_STREAM])
    return rng.permutation(n)


def host_shard(perm: np.ndarray, host: int, num_hosts: int) -> np.ndarray:
    """Host ``host``'s part of an epoch permutation: ``perm[host::num_hosts]`` cut to ``n // num_hosts``."""
    if not 0 <= host < num_hosts:
        raise ValueError(f"host index {host} is outside 0..{num_hosts - 1}")
    per_host = len(perm) // num_hosts
    return perm[host::num_hosts][:per_host]


def example_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """The generator for the random choices made for example ``index`` when it is read in ``epoch``."""
    return np.random.default_rng([int(seed), int(epoch), int(index), _EXAMPLE_STREAM])


class HostOrder:
    """Maps a host's stream position ``k`` to ``(epoch, dataset index)``.

    Caches the current epoch's shard, so reading consecutive positions costs one permutation per
    epoch.
    """

    def __init__(self, seed: int, num_examples: int, host: int = 0, num_hosts: int = 1):
        if num_examples < num_hosts:
            raise ValueError(
                f"the dataset has {num_examples} examples but there are {num_hosts} hosts; every host needs at "
                "least one example per epoch."
            )
        self.seed = int(seed)
        self.num_examples = int(num_examples)
        self.host = int(host)
        self.num_hosts = int(num_hosts)
        self.per_epoch = self.num_examples // self.num_hosts
        self._epoch = -1
        self._shard = np.zeros((0,), np.int64)

    def shard(self, epoch: int) -> np.ndarray:
        """This host's dataset indices for ``epoch``, in reading order.  # [per_epoch]"""
        if epoch != self._epoch:
            perm = epoch_permutation(self.seed, epoch, self.num_examples)
            self._shard = host_shard(perm, self.host, self.num_hosts)
            self._epoch = epoch
        return self._shard

    def item(self, k: int) -> tuple[int, int]:
        """Stream position ``k`` -> ``(epoch, dataset index)``."""
        if k < 0:
            raise ValueError(f"stream position must be >= 0, got {k}")
        epoch, j = divmod(int(k), self.per_epoch)
        return epoch, int(self.shard(epoch)[j])
