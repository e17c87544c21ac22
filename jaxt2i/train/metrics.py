"""Training observability: JSON-lines metrics, TensorBoard events, FLOPs and MFU (the progress bar is tqdm's).

* ``MetricsWriter`` appends one JSON object per logged step to ``WORKDIR/metrics.jsonl`` and, when
  ``tensorboardX`` or ``tensorflow`` can be imported, writes TensorBoard scalars to
  ``WORKDIR/tb/``; otherwise it says once that TensorBoard is off (no dependency is added for it).
* ``compiled_flops`` reads the FLOPs of one lowered or compiled step from XLA's cost analysis;
  ``mfu`` divides achieved FLOP/s by the peak of the devices (``peak_flops_per_device``: a table
  by device kind, overridable by the ``peak_tflops`` config key).
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import math
from pathlib import Path

# Peak dense bf16 TFLOP/s per device (vendor figures, without sparsity). Matched by substring of
# jax.Device.device_kind, case-insensitive, first match wins.
PEAK_TFLOPS: tuple[tuple[str, float], ...] = (
    ("h200", 989.0),
    ("h100", 989.0),
    ("a100", 312.0),
    ("l40s", 362.0),
    ("a10g", 125.0),
    ("rtx 4090", 165.0),
    ("rtx 3090", 71.0),
    ("v100", 125.0),
    ("t4", 65.0),
    ("tpu v6", 918.0),
    ("tpu v5p", 459.0),
    ("tpu v5 lite", 197.0),
    ("tpu v5e", 197.0),
    ("tpu v4", 275.0),
    ("tpu v3", 123.0),
)


def peak_flops_per_device(device_kind: str, override_tflops: float | None = None) -> float | None:
    """Peak FLOP/s of one device of ``device_kind`` (None when unknown, e.g. a CPU)."""
    if override_tflops:
        return float(override_tflops) * 1e12
    kind = device_kind.lower()
    for name, tflops in PEAK_TFLOPS:
        if name in kind:
            return tflops * 1e12
    return None


def compiled_flops(compiled) -> float | None:
    """FLOPs of one call of a lowered or compiled XLA program (``jit(f).lower(...)``, ``.compile()``), if XLA
    reports them.

    A lowered program reports the FLOPs of the whole (global) computation; a compiled SPMD program reports those of
    one device's partition (measured on XLA's CPU backend with 8 devices). MFU uses the lowered figure.
    """
    try:
        analysis = compiled.cost_analysis()
    except Exception:  # noqa: BLE001 -- some backends do not implement cost analysis
        return None
    if isinstance(analysis, (list, tuple)):
        analysis = analysis[0] if analysis else None
    if not analysis:
        return None
    flops = analysis.get("flops")
    return float(flops) if flops and flops > 0 else None


def mfu(flops_per_step: float | None, steps_per_s: float, num_devices: int, peak_per_device: float | None):
    """Model FLOPs utilisation: achieved FLOP/s over the devices' peak (None when either is unknown)."""
    if not flops_per_step or not peak_per_device or steps_per_s <= 0:
        return None
    return flops_per_step * steps_per_s / (num_devices * peak_per_device)


def _tb_writer(logdir: Path):
    """A TensorBoard scalar writer, or None when neither tensorboardX nor tensorflow with tensorboard imports.

    Both are optional: tensorboardX is looked up by name (``importlib``) and tensorflow imported here, so neither is
    loaded unless a run asks for TensorBoard events."""
    if importlib.util.find_spec("tensorboardX") is not None:
        w = importlib.import_module("tensorboardX").SummaryWriter(str(logdir))
        return lambda tag, value, step: w.add_scalar(tag, value, step), w.flush, w.close
    if importlib.util.find_spec("tensorboard") is None or importlib.util.find_spec("tensorflow") is None:
        return None  # tensorflow writes summaries only with the tensorboard package
    import tensorflow as tf

    w = tf.summary.create_file_writer(str(logdir))

    def scalar(tag, value, step):
        with w.as_default():
            tf.summary.scalar(tag, value, step=step)

    return scalar, w.flush, w.close


def _jsonable(v):
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v


class MetricsWriter:
    """Writes per-step metrics to ``workdir/metrics.jsonl`` (and TensorBoard when available).

    On resume (``truncate_after=step``), records of steps after the restored checkpoint -- written by
    the interrupted run and about to be recomputed -- are dropped first, so the file holds each
    step once.
    """

    def __init__(self, workdir: str | Path, *, tensorboard: bool = True, truncate_after: int | None = None,
                 enabled: bool = True, log=print):
        self.workdir = Path(workdir)
        self.path = self.workdir / "metrics.jsonl"
        self.enabled = enabled
        self._tb = None
        if not enabled:
            return
        self.workdir.mkdir(parents=True, exist_ok=True)
        if truncate_after is not None:
            self._truncate(truncate_after)
        elif self.path.exists():
            self.path.unlink()
        self._file = open(self.path, "a", encoding="utf-8")
        if tensorboard:
            self._tb = _tb_writer(self.workdir / "tb")
            if self._tb is None:
                log("TensorBoard events are off: neither tensorboardX nor tensorflow with tensorboard is installed "
                    "(metrics still go to metrics.jsonl).")

    def _truncate(self, step: int):
        if not self.path.exists():
            return
        kept = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by a kill
            if rec.get("step", 0) <= step:
                kept.append(line)
        self.path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")

    def write(self, step: int, metrics: dict):
        """Appends ``{"step": step, **metrics}`` (flushed at once, so a killed run loses nothing written)."""
        if not self.enabled:
            return
        rec = {"step": int(step), **{k: _jsonable(v) for k, v in metrics.items()}}
        self._file.write(json.dumps(rec) + "\n")
        self._file.flush()
        if self._tb is not None:
            scalar = self._tb[0]
            for k, v in metrics.items():
                if isinstance(v, (int, float)) and math.isfinite(float(v)):
                    scalar(f"train/{k}", float(v), int(step))
            self._tb[1]()

    def close(self):
        if not self.enabled:
            return
        self._file.close()
        if self._tb is not None:
            self._tb[2]()
