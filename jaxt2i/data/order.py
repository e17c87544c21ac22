"""Deterministic example order, split over hosts so that the global batch does not depend on how many there are.

The order in which examples are read is a pure function of ``(seed, epoch, index)``:

* one global stream runs through the dataset epoch after epoch; every epoch has its own permutation of
  ``range(n)``, drawn from ``(seed, epoch)``, and global position ``g`` is item ``g % n`` of epoch ``g // n``'s;
* the global batch of step ``s`` is positions ``[s * B, (s + 1) * B)``; with ``H`` hosts feeding ``b = B / H``
  rows each, host ``h`` takes the ``b`` positions from ``s * B + h * b`` on: its block of the batch, the rows its
  devices hold. One host of batch ``B`` and eight hosts of batch ``B / 8`` therefore see the same global batches
  in the same row order, and no position is read by two hosts;
* a host reads its positions as one endless stream: its ``k``-th item is position
  ``(k // b) * B + h * b + k % b``.

The only state a reader needs is ``k``, the number of stream items it has consumed (including
items skipped because they were unreadable). Saving ``k`` in a checkpoint and restarting from it
gives exactly the batches the uninterrupted run would have seen; while no item was skipped, ``k`` is
``steps * b`` on every host, so a run may also restart under another number of hosts.

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


def global_position(k: int, host: int, num_hosts: int, block: int) -> int:
    """Host ``host``'s stream item ``k`` -> its global stream position (``block``: rows per host and step)."""
    if not 0 <= host < num_hosts:
        raise ValueError(f"host index {host} is outside 0..{num_hosts - 1}")
    step, j = divmod(int(k), int(block))
    return (step * num_hosts + host) * block + j


def example_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """The generator for the random choices made for example ``index`` when it is read in ``epoch``."""
    return np.random.default_rng([int(seed), int(epoch), int(index), _EXAMPLE_STREAM])


class HostOrder:
    """Maps a host's stream position ``k`` to ``(epoch, dataset index)``.

    ``block``: the rows this host feeds per step (the global batch divided by ``num_hosts``). Caches the
    current epoch's permutation, so reading consecutive positions costs one permutation per epoch.
    """

    def __init__(self, seed: int, num_examples: int, host: int = 0, num_hosts: int = 1, block: int = 1):
        if num_examples < 1:
            raise ValueError("the dataset is empty; every host needs examples to read.")
        if block < 1:
            raise ValueError(f"block (rows per host and step) must be >= 1, got {block}")
        global_position(0, host, num_hosts, block)  # checks the host index
        self.seed = int(seed)
        self.num_examples = int(num_examples)
        self.host = int(host)
        self.num_hosts = int(num_hosts)
        self.block = int(block)
        self._epoch = -1
        self._perm = np.zeros((0,), np.int64)

    def permutation(self, epoch: int) -> np.ndarray:
        """The dataset indices of ``epoch``, in global reading order.  # [num_examples]"""
        if epoch != self._epoch:
            self._perm = epoch_permutation(self.seed, epoch, self.num_examples)
            self._epoch = epoch
        return self._perm

    def item(self, k: int) -> tuple[int, int]:
        """Stream position ``k`` -> ``(epoch, dataset index)``."""
        if k < 0:
            raise ValueError(f"stream position must be >= 0, got {k}")
        epoch, j = divmod(global_position(k, self.host, self.num_hosts, self.block), self.num_examples)
        return epoch, int(self.permutation(epoch)[j])
