"""jaxt2i's one model-folder format: family and typed components, version-1 folders, the shipped model."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from jaxt2i.shapes import SHIPPED_MODEL as DEFAULT_MODEL
from jaxt2i.convert import load, native
from jaxt2i.convert.core import ConversionError
from jaxt2i.convert.io import write_safetensors
from jaxt2i.pipelines import load_pipeline

README_PROMPT = "a red circle above a blue square"
SHIPPED_IMAGE = os.path.join(os.path.dirname(__file__), "data", "shipped_readme_image.npy")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# the README's prompt and seed at the folder's recommended settings (25 steps, guidance 4), DDIM
DRAW_SHIPPED = f"""
import sys, numpy as np
from jaxt2i.shapes import SHIPPED_MODEL
from jaxt2i.pipelines import load_pipeline
pipe = load_pipeline(SHIPPED_MODEL)
assert set(pipe.configs) == {{"text_encoder", "vae", "unet", "conditioner", "clip_vision"}}, sorted(pipe.configs)
steps, guidance = pipe.sampling_defaults()
np.save(sys.argv[1], pipe.text_to_image([{README_PROMPT!r}], steps=steps, guidance_scale=guidance, sampler="ddim",
                                        seed=0))
"""


def test_shipped_model_draws_the_same_image_as_before_its_conditioner_became_a_component(tmp_path):
    """``jaxt2i generate`` at the README prompt and seed (the folder's recommended 25 steps, guidance 4, DDIM):
    the float32 image the model drew when its context merge lived inside the U-Net (tests/data). Drawn in a process
    of its own at XLA's default optimisation level, the one the stored image was drawn at (tests/conftest.py)."""
    flags = re.sub(r"--xla_backend_optimization_level=\d+", "", os.environ.get("XLA_FLAGS", "")).strip()
    env = dict(os.environ, XLA_FLAGS=flags,
               PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-c", DRAW_SHIPPED, str(tmp_path / "image.npy")], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    np.testing.assert_allclose(np.load(tmp_path / "image.npy"), np.load(SHIPPED_IMAGE), rtol=0, atol=1e-6)


def _write_v1_folder(model: load.LoadedModel, path: str) -> None:
    """``model`` (with a conditioner and a clip_vision) in the version-1 layout: the merge inside the U-Net's config
    and weights, the image tower in clip_vision/{params.safetensors, config.json}."""
    os.makedirs(os.path.join(path, "clip_vision"))
    unet_config = dict(native.config_to_dict(model.configs["unet"]), context_encoder_layers=0,
                       context_encoder_heads=4, context_merge_rank=model.configs["conditioner"].rank)
    manifest = {"format": "jaxt2i", "version": 1,
                "components": {"text_encoder": native.config_to_dict(model.configs["text_encoder"]),
                               "vae": native.config_to_dict(model.configs["vae"]), "unet": unet_config},
                "schedule": native.config_to_dict(model.schedule), "tokenizer": {"pad": "eos"},
                "text_layer": list(model.text_layer), "sampling": {"steps": 3}}
    with open(os.path.join(path, native.MANIFEST), "w") as f:
        json.dump(manifest, f)
    for name in ("text_encoder", "vae"):
        write_safetensors(os.path.join(path, f"{name}.safetensors"), native.flatten_params(model.params[name]))
    unet = native.flatten_params(model.params["unet"])
    unet.update({f"context_merge/{k}": v for k, v in native.flatten_params(model.params["conditioner"]).items()})
    write_safetensors(os.path.join(path, "unet.safetensors"), unet)
    write_safetensors(os.path.join(path, "clip_vision", "params.safetensors"),
                      native.flatten_params(model.params["clip_vision"]))
    with open(os.path.join(path, "clip_vision", "config.json"), "w") as f:
        json.dump({"text": native.config_to_dict(model.configs["text_encoder"]),
                   "vision": native.config_to_dict(model.configs["clip_vision"])}, f)


def test_version_1_folders_read_as_version_2(tmp_path):
    shipped = load.read_native(DEFAULT_MODEL)
    _write_v1_folder(shipped, str(tmp_path / "v1"))
    old = load.read_native(str(tmp_path / "v1"))
    assert old.family == "latent_diffusion" and old.text_layer == (0, -1) and old.sampling == {"steps": 3}
    assert old.configs == shipped.configs
    for name in shipped.params:
        assert jax.tree.all(jax.tree.map(np.array_equal, old.params[name], shipped.params[name])), name
    load.write_native(str(tmp_path / "v2"), old)  # written back in the current version
    assert json.loads((tmp_path / "v2" / native.MANIFEST).read_text())["version"] == native.FORMAT_VERSION


def test_version_1_context_encoder_is_refused_by_name(tmp_path):
    folder = tmp_path / "v1"
    _write_v1_folder(load.read_native(DEFAULT_MODEL), str(folder))
    manifest = json.loads((folder / native.MANIFEST).read_text())
    manifest["components"]["unet"]["context_encoder_layers"] = 2
    (folder / native.MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ConversionError, match="context encoder"):
        load.read_native(str(folder))


def _copy_shipped(tmp_path) -> tuple[str, dict]:
    folder = str(tmp_path / "model")
    shutil.copytree(DEFAULT_MODEL, folder)
    with open(os.path.join(folder, native.MANIFEST)) as f:
        return folder, json.load(f)


def _rewrite(folder: str, manifest: dict) -> None:
    with open(os.path.join(folder, native.MANIFEST), "w") as f:
        json.dump(manifest, f)


@pytest.mark.parametrize("change, match", [
    (lambda m: m.update(version=native.FORMAT_VERSION + 1), "Upgrade jaxt2i"),
    (lambda m: m.update(family="rocket"), "unknown family 'rocket'"),
    (lambda m: m["components"]["conditioner"].update(type="mystery"), "unknown component type 'mystery'"),
    (lambda m: m["components"].update(conditioner={"rank": 6}), r"component 'conditioner' must be"),
    (lambda m: m["components"].pop("vae"), r"\['vae'\] missing"),
])
def test_bad_manifests_are_refused_with_what_is_wrong(tmp_path, change, match):
    folder, manifest = _copy_shipped(tmp_path)
    change(manifest)
    _rewrite(folder, manifest)
    with pytest.raises(ConversionError, match=match):
        load.read_native(folder)


def test_a_folder_of_components_alone_reads_but_is_not_a_pipeline(tmp_path):
    shipped = load.read_native(DEFAULT_MODEL)
    parts = dataclasses.replace(shipped, family=None, schedule=None, text_layer=-1, sampling={},
                                configs={"vae": shipped.configs["vae"]}, params={"vae": shipped.params["vae"]})
    folder = str(tmp_path / "vae_only")
    load.write_native(folder, parts)
    back = load.read_native(folder)
    assert back.family is None and back.schedule is None and set(back.params) == {"vae"}
    with pytest.raises(ValueError, match=r"components alone \(no pipeline family\): \['vae'\]"):
        load_pipeline(folder)


def test_a_component_may_be_stored_under_another_name_than_its_type(tmp_path):
    shipped = load.read_native(DEFAULT_MODEL)
    renamed = dataclasses.replace(shipped, family=None, configs={"image_tower": shipped.configs["clip_vision"]},
                                  params={"image_tower": shipped.params["clip_vision"]},
                                  types={"image_tower": "clip_vision"})
    load.write_native(str(tmp_path / "renamed"), renamed)
    back = load.read_native(str(tmp_path / "renamed"))
    assert back.component_type("image_tower") == "clip_vision" and back.configs == renamed.configs
