"""General CLIP metrics (jaxt2i.eval.clip_metrics): CLIP score, retrieval, and CLIP folders."""

import jax
import numpy as np
import pytest

from jaxt2i.convert.io import write_safetensors
from jaxt2i.convert.native import flatten_params
from jaxt2i.eval import clip_metrics as cm
from jaxt2i.models import clip_vision as cv

TINY = cv.preset("tiny")


def test_clip_score_and_retrieval_hand_made():
    img = np.array([[1.0, 0.0], [0.0, 1.0]])
    txt = np.array([[0.6, 0.8], [-1.0, 0.0]])  # cos 0.6 and 0 (clipped from 0)
    assert cm.clip_score(img, txt) == pytest.approx(30.0)
    assert cm.retrieval_accuracy(img, txt) == {"image_to_text": 0.5, "text_to_image": 0.5}


def test_clip_folders_load_with_their_own_or_the_models_text_tower(tmp_path):
    params = cv.init_params(TINY, jax.random.key(0))
    flat = flatten_params(params)
    config = {"text": vars(TINY.text), "vision": vars(TINY.vision)}
    cm.write_clip_vision(str(tmp_path / "model" / cm.CLIP_VISION_DIR), flat, config, dtype="float32")
    side = TINY.vision.image_size
    images = np.random.default_rng(0).uniform(size=(3, side, side, 3)).astype(np.float32)
    prompts = ["a red circle", "a blue square", "a green triangle"]
    with pytest.raises(ValueError, match="image tower"):
        cm.load_clip(str(tmp_path / "model"))
    encode_images, encode_texts = cm.load_clip(str(tmp_path / "model"), params["text_model"])
    img, txt = encode_images(images), encode_texts(prompts)
    assert img.shape == txt.shape == (3, TINY.vision.projection_dim)
    np.testing.assert_allclose(np.linalg.norm(img, axis=1), 1.0, rtol=1e-5)
    full = tmp_path / "full"  # a CLIP folder with both towers gives the same encoders
    full.mkdir()
    write_safetensors(str(full / "params.safetensors"), flat)
    (full / "config.json").write_text((tmp_path / "model" / cm.CLIP_VISION_DIR / "config.json").read_text())
    encode_images2, encode_texts2 = cm.load_clip(str(full))
    np.testing.assert_allclose(encode_images2(images), img, atol=1e-6)
    np.testing.assert_allclose(encode_texts2(prompts), txt, atol=1e-6)
    assert cm.load_clip(str(tmp_path / "nothing")) is None and cm.find_clip(str(tmp_path)) is None

    class NoParams:  # a model of another family: no text encoder to lend, so only a full CLIP folder works
        pass

    assert cm.clip_for_model(NoParams(), str(tmp_path / "model"), str(full))[1] == str(full)
    assert cm.clip_for_model(NoParams(), str(tmp_path / "nothing"))[0] is None
