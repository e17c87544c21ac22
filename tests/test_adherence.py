"""Prompt-adherence scoring on hand-made detections, including failures, and end to end on renders."""

import numpy as np
import pytest

from jaxt2i.shapes import world as S
from jaxt2i.shapes import adherence as A
from jaxt2i.shapes.detector import Detection


def det(color, shape, x, y, size="small"):
    return Detection(color, shape, size, (float(x), float(y)), (0, 0, 1, 1), 100, f"{shape}@0", 1.0, 0.0)


def obj(color, shape, size="small"):
    return S.Obj(color, shape, size, (32.0, 32.0), 12)


ONE = S.Scene((obj("red", "circle"),))
TWO = S.Scene((obj("red", "circle"), obj("blue", "square", "large")), "left of")


def test_one_object_correct_when_color_and_shape_present():
    s = A.score(ONE, [det("red", "circle", 30, 30)])
    assert s.correct and s.objects_correct and s.count_correct and s.size_correct
    assert s.relation_correct is None and s.prompt_type == "one_object"


@pytest.mark.parametrize(
    "dets",
    [[], [det("red", "square", 30, 30)], [det("orange", "circle", 30, 30)], [det("blue", "triangle", 5, 5)]],
)
def test_one_object_failures(dets):
    s = A.score(ONE, dets)
    assert not s.correct and s.objects_found == 0 and s.size_correct is None


def test_one_object_extra_objects_are_not_failures_but_fail_the_exact_score():
    s = A.score(ONE, [det("green", "square", 10, 10), det("red", "circle", 40, 40, "large")])
    assert s.correct and not s.count_correct and not s.exact and s.size_correct is False
    assert A.score(ONE, [det("red", "circle", 40, 40)]).exact


def test_a_third_object_fails_the_exact_score_even_of_unknown_shape():
    right = [det("blue", "square", 50, 30, "large"), det("red", "circle", 10, 35)]
    assert A.score(TWO, right).exact
    for third in (det("green", "triangle", 30, 60), det("white", "unknown", 30, 60)):
        s = A.score(TWO, right + [third])
        assert s.correct and not s.exact and s.unknown_shapes == (third.shape == "unknown")


def test_an_unknown_shape_never_matches_a_target():
    s = A.score(ONE, [det("red", "unknown", 30, 30)])
    assert not s.correct and s.unknown_shapes == 1 and s.count_correct


def test_two_objects_correct():
    s = A.score(TWO, [det("blue", "square", 50, 30, "large"), det("red", "circle", 10, 35)])
    assert s.correct and s.objects_correct and s.relation_correct and s.count_correct and s.size_correct


def test_two_objects_wrong_relation():
    s = A.score(TWO, [det("red", "circle", 50, 30), det("blue", "square", 10, 30)])
    assert not s.correct and s.objects_correct and s.relation_correct is False and s.objects_found == 2


def test_two_objects_vertical_arrangement_is_not_left_of():
    s = A.score(TWO, [det("red", "circle", 30, 10), det("blue", "square", 34, 50)])
    assert not s.correct and s.objects_correct
    above = S.Scene(TWO.objects, "above")
    assert A.score(above, [det("red", "circle", 30, 10), det("blue", "square", 34, 50)]).correct


def test_two_objects_missing_or_wrong_attribute():
    s = A.score(TWO, [det("red", "circle", 10, 30)])
    assert not s.correct and s.objects_found == 1 and not s.objects_correct
    s = A.score(TWO, [det("red", "circle", 10, 30), det("blue", "circle", 50, 30)])
    assert not s.correct and s.objects_found == 1
    s = A.score(TWO, [det("green", "triangle", 10, 30)])
    assert s.objects_found == 0 and s.size_correct is None


def test_two_objects_any_good_pair_counts():
    dets = [det("red", "circle", 60, 30), det("blue", "square", 40, 30), det("red", "circle", 10, 30)]
    s = A.score(TWO, dets)
    assert s.correct and not s.count_correct


def test_bad_target_is_rejected():
    with pytest.raises(ValueError, match="relation"):
        A.score(S.Scene(TWO.objects, None), [])


def test_report_aggregates_per_group_and_type():
    scores = [
        A.score(ONE, [det("red", "circle", 30, 30)]),  # train one: correct
        A.score(ONE, []),  # train one: wrong
        A.score(TWO, [det("red", "circle", 10, 30), det("blue", "square", 50, 30)]),  # train two: correct
        A.score(TWO, [det("red", "circle", 50, 30), det("blue", "square", 10, 30)]),  # heldout two: relation wrong
        A.score(TWO, [det("red", "circle", 10, 30)]),  # heldout two: object missing
    ]
    r = A.report(scores, ["train", "train", "train", "heldout", "heldout"])
    assert r["train"]["one_object"]["accuracy"] == 0.5 and r["train"]["one_object"]["n"] == 2
    assert r["train"]["one_object"]["exact_accuracy"] == 0.5 and r["train"]["overall_exact"] == 0.75
    assert r["train"]["two_object"]["accuracy"] == 1.0
    assert r["train"]["overall"] == 0.75 and r["train"]["n"] == 3
    h = r["heldout"]
    assert "one_object" not in h and h["overall"] == 0.0
    assert h["two_object"]["objects_accuracy"] == 0.5
    assert h["two_object"]["relation_accuracy_given_objects"] == 0.0
    assert r["overall"] == pytest.approx((0.5 + 1 / 3) / 2) and r["n"] == 5
    assert A.report(scores)["all"]["n"] == 5
    with pytest.raises(ValueError, match="label"):
        A.report(scores, ["train"])


def test_end_to_end_rendered_targets_score_perfectly_and_shuffled_ones_do_not():
    prompts = [p for t in S.PROMPT_TYPES for sp in S.SPLITS for p in S.eval_prompts(sp, t, 30, seed=4)]
    images = [S.render(p.target) for p in prompts]
    rep, scores = A.evaluate_prompts(prompts, images)
    assert all(s.correct and s.exact and s.size_correct and not s.unknown_shapes for s in scores)
    assert rep["overall"] == 1.0 and rep["overall_exact"] == 1.0 and rep["heldout"]["two_object"]["n"] == 30
    rng = np.random.default_rng(0)
    noisy = [np.clip(im / 255.0 + rng.normal(0, 0.05, im.shape), 0, 1) for im in images]
    assert A.evaluate_prompts(prompts, noisy)[0]["overall"] == 1.0
    shuffled = images[1:] + images[:1]
    assert A.evaluate_prompts(prompts, shuffled)[0]["overall"] < 0.3
    with pytest.raises(ValueError, match="one image per prompt"):
        A.evaluate_prompts(prompts, images[:-1])
