"""scripts/scaling_memory.py on the tiny U-Net: the train state's per-device bytes halve from fsdp=1 to fsdp=2, in the
shardings and in the compiled step's memory analysis. Runs in a subprocess with 8 host devices."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

CHILD = """
import importlib.util, json
spec = importlib.util.spec_from_file_location("scaling_memory", "scripts/scaling_memory.py")
m = importlib.util.module_from_spec(spec)
spec.loader.exec_module(m)
rows = [m.measure_step("tiny_sd1", f, remat=False, dtype="float32", batch_per_device=1, side=8,
                       compile_step={compile}) for f in (1, 2)]
print(json.dumps(rows))
"""


def _measure(compile_step: bool) -> list[dict]:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT),
           "XLA_FLAGS": "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0"}
    out = subprocess.run([sys.executable, "-c", CHILD.format(compile=compile_step)], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_state_bytes_halve_from_fsdp_1_to_2():
    one, two = _measure(compile_step=False)
    assert (one["fsdp"], one["data"], two["fsdp"], two["data"]) == (1, 8, 2, 4)
    assert one["state_from_shardings"] == pytest.approx(one["ideal_state"], rel=1e-4)  # step + rng only
    assert 0.5 <= two["state_from_shardings"] / one["state_from_shardings"] < 0.52  # small leaves stay whole
    assert two["opt_bytes"] == pytest.approx(2 * two["params_bytes"], rel=1e-3)  # Adam's two moments
    assert two["ema_bytes"] == two["params_bytes"]


@pytest.mark.slow
def test_compiled_step_arguments_halve_from_fsdp_1_to_2():
    one, two = _measure(compile_step=True)
    for row in (one, two):
        assert row["state_measured"] == row["state_from_shardings"]
        assert row["alias"] == row["state_from_shardings"]  # the donated state is updated in place
    assert 0.5 <= two["state_measured"] / one["state_measured"] < 0.52
