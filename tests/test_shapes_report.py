"""scripts/shapes_report.py compare: the pooling of `jaxt2i eval` reports that docs/shapes_model.md's tables use."""

import importlib.util
import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def report_script():
    spec = importlib.util.spec_from_file_location("shapes_report", REPO / "scripts" / "shapes_report.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _cell(n, right, objects, count, relation=None):
    cell = {"n": n, "accuracy": right / n, "objects_accuracy": objects / n, "count_accuracy": count / n,
            "size_accuracy": 0.5}
    if relation is not None:
        cell["relation_accuracy_given_objects"] = relation / objects if objects else 0.0
    return cell


def _report(scales: dict) -> dict:
    """A report shaped like `jaxt2i eval --out`'s: {"guidance": {scale: {"adherence": {split: {type: cell}}}}}."""
    guidance = {}
    for scale, (one, two) in scales.items():
        splits = {split: {"one_object": _cell(*one), "two_object": _cell(*two)} for split in ("train", "heldout")}
        guidance[scale] = {"adherence": {**splits, "overall": 0.0, "n": 0}}
    return {"guidance": guidance}


def test_pooled_adherence_sums_counts_across_draws(report_script):
    a = _report({"3": ((50, 42, 42, 48), (50, 7, 23, 30, 7))})
    b = _report({"3": ((100, 88, 88, 97), (100, 14, 30, 60, 10)), "1": ((100, 90, 90, 80), (100, 9, 20, 50, 9))})
    pooled = report_script.pooled_adherence([a, b], "3")
    assert pooled[("heldout", "one_object")] == {"n": 150, "right": 130, "objects": 130, "count": 145}
    assert pooled[("train", "two_object")] == {"n": 150, "right": 21, "objects": 53, "count": 90, "relation": 17}
    # a scale only one report has pools that one alone; a scale none has is an error
    assert report_script.pooled_adherence([a, b], "1")[("train", "one_object")]["n"] == 100
    with pytest.raises(ValueError, match="guidance 5"):
        report_script.pooled_adherence([a, b], "5")


def test_compare_prints_pooled_percentages_and_brackets(report_script, tmp_path, capsys):
    new = [tmp_path / "a.json", tmp_path / "b.json"]
    new[0].write_text(json.dumps(_report({"3": ((50, 42, 42, 48), (50, 7, 23, 30, 7))})))
    new[1].write_text(json.dumps(_report({"3": ((150, 132, 132, 145), (150, 21, 52, 90, 20))})))
    old = tmp_path / "old.json"
    old.write_text(json.dumps(_report({"3": ((200, 165, 165, 167), (200, 21, 63, 100, 21))})))
    report_script.main(["compare", *map(str, new), "--against", str(old)])
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| 3 | heldout")]
    assert rows == ["| 3 | heldout | 200 | 87.0% (82.5%) | 14.0% (10.5%) | 37.5% (31.5%) | 36.0% of 75 (33.3% of 63) "
                    "| 96.5% (83.5%) |"]
