"""Shipped models by name, and model folders that share a shipped model's components instead of copying them."""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np
import pytest

from jaxt2i.convert import native
from jaxt2i.convert.core import ConversionError
from jaxt2i.convert.load import read_native, write_native
from jaxt2i.shipped import SHIPPED_MODELS, model_path

SHAPES = SHIPPED_MODELS["shapes"]


def test_names_resolve_to_the_package_folders_and_paths_stay_paths(tmp_path, monkeypatch):
    assert model_path("shapes") == SHAPES and os.path.isdir(SHAPES)
    assert model_path("runs/x/final") == "runs/x/final"
    monkeypatch.chdir(tmp_path)
    (tmp_path / "shapes").mkdir()
    assert model_path("shapes") == "shapes"  # a folder of that name in the working directory wins


@pytest.fixture(scope="module")
def shipped():
    return read_native(SHAPES)


def _small(model, names):
    return dataclasses.replace(model, configs={k: model.configs[k] for k in names},
                               params={k: model.params[k] for k in names}, family=None, schedule=None)


def test_a_shared_component_is_read_from_the_shipped_model(shipped, tmp_path):
    model = dataclasses.replace(_small(shipped, ("vae", "conditioner")), shared={"vae": "shapes"})
    out = tmp_path / "m"
    write_native(str(out), model)
    assert not (out / "vae.safetensors").exists() and (out / "conditioner.safetensors").exists()
    manifest = json.loads((out / native.MANIFEST).read_text())
    assert manifest["components"]["vae"]["from"] == "shapes" and "from" not in manifest["components"]["conditioner"]
    again = read_native(str(out))
    assert again.shared == {} and again.configs == model.configs
    for name in ("vae", "conditioner"):
        flat, want = native.flatten_params(again.params[name]), native.flatten_params(shipped.params[name])
        assert flat.keys() == want.keys()
        for k in want:
            np.testing.assert_array_equal(np.asarray(flat[k]), np.asarray(want[k]), err_msg=k)
    copy = tmp_path / "copy"
    write_native(str(copy), again)  # a folder written from a loaded model is self-contained
    assert (copy / "vae.safetensors").exists()


def test_a_shared_component_must_match_the_shipped_one(shipped, tmp_path):
    other = dataclasses.replace(shipped.configs["vae"], scaling_factor=0.5)
    model = dataclasses.replace(_small(shipped, ("vae",)), configs={"vae": other}, shared={"vae": "shapes"})
    with pytest.raises(ConversionError, match="not the same component"):
        write_native(str(tmp_path / "m"), model)
    assert not (tmp_path / "m").exists()
    out = tmp_path / "ok"
    write_native(str(out), dataclasses.replace(_small(shipped, ("vae",)), shared={"vae": "shapes"}))
    manifest = json.loads((out / native.MANIFEST).read_text())
    manifest["components"]["vae"]["config"]["scaling_factor"] = 0.5
    (out / native.MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ConversionError, match="not the same component"):
        read_native(str(out))
    manifest["components"]["vae"]["from"] = "no-such-model"
    (out / native.MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ConversionError, match="not a model shipped"):
        read_native(str(out))


def test_dit_shapes_ships_small_shares_the_encoders_and_generates():
    from jaxt2i.pipelines import load_pipeline

    folder = SHIPPED_MODELS["dit-shapes"]
    size = sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder))
    assert size <= 10 * 10**6
    manifest = json.loads(open(os.path.join(folder, native.MANIFEST)).read())
    assert {k for k, v in manifest["components"].items() if v.get("from") == "shapes"} == {
        "text_encoder", "vae", "clip_vision"}
    pipe = load_pipeline("dit-shapes")
    assert pipe.models.denoiser_name == "transformer" and pipe.models.denoiser.config.learn_sigma
    image = pipe.text_to_image("a red circle", steps=2, seed=0)
    assert image.shape == (1, 64, 64, 3) and np.isfinite(image).all() and image.std() > 0
