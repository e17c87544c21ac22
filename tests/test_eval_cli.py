"""`jaxt2i eval` end to end on a few prompts (a tiny random-weight model, 1 sampling step), and the report maths."""

from __future__ import annotations

import json

import numpy as np

from jaxt2i.shapes import report
from jaxt2i.shapes import world as shapes
from jaxt2i.shapes.cli import eval_main


def test_eval_command_writes_json_and_markdown(tiny_model, tmp_path, capsys):
    out = tmp_path / "r" / "report.json"
    saved = tmp_path / "imgs" / "images.npz"
    rc = eval_main(["--model", tiny_model, "--n", "1", "--steps", "1", "--guidance", "1", "--batch-size", "2",
                    "--out", str(out), "--save-images", str(saved)])
    assert rc == 0
    result = json.loads(out.read_text())
    assert result["settings"]["n_prompts"] == 4  # 1 per split x prompt type
    entry = result["guidance"]["1"]
    rep = entry["adherence"]
    for split in shapes.SPLITS:
        for kind in shapes.PROMPT_TYPES:
            assert rep[split][kind]["n"] == 1
            assert 0.0 <= rep[split][kind]["accuracy"] <= 1.0
    assert entry["clip_score"] is None and entry["frechet"] is None  # no CLIP beside a random model
    md = (tmp_path / "r" / "report.md").read_text()
    assert "| 1 | heldout |" in md and "missing" in md and "through the autoencoder" in md
    assert set(result["vae_roundtrip"]) >= set(shapes.SPLITS)
    assert "| guidance |" in capsys.readouterr().out
    # the saved images are the scored ones: scoring them again gives the report's adherence
    texts, images, settings = report.load_eval_images(str(saved))
    prompts = report.eval_prompt_set(settings["n_per_group"], seed=settings["seed"])
    assert texts == [p.prompt for p in prompts] and set(images) == {"1"}
    assert images["1"].shape[0::3] == (4, 3) and images["1"].dtype == np.uint8
    assert report.evaluate_images(prompts, images["1"] / 255.0)["adherence"] == rep
    # and `--from-images` scores them without generating: the same verdicts
    again = tmp_path / "again.json"
    assert eval_main(["--model", tiny_model, "--from-images", str(saved), "--batch-size", "2", "--out", str(again)]) == 0
    rescored = json.loads(again.read_text())
    assert rescored["guidance"]["1"]["adherence"] == rep and rescored["settings"]["images_from"] == str(saved)


def test_eval_command_rejects_bad_arguments(tiny_model, tmp_path, capsys):
    assert eval_main(["--model", tiny_model, "--guidance", "a,b", "--out", str(tmp_path / "x.json")]) == 2
    assert "--guidance" in capsys.readouterr().err
    assert eval_main(["--model", str(tmp_path / "nothing"), "--out", str(tmp_path / "x.json")]) == 2
    assert "no model at" in capsys.readouterr().err
    assert eval_main(["--model", tiny_model, "--save-images", str(tmp_path / "x.png"),
                      "--out", str(tmp_path / "x.json")]) == 2
    assert "--save-images" in capsys.readouterr().err and not (tmp_path / "x.json").exists()
    assert eval_main(["--model", tiny_model, "--from-images", str(tmp_path / "none.npz"),
                      "--out", str(tmp_path / "x.json")]) == 2
    assert "no such file" in capsys.readouterr().err


def test_prompt_set_covers_every_split_and_type():
    prompts = report.eval_prompt_set(3, seed=0)
    groups = {(p.split, p.prompt_type) for p in prompts}
    assert groups == {(s, k) for s in shapes.SPLITS for k in shapes.PROMPT_TYPES}
    assert len(prompts) == 12
    assert all(shapes.is_heldout(p.target) for p in prompts if p.split == "heldout")


def test_real_images_score_perfectly_and_frechet_floor_is_small():
    """The evaluation of the real renders of the prompts' target scenes: adherence 100%; the report's table renders."""
    prompts = report.eval_prompt_set(4, seed=1)
    images = np.stack([shapes.render(p.target) for p in prompts]).astype(np.float32) / 255.0
    entry = report.evaluate_images(prompts, images)
    assert entry["adherence"]["overall"] == 1.0
    result = {"settings": {"n_per_group": 4, "n_prompts": 16, "steps": 0, "sampler": "real", "seed": 1},
              "guidance": {"real": entry}}
    assert "| real | heldout | 100.0% | 100.0% | 100.0% | 100.0% |" in report.markdown_report(result)


class _Painter:
    """A model of no family: ``text_to_image`` paints each prompt's scene (read back from its text) at the middle.
    It has no sampler, no autoencoder and no parameters; ``jaxt2i.shapes.report`` must score it all the same."""

    def __init__(self):
        self.calls = []

    def text_to_image(self, prompts, *, seed, steps, guidance_scale):
        self.calls.append((len(prompts), seed, steps, guidance_scale))
        out = []
        for text in prompts:
            objects, relation = shapes.parse_caption(text)
            offsets = [(0, 0)] if relation is None else {
                "left of": [(-14, 0), (14, 0)], "right of": [(14, 0), (-14, 0)],
                "above": [(0, -14), (0, 14)], "below": [(0, 14), (0, -14)]}[relation]
            scene = shapes.Scene(tuple(shapes.Obj(c, s, z or "small", (32.0 + dx, 32.0 + dy), 12)
                                       for (c, s, z), (dx, dy) in zip(objects, offsets)), relation)
            out.append(shapes.render(scene).astype(np.float32) / 255.0)
        return np.stack(out)


def test_any_model_with_text_to_image_is_scored():
    painter = _Painter()
    result = report.evaluate_pipeline(painter, guidance_scales=(2.0,), n=2, steps=3, seed=0, batch_size=3)
    assert result["vae_roundtrip"] is None and result["settings"]["sampler"] is None
    rep = result["guidance"]["2"]["adherence"]
    assert rep["overall"] == 1.0 and rep["overall_exact"] == 1.0
    assert painter.calls[0] == (3, 0, 3, 2.0) and [c[1] for c in painter.calls] == [0, 1, 2]
    assert "| 2 | train | 100.0% | 100.0% | 100.0% | 100.0% |" in report.markdown_report(result)
