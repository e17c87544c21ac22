"""jaxt2i.shapes.report.pooled_adherence / markdown_comparison: pooling `jaxt2i eval` reports of independent draws
(what `scripts/shapes_report.py compare` prints for docs/shapes_model.md's tables)."""

import pytest

from jaxt2i.shapes.report import markdown_comparison, pooled_adherence


def _cell(n, right, objects, count, relation=None):
    exact = min(right, count)  # a made-up exact count: never above the right or the right-count ones
    cell = {"n": n, "accuracy": right / n, "exact_accuracy": exact / n, "objects_accuracy": objects / n,
            "count_accuracy": count / n, "size_accuracy": 0.5}
    if relation is not None:
        cell["relation_accuracy_given_objects"] = relation / objects if objects else 0.0
    return cell


def _report(scales: dict) -> dict:
    """A result shaped like `evaluate_pipeline`'s: {"guidance": {scale: {"adherence": {split: {type: cell}}}}}."""
    guidance = {}
    for scale, (one, two) in scales.items():
        splits = {split: {"one_object": _cell(*one), "two_object": _cell(*two)} for split in ("train", "heldout")}
        guidance[scale] = {"adherence": {**splits, "overall": 0.0, "n": 0}}
    return {"guidance": guidance}


def test_pooled_adherence_sums_counts_across_draws():
    a = _report({"3": ((50, 42, 42, 48), (50, 7, 23, 30, 7))})
    b = _report({"3": ((100, 88, 88, 97), (100, 14, 30, 60, 10)), "1": ((100, 90, 90, 80), (100, 9, 20, 50, 9))})
    pooled = pooled_adherence([a, b], 3.0)
    assert pooled[("heldout", "one_object")] == {"n": 150, "right": 130, "exact": 130, "objects": 130, "count": 145}
    assert pooled[("train", "two_object")] == {"n": 150, "right": 21, "exact": 21, "objects": 53, "count": 90,
                                               "relation": 17}
    # a scale only one report has pools that one alone; a scale none has is an error
    assert pooled_adherence([a, b], "1")[("train", "one_object")]["n"] == 100
    with pytest.raises(ValueError, match="guidance 5"):
        pooled_adherence([a, b], 5)


def test_markdown_comparison_pools_percentages_by_counts_and_brackets_the_other_model():
    new = [_report({"3": ((50, 42, 42, 40), (50, 7, 23, 5, 7))}),
           _report({"3": ((150, 132, 132, 130), (150, 21, 52, 20, 20))})]
    old = [_report({"3": ((200, 165, 165, 160), (200, 21, 63, 21, 21))})]
    rows = [line for line in markdown_comparison(new, old).splitlines() if line.startswith("| 3 | heldout")]
    # 174/200 = 87.0% (averaging the two draws' percentages would give 86.0%)
    assert rows == ["| 3 | heldout | 200 | 87.0% (82.5%) | 85.0% (80.0%) | 14.0% (10.5%) | 12.5% (10.5%) "
                    "| 37.5% (31.5%) | 36.0% of 75 (33.3% of 63) |"]
    # without `against`, no brackets
    assert "(" not in markdown_comparison(new).splitlines()[-1]


def test_a_draw_where_no_image_has_both_objects_pools():
    """`evaluate_pipeline` reports the relation given both objects as None when no image had both."""
    a = _report({"2": ((50, 2, 2, 40), (50, 0, 0, 30, 0))})
    for split in ("train", "heldout"):
        a["guidance"]["2"]["adherence"][split]["two_object"]["relation_accuracy_given_objects"] = None
    b = _report({"2": ((50, 1, 1, 40), (50, 1, 2, 30, 1))})
    assert pooled_adherence([a, b], 2)[("heldout", "two_object")]["relation"] == 1
    assert "| 2 | heldout | 100 |" in markdown_comparison([a, b])
