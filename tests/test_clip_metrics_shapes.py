"""What a CLIP knows about the shapes world (jaxt2i.shapes.clip_probes), on hand-made embeddings."""

import numpy as np
import pytest

from jaxt2i.shapes import clip_probes as cp
from jaxt2i.shapes import world as shapes


def test_zero_shot_accuracy_hand_made():
    # 3 classes along the axes; images 0, 1 point at classes 0, 1; image 2 is nearest class 0 but is class 2.
    labels = [("red", "circle"), ("red", "square"), ("blue", "circle")]
    classes = np.eye(3)
    images = np.array([[1.0, 0.1, 0.0], [0.0, 1.0, 0.2], [0.9, 0.0, 0.5]])
    targets = [("red", "circle"), ("red", "square"), ("blue", "circle")]
    np.testing.assert_array_equal(cp.zero_shot_predict(images, classes), [0, 1, 0])
    got = cp.zero_shot_accuracy(images, classes, labels, targets)
    assert got == {"color": pytest.approx(2 / 3), "shape": pytest.approx(1.0), "pair": pytest.approx(2 / 3), "n": 3}
    with pytest.raises(ValueError, match="must match"):
        cp.zero_shot_accuracy(images, classes, labels, targets[:2])


def test_pair_prompts_and_eval_sets():
    prompts, labels = cp.pair_prompts()
    assert len(prompts) == 21 and prompts[0] == "a red circle" and labels[0] == ("red", "circle")
    images, targets = cp.one_object_eval_set("heldout", 12)
    assert images.shape == (12, 64, 64, 3)
    assert all(t in shapes.HELDOUT_COLOR_SHAPES for t in targets)
    _, train_targets = cp.one_object_eval_set("train", 30)
    assert not any(t in shapes.HELDOUT_COLOR_SHAPES for t in train_targets)


def test_hard_negative_report_hand_made():
    scenes = [shapes.scene(0, i, "train", n_objects=2) for i in range(6)]
    images = np.zeros((6, 1))

    def perfect_texts(captions):  # +1 for any caption the image agrees with, -1 otherwise (image i is scene i)
        return np.array([[1.0] if text in truths else [-1.0] for text in captions])

    truths = set()
    for sc in scenes:  # every caption that describes a scene exactly, with all sizes named
        rng = np.random.default_rng(0)
        for _ in range(200):
            truths.add(shapes.caption(sc, rng, name_sizes=True))
    report = cp.hard_negative_report(lambda x: np.ones((len(x), 1)), perfect_texts, images, scenes)
    assert report["relation"] == 1.0 and 3 <= report["n_relation"] <= 6  # some reversals are held-out layouts
    assert report["n_binding"] >= 3 and report["binding"] == 1.0 and report["color"] == 1.0
    blind = cp.hard_negative_report(lambda x: np.ones((len(x), 1)), lambda c: np.ones((len(c), 1)), images, scenes)
    assert blind["relation"] == 0.0  # ties are not wins
