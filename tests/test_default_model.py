"""The shipped default model (jaxt2i/assets/shapes_model): size budget, loading, one generated image."""

from __future__ import annotations

import os

import numpy as np
import pytest

from jaxt2i.shapes import SHIPPED_MODEL as DEFAULT_MODEL

MAX_BYTES = 20 * 10**6


def _folder_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def test_default_model_is_shipped_and_small():
    assert os.path.isfile(os.path.join(DEFAULT_MODEL, "jaxt2i.json")), (
        f"{DEFAULT_MODEL} is missing; build it with scripts/build_shapes_model.py")
    assert _folder_bytes(DEFAULT_MODEL) <= MAX_BYTES


@pytest.fixture(scope="module")
def pipe():
    from jaxt2i.pipelines import load_pipeline

    return load_pipeline(DEFAULT_MODEL)


def test_default_model_loads_in_float32_and_generates_a_64px_image(pipe):
    import jax

    assert all(x.dtype == np.float32 for x in jax.tree.leaves(pipe.params))  # stored float16, cast on load
    assert pipe.default_size == (64, 64)
    image = pipe.text_to_image("a red circle", steps=2, guidance_scale=3.0, seed=0)
    assert image.shape == (1, 64, 64, 3) and image.dtype == np.float32
    assert np.all(np.isfinite(image)) and image.min() >= 0.0 and image.max() <= 1.0
    assert image.std() > 0.0  # not a blank canvas


def test_shapes_unet_config_describes_the_shipped_unet():
    """configs/shapes_unet.yaml retrains the U-Net and conditioner that ship: the same architectures as in the
    shipped manifest, the same text layers and recommended sampling."""
    from jaxt2i.convert.load import read_native
    from jaxt2i.models.unet import UNetConfig
    from jaxt2i.train.config import from_dict, load_config
    from jaxt2i.train.kinds.unet import conditioner_config

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cfg = load_config(os.path.join(root, "configs", "shapes_unet.yaml"))
    shipped = read_native(DEFAULT_MODEL)
    # as `jaxt2i train` builds them, the conditioner's width from the (shipped) text encoder
    assert from_dict(UNetConfig, cfg.model.unet_config) == shipped.configs["unet"]
    assert conditioner_config(cfg.model, shipped.configs["text_encoder"]) == shipped.configs["conditioner"]
    assert tuple(cfg.model.text_layer) == shipped.text_layer == (0, -1)
    assert {"steps": cfg.sample.steps, "guidance": cfg.sample.guidance_scale} == shipped.sampling
