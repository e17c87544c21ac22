"""General CLIP metrics (jaxt2i.eval.clip_metrics): CLIP score, retrieval, and CLIP folders."""

import functools

import jax
import numpy as np
import pytest

from jaxt2i.convert.load import LoadedModel, write_native
from jaxt2i.eval import clip_metrics as cm
from jaxt2i.models import clip_vision as cv
from tests.weights import random_params

TINY = cv.preset("tiny")


def test_clip_score_and_retrieval_hand_made():
    img = np.array([[1.0, 0.0], [0.0, 1.0]])
    txt = np.array([[0.6, 0.8], [-1.0, 0.0]])  # cos 0.6 and 0 (clipped from 0)
    assert cm.clip_score(img, txt) == pytest.approx(30.0)
    assert cm.retrieval_accuracy(img, txt) == {"image_to_text": 0.5, "text_to_image": 0.5}


def test_a_clip_is_made_of_a_models_text_encoder_and_clip_vision_components(tmp_path):
    params = random_params(jax.eval_shape(functools.partial(cv.init_params, TINY), jax.random.key(0)), 0)
    configs = {"text_encoder": TINY.text, "clip_vision": TINY.vision}
    parts = {"text_encoder": params["text_model"],
             "clip_vision": {"vision_model": params["vision_model"], "logit_scale": params["logit_scale"]}}
    side = TINY.vision.image_size
    images = np.random.default_rng(0).uniform(size=(3, side, side, 3)).astype(np.float32)
    prompts = ["a red circle", "a blue square", "a green triangle"]
    encode_images, encode_texts = cm.clip_from_components(configs, parts)
    img, txt = encode_images(images), encode_texts(prompts)
    assert img.shape == txt.shape == (3, TINY.vision.projection_dim)
    np.testing.assert_allclose(np.linalg.norm(img, axis=1), 1.0, rtol=1e-5)
    full = cv.CLIPModel(TINY)  # the same as the whole CLIP's own feature functions
    want = jax.jit(functools.partial(full.apply, method=cv.CLIPModel.get_image_features))({"params": params}, images)
    np.testing.assert_allclose(img, np.asarray(want), atol=1e-5)
    assert cm.clip_from_components({"text_encoder": TINY.text}, {"text_encoder": parts["text_encoder"]}) is None

    folder = str(tmp_path / "clip")  # the same components as a model folder (what `--clip FOLDER` reads)
    write_native(folder, LoadedModel(configs, parts, None, {"pad": "eos", "folder": None}, "test", family=None))
    encode_images2, encode_texts2 = cm.load_clip(folder)
    np.testing.assert_allclose(encode_images2(images), img, atol=1e-6)
    np.testing.assert_allclose(encode_texts2(prompts), txt, atol=1e-6)
    with pytest.raises(FileNotFoundError, match="not a jaxt2i model folder"):
        cm.load_clip(str(tmp_path))

    class OtherFamily:  # a model with neither params nor configs: only --clip gives it a CLIP
        pass

    assert cm.clip_for_model(OtherFamily()) is None
    assert cm.clip_for_model(OtherFamily(), folder) is not None
