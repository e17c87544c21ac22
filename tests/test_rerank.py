"""Best-of-N by CLIP score (jaxt2i.eval.rerank): the selection maths, seeds, the shipped CLIP as ranker, the CLIs."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from PIL import Image

from jaxt2i.cli import main
from jaxt2i.shapes import SHIPPED_MODEL as DEFAULT_MODEL
from jaxt2i.shapes import world as shapes
from jaxt2i.eval import clip_metrics, rerank
from jaxt2i.pipelines import load_pipeline
from jaxt2i.shapes.cli import eval_main

COLORS = {"red": (1.0, 0.0, 0.0), "green": (0.0, 1.0, 0.0), "blue": (0.0, 0.0, 1.0)}


def color_clip():
    """A hand-made 'CLIP': an image's feature is its unit-norm mean color, a prompt's the unit color it names."""

    def unit(v):
        v = np.asarray(v, np.float64)
        return v / np.linalg.norm(v, axis=-1, keepdims=True)

    def encode_images(images):
        return unit(np.asarray(images).mean(axis=(1, 2)) + 1e-6)

    def encode_texts(prompts):
        return unit([next(c for name, c in COLORS.items() if name in p) for p in prompts])

    return encode_images, encode_texts


def solid(color, size=4):
    return np.broadcast_to(np.asarray(color, np.float32), (size, size, 3)).copy()


def test_clip_scores_are_cosines_per_candidate_and_prompt():
    clip = color_clip()
    candidates = np.stack([np.stack([solid(COLORS["red"]), solid((0.5, 0.5, 0.0))]),
                           np.stack([solid((0.6, 0.8, 0.0)), solid(COLORS["green"])])])  # [N=2, P=2, 4, 4, 3]
    scores = rerank.clip_scores(clip, candidates, ["a red circle", "a green square"])
    want = np.array([[1.0, np.sqrt(0.5)], [0.6, 1.0]])
    np.testing.assert_allclose(scores, want, atol=1e-5)
    with pytest.raises(ValueError, match="one prompt per image"):
        rerank.clip_scores(clip, candidates, ["a red circle"])


def test_pick_best_takes_the_argmax_per_prompt_and_the_first_on_ties():
    candidates = np.arange(3 * 2).reshape(3, 2)[..., None, None] * np.ones((1, 1, 2, 2))  # [N=3, P=2, 2, 2]
    scores = np.array([[0.1, 0.5], [0.9, 0.5], [0.3, 0.2]])
    images, chosen = rerank.pick_best(candidates, scores)
    assert chosen.tolist() == [1, 0]
    np.testing.assert_array_equal(images, np.stack([candidates[1, 0], candidates[0, 1]]))
    with pytest.raises(ValueError, match=r"\[N, P\]"):
        rerank.pick_best(candidates, scores.T)


def test_best_of_draws_candidate_seeds_and_keeps_the_plain_draw_as_candidate_0():
    seeds = []
    palette = [COLORS["blue"], COLORS["red"], COLORS["green"]]

    def draw(seed):  # candidate c is colored palette[c] for both prompts
        seeds.append(seed)
        c = (seed - 7) // rerank.CANDIDATE_SEED_STRIDE
        return np.stack([solid(palette[c]), solid(palette[c])])

    prompts = ["a red circle", "a green square"]
    plain, info = rerank.best_of(draw, prompts, 1, 7, clip=None)  # N = 1: the draw itself, no CLIP needed
    assert seeds == [7] and info["chosen"].tolist() == [0, 0]
    np.testing.assert_array_equal(plain, draw(7))
    seeds.clear()
    images, info = rerank.best_of(draw, prompts, 3, 7, color_clip())
    assert seeds == [rerank.candidate_seed(7, c) for c in range(3)] and rerank.candidate_seed(7, 0) == 7
    assert info["chosen"].tolist() == [1, 2] and info["scores"].shape == (3, 2)
    np.testing.assert_array_equal(images, np.stack([solid(COLORS["red"]), solid(COLORS["green"])]))
    with pytest.raises(ValueError, match="needs a CLIP"):
        rerank.best_of(draw, prompts, 2, 7, clip=None)
    with pytest.raises(ValueError, match=">= 1"):
        rerank.best_of(draw, prompts, 0, 7, clip=None)


@pytest.fixture(scope="module")
def shipped_clip():
    return clip_metrics.clip_for_model(load_pipeline(DEFAULT_MODEL))


def test_the_shipped_clip_ranks_the_render_of_the_prompt_first(shipped_clip):
    """Real renders as candidates: for one-object prompts the shipped small CLIP prefers the render of the prompt's
    own scene over renders of scenes with another color-shape pair."""
    prompts = shapes.eval_prompts("train", "one_object", 8, seed=0)
    pairs = [(p.target.objects[0].color, p.target.objects[0].shape) for p in prompts]
    keep = [i for i, pair in enumerate(pairs) if pairs.count(pair) == 1]
    prompts = [prompts[i] for i in keep]
    renders = [shapes.render(p.target).astype(np.float32) / 255.0 for p in prompts]
    candidates = np.stack([np.stack(renders[k:] + renders[:k]) for k in range(len(renders))])  # candidate 0: own
    scores = rerank.clip_scores(shipped_clip, candidates, [p.prompt for p in prompts])
    _, chosen = rerank.pick_best(candidates, scores)
    assert len(prompts) >= 5 and chosen.tolist() == [0] * len(prompts), ([p.prompt for p in prompts], scores)


def test_generate_with_candidates_writes_the_draw_the_clip_scores_best(tmp_path, shipped_clip):
    from jaxt2i.images import to_uint8
    from jaxt2i.pipelines import load_pipeline

    out = tmp_path / "best.png"
    assert main(["generate", "a red circle", "--steps", "2", "--candidates", "2", "--seed", "5",
                 "--out", str(out)]) == 0
    png = Image.open(out)
    assert png.text["candidates"] == "2"
    pipe = load_pipeline(DEFAULT_MODEL)
    guidance = pipe.sampling["guidance"]  # what generate uses without --guidance
    draws = np.stack([pipe.text_to_image(["a red circle"], steps=2, guidance_scale=guidance,
                                         seed=rerank.candidate_seed(5, c))
                      for c in range(2)])  # [N=2, P=1, 64, 64, 3]
    best, chosen = rerank.pick_best(draws, rerank.clip_scores(shipped_clip, draws, ["a red circle"]))
    written = np.asarray(png.convert("RGB")).astype(int)
    # the CLI samples with a progress display (one dispatch per model call): the same numbers up to float rounding
    assert np.abs(written - to_uint8(best[0])).max() <= 1
    other = to_uint8(draws[1 - chosen[0], 0]).astype(int)
    assert np.abs(written - other).mean() > 5  # the two candidates differ: the check can tell them apart


def test_candidates_without_a_clip_is_a_clear_error(tiny_model, tmp_path, capsys):
    model = tiny_model  # random tiny_sd1 weights, no clip_vision/
    out = tmp_path / "x.png"
    assert main(["generate", "a cat", "--model", model, "--candidates", "2", "--out", str(out)]) == 2
    assert "needs a CLIP" in capsys.readouterr().err and not out.exists()
    assert eval_main(["--model", model, "--candidates", "2", "--out", str(tmp_path / "r.json")]) == 2
    assert "needs a CLIP" in capsys.readouterr().err and not os.path.exists(tmp_path / "r.json")


def test_eval_with_candidates_reports_the_reranked_share(tmp_path):
    out = tmp_path / "report.json"
    assert eval_main(["--n", "1", "--steps", "1", "--guidance", "3", "--batch-size", "4", "--candidates", "2",
                      "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["settings"]["candidates"] == 2
    assert 0.0 <= result["guidance"]["3"]["reranked_share"] <= 1.0
    assert "Best of 2 candidates" in (tmp_path / "report.md").read_text()
