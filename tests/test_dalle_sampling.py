"""Sampling DALL-E's image tokens: logits filters, guidance, and the cached sampler against the full forward."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxt2i.models import dalle
from jaxt2i.models.dalle_sampling import (guide_logits, sample_image_tokens, sample_logits, top_k_filter,
                                          top_p_filter)

TINY = dalle.get_config("tiny")
SAMPLE = jax.jit(sample_image_tokens, static_argnames=("model", "top_k", "guidance_scale"))


def _kept(filtered) -> list[list[int]]:
    return [sorted(np.flatnonzero(np.isfinite(row)).tolist()) for row in np.asarray(filtered)]


def test_top_k_keeps_exactly_the_k_largest():
    logits = jnp.array([[1.0, 3.0, 2.0, 0.5, 2.5], [0.0, -1.0, 4.0, 3.0, -2.0]])
    assert _kept(top_k_filter(logits, 2)) == [[1, 4], [2, 3]]
    assert _kept(top_k_filter(logits, 1)) == [[1], [2]]
    kept = top_k_filter(logits, 3)
    np.testing.assert_array_equal(np.asarray(kept)[0, [1, 2, 4]], [3.0, 2.0, 2.5])  # kept logits unchanged
    assert _kept(top_k_filter(logits, None)) == _kept(top_k_filter(logits, 5)) == [[0, 1, 2, 3, 4]] * 2
    with pytest.raises(ValueError, match="top_k"):
        top_k_filter(logits, 0)


def test_top_p_keeps_the_smallest_nucleus():
    probs = np.array([0.15, 0.5, 0.05, 0.3])  # ranked: 1 (0.5), 3 (0.3), 0 (0.15), 2 (0.05)
    logits = jnp.log(jnp.asarray(np.stack([probs, probs[::-1]])))
    assert _kept(top_p_filter(logits, 0.4)) == [[1], [2]]
    assert _kept(top_p_filter(logits, 0.7)) == [[1, 3], [0, 2]]
    assert _kept(top_p_filter(logits, 0.9)) == [[0, 1, 3], [0, 2, 3]]
    assert _kept(top_p_filter(logits, 0.99)) == [[0, 1, 2, 3]] * 2
    assert _kept(top_p_filter(logits, None)) == [[0, 1, 2, 3]] * 2
    after_top_k = top_p_filter(top_k_filter(logits, 2), 0.99)  # top-k's -inf entries stay out
    assert _kept(after_top_k) == [[1, 3], [0, 2]]


def test_guidance_at_scale_one_is_the_conditional_logits():
    cond, uncond = jax.random.normal(jax.random.PRNGKey(0), (2, 3, 7))
    np.testing.assert_allclose(np.asarray(guide_logits(cond, uncond, 1.0)), np.asarray(cond), atol=1e-6, rtol=0)
    np.testing.assert_array_equal(np.asarray(guide_logits(cond, uncond, 0.0)), np.asarray(uncond))
    np.testing.assert_allclose(np.asarray(guide_logits(cond, uncond, 3.0)),
                               np.asarray(uncond + 3.0 * (cond - uncond)), atol=1e-6, rtol=0)


def test_sample_logits_with_top_k_one_is_the_argmax_whatever_the_key():
    logits = jax.random.normal(jax.random.PRNGKey(1), (4, 11))
    for seed in range(3):
        got = sample_logits(jax.random.PRNGKey(seed), logits, temperature=2.0, top_k=1)
        np.testing.assert_array_equal(np.asarray(got), np.argmax(np.asarray(logits), axis=-1))


def _setup(batch=2, seed=0, sharpen=True):
    model = dalle.DalleTransformer(TINY)
    text = jax.random.randint(jax.random.PRNGKey(seed + 1), (batch, TINY.text_length), 0, TINY.text_vocab_size)
    image = jnp.zeros((batch, TINY.image_height, TINY.image_width), jnp.int32)
    params = nn.unbox(model.init(jax.random.PRNGKey(seed), text, image)["params"])
    # Sharper logits than at initialisation, so greedy choices are far from ties.
    if sharpen:
        params["image_head"]["kernel"] = params["image_head"]["kernel"] * 50.0
    return model, params, text


def test_the_sampler_jits_and_returns_image_tokens():
    model, params, text = _setup(sharpen=False)
    tokens = SAMPLE(model, params, text, jax.random.PRNGKey(2), temperature=1.0, top_k=10, top_p=0.9,
                    guidance_scale=3.0)
    assert tokens.shape == (2, TINY.image_height, TINY.image_width) and tokens.dtype == jnp.int32
    assert int(tokens.min()) >= 0 and int(tokens.max()) < TINY.image_vocab_size
    other = SAMPLE(model, params, text, jax.random.PRNGKey(3), temperature=1.0, top_k=10, top_p=0.9,
                   guidance_scale=3.0)
    assert not np.array_equal(np.asarray(tokens), np.asarray(other))  # the key matters


@pytest.mark.parametrize("scale", [1.0, 3.0])
def test_greedy_samples_are_the_argmax_of_the_full_forward(scale):
    """Top-1 sampling through the cache picks, at every position, the argmax of the (guided) full-forward logits of
    the sampled prefix: the cache, the feedback of tokens and the guidance batch all line up."""
    model, params, text = _setup()
    tokens = SAMPLE(model, params, text, jax.random.PRNGKey(4), top_k=1, guidance_scale=scale)
    _, cond = model.apply({"params": params}, text, tokens)
    _, uncond = model.apply({"params": params}, dalle.empty_caption(TINY, 2), tokens)
    guided = np.asarray(guide_logits(cond, uncond, scale))
    np.testing.assert_array_equal(np.asarray(tokens).reshape(2, -1), guided.argmax(-1))
    if scale == 1.0:  # the unguided sampler runs no unconditional batch yet picks the same tokens
        np.testing.assert_array_equal(np.asarray(tokens).reshape(2, -1), np.asarray(cond).argmax(-1))
