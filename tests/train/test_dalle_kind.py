"""Kind ``dalle``: two steps from the shapes world on a given dVAE and the shipped CLIP, exported as a folder that
``load_pipeline`` samples from; the loss (caption dropout, frozen-encoder tokens, weighted cross-entropy); config
errors. Exact resume after SIGKILL and jit == shard_map on 8 host devices: test_kinds.py (KINDS["dalle"])."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxt2i.data.sources import make_source
from jaxt2i.dvae import DVAE, load_dvae
from jaxt2i.models import dalle, dvae
from jaxt2i.pipelines import DallePipeline, load_pipeline
from jaxt2i.train import loop
from jaxt2i.train.config import ConfigError, load_config

CONFIG = str(Path(__file__).resolve().parents[2] / "configs" / "shapes_dalle.yaml")
# 64x64 images as 4x4 tokens (five groups, factor 16), so the shipped CLIP (64x64) can rank the model's images.
DVAE_64 = dvae.DVAEConfig(vocab_size=32, n_hid=8, n_blk_per_group=1, group_count=5, n_init=8, image_size=64)
TINY = ("model.transformer=tiny", "model.transformer_config={text_length: 16}", "progress=false",
        "tensorboard=false", "async_checkpoints=false", "log_every=1", "optim.warmup_steps=1",
        "model.text_vocabulary=clip")


def random_weights(abstract, seed: int, std: float = 0.1) -> dict:
    """Normal weights shaped like the abstract tree ``abstract`` (numpy: nothing to compile)."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda a: (std * rng.standard_normal(a.shape)).astype(np.float32), abstract)


@pytest.fixture(scope="module")
def dvae_folder(tmp_path_factory) -> tuple[str, DVAE]:
    params = {"encoder": random_weights(dvae.encoder_abstract_params(DVAE_64), 0),
              "decoder": random_weights(dvae.decoder_abstract_params(DVAE_64), 1)}
    model = DVAE(DVAE_64, params, source="test")
    path = tmp_path_factory.mktemp("dvae") / "dvae"
    model.save(path)
    return str(path), model


def test_two_steps_export_a_folder_the_pipeline_samples_from(dvae_folder, tmp_path):
    path, given = dvae_folder
    cfg = load_config(CONFIG, [*TINY, "steps=2", "batch_size=4", "checkpoint_every=2", "data.num_examples=8",
                               f"model.dvae_from={path}", "model.clip_from=shapes", "model.top_k=5",
                               "model.temperature=0.9", "sample.guidance_scale=2.5", f"workdir={tmp_path / 'run'}"])
    result = loop.run(cfg)
    assert result.step == 2 and np.isfinite(result.last_metrics["loss"])
    assert {"text_loss", "image_loss"} <= set(result.last_metrics)
    manifest = json.loads((result.final_dir / "jaxt2i.json").read_text())
    assert manifest["family"] == "dalle"
    assert {k: v["type"] for k, v in manifest["components"].items()} == {
        "transformer": "dalle_transformer", "dvae_encoder": "dvae_encoder", "dvae_decoder": "dvae_decoder",
        "text_encoder": "text_encoder", "clip_vision": "clip_vision"}
    config = manifest["components"]["transformer"]["config"]
    assert (config["image_height"], config["image_vocab_size"], config["text_vocab_size"]) == (4, 32, 49408)
    exported = load_dvae(result.final_dir)  # the frozen dVAE, unchanged
    for part in ("encoder", "decoder"):
        for a, b in zip(jax.tree.leaves(exported.params[part]), jax.tree.leaves(given.params[part])):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    pipe = load_pipeline(result.final_dir)
    assert isinstance(pipe, DallePipeline) and pipe.ranking_clip() is not None
    assert pipe.sampling == {"guidance": 2.5, "temperature": 0.9, "top_k": 5, "top_p": None, "steps": 16}
    images = pipe.text_to_image(["a red circle"], seed=0)
    assert images.shape == (1, 64, 64, 3) and images.dtype == np.float32 and np.isfinite(images).all()


def test_a_compact_text_vocabulary_holds_the_captions_words_and_travels_with_the_folder(dvae_folder, tmp_path):
    path, _ = dvae_folder
    cfg = load_config(CONFIG, [*TINY, "steps=1", "batch_size=4", "checkpoint_every=1", "data.num_examples=64",
                               f"model.dvae_from={path}", "model.text_vocabulary=captions",
                               "model.vocabulary_examples=32", f"workdir={tmp_path / 'run'}"])
    result = loop.run(cfg)
    manifest = json.loads((result.final_dir / "jaxt2i.json").read_text())
    kept = manifest["extras"]["text_vocabulary"]
    config = manifest["components"]["transformer"]["config"]
    assert 10 < len(kept) < 100 and config["text_vocab_size"] == len(kept) + 1
    pipe = load_pipeline(result.final_dir)
    table = pipe.params["transformer"]["text_embed"]["embedding"]
    assert table.shape[0] == len(kept) + 1 + config["text_length"]  # kept ids, unknown, one pad per position
    source = make_source(cfg.data)
    captions = [c for i in range(32) for c in source.example(i).captions]
    tokens = pipe.text_tokens(captions)
    assert tokens.max() < config["text_vocab_size"] + config["text_length"]
    assert not np.isin(tokens, len(kept)).any()  # no caption of those examples reads as unknown
    images = pipe.text_to_image(["a red circle"], seed=0)
    assert images.shape == (1, 64, 64, 3) and np.isfinite(images).all()


def test_the_loss_is_the_weighted_cross_entropy_of_frozen_encoder_tokens(tmp_path):
    """With cond_dropout 0 the captions' tokens, with cond_dropout near 1 the empty caption in every row; image
    tokens are the argmax of the frozen encoder's logits of the batch's images."""
    @jax.jit
    def reference(components, images, text):
        tokens = jnp.argmax(dvae.encode(components["dvae_encoder"], (images + 1.0) / 2.0, dvae.PRESETS["tiny"]), -1)
        text_logits, image_logits = dalle.DalleTransformer(config).apply({"params": components["transformer"]},
                                                                          text, tokens)
        return dalle.weighted_loss(text_logits, image_logits, text, tokens, text_weight=0.3, image_weight=0.875)

    got_losses = []
    for dropout in (0.0, 0.999999):
        cfg = load_config(CONFIG, [*TINY, "data.image_size=16", "model.dvae_from=null", "model.clip_from=null",
                                   "data.num_examples=8", f"loss.cond_dropout={dropout}", "loss.text_weight=0.3",
                                   f"workdir={tmp_path}"])
        kind = loop.build_kind(cfg)
        config = kind.config
        components = {"transformer": random_weights(dalle.abstract_params(config), 2, std=0.2),
                      "dvae_encoder": random_weights(dvae.encoder_abstract_params(kind.dvae_config), 3)}
        batches = kind.batches(4, None)
        batch = next(batches)
        batches.close()
        got, metrics = jax.jit(lambda c, b: kind.loss(c, b, jax.random.PRNGKey(0), 0, lambda x: x))(components, batch)
        text = dalle.empty_caption(config, 4) if dropout else batch["text_tokens"]
        want, parts = reference(components, batch["images"], text)
        np.testing.assert_allclose(float(got), float(want), rtol=1e-5)
        np.testing.assert_allclose(float(metrics["text_loss"]), float(parts["text_loss"]), rtol=1e-5)
        got_losses.append(float(got))
    assert got_losses[0] != got_losses[1]  # the two cases are told apart


def test_settings_that_follow_the_dvae_or_do_not_fit_are_errors(tmp_path):
    def kind(*overrides):
        return loop.build_kind(load_config(CONFIG, [*TINY, "data.image_size=16", "model.dvae_from=null",
                                                    "model.clip_from=null", f"workdir={tmp_path}", *overrides]))

    assert kind().config.image_height == 8 and kind().config.layer_kinds == ("row", "row", "column", "conv")
    assert kind("model.transformer_config={text_length: 16, num_layers: 5}").config.layer_kinds[-1] == "conv"
    with pytest.raises(ValueError, match="image_height.*follows the dVAE"):
        kind("model.transformer_config={image_height: 4}")
    with pytest.raises(ValueError, match="reads 64x64 images"):
        kind("model.clip_from=shapes")
    with pytest.raises(ValueError, match="multiple of the dVAE's downsampling factor"):
        kind("data.image_size=15")
    with pytest.raises(ConfigError, match="top_k"):
        kind("model.top_k=0")


def test_each_example_draws_its_own_randomness_whatever_the_batch_layout(tmp_path):
    """Caption dropout and transformer dropout come from each example's global index, so a batch's loss is the mean
    of its rows' losses computed one by one (what makes the jit and shard_map forms agree)."""
    cfg = load_config(CONFIG, [*TINY, "data.image_size=16", "model.dvae_from=null", "model.clip_from=null",
                               "data.num_examples=8", "loss.cond_dropout=0.5", f"workdir={tmp_path}",
                               "model.transformer_config={text_length: 16, dropout: 0.3}"])
    kind = loop.build_kind(cfg)
    components = {"transformer": random_weights(dalle.abstract_params(kind.config), 2, std=0.2),
                  "dvae_encoder": random_weights(dvae.encoder_abstract_params(kind.dvae_config), 3)}
    batches = kind.batches(4, None)
    batch = next(batches)
    batches.close()
    loss = jax.jit(lambda c, b, first: kind.loss(c, b, jax.random.PRNGKey(7), first, lambda x: x)[0])
    rows = [float(loss(components, {k: v[i:i + 1] for k, v in batch.items()}, 10 + i)) for i in range(4)]
    np.testing.assert_allclose(float(loss(components, batch, 10)), np.mean(rows), rtol=1e-5)
    assert float(loss(components, batch, 10)) != float(loss(components, batch, 11))  # the index matters
