"""The vae and clip kinds' loss pieces against hand computations: ELBO terms, caption tokenising, parse labels of
shapes-world captions, the class-balanced head loss."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxt2i.models import clip_vision as cv
from jaxt2i.models.vae import PRESETS as VAE_PRESETS, AutoencoderKL, abstract_params as vae_abstract_params
from jaxt2i.shapes.parse import PARSE_TARGETS, ROLES, caption_parse_targets
from jaxt2i.tokenizer import CLIPTokenizer
from jaxt2i.train.kinds.clip import heads_loss, tokenize_checked
from jaxt2i.train.kinds.vae import elbo_loss
from jaxt2i.train.step import example_keys
from tests.weights import random_params

TINY_CLIP = cv.preset("tiny")


@pytest.fixture(scope="module")
def tokenizer():
    return CLIPTokenizer.default()


def test_elbo_terms():
    config = VAE_PRESETS["tiny"]
    module = AutoencoderKL(config)
    params = random_params(vae_abstract_params(config), 0)  # host-side weights: no compiled init
    side = 4 * config.downsample_factor
    images = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (4, side, side, 3)), jnp.float32)
    keys = example_keys(jax.random.key(1), jnp.int32(0), 4)
    # one compiled program per reconstruction loss (beta is an argument), not one per operation
    l1, l2 = (jax.jit(functools.partial(elbo_loss, module, recon=recon)) for recon in ("l1", "l2"))
    loss0, m0 = l1(params, images, keys, 0.0)
    loss1, m1 = l1(params, images, keys, 10.0)
    np.testing.assert_allclose(float(loss0), float(m0["rec"]), rtol=1e-6)
    np.testing.assert_allclose(float(loss1), float(m1["rec"]) + 10.0 * float(m1["kl_per_value"]), rtol=1e-5)
    assert float(m1["kl_per_value"]) > 0
    _, m2 = l2(params, images, keys, 0.0)
    assert float(m2["rec"]) != float(m0["rec"])
    np.testing.assert_allclose(float(m0["psnr"]), float(m2["psnr"]), rtol=1e-6)  # PSNR does not depend on recon


def test_tokenize_checked_refuses_truncation(tokenizer):
    ids = tokenize_checked(tokenizer, ["a red circle"], 8)
    assert ids.shape == (1, 8) and ids[0, 0] == tokenizer.bos_token_id
    with pytest.raises(ValueError, match="text_length"):
        tokenize_checked(tokenizer, ["there is a small white triangle to the left of a large orange square"], 8)


def test_training_length_cut_does_not_change_the_text_embedding(tokenizer):
    """Positions after EOS are invisible to the EOS-pooled embedding of the causal text tower."""
    params = random_params(jax.eval_shape(functools.partial(cv.init_params, TINY_CLIP), jax.random.key(0)), 0)
    model = cv.CLIPModel(TINY_CLIP)
    full = tokenizer(["a red circle above a blue square"])
    features = jax.jit(lambda p, ids: model.apply({"params": p}, ids, method=cv.CLIPModel.get_text_features))
    embed = lambda ids: features(params, jnp.asarray(ids))
    np.testing.assert_allclose(embed(full), embed(full[:, :16]), atol=1e-6)


def _labelled(tokenizer, targets, captions, name, row):
    """(token text, class) where target ``name`` labels a token of caption ``row``."""
    words = {v: k for k, v in tokenizer.vocab.items()}
    ids = tokenizer(captions)
    classes = ROLES if name == "role" else PARSE_TARGETS[name]
    keep = targets[name][row] > 0 if name == "role" else targets[name][row] >= 0
    return [(words[ids[row, j]], classes[targets[name][row, j]]) for j in np.nonzero(keep)[0]]


def test_caption_parse_targets_hand_made(tokenizer):
    captions = ["a red circle above a large blue square",
                "there is an orange triangle to the right of a white circle", "a picture of a small green square"]
    targets = caption_parse_targets(tokenizer, captions, 24)
    got = lambda name, row: _labelled(tokenizer, targets, captions, name, row)
    assert got("color", 0) == [("circle</w>", "red"), ("square</w>", "blue")]
    assert got("shape", 1) == [("triangle</w>", "triangle"), ("circle</w>", "circle")]
    assert got("side", 0) == [("large</w>", "below"), ("blue</w>", "below"), ("square</w>", "below")]
    assert got("side", 1) == [("white</w>", "left of"), ("circle</w>", "left of")]
    assert got("side", 2) == [] and got("color", 2) == [("square</w>", "green")]
    assert (targets["role"] >= 0).all()  # every token has a role, "none" included
    assert got("role", 0) == [("red</w>", "first"), ("circle</w>", "first"), ("large</w>", "second, below"),
                              ("blue</w>", "second, below"), ("square</w>", "second, below")]
    assert got("role", 2) == [("small</w>", "first"), ("green</w>", "first"), ("square</w>", "first")]
    with pytest.raises(ValueError, match="does not fit in 8 tokens"):
        caption_parse_targets(tokenizer, captions[1:2], 8)


def test_balanced_head_loss_is_the_mean_of_per_class_means():
    rng = np.random.default_rng(0)
    states = rng.standard_normal((2, 6, 4)).astype(np.float32)
    head = {"kernel": rng.standard_normal((4, len(ROLES))).astype(np.float32),
            "bias": rng.standard_normal(len(ROLES)).astype(np.float32)}
    labels = np.array([[0, 0, 0, 0, 1, 5], [0, 0, 0, 1, 1, -1]], np.int32)
    logits = states @ head["kernel"] + head["bias"]
    ce = -(logits - np.log(np.exp(logits).sum(-1, keepdims=True)))
    ce = np.take_along_axis(ce, np.maximum(labels, 0)[..., None], -1)[..., 0]
    right = logits.argmax(-1) == labels
    present = [0, 1, 5]
    loss, metrics = heads_loss({"parse_role": jnp.asarray(logits)}, {"parse_role": jnp.asarray(labels)},
                               balanced=("parse_role",))
    np.testing.assert_allclose(float(loss), np.mean([ce[labels == c].mean() for c in present]), rtol=1e-5)
    np.testing.assert_allclose(float(metrics["parse_role_accuracy"]), right[labels >= 0].mean(), rtol=1e-6)
    np.testing.assert_allclose(float(metrics["parse_role_worst_class_accuracy"]),
                               min(right[labels == c].mean() for c in present), rtol=1e-6)
    plain, plain_metrics = heads_loss({"parse_role": jnp.asarray(logits)}, {"parse_role": jnp.asarray(labels)}, ())
    np.testing.assert_allclose(float(plain), ce[labels >= 0].mean(), rtol=1e-5)  # the mean over labelled tokens
    assert "parse_role_worst_class_accuracy" not in plain_metrics
