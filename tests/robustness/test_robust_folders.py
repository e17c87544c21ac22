"""Model folders with missing, extra, damaged or mismatched files: jaxt2i folders (convert/native.py, read by
convert/load.py) and diffusers folders. Each is a clear error (FileNotFoundError or a ValueError subclass) whose
message names the file, raised by the reader, not by code deep inside that meets a bad value later."""

from __future__ import annotations

import json
import os
import shutil

import pytest

from jaxt2i.convert import load
from jaxt2i.convert.core import ConversionError
from jaxt2i.convert.io import CheckpointReadError
from jaxt2i.pipelines import load_pipeline


@pytest.fixture
def native(tiny_model, tmp_path) -> str:
    folder = str(tmp_path / "model")
    shutil.copytree(tiny_model, folder)
    return folder


@pytest.fixture(scope="module")
def diffusers_source(tiny_model, tmp_path_factory) -> str:
    folder = str(tmp_path_factory.mktemp("diffusers") / "model")
    load.write_diffusers_folder(folder, load.read_any(tiny_model))
    return folder


@pytest.fixture
def diffusers(diffusers_source, tmp_path) -> str:
    folder = str(tmp_path / "diffusers_model")
    shutil.copytree(diffusers_source, folder)
    return folder


def _fails(path, error, named: str) -> str:
    with pytest.raises(error) as info:
        load.read_any(path)
    message = str(info.value)
    assert named in message and "\n" not in message, message
    return message


def _edit_manifest(folder: str, edit) -> str:
    path = os.path.join(folder, "jaxt2i.json")
    with open(path) as f:
        manifest = json.load(f)
    edit(manifest)
    with open(path, "w") as f:
        json.dump(manifest, f)
    return path


# ------------------------------------------------------------------------------------------------ jaxt2i folders
def test_the_intact_folder_reads(native):
    assert sorted(load.read_any(native).params) == ["text_encoder", "unet", "vae"]


def test_missing_manifest(native):
    os.remove(os.path.join(native, "jaxt2i.json"))
    _fails(native, FileNotFoundError, native)


@pytest.mark.parametrize("name", ["unet", "vae", "text_encoder"])
def test_missing_component_file(native, name):
    os.remove(os.path.join(native, f"{name}.safetensors"))
    _fails(native, FileNotFoundError, f"{name}.safetensors")


def test_an_extra_weight_file_the_manifest_does_not_name(native):
    shutil.copy(os.path.join(native, "vae.safetensors"), os.path.join(native, "vae_old.safetensors"))
    message = _fails(native, ConversionError, "vae_old.safetensors")
    assert "jaxt2i.json" in message


def test_other_extra_files_are_fine(native):
    for name in ("README.md", "sample.png", "notes.txt"):
        with open(os.path.join(native, name), "w") as f:
            f.write("x")
    load.read_any(native)


def test_a_truncated_component_file(native):
    path = os.path.join(native, "unet.safetensors")
    with open(path, "rb") as f:
        raw = f.read()
    with open(path, "wb") as f:
        f.write(raw[: len(raw) // 2])
    _fails(native, CheckpointReadError, path)


def test_a_component_file_of_another_component(native):
    shutil.copy(os.path.join(native, "text_encoder.safetensors"), os.path.join(native, "vae.safetensors"))
    _fails(native, ConversionError, "vae.safetensors")


@pytest.mark.parametrize("edit, named", [
    (lambda m: m["components"]["unet"]["config"].update(layers_per_block="two"), "layers_per_block"),
    (lambda m: m["components"]["unet"]["config"].update(block_out_channels=32), "'unet'"),
    (lambda m: m["components"]["vae"]["config"].update(latent_channels=-4), "'vae'"),
    (lambda m: m["components"]["text_encoder"]["config"].update(num_heads=None), "'text_encoder'"),
    (lambda m: m["components"]["unet"]["config"].update(colour="blue"), "colour"),
    (lambda m: m["components"]["vae"].update(config=[1, 2]), "vae"),
    (lambda m: m["components"]["vae"].update(type="teapot"), "teapot"),
    (lambda m: m.update(components=[]), "jaxt2i"),
    (lambda m: m.update(sampling={"steps": 0}), "steps"),
    (lambda m: m.update(schedule={"num_train_timesteps": "many"}), "num_train_timesteps"),
], ids=["string-for-int", "int-for-list", "negative-channels", "null-for-int", "unknown-field", "config-not-object",
        "unknown-type", "components-not-object", "zero-steps", "bad-schedule"])
def test_a_manifest_with_bad_values_names_the_field_and_the_file(native, edit, named):
    path = _edit_manifest(native, edit)
    with pytest.raises((ConversionError, ValueError)) as info:
        load.read_any(native)
    message = str(info.value)
    assert named in message and (native in message or path in message), message


@pytest.mark.parametrize("text", ["", "{", "null", "[]", "\x00\x01"])
def test_a_manifest_that_is_not_a_json_object(native, text):
    with open(os.path.join(native, "jaxt2i.json"), "w") as f:
        f.write(text)
    _fails(native, ConversionError, "jaxt2i.json")


def test_the_pipeline_loader_and_the_cli_report_the_same_errors(native, tmp_path, capsys):
    from jaxt2i.cli import main

    os.remove(os.path.join(native, "unet.safetensors"))
    with pytest.raises(FileNotFoundError, match="unet.safetensors"):
        load_pipeline(native)
    out = tmp_path / "x.png"
    assert main(["generate", "a cat", "--model", native, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "unet.safetensors" in err[-1] and "Traceback" not in "\n".join(err)
    assert not out.exists()


# --------------------------------------------------------------------------------------------- diffusers folders
def test_the_intact_diffusers_folder_reads(diffusers):
    assert sorted(load.read_any(diffusers).params) == ["text_encoder", "unet", "vae"]


@pytest.mark.parametrize("relative", ["unet/config.json", "vae/diffusion_pytorch_model.safetensors",
                                      "text_encoder/model.safetensors"])
def test_diffusers_folder_missing_a_file(diffusers, relative):
    os.remove(os.path.join(diffusers, relative))
    _fails(diffusers, FileNotFoundError, os.path.dirname(os.path.join(diffusers, relative)))


def test_diffusers_folder_with_a_broken_config(diffusers):
    path = os.path.join(diffusers, "unet", "config.json")
    with open(path, "w") as f:
        f.write("{broken")
    _fails(diffusers, ConversionError, path)


def test_diffusers_folder_with_a_bad_config_value(diffusers):
    path = os.path.join(diffusers, "unet", "config.json")
    with open(path) as f:
        config = json.load(f)
    config["layers_per_block"] = "two"
    with open(path, "w") as f:
        json.dump(config, f)
    _fails(diffusers, ConversionError, path)


def test_diffusers_shard_index_without_a_weight_map_or_with_a_missing_shard(diffusers):
    folder = os.path.join(diffusers, "unet")
    os.rename(os.path.join(folder, "diffusion_pytorch_model.safetensors"), os.path.join(folder, "part-1.safetensors"))
    index = os.path.join(folder, "diffusion_pytorch_model.safetensors.index.json")
    with open(index, "w") as f:
        json.dump({"metadata": {}}, f)
    _fails(diffusers, ConversionError, index)
    with open(index, "w") as f:
        json.dump({"weight_map": {"conv_in.weight": "part-2.safetensors"}}, f)
    _fails(diffusers, FileNotFoundError, "part-2.safetensors")


def test_diffusers_folder_extra_components_are_not_read(diffusers):
    """A diffusers folder may hold parts jaxt2i does not run (safety_checker, feature_extractor): not an error."""
    os.makedirs(os.path.join(diffusers, "safety_checker"))
    with open(os.path.join(diffusers, "safety_checker", "config.json"), "w") as f:
        f.write("{}")
    load.read_any(diffusers)
