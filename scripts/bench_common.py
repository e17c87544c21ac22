"""What every ``scripts/bench_*.py`` shares: the machine line, the command line, thread pinning, the alternating
timer, and the load protocol that keeps a loaded machine's numbers out of the headline.

The load protocol
-----------------
A ratio measured while another job competes for the cores is not a ratio of the two libraries: a multi-threaded
kernel that waits at a barrier for a descheduled thread (torch's OpenMP pool more than XLA's work-stealing pool)
slows down out of all proportion, so a loaded machine can flatter either side. Each script therefore records the
1-minute load average (``/proc/loadavg``) twice:

* ``before``: when the script starts, before it has done any work, so the figure is the other processes' load;
* ``after``: right after each row's timed part. By then the benchmark's own threads count in it: while it runs,
  each busy thread adds up to 1 to the load (approached over about a minute), so up to ``own_threads``
  (``--threads``, or every core the process may use) of ``after`` is the benchmark itself.

A row is **quiet** when ``before <= QUIET_LOAD`` and ``after - own_threads <= QUIET_LOAD``, otherwise **LOADED**.
``QUIET_LOAD = 0.5`` is half a core, the same on every machine: a single other busy thread competing for the cores
adds ~1 to the load (a little less in its first minute) and stalls an all-cores kernel whatever the core count, so it
must mark the row as loaded, while an idle machine's background (daemons, a shell) stays well below 0.5. Known
limits: the allowance for the benchmark's own threads is an upper bound (while it keeps fewer threads busy, e.g. a
single-threaded phase, that many fewer other threads go unnoticed in ``after``, never in ``before``);
spinning OpenMP threads can push ``after`` a little above ``own_threads`` on a quiet machine (the row is then marked
LOADED wrongly: rerun); a job that starts during a short timed part (well under a minute) raises the 1-minute
average only partly. After a previous heavy job, wait until ``uptime`` shows a 1-minute load below 0.5 (a load of 2
decays below 0.5 in about 85 s).

Every row is printed with its load cell (``0.21->1.93 quiet`` or ``3.10->4.20 **LOADED**``). The summary a script
prints last (:func:`headline_lines`) names only quiet rows as headlines; when no row is quiet it says so instead of
repeating a ratio.
"""

from __future__ import annotations

import dataclasses
import math
import os
import platform
import statistics
import sys
import time
from typing import Callable, Sequence

QUIET_LOAD = 0.5  # other processes' 1-minute load, in busy threads, that still counts as a quiet machine


# ------------------------------------------------------------------------------------------------ load protocol
def loadavg() -> float:
    """The machine's 1-minute load average now; NaN where the OS does not report one (then no row is quiet)."""
    try:
        return os.getloadavg()[0]
    except OSError:
        return math.nan


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity), i.e. the threads an unpinned benchmark uses."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def is_quiet(before: float, after: float, own_threads: int, threshold: float = QUIET_LOAD) -> bool:
    """The protocol's rule: the other processes' load stayed ``<= threshold`` before and after the timed part.

    ``before`` is the 1-minute load at the script's start (the benchmark not yet running), compared strictly;
    ``after`` is taken right after the timed part, where up to ``own_threads`` of it is the benchmark itself.
    NaN (no load average) is never quiet.
    """
    return before <= threshold and after - own_threads <= threshold


@dataclasses.dataclass(frozen=True)
class Load:
    """The 1-minute load average around one timed part, and what the benchmark itself ran with."""

    before: float
    after: float
    own_threads: int  # threads the benchmark runs (--threads, or every usable core)
    cores: int  # the machine's cores (the load average is machine-wide)

    @property
    def quiet(self) -> bool:
        return is_quiet(self.before, self.after, self.own_threads)

    def cell(self) -> str:
        """The table cell: ``before->after`` and the verdict, e.g. ``0.21->1.93 quiet``."""
        return f"{self.before:.2f}->{self.after:.2f} " + ("quiet" if self.quiet else "**LOADED**")


class LoadMeter:
    """Records the load when created (create it first thing in ``main``, before any work); :meth:`measure` after
    each timed part returns that row's :class:`Load`."""

    def __init__(self, own_threads: int | None = None):
        self.before = loadavg()
        self.own_threads = own_threads or usable_cores()
        self.cores = os.cpu_count() or 1

    def measure(self) -> Load:
        return Load(self.before, loadavg(), self.own_threads, self.cores)


def protocol_line(own_threads: int, cores: int, threshold: float = QUIET_LOAD) -> str:
    """One line stating the rule the rows were classified by."""
    return (f"load protocol: a row is quiet when the 1-minute load is <= {threshold:g} before the run and "
            f"<= {threshold:g} + {own_threads} (this benchmark's threads) right after its timed part; "
            f"{cores} cores; otherwise it is marked LOADED and is no headline")


@dataclasses.dataclass(frozen=True)
class Row:
    """One result row: its cells (without the load cell), its load, and the one-line summary it would headline
    with (None for a row that is never a headline)."""

    cells: Sequence[str]
    load: Load
    headline: str | None = None


def table_lines(header: Sequence[str], rows: Sequence[Row], load_column: str = "load before->after") -> list[str]:
    """A markdown table: ``header`` + the load column, then each row with its load cell (LOADED rows marked)."""
    columns = list(header) + [load_column]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(list(row.cells) + [row.load.cell()]) + " |" for row in rows]
    return lines


def headline_lines(rows: Sequence[Row]) -> list[str]:
    """The summary printed last: one ``headline:`` line per quiet row that has a headline (after a note counting the
    LOADED ones); a loaded row's is never one. Without any quiet row, a single ``no headline:`` line says why."""
    candidates = [row for row in rows if row.headline is not None]
    quiet = [row for row in candidates if row.load.quiet]
    if quiet:
        skipped = len(candidates) - len(quiet)
        note = [f"({skipped} LOADED row(s) above are no headline)"] if skipped else []
        return note + [f"headline: {row.headline} (quiet machine, load {row.load.before:.2f}->{row.load.after:.2f})"
                       for row in quiet]
    if not candidates:
        return []
    before = max(row.load.before for row in candidates)
    after = max(0.0, *(row.load.after - row.load.own_threads for row in candidates))
    return [f"no headline: every row comes from a LOADED machine (1-minute load {before:.2f} at the start, up "
            f"to {after:.2f} above the benchmark's own threads after a timed part); rerun on a quiet machine"]


def report(header: Sequence[str], rows: Sequence[Row], load_column: str = "load before->after") -> str:
    """The table, the protocol line and the headline summary (last), as one text block."""
    if not rows:
        return ""
    first = rows[0].load
    lines = table_lines(header, rows, load_column) + ["", protocol_line(first.own_threads, first.cores)]
    return "\n".join(lines + headline_lines(rows))


def comparison_header(reference: str = "diffusers") -> list[str]:
    """The columns of a jaxt2i-vs-reference timing table (before the load column)."""
    return ["benchmark", "jaxt2i median s", f"{reference} median s", "ratio", "warm-up", "repeats"]


def comparison_row(label: str, medians: dict, warm_up: str, repeats: int, load: Load, reference: str = "diffusers",
                   digits: int = 2) -> Row:
    """A :func:`comparison_header` row from :func:`summary`'s ``medians`` (a = jaxt2i, b = the reference); its
    headline is the ratio of medians, per-pair ratio in brackets."""
    ratio = f"{medians['ratio']:.2f}x (per-pair {medians['pair_ratio']:.2f}x)"
    cells = [label, f"{medians['a']:.{digits}f}", f"{medians['b']:.{digits}f}", ratio, warm_up, str(repeats)]
    return Row(cells, load, f"{label}: jaxt2i / {reference} {ratio}")


def print_report(header: Sequence[str], rows: Sequence[Row], load_column: str = "load before->after") -> None:
    print("\n" + report(header, rows, load_column), flush=True)


# ------------------------------------------------------------------------------------------- machine and timing
def machine() -> str:
    """One line: CPU model, cores, RAM, library versions (imports jax and torch)."""
    import jax
    import torch

    cpu = platform.processor() or "cpu"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    mem_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return (f"{cpu}, {os.cpu_count()} cores, {mem_gb:.0f} GB RAM; jax {jax.__version__} "
            f"({jax.default_backend()}), torch {torch.__version__} ({torch.get_num_threads()} threads)")


def command_line() -> str:
    """The command that ran this script, as the docs quote it."""
    return "python " + " ".join([os.path.relpath(sys.argv[0])] + sys.argv[1:])


def pin_threads(threads: int | None) -> None:
    """Restricts this process (jax's and torch's thread pools) to ``threads`` cores; call before importing jax.

    With 1 thread each library runs sequentially on one core, so CPU time taken by other processes slows both alike
    instead of stalling a multi-threaded kernel that waits for its slowest thread.
    """
    if not threads:
        return
    cpus = sorted(os.sched_getaffinity(0))[-threads:]
    os.sched_setaffinity(0, cpus)
    os.environ["OMP_NUM_THREADS"] = str(threads)
    import torch

    torch.set_num_threads(threads)


def time_once(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def alternate(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, list[float]]:
    """Times each function ``repeats`` times, interleaved (a, b, a, b, ...), returning seconds per call."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for r in range(repeats):
        order = list(fns) if r % 2 == 0 else list(reversed(fns))  # neither library always goes first
        for name in order:
            times[name].append(time_once(fns[name]))
    return times


def summary(times: dict[str, list[float]], a: str = "jaxt2i", b: str = "diffusers") -> dict[str, float]:
    """Medians, ratio of medians and the median of the per-repeat ratios (a/b)."""
    med = {name: statistics.median(t) for name, t in times.items()}
    pair_ratios = [x / y for x, y in zip(times[a], times[b])]
    return {"a": med[a], "b": med[b], "ratio": med[a] / med[b], "pair_ratio": statistics.median(pair_ratios),
            "spread_a": (min(times[a]), max(times[a])), "spread_b": (min(times[b]), max(times[b]))}
