"""The small ViT image tower, the CLIP pairing and the symmetric InfoNCE loss."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxt2i.models import clip_vision as cv


def _np_infonce(img, txt, logit_scale):
    """Independent reference: float64 log-softmax cross-entropy both ways."""
    scale = math.exp(min(logit_scale, math.log(100.0)))
    logits = scale * img.astype(np.float64) @ txt.astype(np.float64).T

    def ce(l):
        l = l - l.max(axis=1, keepdims=True)
        logp = l - np.log(np.exp(l).sum(axis=1, keepdims=True))
        return -np.mean(np.diag(logp))

    return 0.5 * (ce(logits) + ce(logits.T))


def _unit(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.mark.parametrize("logit_scale", [0.0, math.log(1 / 0.07), 7.0])
def test_infonce_matches_numpy(logit_scale):
    rng = np.random.default_rng(0)
    img, txt = _unit(rng.normal(size=(6, 5))), _unit(rng.normal(size=(6, 5)))
    got = cv.contrastive_loss(jnp.asarray(img, jnp.float32), jnp.asarray(txt, jnp.float32), logit_scale)
    np.testing.assert_allclose(float(got), _np_infonce(img, txt, logit_scale), rtol=1e-5)


def test_infonce_is_asymmetric_in_general_and_clipped():
    rng = np.random.default_rng(1)
    img, txt = jnp.asarray(_unit(rng.normal(size=(4, 3)))), jnp.asarray(_unit(rng.normal(size=(4, 3))))
    # Above ln(100) the loss no longer changes and the temperature gets no gradient.
    at_cap = cv.contrastive_loss(img, txt, math.log(100.0))
    np.testing.assert_allclose(float(cv.contrastive_loss(img, txt, 9.0)), float(at_cap), rtol=1e-6)
    assert float(jax.grad(lambda s: cv.contrastive_loss(img, txt, s))(9.0)) == 0.0
    assert float(jax.grad(lambda s: cv.contrastive_loss(img, txt, s))(1.0)) != 0.0
    # The two directions differ for a non-symmetric similarity matrix; the loss averages them.
    logits = np.asarray(cv.contrastive_logits(img, txt, 1.0))
    assert not np.allclose(logits, logits.T)


def test_vision_tower_shapes_and_param_names():
    cfg = cv.vision_preset("tiny")
    model = cv.CLIPVisionModel(cfg)
    x = jnp.asarray(np.random.default_rng(0).random((3, 64, 64, 3)), jnp.float32)
    params = model.init(jax.random.key(0), x)["params"]
    embeds, pooled = model.apply({"params": params}, x)
    assert embeds.shape == (3, cfg.projection_dim) and pooled.shape == (3, cfg.hidden_size)
    assert params["patch_embedding"]["kernel"].shape == (16, 16, 3, cfg.hidden_size)
    assert "bias" not in params["patch_embedding"]
    assert params["class_embedding"].shape == (cfg.hidden_size,)
    assert params["position_embedding"]["embedding"].shape == (cfg.num_patches + 1, cfg.hidden_size)
    assert set(params["layers_0"]) == {"layer_norm1", "self_attn", "layer_norm2", "mlp"}
    assert params["visual_projection"]["kernel"].shape == (cfg.hidden_size, cfg.projection_dim)
    assert cv.vision_preset("shapes").num_patches == 64
    with pytest.raises(ValueError, match="expects images"):
        model.apply({"params": params}, x[:, :32])


def test_vision_tower_is_bidirectional_and_uses_every_patch():
    """Changing the last patch changes the class-token output (no causal mask, all patches reach the pool)."""
    cfg = cv.vision_preset("tiny")
    model = cv.CLIPVisionModel(cfg)
    x = jnp.zeros((1, 64, 64, 3))
    params = model.init(jax.random.key(0), x)["params"]
    y = x.at[:, 48:, 48:, :].set(1.0)
    a, b = model.apply({"params": params}, x)[1], model.apply({"params": params}, y)[1]
    assert float(jnp.max(jnp.abs(a - b))) > 1e-3


def test_clip_model_outputs_unit_norm_embeddings():
    cfg = cv.preset("tiny")
    params = cv.init_params(cfg, jax.random.key(0))
    ids = jnp.asarray([[49406, 320, 736, 49407] + [49407] * 4, [49406, 320, 49407] + [49407] * 5])
    images = jnp.zeros((2, 64, 64, 3))
    img, txt, scale = cv.CLIPModel(cfg).apply({"params": params}, ids, images)
    assert img.shape == txt.shape == (2, cfg.vision.projection_dim)
    np.testing.assert_allclose(np.linalg.norm(np.asarray(img), axis=1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(np.asarray(txt), axis=1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(float(scale), math.log(1 / 0.07), rtol=1e-6)
    assert params["text_model"]["text_projection"]["kernel"].shape == (cfg.text.hidden_size, cfg.text.projection_dim)


def test_config_checks_and_round_trip():
    import dataclasses

    cfg = cv.preset("shapes")
    assert cv.CLIPConfig.from_dict(dataclasses.asdict(cfg)) == cfg
    with pytest.raises(ValueError, match="projection_dim"):
        cv.CLIPConfig(text=dataclasses.replace(cfg.text, projection_dim=32), vision=cfg.vision)
    with pytest.raises(ValueError, match="patch_size"):
        cv.CLIPVisionConfig(image_size=64, patch_size=7)


def test_infonce_with_hard_negatives_matches_numpy():
    """Hard negatives join every image's candidate texts (image->text only); text->image is unchanged."""
    rng = np.random.default_rng(2)
    img, txt, neg = (_unit(rng.normal(size=(5, 4))) for _ in range(3))
    logit_scale = 2.5
    scale = math.exp(logit_scale)
    logits = scale * np.concatenate([img @ txt.T, img @ neg.T], axis=1)
    logp = logits - np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(1, keepdims=True)) - logits.max(
        1, keepdims=True)
    i2t = -np.mean(np.diag(logp[:, :5]))
    t_logits = scale * txt @ img.T
    t_logp = t_logits - np.log(np.exp(t_logits).sum(1, keepdims=True))
    want = 0.5 * (i2t - np.mean(np.diag(t_logp)))
    got = cv.contrastive_loss(*(jnp.asarray(x, jnp.float32) for x in (img, txt)), logit_scale,
                              jnp.asarray(neg, jnp.float32))
    np.testing.assert_allclose(float(got), want, rtol=1e-5)
    # negatives that duplicate every caption double each image->text candidate: that direction costs exactly ln 2 more
    dup = cv.contrastive_loss(jnp.asarray(img), jnp.asarray(txt), 4.6, jnp.asarray(txt))
    base = cv.contrastive_loss(jnp.asarray(img), jnp.asarray(txt), 4.6)
    np.testing.assert_allclose(float(dup) - float(base), 0.5 * math.log(2), rtol=1e-4)
