"""End-to-end parity of the sampling programs with diffusers' Stable Diffusion pipelines (issue 3).

Same random weights, prompts, negative prompts and initial noise; output_type="np" on the diffusers side.
The reference VAE's posterior is made (numerically) deterministic — logvar = -30, std ~ 3e-7 — so img2img and
inpainting, which sample the posterior with torch's generator, can be compared exactly too.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from jaxt2i.pipelines import latent_diffusion as jpipeline
from jaxt2i.pipelines import load_pipeline
from tests.parity.sd_reference import nchw, save_diffusers_folder

TOL = 2e-3
PROMPTS = ["a red circle above a blue square", "a green triangle"]
NEGATIVE = ["blurry", "a yellow circle"]
SIZE = 16  # pixels; the tiny VAE downsamples by 2 -> 8x8 latents
STEPS = 4

SCHEDULERS = {
    "ddim": "DDIMScheduler",
    "pndm": "PNDMScheduler",
    "lms": "LMSDiscreteScheduler",
    "euler": "EulerDiscreteScheduler",
    "heun": "HeunDiscreteScheduler",
    "dpmpp_2m": "DPMSolverMultistepScheduler",
}


def _deterministic_posterior(vae: torch.nn.Module) -> None:
    latent = vae.config.latent_channels
    with torch.no_grad():
        vae.quant_conv.weight[latent:] = 0.0
        vae.quant_conv.bias[latent:] = -30.0


@pytest.fixture(scope="module", params=["tiny_sd1", "tiny_sd2"])
def pipes(request, tmp_path_factory):
    """(torch pipeline, jaxt2i pipeline) with identical weights."""
    folder = str(tmp_path_factory.mktemp(request.param) / "model")
    tpipe = save_diffusers_folder(folder, request.param, seed=3)
    _deterministic_posterior(tpipe.vae)
    tpipe.vae.save_pretrained(folder + "/vae")
    tpipe.set_progress_bar_config(disable=True)
    return tpipe, load_pipeline(folder)


def _noise(seed: int = 0, batch: int = 2) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((batch, SIZE // 2, SIZE // 2, 4)).astype(np.float32)


def _use_scheduler(tpipe, sampler: str):
    import diffusers

    cls = getattr(diffusers, SCHEDULERS[sampler])
    config = {**tpipe.scheduler.config, "clip_sample": False}  # what the folder's scheduler_config.json says
    if sampler == "pndm":
        config["skip_prk_steps"] = True
    tpipe.scheduler = cls.from_config(config)


@pytest.mark.parametrize("sampler", list(SCHEDULERS))
def test_text_to_image_matches_diffusers(pipes, sampler):
    tpipe, jpipe = pipes
    _use_scheduler(tpipe, sampler)
    noise = _noise()
    ref = tpipe(PROMPTS, negative_prompt=NEGATIVE, num_inference_steps=STEPS, guidance_scale=6.0,
                latents=nchw(noise), height=SIZE, width=SIZE, output_type="np").images
    ours = jpipe.text_to_image(PROMPTS, negative_prompt=NEGATIVE, steps=STEPS, guidance_scale=6.0, sampler=sampler,
                               latents=noise, height=SIZE, width=SIZE)
    assert ours.shape == ref.shape == (2, SIZE, SIZE, 3)
    np.testing.assert_allclose(ours, ref, atol=TOL, rtol=0)


# Pipeline mechanics that do not depend on the model family (the unconditional half skipped at guidance <= 1, the
# staged run): tiny_sd1 by default, tiny_sd2 with -m slow; the other tests here check each family-dependent step on
# both.
MECHANICS = pytest.mark.parametrize("pipes", ["tiny_sd1", pytest.param("tiny_sd2", marks=pytest.mark.slow)],
                                    indirect=True)


@MECHANICS
def test_guidance_off_matches_diffusers(pipes):
    tpipe, jpipe = pipes
    _use_scheduler(tpipe, "ddim")
    noise = _noise(1)
    ref = tpipe(PROMPTS, num_inference_steps=STEPS, guidance_scale=1.0, latents=nchw(noise), height=SIZE, width=SIZE,
                output_type="np").images
    ours = jpipe.text_to_image(PROMPTS, steps=STEPS, guidance_scale=1.0, latents=noise, height=SIZE, width=SIZE)
    np.testing.assert_allclose(ours, ref, atol=TOL, rtol=0)


def test_new_prompt_seed_or_guidance_does_not_recompile(pipes):
    _, jpipe = pipes
    kwargs = dict(steps=STEPS, sampler="ddim", height=SIZE, width=SIZE)
    jpipe.text_to_image(PROMPTS, guidance_scale=6.0, seed=0, **kwargs)
    before = jpipeline._program._cache_size()
    a = jpipe.text_to_image(["a purple square", "two circles"], negative_prompt="dark", guidance_scale=3.5, seed=7,
                            **kwargs)
    b = jpipe.text_to_image(PROMPTS, guidance_scale=9.0, seed=123, **kwargs)
    assert jpipeline._program._cache_size() == before
    assert not np.allclose(a, b)  # the inputs really changed the output


def _patch_noise(monkeypatch, module_name: str, noise: np.ndarray):
    """diffusers draws the img2img/inpaint noise with randn_tensor; hand it ours instead."""
    import importlib

    module = importlib.import_module(module_name)
    monkeypatch.setattr(module, "randn_tensor", lambda shape, **kw: nchw(noise).to(kw.get("dtype") or torch.float32))


def _image(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.uniform(0, 1, (1, SIZE, SIZE, 3)).astype(np.float32)


@pytest.mark.parametrize("sampler", ["ddim", "euler"])
def test_image_to_image_matches_diffusers(pipes, monkeypatch, sampler):
    from diffusers import StableDiffusionImg2ImgPipeline

    tpipe, jpipe = pipes
    _use_scheduler(tpipe, sampler)
    img_pipe = StableDiffusionImg2ImgPipeline(**tpipe.components)
    img_pipe.set_progress_bar_config(disable=True)
    noise, image = _noise(2, batch=1), _image(0)
    _patch_noise(monkeypatch, "diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_img2img", noise)
    ref = img_pipe(PROMPTS[:1], image=image, strength=0.6, num_inference_steps=5, guidance_scale=5.0,
                   negative_prompt=NEGATIVE[:1], output_type="np").images
    ours = jpipe.image_to_image(PROMPTS[:1], image, strength=0.6, steps=5, guidance_scale=5.0, sampler=sampler,
                                negative_prompt=NEGATIVE[:1], latents=noise)
    np.testing.assert_allclose(ours, ref, atol=TOL, rtol=0)


def test_inpaint_matches_diffusers(pipes, monkeypatch):
    from diffusers import StableDiffusionInpaintPipeline

    tpipe, jpipe = pipes
    _use_scheduler(tpipe, "ddim")
    inpaint_pipe = StableDiffusionInpaintPipeline(**tpipe.components)
    inpaint_pipe.set_progress_bar_config(disable=True)
    noise, image = _noise(3, batch=1), _image(1)
    mask = np.zeros((1, SIZE, SIZE), np.float32)
    mask[:, 4:12, 2:10] = 1.0
    _patch_noise(monkeypatch, "diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_inpaint", noise)
    ref = inpaint_pipe(PROMPTS[:1], image=image, mask_image=mask[..., None], num_inference_steps=STEPS,
                       guidance_scale=5.0, height=SIZE, width=SIZE, output_type="np").images
    ours = jpipe.inpaint(PROMPTS[:1], image, mask, steps=STEPS, guidance_scale=5.0, sampler="ddim", latents=noise)
    np.testing.assert_allclose(ours, ref, atol=TOL, rtol=0)


@pytest.fixture(scope="module")
def inpaint_pipes(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("inpaint9") / "model")
    tpipe = save_diffusers_folder(folder, "tiny_sd1", seed=4, in_channels=9)
    _deterministic_posterior(tpipe.vae)
    tpipe.vae.save_pretrained(folder + "/vae")
    tpipe.set_progress_bar_config(disable=True)
    return tpipe, load_pipeline(folder)


def test_nine_channel_inpainting_model_matches_diffusers(inpaint_pipes, monkeypatch):
    tpipe, jpipe = inpaint_pipes
    assert jpipe.is_inpainting_model
    _use_scheduler(tpipe, "ddim")
    noise, image = _noise(4, batch=1), _image(2)
    mask = np.zeros((SIZE, SIZE), np.float32)
    mask[6:14, 0:8] = 1.0
    _patch_noise(monkeypatch, "diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_inpaint", noise)
    ref = tpipe(PROMPTS[:1], image=image, mask_image=mask[None, ..., None], num_inference_steps=STEPS,
                guidance_scale=4.0, height=SIZE, width=SIZE, output_type="np").images
    ours = jpipe.inpaint(PROMPTS[:1], image, mask, steps=STEPS, guidance_scale=4.0, latents=noise)
    np.testing.assert_allclose(ours, ref, atol=TOL, rtol=0)
    with pytest.raises(ValueError, match="inpainting model"):
        jpipe.text_to_image("x", steps=2, height=SIZE, width=SIZE)


def test_inpaint_with_empty_mask_returns_the_vae_round_trip(pipes):
    """The defining property for ordinary models: the known region is restored after every step, so with nothing
    to repaint the final latents are the image's own latents (compared after decoding: the decoder's attention
    mixes all pixels, so only a fully-known latent grid gives exact equality)."""
    _, jpipe = pipes
    image = _image(5)
    out = jpipe.inpaint("a cat", image, np.zeros((SIZE, SIZE), np.float32), steps=STEPS, guidance_scale=3.0, seed=1)
    roundtrip = np.asarray(jpipe.decode_latents(jpipe.encode_image(image)))
    np.testing.assert_allclose(out, roundtrip, atol=1e-5, rtol=0)
    repainted = jpipe.inpaint("a cat", image, np.ones((SIZE, SIZE), np.float32), steps=STEPS, guidance_scale=3.0,
                              seed=1)
    assert np.abs(repainted - roundtrip).max() > 1e-2  # a full mask really repaints


def test_bad_inputs_give_clear_errors(pipes):
    _, jpipe = pipes
    with pytest.raises(ValueError, match=r"multiples of 4 pixels \(the VAE's factor 2 x the unet's downsampling 2\)"):
        jpipe.text_to_image("x", steps=2, height=SIZE + 2, width=SIZE)
    with pytest.raises(ValueError, match="Unknown sampler"):
        jpipe.text_to_image("x", steps=2, sampler="magic", height=SIZE, width=SIZE)
    with pytest.raises(ValueError, match="mask is"):
        jpipe.inpaint("x", _image(0), np.zeros((SIZE, SIZE // 2)), steps=2)
    with pytest.raises(ValueError, match="strength"):
        jpipe.image_to_image("x", _image(0), strength=0.0, steps=2)
    with pytest.raises(ValueError, match="latents have shape"):
        jpipe.text_to_image("x", steps=2, latents=np.zeros((1, 3, 3, 4)), height=SIZE, width=SIZE)


@MECHANICS
def test_progress_runs_in_stages_with_the_same_result(pipes):
    """progress=fn runs setup / one segment per model call / decode; the numbers equal the single program's."""
    _, jpipe = pipes
    calls = []
    kwargs = dict(steps=STEPS, guidance_scale=4.0, sampler="dpmpp_2m", height=SIZE, width=SIZE, seed=2)
    staged = jpipe.text_to_image(PROMPTS, progress=lambda done, total: calls.append((done, total)), **kwargs)
    np.testing.assert_allclose(staged, jpipe.text_to_image(PROMPTS, **kwargs), atol=1e-6, rtol=0)
    assert calls == [(i, STEPS) for i in range(STEPS + 1)]
    mask = np.zeros((SIZE, SIZE), np.float32)
    mask[4:, :] = 1.0
    inpaint_kwargs = dict(steps=STEPS, guidance_scale=4.0, strength=0.75, seed=3)
    np.testing.assert_allclose(jpipe.inpaint("a cat", _image(3), mask, progress=lambda d, t: None, **inpaint_kwargs),
                               jpipe.inpaint("a cat", _image(3), mask, **inpaint_kwargs), atol=1e-6, rtol=0)
