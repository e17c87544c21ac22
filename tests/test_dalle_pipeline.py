"""The DALL-E pipeline on a tiny random-weight model folder: text_to_image, its sampling knobs, CLIP reranking of
candidates, and `jaxt2i generate` / `jaxt2i eval` on the folder."""

from __future__ import annotations

import json

import functools

import jax
import numpy as np
import pytest
from PIL import Image

from jaxt2i import presets
from jaxt2i.cli import main as cli_main
from jaxt2i.convert.load import LoadedModel, write_native
from jaxt2i.eval import rerank
from jaxt2i.images import to_uint8
from jaxt2i.models import clip_vision, dalle, dvae
from jaxt2i.models.dalle_sampling import guide_logits
from jaxt2i.pipelines import DallePipeline, load_pipeline
from jaxt2i.shapes.cli import eval_main

PROMPTS = ["a red circle", "a blue square to the left of a green triangle"]
# 64x64 images (the shapes world's, and the tiny CLIP's) as 4x4 tokens: five dVAE groups, factor 16.
DVAE = dvae.DVAEConfig(vocab_size=32, n_hid=8, n_blk_per_group=1, group_count=5, n_init=8, image_size=64)
TRANSFORMER = dalle.DalleConfig(text_vocab_size=49408, text_length=16, image_vocab_size=32, image_height=4,
                                image_width=4, num_layers=4, num_heads=2, head_dim=8, conv_kernel=3)
RECOMMENDED = {"temperature": 1.0, "top_k": 8, "top_p": None}


def initial_weights(abstract, rng: np.random.Generator, kernel_std=None) -> dict:
    """Weights shaped like ``abstract`` as the models initialise them, drawn with numpy (no tracing): kernels and
    tables normal (std ``kernel_std``, or 1/sqrt(fan-in)), norm scales one, biases zero."""
    def one(path, leaf):
        name = str(getattr(path[-1], "key", path[-1]))
        if name == "bias":
            return np.zeros(leaf.shape, np.float32)
        if name == "scale":
            return np.ones(leaf.shape, np.float32)
        std = kernel_std or 1.0 / np.sqrt(np.prod(leaf.shape[:-1]))
        return (std * rng.standard_normal(leaf.shape)).astype(np.float32)

    return jax.tree_util.tree_map_with_path(one, abstract)


def write_tiny_dalle(path, with_clip: bool) -> str:
    """A ``dalle`` model folder with random weights (the transformer's 10x the usual init, its image head 50x: the
    caption matters and greedy choices are far from ties); a tiny CLIP when asked."""
    rng = np.random.default_rng(0)
    configs = {"transformer": TRANSFORMER, "dvae_encoder": DVAE, "dvae_decoder": DVAE}
    types = {"transformer": "dalle_transformer"}
    if with_clip:
        tiny_clip = clip_vision.PRESETS["tiny"]
        configs.update(text_encoder=tiny_clip.text, clip_vision=tiny_clip.vision)
    stds = {"transformer": 0.2, "text_encoder": 0.05, "clip_vision": 0.05}  # the dVAE's: 1/sqrt(fan-in)
    params = {name: initial_weights(presets.abstract_params(types.get(name, name), config), rng, stds.get(name))
              for name, config in configs.items()}
    params["transformer"]["image_head"]["kernel"] *= 5.0
    write_native(str(path), LoadedModel(configs, params, None, {"pad": "eos", "folder": None}, "test",
                                        sampling={"guidance": 3.0}, family="dalle", types=types,
                                        extras={"token_sampling": RECOMMENDED}))
    return str(path)


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> str:
    return write_tiny_dalle(tmp_path_factory.mktemp("dalle") / "model", with_clip=True)


@pytest.fixture(scope="module")
def pipe(folder) -> DallePipeline:
    return load_pipeline(folder)


@functools.partial(jax.jit, static_argnums=0)
def image_logits(transformer, params, text, tokens):
    """The image logits of the full (uncached) forward pass: [B, N, V]."""
    return transformer.apply({"params": params}, text, tokens)[1]


def full_forward_logits(pipe: DallePipeline, prompts, tokens, scale: float, uncond_text=None) -> np.ndarray:
    """The guided image logits of the full forward pass over the sampled tokens (against the empty caption, or
    ``uncond_text``): [B, N, V]."""
    params = pipe.params[pipe.transformer_name]
    uncond_text = dalle.empty_caption(pipe.config, len(prompts)) if uncond_text is None else uncond_text
    cond = image_logits(pipe.transformer, params, pipe.text_tokens(prompts), tokens)
    uncond = image_logits(pipe.transformer, params, uncond_text, tokens)
    return np.asarray(guide_logits(cond, uncond, scale))


def test_the_folder_loads_as_a_dalle_pipeline_with_its_recommended_sampling(pipe):
    assert isinstance(pipe, DallePipeline) and pipe.default_size == (64, 64)
    assert pipe.sampling == {"guidance": 3.0, **RECOMMENDED, "steps": 16}
    assert pipe.sampling_defaults(50, None) == (16, 3.0)  # steps: one transformer call per image token
    assert pipe.resolve_sampling(top_k=0, top_p=1.0)["top_k"] is None  # 0 / 1 turn the filters off
    with pytest.raises(ValueError, match="temperature"):
        pipe.resolve_sampling(temperature=0.0)


def test_text_to_image_is_float_images_in_range_fixed_by_the_seed(pipe):
    images = pipe.text_to_image(PROMPTS, seed=0)
    assert images.shape == (2, 64, 64, 3) and images.dtype == np.float32
    assert 0.0 <= images.min() and images.max() <= 1.0
    np.testing.assert_array_equal(images, pipe.text_to_image(PROMPTS, seed=0))
    assert not np.array_equal(images, pipe.text_to_image(PROMPTS, seed=1))
    # the diffusion families' keywords (what `jaxt2i generate` / `jaxt2i eval` pass) change nothing
    same = pipe.text_to_image(PROMPTS, seed=0, steps=7, sampler="euler", use_karras_sigmas=True, height=64, width=64,
                              negative_prompt=None, progress=lambda done, total: None)
    np.testing.assert_array_equal(images, same)


@pytest.mark.parametrize("scale", [1.0, 3.0])
def test_greedy_sampling_is_the_argmax_of_the_guided_logits(pipe, scale):
    """top_k=1 (and, guided, a tiny temperature or a tiny nucleus) picks, at every position, the argmax of the guided
    full-forward logits of the sampled prefix (tests/test_dalle_sampling.py checks the sampler itself); the images
    are the dVAE's decoding of those tokens."""
    tokens = pipe.sample_tokens(PROMPTS, seed=0, guidance_scale=scale, top_k=1)
    guided = full_forward_logits(pipe, PROMPTS, tokens, scale)
    np.testing.assert_array_equal(tokens.reshape(2, -1), guided.argmax(-1))
    images = pipe.text_to_image(PROMPTS, seed=5, guidance_scale=scale, top_k=1)
    np.testing.assert_allclose(images, np.asarray(pipe.decode_latents(tokens)), atol=1e-6)
    if scale == 1:
        return
    for seed in (1, 2):  # whatever the draw
        np.testing.assert_array_equal(pipe.sample_tokens(PROMPTS, seed=seed, guidance_scale=scale, temperature=1e-6,
                                                         top_k=0), tokens)
        np.testing.assert_array_equal(pipe.sample_tokens(PROMPTS, seed=seed, guidance_scale=scale, top_k=0,
                                                         top_p=1e-6), tokens)
    # guidance changes the choice somewhere: the unguided argmax is another sequence
    assert not np.array_equal(full_forward_logits(pipe, PROMPTS, tokens, 1.0).argmax(-1), guided.argmax(-1))


def test_top_k_keeps_every_token_among_the_k_most_likely(pipe):
    outside = []
    for seed in range(3):
        for top_k in (2, 0):
            tokens = pipe.sample_tokens(PROMPTS, seed=seed, top_k=top_k, guidance_scale=3.0)
            guided = full_forward_logits(pipe, PROMPTS, tokens, 3.0)
            ranks = (guided > np.take_along_axis(guided, tokens.reshape(2, -1, 1), -1)).sum(-1)  # 0: the argmax
            if top_k:
                assert ranks.max() < top_k
            else:
                outside.append(ranks.max() >= 2)
    assert any(outside)  # without the filter, less likely tokens are drawn


def test_a_negative_prompt_replaces_the_empty_caption(pipe):
    plain = pipe.sample_tokens(PROMPTS, seed=0, guidance_scale=3.0, top_k=1)
    negative = pipe.sample_tokens(PROMPTS, seed=0, guidance_scale=3.0, top_k=1, negative_prompt="a green triangle")
    guided = full_forward_logits(pipe, PROMPTS, negative, 3.0, pipe.text_tokens(["a green triangle"] * 2))
    np.testing.assert_array_equal(negative.reshape(2, -1), guided.argmax(-1))
    assert not np.array_equal(plain, negative)


def test_candidates_keep_the_draw_the_clip_scores_best(pipe):
    best = pipe.text_to_image(PROMPTS, seed=4, candidates=3)
    draws = np.stack([pipe.text_to_image(PROMPTS, seed=rerank.candidate_seed(4, c)) for c in range(3)])
    encode_images, encode_texts = pipe.ranking_clip()
    image_features = np.asarray(encode_images(draws.reshape(6, 64, 64, 3))).reshape(3, 2, -1)
    cosines = np.einsum("npd,pd->np", image_features, np.asarray(encode_texts(PROMPTS)))
    chosen = cosines.argmax(0)
    np.testing.assert_array_equal(best, draws[chosen, np.arange(2)])


def test_bad_calls_are_clear_errors(pipe, tmp_path):
    with pytest.raises(ValueError, match="32x32"):
        pipe.text_to_image(PROMPTS, height=32, width=32)
    with pytest.raises(ValueError, match="latents"):
        pipe.text_to_image(PROMPTS, latents=np.zeros((2, 8, 8, 4)))
    with pytest.raises(ValueError, match="candidates"):
        pipe.text_to_image(PROMPTS, candidates=0)
    no_clip = load_pipeline(write_tiny_dalle(tmp_path / "no_clip", with_clip=False))
    assert no_clip.ranking_clip() is None
    with pytest.raises(ValueError, match="needs a CLIP"):
        no_clip.text_to_image(PROMPTS, candidates=2)


def test_generate_writes_the_image_and_its_settings(folder, pipe, tmp_path):
    out = tmp_path / "a.png"
    assert cli_main(["generate", "a red circle", "--model", folder, "--seed", "3", "--out", str(out)]) == 0
    png = Image.open(out)
    settings = dict(png.text)
    assert settings["sampler"] == "autoregressive" and settings["steps"] == "16"
    assert (settings["guidance"], settings["temperature"], settings["top_k"], settings["top_p"]) == \
        ("3", "1", "8", "none")
    np.testing.assert_array_equal(np.asarray(png.convert("RGB")),
                                  to_uint8(pipe.text_to_image(["a red circle"], seed=3)[0]))
    ranked = tmp_path / "b.png"
    assert cli_main(["generate", "a red circle", "--model", folder, "--candidates", "2", "--guidance", "2",
                     "--out", str(ranked)]) == 0
    assert dict(Image.open(ranked).text)["candidates"] == "2" and dict(Image.open(ranked).text)["guidance"] == "2"


def test_eval_scores_the_model(folder, tmp_path):
    out = tmp_path / "report.json"
    assert eval_main(["--model", folder, "--n", "1", "--guidance", "1,3", "--batch-size", "2", "--n-real", "8",
                      "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert set(result["guidance"]) == {"1", "3"} and result["settings"]["n_prompts"] == 4
    assert result["guidance"]["3"]["clip_score"] is not None  # the folder's CLIP scores it
    assert result["vae_roundtrip"] is not None  # the dVAE's encode -> decode ceiling
