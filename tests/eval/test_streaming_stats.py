"""The streaming statistics of `jaxt2i eval` equal the in-memory ones: the Frechet accumulator (any batch split, any
merge order), adherence counts, CLIP-score sums; the merge across processes; the streamed .npz of images."""

from __future__ import annotations

import functools
import json

import numpy as np
import pytest

from jaxt2i.devices import batch_sharding, device_batch_size, pad_rows
from jaxt2i.eval import clip_metrics, distribute, frechet, npz_stream
from jaxt2i.shapes import adherence, report, world


def _features(seed: int, n: int, d: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, d)) @ rng.normal(size=(d, d)) / np.sqrt(d) * 3.0 + rng.normal(size=d) * 10.0


def _uneven_batches(x: np.ndarray, seed: int) -> list[np.ndarray]:
    cuts = np.sort(np.random.default_rng(seed).choice(np.arange(1, len(x)), size=7, replace=False))
    return np.split(x, cuts)


@pytest.mark.parametrize("order", ["in order", "reversed", "shuffled tree"])
def test_accumulator_equals_numpy_for_uneven_batches_merged_in_any_order(order):
    x = _features(0, 403, 24)
    parts = [frechet.RunningStatistics.of(b) for b in _uneven_batches(x, 1)]
    assert len({p.n for p in parts}) > 1  # the batches are uneven
    if order == "in order":
        stats = functools.reduce(lambda a, b: a.update(b), _uneven_batches(x, 1), frechet.RunningStatistics.empty(24))
    elif order == "reversed":
        stats = functools.reduce(lambda a, b: a.merge(b), parts[::-1])
    else:  # a pairwise tree over a shuffled list, as shards merged by several processes would be
        rng = np.random.default_rng(2)
        parts = [parts[i] for i in rng.permutation(len(parts))]
        while len(parts) > 1:
            parts = [parts[i].merge(parts[i + 1]) if i + 1 < len(parts) else parts[i] for i in range(0, len(parts), 2)]
        stats = parts[0]
    mean, cov = stats.mean_cov()
    assert stats.n == 403
    np.testing.assert_allclose(mean, x.mean(0), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(cov, np.cov(x, rowvar=False), rtol=1e-10, atol=1e-10)
    y = _features(3, 150, 24)
    streamed = frechet.frechet_distance_from_statistics(stats, frechet.RunningStatistics.empty(24).update(y))
    assert streamed == pytest.approx(frechet.frechet_distance_from_features(x, y), rel=1e-10)


def test_accumulator_holds_the_same_few_numbers_whatever_the_count():
    small = frechet.RunningStatistics.empty(16).update(_features(0, 10, 16))
    large = functools.reduce(lambda s, b: s.update(b), np.split(_features(1, 5000, 16), 50), small)
    nbytes = [sum(np.asarray(leaf).nbytes for leaf in s) for s in (small, large)]
    assert nbytes[0] == nbytes[1] == 8 + 8 * (16 + 16 * 16)


def _random_scores(n: int, seed: int) -> tuple[list[adherence.PromptScore], list[str]]:
    rng = np.random.default_rng(seed)
    scores, groups = [], []
    for _ in range(n):
        kind = world.PROMPT_TYPES[rng.integers(2)]
        correct = bool(rng.integers(2))
        objects = correct or bool(rng.integers(2))
        scores.append(adherence.PromptScore(
            kind, correct, int(objects) * (1 + (kind == "two_object")), objects,
            None if kind == "one_object" else correct, bool(rng.integers(2)),
            [None, True, False][rng.integers(3)] if objects else None, int(rng.integers(2))))
        groups.append(world.SPLITS[rng.integers(2)])
    return scores, groups


def test_adherence_counts_summed_over_batches_give_the_report_of_all_scores():
    scores, groups = _random_scores(97, 0)
    whole = adherence.report(scores, groups)
    counts = sum(adherence.score_counts(scores[a:a + 13], groups[a:a + 13], world.SPLITS) for a in range(0, 97, 13))
    assert adherence.report_from_counts(counts, world.SPLITS) == whole  # exactly: the ratios of the same integers
    assert list(whole) == ["heldout", "train", "overall", "overall_exact", "n"]  # the report's order
    one = adherence.report(scores[:1], groups[:1])  # a group or type with no scores is left out, as before
    assert set(one) == {groups[0], "overall", "overall_exact", "n"} and set(one[groups[0]]) >= {scores[0].prompt_type}


class _HandClip:
    """A CLIP of fixed random projections: unit-norm features of images (mean colour + texture) and of prompts."""

    def __init__(self, dim: int = 6):  # full rank: a singular covariance would make the distance ill-conditioned
        rng = np.random.default_rng(0)
        self.image_proj = rng.normal(size=(6, dim))
        self.dim = dim

    def encode_images(self, images):
        x = np.asarray(images, np.float64)
        f = np.concatenate([x.mean((1, 2)), x.std((1, 2))], axis=1) @ self.image_proj
        return f / np.linalg.norm(f, axis=1, keepdims=True)

    def encode_texts(self, prompts):
        f = np.stack([np.random.default_rng(sum(map(ord, p))).normal(size=self.dim) for p in prompts])
        return f / np.linalg.norm(f, axis=1, keepdims=True)


def test_scoring_batch_by_batch_equals_scoring_everything_at_once():
    prompts = report.eval_prompt_set(5, seed=2)  # 20 prompts
    rng = np.random.default_rng(1)
    images = np.stack([world.render(p.target) for p in prompts]).astype(np.float32) / 255.0
    images[::3] = rng.uniform(size=images[::3].shape)  # some images that are wrong
    fake = _HandClip()
    clip = (fake.encode_images, fake.encode_texts)
    real = fake.encode_images(rng.uniform(size=(30, 6, 6, 3)))
    state = report.ScoreState.empty(fake.dim)
    for a, b in [(0, 3), (3, 4), (4, 11), (11, 20)]:
        state = report.score_batch(state, prompts[a:b], images[a:b], clip)
    streamed = report.state_entry(state, frechet.RunningStatistics.of(real))
    # in memory, with the library's whole-set functions
    whole_adherence, _ = adherence.evaluate_prompts(prompts, list(np.round(images * 255).astype(np.uint8)))
    img, txt = fake.encode_images(images), fake.encode_texts([p.prompt for p in prompts])
    assert streamed["adherence"] == whole_adherence
    splits = np.array([p.split for p in prompts])
    for s in world.SPLITS:
        assert streamed["clip_score"][s] == pytest.approx(clip_metrics.clip_score(img[splits == s], txt[splits == s]),
                                                          rel=1e-12)
    assert streamed["clip_score"]["all"] == pytest.approx(clip_metrics.clip_score(img, txt), rel=1e-12)
    assert streamed["frechet"] == pytest.approx(
        frechet.frechet_distance_from_features(img, real), rel=1e-10)


def test_process_shares_are_disjoint_cover_everything_and_merge_to_the_whole():
    n, size = 23, 4
    shares = [list(distribute.process_batches(n, size, p, 3)) for p in range(3)]
    rows = sorted(i for share in shares for _, a, b in share for i in range(a, b))
    assert rows == list(range(n))
    assert [k for k, _, _ in shares[1]] == [1, 4]
    x = _features(5, n, 6)
    per_process = [frechet.RunningStatistics.empty(6) for _ in range(3)]
    for p, share in enumerate(shares):
        for _, a, b in share:
            per_process[p] = per_process[p].update(x[a:b])
    merged = functools.reduce(lambda a, b: a.merge(b), per_process)
    np.testing.assert_allclose(merged.mean_cov()[1], np.cov(x, rowvar=False), rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="process index"):
        list(distribute.process_batches(n, size, 3, 3))


def test_gather_with_one_process_is_the_identity_and_padding_fills_a_device_multiple():
    state = report.ScoreState.empty(4)
    assert distribute.gather(state)[0] is state
    assert report.merged(state) is state
    assert device_batch_size(5, 4) == 8 and device_batch_size(8, 4) == 8
    assert pad_rows(["a", "b"], 4) == ["a", "b", "b", "b"]
    np.testing.assert_array_equal(pad_rows(np.arange(3), 5), [0, 1, 2, 2, 2])
    assert batch_sharding([object()]) is None


def test_streamed_npz_reads_back_with_numpy_and_in_pieces(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (10, 4, 5, 3), dtype=np.uint8)
    path = str(tmp_path / "images.npz")
    with npz_stream.NpzWriter(path) as w:
        w.begin("guidance_3", images.shape, np.uint8)
        for a in range(0, 10, 3):
            w.write(images[a:a + 3])
        w.add("prompts", np.asarray(["a"] * 10))
        w.add("settings", np.asarray(json.dumps({"n_per_group": 1})))
    with np.load(path) as f:
        np.testing.assert_array_equal(f["guidance_3"], images)
    parts = list(npz_stream.read_rows(path, "guidance_3", [(1, 3), (6, 10)]))
    np.testing.assert_array_equal(np.concatenate(parts), images[[1, 2, 6, 7, 8, 9]])
    assert npz_stream.array_shape(path, "guidance_3") == images.shape
    assert report.eval_images_index(path) == (["a"] * 10, ["3"], {"n_per_group": 1})
    np.savez_compressed(tmp_path / "numpy.npz", guidance_3=images)  # a file numpy wrote reads the same way
    np.testing.assert_array_equal(next(npz_stream.read_rows(str(tmp_path / "numpy.npz"), "guidance_3", [(2, 9)])),
                                  images[2:9])
    (tmp_path / "numpy.npz").unlink()
    # a failure midway leaves the earlier file as it was and no partial file
    with pytest.raises(RuntimeError):
        with npz_stream.NpzWriter(path) as w:
            w.begin("guidance_3", images.shape, np.uint8)
            w.write(images[:3])
            raise RuntimeError("disk full")
    with np.load(path) as f:
        np.testing.assert_array_equal(f["guidance_3"], images)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["images.npz"]
    with pytest.raises(ValueError, match="rows of shape"):
        with npz_stream.NpzWriter(str(tmp_path / "b.npz")) as w:
            w.begin("x", (2, 3), np.uint8)
            w.write(np.zeros((3, 3), np.uint8))
