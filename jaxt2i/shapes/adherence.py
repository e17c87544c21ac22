"""Prompt-adherence scoring for the shapes world: did the image show what the prompt asked for?

A prompt's target is a ``jaxt2i.world.world.Scene``; an image's content is the list of
``jaxt2i.world.detector.Detection`` found in it. Rules (GenEval-style, presence-based):

* one object: correct when some detection has the target's color and shape;
* two objects: correct when both targets are found (as two different detections with the right
  color and shape) and, for some such pair, ``relation(first, second)`` is the target relation.

Extra objects do not make a GenEval-style verdict wrong; the **exact** verdict is stricter: correct, and no object
besides the targets (exactly as many detections as target objects, objects of unknown shape included), so a third
object drawn beside two right ones fails it. Sizes are not part of correctness (prompts may omit them);
``size_correct``, ``count_correct`` (exactly as many detections as target objects) and ``unknown_shapes`` (objects
whose shape is no world shape) are reported on the side. ``report`` aggregates per group (e.g. "train/one_object")
and averages the per-type accuracies.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from jaxt2i.shapes import detector, world


@dataclasses.dataclass(frozen=True)
class PromptScore:
    """The verdict for one (target, detections) pair; ``relation_correct`` is None for one object."""

    prompt_type: str
    correct: bool
    objects_found: int  # how many target objects have a matching detection (distinct detections)
    objects_correct: bool
    relation_correct: bool | None
    count_correct: bool
    size_correct: bool | None  # None when a target object was not found
    unknown_shapes: int = 0  # detections whose shape is no world shape

    @property
    def exact(self) -> bool:
        """Correct, with nothing drawn besides the target objects."""
        return self.correct and self.count_correct


def _matches(obj: world.Obj, detections: Sequence[detector.Detection]) -> list[int]:
    return [i for i, d in enumerate(detections) if (d.color, d.shape) == (obj.color, obj.shape)]


def _size_ok(objects: Sequence[world.Obj], chosen: Sequence[detector.Detection]) -> bool:
    return all(o.size == d.size for o, d in zip(objects, chosen))


def score(target: world.Scene, detections: Sequence[detector.Detection]) -> PromptScore:
    """Score one image's detections against its prompt's target scene."""
    count_ok = len(detections) == len(target.objects)
    unknown = sum(d.shape == detector.UNKNOWN for d in detections)
    if len(target.objects) == 1:
        found = _matches(target.objects[0], detections)
        size_ok = any(detections[i].size == target.objects[0].size for i in found) if found else None
        return PromptScore("one_object", bool(found), int(bool(found)), bool(found), None, count_ok, size_ok,
                           unknown)
    if len(target.objects) != 2 or target.relation not in world.RELATIONS:
        raise ValueError(f"target must hold one object, or two with a relation in {world.RELATIONS}: {target}")
    a, b = target.objects
    pairs = [(i, j) for i in _matches(a, detections) for j in _matches(b, detections) if i != j]
    n_found = 2 if pairs else int(bool(_matches(a, detections)) or bool(_matches(b, detections)))
    good = [(i, j) for i, j in pairs if detector.relation(detections[i], detections[j]) == target.relation]
    chosen = good or pairs
    size_ok = any(_size_ok((a, b), (detections[i], detections[j])) for i, j in chosen) if chosen else None
    return PromptScore(
        "two_object",
        correct=bool(good),
        objects_found=n_found,
        objects_correct=bool(pairs),
        relation_correct=bool(good),
        count_correct=count_ok,
        size_correct=size_ok,
        unknown_shapes=unknown,
    )


def _mean(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None


# What ``report`` needs of a group of scores, as integer counts: summed over batches, shards and processes, they
# give exactly the report of all the scores at once.
COUNT_FIELDS = ("n", "correct", "exact", "objects", "count", "size_known", "size", "unknown", "relation")


def score_row(s: PromptScore) -> np.ndarray:
    """One score as counts: int64 [len(COUNT_FIELDS)] of 0s and 1s."""
    return np.array([1, s.correct, s.exact, s.objects_correct, s.count_correct, s.size_correct is not None,
                     bool(s.size_correct), s.unknown_shapes > 0, bool(s.objects_correct and s.relation_correct)],
                    np.int64)


def score_counts(scores: Sequence[PromptScore], groups: Sequence[str], group_names: Sequence[str]) -> np.ndarray:
    """Counts of ``scores`` per group and prompt type: int64 [len(group_names), len(world.PROMPT_TYPES),
    len(COUNT_FIELDS)]; ``groups`` labels each score with one of ``group_names``. Counts add: the counts of two
    disjoint sets of scores are the sum of their counts."""
    if len(groups) != len(scores):
        raise ValueError(f"got {len(scores)} scores but {len(groups)} group labels; give one label per score")
    counts = np.zeros((len(group_names), len(world.PROMPT_TYPES), len(COUNT_FIELDS)), np.int64)
    for g, s in zip(groups, scores):
        if g not in group_names:
            raise ValueError(f"group {g!r} is not one of {list(group_names)}")
        counts[list(group_names).index(g), world.PROMPT_TYPES.index(s.prompt_type)] += score_row(s)
    return counts


def _ratio(num, den) -> float | None:
    return float(num / den) if den else None


def _cell_stats(row: np.ndarray, prompt_type: str) -> dict:
    """The stats of one (group, prompt type) from its counts [len(COUNT_FIELDS)]."""
    c = dict(zip(COUNT_FIELDS, (int(v) for v in row)))
    stats = {
        "n": c["n"],
        "accuracy": _ratio(c["correct"], c["n"]),
        "exact_accuracy": _ratio(c["exact"], c["n"]),
        "objects_accuracy": _ratio(c["objects"], c["n"]),
        "count_accuracy": _ratio(c["count"], c["n"]),
        "size_accuracy": _ratio(c["size"], c["size_known"]),
        "unknown_shape_share": _ratio(c["unknown"], c["n"]),
    }
    if prompt_type == "two_object":
        stats["relation_accuracy_given_objects"] = _ratio(c["relation"], c["objects"])
    return stats


def _by_type(counts: np.ndarray) -> dict:
    """One group's report from its counts [len(world.PROMPT_TYPES), len(COUNT_FIELDS)]."""
    out = {t: _cell_stats(counts[i], t) for i, t in enumerate(world.PROMPT_TYPES) if counts[i, 0] > 0}
    out["overall"] = _mean([out[t]["accuracy"] for t in world.PROMPT_TYPES if t in out])
    out["overall_exact"] = _mean([out[t]["exact_accuracy"] for t in world.PROMPT_TYPES if t in out])
    out["n"] = int(counts[:, 0].sum())
    return out


def report_from_counts(counts: np.ndarray, group_names: Sequence[str]) -> dict:
    """``report`` from ``score_counts`` (summed over any number of batches): groups without scores are left out."""
    counts = np.asarray(counts)
    result = {g: _by_type(counts[i]) for g, i in sorted((g, i) for i, g in enumerate(group_names))
              if counts[i, :, 0].sum() > 0}
    total = _by_type(counts.sum(axis=0))
    result["overall"], result["overall_exact"], result["n"] = total["overall"], total["overall_exact"], total["n"]
    return result


def report(scores: Sequence[PromptScore], groups: Sequence[str] | None = None) -> dict:
    """Aggregate scores: {group: {prompt_type: stats}, ..., "overall": ..., "n": ...}.

    ``groups`` (e.g. the split of each prompt) labels each score; without it everything is one
    group "all". Each group's "overall" ("overall_exact") is the mean of its per-type (exact) accuracies, so one- and
    two-object prompts weigh equally whatever their counts; the top-level "overall" is the same
    mean over all scores regardless of group. The same as ``report_from_counts(score_counts(...))``, which
    gathers the numbers batch by batch.
    """
    groups = ["all"] * len(scores) if groups is None else list(groups)
    names = sorted(set(groups))
    return report_from_counts(score_counts(scores, groups, names), names)


def evaluate(
    targets: Sequence[world.Scene],
    images: Sequence[np.ndarray],
    groups: Sequence[str] | None = None,
) -> tuple[dict, list[PromptScore]]:
    """Detect objects in each image [H, W, 3] and score it against its target; (report, scores)."""
    scores = score_images(targets, images)
    return report(scores, groups), scores


def score_images(targets: Sequence[world.Scene], images: Sequence[np.ndarray]) -> list[PromptScore]:
    """Detect objects in each image [H, W, 3] (uint8) and score it against its target."""
    if len(targets) != len(images):
        raise ValueError(f"got {len(targets)} targets but {len(images)} images; give one image per prompt")
    return [score(t, detector.detect(np.asarray(im))) for t, im in zip(targets, images)]


def evaluate_prompts(
    prompts: Sequence[world.EvalPrompt], images: Sequence[np.ndarray]
) -> tuple[dict, list[PromptScore]]:
    """``evaluate`` for ``world.eval_prompts`` output; groups are the prompts' splits."""
    return evaluate([p.target for p in prompts], images, [p.split for p in prompts])
