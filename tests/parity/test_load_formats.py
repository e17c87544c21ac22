"""Every checkpoint kind loads and computes what the PyTorch reference computes (issue 2).

Tiny random-weight SD1-style and SD2-style models are built with diffusers/transformers, written as a diffusers
folder and as original single files (.safetensors and .ckpt), loaded with ``jaxt2i.load_pipeline`` and compared.
"""

from __future__ import annotations

import os
import re

import numpy as np
import pytest
import torch

from jaxt2i.convert import clip_keys, load, unet_keys, vae_keys
from jaxt2i.convert.core import ConversionError
from jaxt2i.convert.io import CheckpointReadError, read_safetensors, write_safetensors
from jaxt2i.pipelines import load_pipeline
from tests.parity.sd_reference import nchw, nhwc, save_diffusers_folder, to_numpy_state_dict

PROMPTS = ["a red circle above a blue square", "Über-café 🎨, with\ttabs  and   spaces"]
ATOL = 1e-4
IMAGE_ATOL = 1e-3


@pytest.fixture(scope="module", params=["tiny_sd1", "tiny_sd2"])
def reference(request, tmp_path_factory):
    """(preset, diffusers folder, torch pipeline)."""
    folder = str(tmp_path_factory.mktemp(request.param) / "diffusers")
    pipe = save_diffusers_folder(folder, request.param, seed=1 if request.param == "tiny_sd1" else 2)
    return request.param, folder, pipe


def _torch_outputs(pipe, prompts, latents, t):
    ids = pipe.tokenizer(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        context = pipe.text_encoder(ids)[0]
        eps = pipe.unet(nchw(latents), t, encoder_hidden_states=context).sample
        image = pipe.vae.decode(nchw(latents) / pipe.vae.config.scaling_factor).sample
    return ids.numpy(), context.numpy(), nhwc(eps), np.clip(nhwc(image) / 2 + 0.5, 0, 1)


def _assert_matches_reference(jpipe, tpipe):
    rng = np.random.default_rng(0)
    latents = rng.standard_normal((2, 8, 8, 4)).astype(np.float32)
    t = torch.tensor([981.0, 17.0])
    ids, context, eps, image = _torch_outputs(tpipe, PROMPTS, latents, t)
    np.testing.assert_array_equal(jpipe.tokenize(PROMPTS), ids)
    np.testing.assert_allclose(np.asarray(jpipe.encode_prompt(PROMPTS)), context, atol=ATOL, rtol=0)
    np.testing.assert_allclose(np.asarray(jpipe.predict_noise(latents, t.numpy(), context)), eps, atol=ATOL, rtol=0)
    np.testing.assert_allclose(np.asarray(jpipe.decode_latents(latents)), image, atol=IMAGE_ATOL, rtol=0)


def test_diffusers_folder_matches_reference(reference):
    preset, folder, tpipe = reference
    jpipe = load_pipeline(folder)
    assert jpipe.schedule.prediction_type == tpipe.scheduler.config.prediction_type
    _assert_matches_reference(jpipe, tpipe)


def test_text_encoder_keys_with_text_model_prefix(reference, tmp_path):
    """Hub checkpoints keep ``text_model.``; transformers >= 5.6 writes without it. Both load the same."""
    preset, folder, tpipe = reference
    import shutil

    copy = str(tmp_path / "prefixed")
    shutil.copytree(folder, copy)
    path = os.path.join(copy, "text_encoder", "model.safetensors")
    sd = read_safetensors(path)
    assert not any(k.startswith("text_model.") for k in sd)  # what transformers 5.x wrote
    write_safetensors(path, {("text_model." + k if not k.startswith("text_projection") else k): v
                             for k, v in sd.items()})
    jpipe = load_pipeline(copy)
    np.testing.assert_allclose(np.asarray(jpipe.encode_prompt(PROMPTS)),
                               tpipe.text_encoder(torch.from_numpy(jpipe.tokenize(PROMPTS)).long())[0].detach().numpy(),
                               atol=ATOL, rtol=0)


def _original_state_dict(tpipe, preset: str) -> dict[str, np.ndarray]:
    """An original single-file state dict built from the torch modules with our key tables, cross-checked
    against diffusers' own single_file_utils converters (independent code)."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint

    from jaxt2i import presets

    configs = presets.get(preset).configs()
    unet_sd = to_numpy_state_dict(tpipe.unet)
    vae_sd = to_numpy_state_dict(tpipe.vae)
    text_sd = clip_keys.normalize_text_encoder_keys(to_numpy_state_dict(tpipe.text_encoder))
    prefix = clip_keys.SD1_PREFIX if preset == "tiny_sd1" else clip_keys.SD2_PREFIX
    original = {
        **unet_keys.diffusers_to_original(unet_sd, configs["unet"]),
        **vae_keys.diffusers_to_original(vae_sd, configs["vae"]),
        **clip_keys.diffusers_to_original(text_sd, configs["text_encoder"], prefix),
    }
    as_torch = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in original.items()}
    theirs_unet = convert_ldm_unet_checkpoint(as_torch, dict(tpipe.unet.config))
    theirs_vae = convert_ldm_vae_checkpoint(as_torch, dict(tpipe.vae.config))
    assert set(theirs_unet) == set(unet_sd)
    assert set(theirs_vae) == set(vae_sd)
    for k in unet_sd:
        np.testing.assert_array_equal(theirs_unet[k].numpy(), unet_sd[k], err_msg=k)
    for k in vae_sd:
        np.testing.assert_array_equal(theirs_vae[k].numpy().reshape(vae_sd[k].shape), vae_sd[k], err_msg=k)
    return original


@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
def test_single_file_matches_reference(reference, tmp_path, suffix):
    preset, folder, tpipe = reference
    original = _original_state_dict(tpipe, preset)
    path = str(tmp_path / f"model{suffix}")
    if suffix == ".safetensors":
        write_safetensors(path, original)
    else:
        torch.save({"state_dict": {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in original.items()},
                    "global_step": 123}, path)
    jpipe = load_pipeline(path, config=preset)
    _assert_matches_reference(jpipe, tpipe)
    # The architecture can also come from a diffusers folder's configs.
    jpipe2 = load_pipeline(path, config=folder)
    np.testing.assert_array_equal(np.asarray(jpipe2.encode_prompt(PROMPTS)), np.asarray(jpipe.encode_prompt(PROMPTS)))


def test_single_file_ema_weights(reference, tmp_path):
    preset, folder, tpipe = reference
    original = _original_state_dict(tpipe, preset)
    rng = np.random.default_rng(5)
    ema = {}
    for k, v in original.items():
        if k.startswith(unet_keys.ORIGINAL_PREFIX):
            ema["model_ema." + k[len("model."):].replace(".", "")] = (v + 0.01 * rng.standard_normal(v.shape)).astype(v.dtype)
    path = str(tmp_path / "ema.safetensors")
    write_safetensors(path, {**original, **ema, "model_ema.num_updates": np.array(7, np.int64)})
    plain = load.read_single_file(path, config=preset)
    with_ema = load.read_single_file(path, config=preset, ema=True)
    conv_in = unet_keys.ORIGINAL_PREFIX + "input_blocks.0.0.weight"
    ema_conv_in = ema["model_ema.diffusion_modelinput_blocks00weight"]
    np.testing.assert_array_equal(with_ema.params["unet"]["conv_in"]["kernel"], np.transpose(ema_conv_in, (2, 3, 1, 0)))
    np.testing.assert_array_equal(plain.params["unet"]["conv_in"]["kernel"],
                                  np.transpose(original[conv_in], (2, 3, 1, 0)))
    del ema["model_ema.diffusion_modelinput_blocks00weight"]
    write_safetensors(path, {**original, **ema})
    with pytest.raises(ConversionError, match="input_blocks00weight"):
        load.read_single_file(path, config=preset, ema=True)


def test_native_format_round_trip_and_export_to_diffusers(reference, tmp_path):
    """convert -> jaxt2i folder -> same numbers; export -> diffusers folder that diffusers loads, exactly."""
    from diffusers import StableDiffusionPipeline

    preset, folder, tpipe = reference
    model = load.read_any(folder)
    native = str(tmp_path / "native")
    load.write_native(native, model)
    with pytest.raises(FileExistsError):
        load.write_native(native, model)
    jpipe = load_pipeline(native)
    _assert_matches_reference(jpipe, tpipe)
    exported = str(tmp_path / "exported")
    load.write_diffusers_folder(exported, load.read_any(native))
    back = StableDiffusionPipeline.from_pretrained(exported, safety_checker=None)
    for name in ("unet", "vae", "text_encoder"):
        ours, ref = getattr(back, name).state_dict(), getattr(tpipe, name).state_dict()
        ref = {k: v for k, v in ref.items() if not k.endswith("position_ids")}
        assert set(k for k in ours if not k.endswith("position_ids")) == set(ref), name
        for k in ref:
            assert torch.equal(ours[k], ref[k]), (name, k)
    assert back.scheduler.config.prediction_type == tpipe.scheduler.config.prediction_type
    ids_theirs = back.tokenizer(PROMPTS, padding="max_length", max_length=77, truncation=True).input_ids
    np.testing.assert_array_equal(np.asarray(ids_theirs), jpipe.tokenize(PROMPTS))


def test_single_file_export_round_trip(reference, tmp_path):
    preset, folder, tpipe = reference
    model = load.read_any(folder)
    path = str(tmp_path / "export.safetensors")
    load.write_single_file(path, model)
    again = load.read_single_file(path, config=preset)
    for name in model.params:
        flat_a = load.native.flatten_params(model.params[name])
        flat_b = load.native.flatten_params(again.params[name])
        assert flat_a.keys() == flat_b.keys()
        for k in flat_a:
            np.testing.assert_array_equal(flat_a[k], flat_b[k], err_msg=f"{name}/{k}")


# ------------------------------------------------------------------------------------------------ errors
class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_malicious_pickle_is_refused_and_never_runs(tmp_path):
    marker = str(tmp_path / "pwned")
    path = str(tmp_path / "evil.ckpt")
    torch.save({"state_dict": {"w": torch.zeros(1)}, "payload": _Exploit(marker)}, path)
    with pytest.raises(CheckpointReadError, match="refused"):
        load.read_any(path, config="tiny_sd1")
    assert not os.path.exists(marker)
    with pytest.raises(CheckpointReadError, match="refused"):
        load_pipeline(path, config="tiny_sd1")
    assert not os.path.exists(marker)


def test_truncated_files_give_clear_errors(reference, tmp_path):
    preset, folder, tpipe = reference
    original = _original_state_dict(tpipe, preset)
    st = str(tmp_path / "model.safetensors")
    write_safetensors(st, original)
    data = open(st, "rb").read()
    open(st, "wb").write(data[: len(data) // 2])
    with pytest.raises(CheckpointReadError, match="truncated"):
        load_pipeline(st, config=preset)
    open(st, "wb").write(b"\x10\x00")
    with pytest.raises(CheckpointReadError, match="too short"):
        load.read_any(st, config=preset)
    ck = str(tmp_path / "model.ckpt")
    torch.save({"state_dict": {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in original.items()}}, ck)
    data = open(ck, "rb").read()
    open(ck, "wb").write(data[: len(data) // 3])
    with pytest.raises(CheckpointReadError, match="truncated or corrupt"):
        load.read_any(ck, config=preset)


def test_missing_unexpected_and_misshaped_keys_are_named(reference, tmp_path):
    preset, folder, tpipe = reference
    original = _original_state_dict(tpipe, preset)
    path = str(tmp_path / "bad.safetensors")
    victim = unet_keys.ORIGINAL_PREFIX + "out.2.weight"
    write_safetensors(path, {k: v for k, v in original.items() if k != victim})
    with pytest.raises(ConversionError, match=r"out\.2\.weight") as err:
        load.read_single_file(path, config=preset)
    assert "bad.safetensors" in str(err.value)
    write_safetensors(path, {**original, "first_stage_model.encoder.extra.weight": np.zeros(3, np.float32)})
    with pytest.raises(ConversionError, match="encoder.extra.weight"):
        load.read_single_file(path, config=preset)
    write_safetensors(path, {**original, "something_else.weight": np.zeros(3, np.float32)})
    with pytest.raises(ConversionError, match="something_else.weight"):
        load.read_single_file(path, config=preset)
    wrong = dict(original)
    wrong[victim] = np.zeros((5,) + original[victim].shape[1:], original[victim].dtype)
    write_safetensors(path, wrong)
    # Shapes are checked after renaming to the diffusers layout; the error names both keys.
    with pytest.raises(ConversionError, match=r"conv_out\.weight has shape \(5, .*expects.*In the single file "
                                              r"this tensor is model\.diffusion_model\.out\.2\.weight\."):
        load.read_single_file(path, config=preset)
    if preset == "tiny_sd2":  # OpenCLIP's fused q/k/v: the error names the fused tensor of the file
        qkv = next(k for k in original if k.endswith("attn.in_proj_weight"))
        write_safetensors(path, {**original, qkv: np.zeros((original[qkv].shape[0], 5), original[qkv].dtype)})
        with pytest.raises(ConversionError, match=rf"q_proj.weight has shape \(32, 5\).*In the single file this "
                                                  rf"tensor is {qkv}\."):
            load.read_single_file(path, config=preset)


def test_detect_single_file_from_shapes():
    base = {"model.diffusion_model.input_blocks.0.0.weight": np.zeros((320, 4, 3, 3), np.float16)}
    sd1 = {**base, "cond_stage_model.transformer.text_model.final_layer_norm.weight": np.zeros(768)}
    sd2 = {**base, "cond_stage_model.model.ln_final.weight": np.zeros(1024)}
    inpaint = {"model.diffusion_model.input_blocks.0.0.weight": np.zeros((320, 9, 3, 3), np.float16)}
    assert load.detect_single_file(sd1, "x") == "sd15"
    assert load.detect_single_file(sd2, "x") == "sd21"
    assert load.detect_single_file({**sd1, **inpaint}, "x") == "sd15_inpaint"
    assert load.detect_single_file({**sd2, **inpaint}, "x") == "sd2_inpaint"
    with pytest.raises(ConversionError, match="not an original Stable Diffusion"):
        load.detect_single_file({"foo": np.zeros(1)}, "x")


def test_missing_path_and_unknown_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="No model at"):
        load_pipeline(str(tmp_path / "nothing"))
    with pytest.raises(FileNotFoundError, match="model_index.json"):
        load_pipeline(str(tmp_path))


# ------------------------------------------------------------------------------------------------ text_layer
@pytest.mark.parametrize("layer", [0, -2, (0, -1)])
def test_text_layer_is_stored_and_conditions_like_the_reference_hidden_state(reference, tmp_path, layer):
    """A jaxt2i folder records which text-encoder hidden state(s) condition the U-Net; the pipeline encodes prompts
    as transformers' ``hidden_states[layer]`` followed by the final LayerNorm (several, without a conditioner:
    concatenated along the tokens); formats that cannot say so refuse."""
    import dataclasses

    preset, folder, tpipe = reference
    model = dataclasses.replace(load.read_any(folder), text_layer=layer)
    native = str(tmp_path / "native")
    load.write_native(native, model)
    assert load.read_any(native).text_layer == layer
    jpipe = load_pipeline(native)
    ids = tpipe.tokenizer(PROMPTS, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        hidden = tpipe.text_encoder(ids, output_hidden_states=True).hidden_states
        want = np.concatenate([tpipe.text_encoder.final_layer_norm(hidden[one]).numpy()  # transformers 5: no
                               for one in np.atleast_1d(layer)], axis=1)              # text_model level
        last = tpipe.text_encoder(ids)[0].numpy()
    got = np.asarray(jpipe.encode_prompt(PROMPTS))
    np.testing.assert_allclose(got, want, atol=ATOL, rtol=0)
    # the layer made a difference, so the check above can fail
    assert np.abs(got[:, :last.shape[1]] - last).max() > 100 * ATOL
    assert jpipe.to_loaded_model().text_layer == layer
    for writer, dst in ((load.write_diffusers_folder, tmp_path / "d"), (load.write_single_file, tmp_path / "s.safetensors")):
        with pytest.raises(ConversionError, match=f"hidden state {re.escape(str(layer))}.*jaxt2i's format"):
            writer(str(dst), model)
        assert not dst.exists()
    last = dataclasses.replace(model, text_layer=model.configs["text_encoder"].num_layers)  # the last layer, by index
    load.write_single_file(str(tmp_path / "last.safetensors"), last)
    assert (tmp_path / "last.safetensors").is_file()


def test_text_layer_missing_means_last_and_out_of_range_is_refused(tiny_model, tmp_path):
    import json
    import shutil

    folder = tmp_path / "m"
    shutil.copytree(tiny_model, folder)
    manifest = json.loads((folder / "jaxt2i.json").read_text())
    assert manifest["text_layer"] == -1
    del manifest["text_layer"]  # a folder written before the field existed
    (folder / "jaxt2i.json").write_text(json.dumps(manifest))
    assert load.read_any(str(folder)).text_layer == -1
    layers = manifest["components"]["text_encoder"]["config"]["num_layers"]
    for bad, why in ((layers + 1, f"does not exist in a {layers}-layer"), (-layers - 2, "does not exist"),
                     ("last", "use an integer"), (1.0, "use an integer"), (True, "use an integer")):
        (folder / "jaxt2i.json").write_text(json.dumps({**manifest, "text_layer": bad}))
        with pytest.raises(ConversionError, match=f'"text_layer": text layer {bad!r}.*{why}'):
            load.read_any(str(folder))


def test_a_folder_with_a_conditioner_samples_and_refuses_a_single_text_layer(tiny_model, tmp_path):
    """A conditioner is its own component of a jaxt2i folder (type, config, weights), read back with the two text
    layers it merges, and the pipeline samples through it; a folder whose ``text_layer`` gives it one layer is
    refused when read, and the diffusers and single-file formats, which cannot hold it, refuse to write it."""
    import dataclasses
    import json

    import jax

    from jaxt2i.models.conditioner import ConditionerConfig, abstract_params

    model = load.read_any(tiny_model)
    config = ConditionerConfig(width=model.configs["unet"].cross_attention_dim, rank=2)
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda s: (0.1 * rng.standard_normal(s.shape)).astype(np.float32), abstract_params(config))
    model = dataclasses.replace(model, configs={**model.configs, "conditioner": config},
                                params={**model.params, "conditioner": params}, text_layer=(0, -1))
    folder = tmp_path / "conditioned"
    load.write_native(str(folder), model)
    manifest = json.loads((folder / "jaxt2i.json").read_text())
    assert manifest["components"]["conditioner"] == {"type": "conditioner", "config": dataclasses.asdict(config)}
    back = load.read_any(str(folder))
    assert back.configs["conditioner"] == config and back.text_layer == (0, -1)
    np.testing.assert_array_equal(back.params["conditioner"]["down"]["kernel"], params["down"]["kernel"])
    images = load_pipeline(str(folder)).text_to_image("a red circle", steps=2, guidance_scale=3.0, height=32, width=32)
    assert images.shape == (1, 32, 32, 3) and np.isfinite(images).all()
    with pytest.raises(ConversionError, match=r"has \['conditioner', 'text_encoder', 'unet', 'vae'\]"):
        load.write_diffusers_folder(str(tmp_path / "diffusers"), back)
    with pytest.raises(ConversionError, match="cannot express"):
        load.write_single_file(str(tmp_path / "single.safetensors"), back)
    (folder / "jaxt2i.json").write_text(json.dumps({**manifest, "text_layer": -1}))
    with pytest.raises(ConversionError, match='"text_layer": text_layer -1 gives the conditioner the wrong input'):
        load.read_any(str(folder))
