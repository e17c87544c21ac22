"""A model folder's recommended sampling settings (jaxt2i.json "sampling"): stored, checked, and used by
`jaxt2i generate` / `jaxt2i eval` when the command line does not say otherwise."""

from __future__ import annotations

import dataclasses
import json
import shutil

import pytest
from PIL import Image

from jaxt2i.cli import main
from jaxt2i.convert import load
from jaxt2i.convert.core import ConversionError
from jaxt2i.shapes.cli import eval_main


def _with_sampling(tiny_model: str, folder, sampling) -> str:
    shutil.copytree(tiny_model, folder)
    manifest = json.loads((folder / "jaxt2i.json").read_text())
    assert "sampling" not in manifest  # a folder written without the field (and every one before it existed)
    if sampling is not None:
        manifest["sampling"] = sampling
    (folder / "jaxt2i.json").write_text(json.dumps(manifest))
    return str(folder)


def test_sampling_settings_round_trip_and_bad_ones_are_refused(tiny_model, tmp_path):
    assert load.read_any(tiny_model).sampling == {}
    folder = _with_sampling(tiny_model, tmp_path / "m", {"steps": 3, "guidance": 2})
    model = load.read_any(folder)
    assert model.sampling == {"steps": 3, "guidance": 2.0} and isinstance(model.sampling["guidance"], float)
    load.write_native(str(tmp_path / "copy"), model)
    assert json.loads((tmp_path / "copy" / "jaxt2i.json").read_text())["sampling"] == {"steps": 3, "guidance": 2.0}
    assert load.read_any(str(tmp_path / "copy")).sampling == model.sampling
    manifest = json.loads((tmp_path / "m" / "jaxt2i.json").read_text())
    for bad, why in (({"steps": 0}, "steps must be an integer >= 1"), ({"steps": 2.5}, "steps must be an integer"),
                     ({"steps": True}, "steps must be an integer"), ({"guidance": "high"}, "guidance must be a number"),
                     ({"guidance": float("nan")}, "guidance must be a number"),
                     ({"cfg": 3}, r"unknown keys \['cfg'\]"), ([25, 3.0], "must be an object")):
        (tmp_path / "m" / "jaxt2i.json").write_text(json.dumps({**manifest, "sampling": bad}))
        with pytest.raises(ConversionError, match=why):
            load.read_any(folder)
    with pytest.raises(ConversionError, match="steps must be an integer >= 1"):
        load.write_native(str(tmp_path / "never"), dataclasses.replace(model, sampling={"steps": -1}))
    assert not (tmp_path / "never").exists()  # refused before anything was written


def test_generate_uses_the_models_settings_unless_told_otherwise(tiny_model, tmp_path):
    folder = _with_sampling(tiny_model, tmp_path / "m", {"steps": 2, "guidance": 1.5})
    out = tmp_path / "a.png"
    assert main(["generate", "a cat", "--model", folder, "--out", str(out)]) == 0
    text = Image.open(out).text
    assert (text["steps"], text["guidance"]) == ("2", "1.5")
    assert main(["generate", "a cat", "--model", folder, "--steps", "1", "--guidance", "4", "--out", str(out)]) == 0
    text = Image.open(tmp_path / "a-1.png").text  # the first image was kept
    assert (text["steps"], text["guidance"]) == ("1", "4.0")
    assert main(["generate", "a cat", "--model", tiny_model, "--steps", "1", "--out", str(tmp_path / "b.png")]) == 0
    assert Image.open(tmp_path / "b.png").text["guidance"] == "7.5"  # no recommendation: Stable Diffusion's usual


def test_eval_adds_the_models_guidance_to_its_default_scales(tiny_model, tmp_path):
    folder = _with_sampling(tiny_model, tmp_path / "m", {"steps": 1, "guidance": 2})
    out = tmp_path / "r.json"
    assert eval_main(["--model", folder, "--n", "1", "--batch-size", "4", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert sorted(result["guidance"], key=float) == ["1", "2", "3", "5"]
    assert result["settings"]["steps"] == 1  # the model's recommended steps

