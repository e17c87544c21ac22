"""The class-conditional DiT family end to end against diffusers' DiTPipeline: a tiny random pipeline written by
``save_pretrained`` (with the hub folders' ``id2label`` in its model index), loaded by ``load_pipeline``, sampled
from the same initial latents (diffusers' ``randn_tensor`` patched to return them) with DDIM."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from jaxt2i.convert.core import ConversionError
from jaxt2i.convert.dit_keys import params_from_diffusers
from jaxt2i.convert.load import read_any, write_native
from jaxt2i.pipelines import ClassPipeline, load_pipeline
from tests.parity.sd_reference import nchw
from tests.parity.test_dit_parity import original_state_dict, tied_embedders

TOL = 2e-3
STEPS = 4
LATENT = 8  # latent side; the tiny VAE downsamples by 2 -> 16 px images
# diffusers' DiTPipeline takes id 1000 as the null class, so the model has ImageNet's 1000 classes; ten are named.
ID2LABEL = {str(i): name for i, name in enumerate(
    ["tench, Tinca tinca", "goldfish, Carassius auratus", "great white shark", "tiger shark", "hammerhead",
     "electric ray", "stingray", "cock", "hen", "ostrich, Struthio camelus"])}


def _perturb(module: torch.nn.Module, seed: int) -> None:
    """Every parameter moved off its init (diffusers zero-initialises some DiT layers), so the test can fail."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    from diffusers import AutoencoderKL, DDIMScheduler, DiTPipeline, DiTTransformer2DModel

    from jaxt2i import presets

    torch.manual_seed(0)
    transformer = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8,
                                        num_layers=2, sample_size=LATENT, patch_size=2,
                                        num_embeds_ada_norm=1000).eval()
    vae = AutoencoderKL(**presets.get("tiny_sd1").configs()["vae"].to_diffusers()).eval()
    _perturb(transformer, 1)
    scheduler = DDIMScheduler(clip_sample=False)
    path = str(tmp_path_factory.mktemp("dit") / "model")
    DiTPipeline(transformer=transformer, vae=vae, scheduler=scheduler).save_pretrained(path)
    index_file = os.path.join(path, "model_index.json")
    with open(index_file) as f:
        index = json.load(f)
    with open(index_file, "w") as f:
        json.dump({**index, "id2label": ID2LABEL}, f)  # as facebook/DiT-XL-2-256's model index has it
    return path


@pytest.fixture(scope="module")
def pipes(folder):
    from diffusers import DiTPipeline

    tpipe = DiTPipeline.from_pretrained(folder)
    tpipe.set_progress_bar_config(disable=True)
    return tpipe, load_pipeline(folder)


def _reference(tpipe, labels, noise, guidance, monkeypatch):
    import diffusers.pipelines.dit.pipeline_dit as pipeline_dit

    monkeypatch.setattr(pipeline_dit, "randn_tensor", lambda shape, **kw: nchw(noise))
    out = tpipe(class_labels=labels, guidance_scale=guidance, num_inference_steps=STEPS, output_type="np").images
    return np.asarray(out)


def _noise(batch: int = 2, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((batch, LATENT, LATENT, 4)).astype(np.float32)


@pytest.mark.parametrize("guidance", [4.0, 1.0])
def test_class_to_image_matches_diffusers(pipes, monkeypatch, guidance):
    tpipe, jpipe = pipes
    assert isinstance(jpipe, ClassPipeline)
    noise = _noise()
    ref = _reference(tpipe, [1, 7], noise, guidance, monkeypatch)
    ours = jpipe.class_to_image([1, 7], steps=STEPS, guidance_scale=guidance, latents=noise)
    assert ours.shape == ref.shape == (2, 2 * LATENT, 2 * LATENT, 3)
    np.testing.assert_allclose(ours, ref, atol=TOL, rtol=0)


def test_class_names_and_text_to_image(pipes):
    tpipe, jpipe = pipes
    assert jpipe.label_ids(["goldfish", "Carassius auratus", "cock", 3]).tolist() == \
        tpipe.get_label_ids(["goldfish", "Carassius auratus", "cock"]) + [3]
    noise = _noise()
    by_id = jpipe.class_to_image([1, 7], steps=STEPS, latents=noise)
    by_name = jpipe.text_to_image(["goldfish", "cock"], steps=STEPS, latents=noise)
    np.testing.assert_array_equal(by_id, by_name)


def test_bad_labels_are_refused_with_a_clear_message(pipes):
    _, jpipe = pipes
    with pytest.raises(ValueError, match="Did you mean 'goldfish'"):
        jpipe.class_to_image(["goldfsh"])
    with pytest.raises(ValueError, match="out of range"):
        jpipe.class_to_image([1000])
    with pytest.raises(ValueError, match="latents have shape"):
        jpipe.class_to_image([1], latents=np.zeros((1, LATENT, LATENT, 3), np.float32))


def test_jaxt2i_folder_keeps_the_class_names(pipes, folder, tmp_path):
    _, jpipe = pipes
    out = tmp_path / "dit"
    write_native(str(out), read_any(folder))
    again = load_pipeline(out)
    assert again.labels == jpipe.labels
    noise = _noise(1)
    np.testing.assert_array_equal(again.class_to_image([2], steps=2, latents=noise),
                                  jpipe.class_to_image([2], steps=2, latents=noise))


def test_any_sampler_runs(pipes):
    _, jpipe = pipes
    images = jpipe.class_to_image([0, 9], steps=3, sampler="dpmpp_2m", seed=1)
    assert images.shape == (2, 2 * LATENT, 2 * LATENT, 3) and np.isfinite(images).all()
    assert not np.allclose(images[0], images[1], atol=1e-3)  # two classes, two seeds' worth of noise: two images


def test_original_checkpoint_with_the_folder_as_config(pipes, folder, tmp_path):
    """facebookresearch's .pt layout (one shared timestep/label embedder) takes the VAE, schedule and class names
    from a DiTPipeline folder; with the folder's embedders tied to block 0's it samples the same images."""
    from safetensors.numpy import load_file

    _, jpipe = pipes
    config = jpipe.configs["transformer"]
    tied = tied_embedders(load_file(os.path.join(folder, "transformer", "diffusion_pytorch_model.safetensors")),
                          config)
    path = tmp_path / "DiT-tiny.pt"
    torch.save({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in original_state_dict(tied, config).items()},
               path)
    with pytest.raises(ConversionError, match="holds the transformer alone"):
        load_pipeline(path)
    from_pt = load_pipeline(path, config=folder)
    assert from_pt.labels == jpipe.labels and from_pt.configs["transformer"] == config
    tied_folder = tmp_path / "tied"
    model = read_any(folder)
    model.params["transformer"] = params_from_diffusers(tied, config, source="tied")
    write_native(str(tied_folder), model)
    noise = _noise(1)
    np.testing.assert_array_equal(from_pt.class_to_image(["hen"], steps=2, latents=noise),
                                  load_pipeline(tied_folder).class_to_image(["hen"], steps=2, latents=noise))


def test_command_line_generates_by_class_name(folder, tmp_path):
    from jaxt2i.cli import main

    out = tmp_path / "fish.png"
    assert main(["generate", "goldfish", "--model", folder, "--steps", "2", "--out", str(out)]) == 0
    assert out.is_file()
    assert main(["img2img", "goldfish", "--model", folder, "--image", str(out), "--out", str(tmp_path / "x.png")]) == 2
