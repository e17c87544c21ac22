"""The benchmark load protocol (scripts/bench_common.py): which rows count as quiet, how LOADED rows are marked, and
that a loaded row is never printed as a headline. Pure functions; no benchmark runs here."""

import importlib.util
import math
import sys
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"
_spec = importlib.util.spec_from_file_location("bench_common", SCRIPTS / "bench_common.py")
bench = importlib.util.module_from_spec(_spec)
sys.modules["bench_common"] = bench  # dataclasses look their module up there
_spec.loader.exec_module(bench)


def _row(name: str, before: float, after: float, own: int = 2) -> "bench.Row":
    return bench.Row([name, "1.00", "2.00", "0.50x"], bench.Load(before, after, own, 2), f"{name}: ratio 0.50x")


@pytest.mark.parametrize("before, after, own, quiet", [
    (0.2, 2.3, 2, True),    # idle before; after = the benchmark's own 2 threads + 0.3
    (0.5, 2.5, 2, True),    # the threshold itself is quiet
    (0.6, 1.0, 2, False),   # another job ran in the minute before the start
    (0.1, 2.7, 2, False),   # a job joined during the run: load above own threads + 0.5
    (0.1, 2.0, 1, False),   # --threads 1: the second core's load is another job's
    (0.1, 1.4, 1, True),
    (math.nan, 1.0, 2, False),  # no load average: never quiet
])
def test_is_quiet(before, after, own, quiet):
    assert bench.is_quiet(before, after, own) is quiet
    assert bench.Load(before, after, own, 2).quiet is quiet


def test_load_cell_marks_loaded_rows():
    assert bench.Load(0.21, 1.93, 2, 2).cell() == "0.21->1.93 quiet"
    assert bench.Load(3.1, 4.2, 2, 2).cell() == "3.10->4.20 **LOADED**"


def test_table_keeps_loaded_rows_marked():
    lines = bench.table_lines(["benchmark", "a", "b", "ratio"], [_row("quiet one", 0.1, 2.0), _row("busy", 3.0, 5.0)])
    assert lines[0] == "| benchmark | a | b | ratio | load before->after |"
    assert lines[1] == "|---|---|---|---|---|"
    assert lines[2].startswith("| quiet one |") and lines[2].endswith("0.10->2.00 quiet |")
    assert lines[3].startswith("| busy |") and "**LOADED**" in lines[3]


def test_headline_names_only_quiet_rows_and_comes_last():
    rows = [_row("busy", 3.0, 5.0), _row("quiet one", 0.1, 2.0)]
    text = bench.report(["benchmark", "a", "b", "ratio"], rows)
    lines = text.splitlines()
    assert lines[-1] == "headline: quiet one: ratio 0.50x (quiet machine, load 0.10->2.00)"
    assert not any(line.startswith("headline: busy") for line in lines)
    assert any(line.startswith("| busy |") and "**LOADED**" in line for line in lines)  # still printed, marked


def test_no_headline_from_a_loaded_machine():
    lines = bench.headline_lines([_row("busy", 3.0, 5.0), _row("also busy", 0.2, 3.4)])
    assert len(lines) == 1 and lines[0].startswith("no headline:") and "LOADED" in lines[0]
    assert "ratio" not in lines[0]  # no ratio is repeated as a summary
    assert bench.headline_lines([bench.Row(["x"], bench.Load(0.1, 1.0, 2, 2))]) == []  # no headline text, no line


def test_load_meter_measures_after_against_its_start():
    meter = bench.LoadMeter(own_threads=1)
    load = meter.measure()
    assert load.before == meter.before and load.own_threads == 1 and load.cores >= 1


@pytest.mark.parametrize("script", sorted(p.name for p in SCRIPTS.glob("bench_*.py") if p.name != "bench_common.py"))
def test_every_benchmark_script_uses_the_protocol(script):
    text = (SCRIPTS / script).read_text(encoding="utf-8")
    assert "LoadMeter(" in text and "print_report(" in text, f"{script} must measure load and print via the protocol"
    assert "loadavg" not in text, f"{script} reads the load itself instead of through LoadMeter"


def test_comparison_row_headlines_the_ratio_of_medians():
    medians = {"a": 12.094, "b": 9.912, "ratio": 1.2201, "pair_ratio": 1.2312}
    row = bench.comparison_row("U-Net B=2", medians, "compile 5.7 s", 3, bench.Load(0.1, 1.9, 2, 2))
    assert list(row.cells) == ["U-Net B=2", "12.09", "9.91", "1.22x (per-pair 1.23x)", "compile 5.7 s", "3"]
    assert row.headline == "U-Net B=2: jaxt2i / diffusers 1.22x (per-pair 1.23x)"
    assert len(bench.comparison_header("dall_e")) == len(row.cells) and "dall_e median s" in bench.comparison_header(
        "dall_e")
