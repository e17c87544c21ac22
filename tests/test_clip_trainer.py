"""The shapes-world CLIP trainer and the CLIP metrics."""

import functools
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxt2i.shapes import world as shapes
from jaxt2i.models import clip_vision as cv
from jaxt2i.tokenizer import CLIPTokenizer
from jaxt2i.train import clip_trainer as ct
from jaxt2i.train import small

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
TINY = cv.preset("tiny")


@pytest.fixture(scope="module")
def tokenizer():
    return CLIPTokenizer.default()


@pytest.fixture(scope="module")
def pairs(tokenizer):
    data = shapes.batch(0, 0, 16, "train")
    return jnp.asarray(data["images"]), jnp.asarray(ct.tokenize_checked(tokenizer, data["captions"], 24))


@functools.lru_cache(maxsize=None)
def _optimizer_and_step():
    """Built once per test session: every test reuses the one compiled step."""
    cfg = ct.CLIPTrainConfig(model="tiny", steps=20, lr=3e-3, warmup_steps=0, weight_decay=0.0)
    optimizer = ct.make_optimizer(cfg.optim)
    return optimizer, ct.make_train_step(TINY, optimizer)


def _setup():
    optimizer, step = _optimizer_and_step()
    return ct.init_state(TINY, optimizer, jax.random.key(0)), step


def test_a_few_steps_reduce_the_loss(pairs):
    state, step = _setup()
    images, ids = pairs
    losses = []
    for _ in range(12):
        state, metrics = step(state, images, ids, jax.random.key(0))
        losses.append(float(metrics["loss"]))
    assert losses[-1] < 0.7 * losses[0], losses


def test_one_step_is_deterministic_from_the_seed(pairs):
    (s1, step), (s2, _) = _setup(), _setup()
    a, ma = step(s1, *pairs, jax.random.key(0))
    b, mb = step(s2, *pairs, jax.random.key(0))
    assert all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params)))
    assert float(ma["loss"]) == float(mb["loss"])
    assert not np.array_equal(a.params["logit_scale"], s1.params["logit_scale"])  # the temperature is learned


def test_tokenize_checked_refuses_truncation(tokenizer):
    ids = ct.tokenize_checked(tokenizer, ["a red circle"], 8)
    assert ids.shape == (1, 8) and ids[0, 0] == tokenizer.bos_token_id
    with pytest.raises(ValueError, match="text_length"):
        ct.tokenize_checked(tokenizer, ["there is a small white triangle to the left of a large orange square"], 8)


def test_training_length_cut_does_not_change_the_text_embedding(tokenizer):
    """Positions after EOS are invisible to the EOS-pooled embedding of the causal text tower."""
    params = cv.init_params(TINY, jax.random.key(0))
    model = cv.CLIPModel(TINY)
    full = tokenizer(["a red circle above a blue square"])
    embed = lambda ids: model.apply({"params": params}, jnp.asarray(ids), method=cv.CLIPModel.get_text_features)
    np.testing.assert_allclose(embed(full), embed(full[:, :16]), atol=1e-6)


def test_save_load_round_trip_float16(tmp_path):
    params = cv.init_params(TINY, jax.random.key(0))
    sizes = ct.save(tmp_path, params, TINY, "float16")
    loaded, config = ct.load_clip(tmp_path)
    assert config == TINY
    assert jax.tree.map(jnp.shape, loaded) == jax.tree.map(jnp.shape, params)
    np.testing.assert_allclose(loaded["logit_scale"], params["logit_scale"], rtol=1e-3)
    text_params, text_config = ct.load_text_encoder(tmp_path)
    assert text_config == TINY.text
    emb = params["text_model"]["token_embedding"]["embedding"]
    np.testing.assert_allclose(text_params["token_embedding"]["embedding"], emb, atol=1e-3)
    assert sizes["text_encoder_bytes"] < sizes["clip_bytes"]
    assert sizes["text_encoder_bytes"] >= 2 * emb.size  # float16 storage


def test_a_model_folder_is_read_as_its_clip(tmp_path):
    """The shipped layout: the text tower as text_encoder.safetensors, the rest in clip_vision/."""
    from jaxt2i.convert.io import write_safetensors
    from jaxt2i.convert.native import flatten_params
    from jaxt2i.shapes.report import write_clip_vision

    params = cv.init_params(TINY, jax.random.key(0))
    flat = flatten_params(params)
    write_safetensors(str(tmp_path / "text_encoder.safetensors"), flatten_params(params["text_model"]))
    write_clip_vision(str(tmp_path / "clip_vision"), flat, {"text": vars(TINY.text), "vision": vars(TINY.vision)},
                      dtype="float32")
    loaded, config = ct.load_clip(tmp_path)
    assert config == TINY
    loaded_flat = flatten_params(loaded)
    assert loaded_flat.keys() == flat.keys()
    for k, v in flat.items():
        np.testing.assert_array_equal(loaded_flat[k].reshape(v.shape), v, err_msg=k)
    (tmp_path / "text_encoder.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="no text_encoder.safetensors"):
        ct.load_clip(tmp_path)


def test_frozen_prefixes_hold_those_parameters_and_train_the_rest(tokenizer, pairs):
    from jaxt2i.convert.native import flatten_params

    images, ids = pairs
    prefixes = ("text_model/token_embedding", "text_model/position_embedding", "text_model/final_layer_norm",
                "vision_model", "logit_scale")
    params = cv.init_params(TINY, jax.random.key(0))
    labels = ct.frozen_labels(params, prefixes)
    assert labels["text_model"]["layers_1"]["mlp"]["fc1"]["kernel"] == "train"
    assert labels["text_model"]["final_layer_norm"]["scale"] == "frozen" and labels["logit_scale"] == "frozen"
    cfg = ct.CLIPTrainConfig(model="tiny", steps=5, lr=3e-3, warmup_steps=0, weight_decay=0.1)
    optimizer = ct.with_frozen(ct.make_optimizer(cfg.optim), params, prefixes)
    state = ct.init_state(TINY, optimizer, jax.random.key(0), parse_heads=["role"], params=params)
    step = ct.make_train_step(TINY, optimizer, parse_loss_weight=1.0)
    captions = shapes.batch(0, 0, 16, "train")["captions"]  # the pairs fixture's captions
    targets = {k: jnp.asarray(v) for k, v in ct.caption_parse_targets(tokenizer, captions, ids.shape[1]).items()}
    before = (flatten_params(state.params), flatten_params(state.parse_heads))
    for _ in range(2):
        state, _ = step(state, images, ids, jax.random.key(0), None, targets)
    after = (flatten_params(state.params), flatten_params(state.parse_heads))
    for k, v in before[0].items():
        held = any(k == p or k.startswith(p + "/") for p in prefixes)
        assert np.array_equal(after[0][k], v) == held, k
    assert all(not np.array_equal(after[1][k], v) for k, v in before[1].items())
    with pytest.raises(ValueError, match="'text_model/embeddings' names no CLIP parameter"):
        ct.frozen_labels(params, ["text_model/embeddings"])


def test_shipped_config_loads():
    cfg = small.load_yaml_config(CONFIGS / "shapes_clip.yaml", ct.CLIPTrainConfig)
    assert small.load_yaml_config(CONFIGS / "shapes_clip.yaml", ct.CLIPTrainConfig, {"lr": "5e-4"}).lr == 5e-4
    with pytest.raises(ValueError, match="steps: expected an integer"):
        small.load_yaml_config(CONFIGS / "shapes_clip.yaml", ct.CLIPTrainConfig, {"steps": "many"})
    config = cfg.clip_config
    assert config == cv.preset("shapes") and cfg.save_dtype == "float16"
    assert config.text.vocab_size == 49408
    override = ct.CLIPTrainConfig(model={"vision": {"num_layers": 2}}).clip_config
    assert override.vision.num_layers == 2 and override.text == config.text


def test_hard_negative_step_learns_to_reject_contradictions(tokenizer):
    data = shapes.batch(0, 0, 16, "train")
    images = jnp.asarray(data["images"])
    ids = jnp.asarray(ct.tokenize_checked(tokenizer, data["captions"], 24))
    negatives = ct.epoch_negative_captions(data["scenes"], np.arange(16), 0, 0)
    assert negatives == ct.epoch_negative_captions(data["scenes"], np.arange(16), 0, 0)
    neg_ids = jnp.asarray(ct.tokenize_checked(tokenizer, negatives, 24))
    state, step = _setup()
    first = None
    for _ in range(15):
        state, metrics = step(state, images, ids, jax.random.key(0), neg_ids)
        first = first or metrics
    assert set(metrics) >= {"beats_hard_negative", "loss", "i2t_accuracy"}
    assert float(metrics["loss"]) < 0.8 * float(first["loss"])
    assert float(metrics["beats_hard_negative"]) > float(first["beats_hard_negative"])


def test_relation_negatives_and_canonical_curriculum_captions():
    scenes = shapes.batch(5, 0, 200)["scenes"]
    two = [i for i, sc in enumerate(scenes) if len(sc.objects) == 2]
    idx = np.asarray(two[:40])
    negatives = ct.epoch_negative_captions(scenes, idx, 0, 0, relation_probability=1.0)

    def layout(objects, relation):  # (left or top object, axis, the other) by (color, shape)
        a, b = objects if relation in ("left of", "above") else objects[::-1]
        return a, relation in ("left of", "right of"), b

    reversed_ = 0
    for i, negative in zip(idx, negatives):  # reversals (or, where that is held out, another kind)
        objects, relation = shapes.parse_caption(negative)
        sc = scenes[i]
        if {o[:2] for o in objects} == {(o.color, o.shape) for o in sc.objects}:
            got = layout([o[:2] for o in objects], relation)
            want = layout([(o.color, o.shape) for o in sc.objects], sc.relation)
            if got == want:  # another kind (a size): only where the reversed layout is held out
                assert shapes.hard_negative_caption(sc, np.random.default_rng(0), "relation") is None, negative
                continue
            assert got[1] == want[1], negative
            reversed_ += 1
    assert reversed_ >= 30
    # the default stream is the one every earlier run used
    assert ct.epoch_negative_captions(scenes, idx, 0, 0) == [
        shapes.hard_negative_caption(scenes[i], np.random.default_rng([0, 0, int(i), 1])) for i in idx]
    canonical = ct.epoch_captions(scenes, idx, 0, 0, canonical=True)
    assert all(shapes.parse_caption(c)[1] in ("left of", "above") for c in canonical)
    assert any(shapes.parse_caption(c)[1] in ("right of", "below") for c in ct.epoch_captions(scenes, idx, 0, 0))


def test_caption_parse_targets_hand_made(tokenizer):
    captions = ["a red circle above a large blue square",
                "there is an orange triangle to the right of a white circle", "a picture of a small green square"]
    targets = ct.caption_parse_targets(tokenizer, captions, 24)
    words = {v: k for k, v in tokenizer.vocab.items()}
    ids = tokenizer(captions)

    def labelled(name, row):  # (token text, class) where the head has a target
        return [(words[ids[row, j]], ct.PARSE_TARGETS[name][targets[name][row, j]])
                for j in np.nonzero(targets[name][row] >= 0)[0]]

    assert labelled("color", 0) == [("circle</w>", "red"), ("square</w>", "blue")]
    assert labelled("shape", 1) == [("triangle</w>", "triangle"), ("circle</w>", "circle")]
    assert labelled("side", 0) == [("large</w>", "below"), ("blue</w>", "below"), ("square</w>", "below")]
    assert labelled("side", 1) == [("white</w>", "left of"), ("circle</w>", "left of")]
    assert labelled("side", 2) == [] and labelled("color", 2) == [("square</w>", "green")]
    with pytest.raises(ValueError, match="text_length"):
        ct.caption_parse_targets(tokenizer, captions[1:2], 8)


def test_parse_loss_teaches_the_tokens_the_side_and_leaves_the_clip_init_alone(tokenizer):
    data = shapes.batch(3, 0, 64, "train")
    two = [i for i, sc in enumerate(data["scenes"]) if len(sc.objects) == 2][:16]
    captions = [data["captions"][i] for i in two]
    images = jnp.asarray(data["images"][two])
    ids = jnp.asarray(ct.tokenize_checked(tokenizer, captions, 24))
    targets = {k: jnp.asarray(v) for k, v in ct.caption_parse_targets(tokenizer, captions, 24).items()}
    cfg = ct.CLIPTrainConfig(model="tiny", steps=20, lr=3e-3, warmup_steps=0, weight_decay=0.0)
    optimizer = ct.make_optimizer(cfg.optim)
    state = ct.init_state(TINY, optimizer, jax.random.key(0), parse_heads=True)
    plain = ct.init_state(TINY, optimizer, jax.random.key(0))
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(plain.params)))
    step = ct.make_train_step(TINY, optimizer, parse_loss_weight=1.0)
    first = None
    for _ in range(20):
        state, metrics = step(state, images, ids, jax.random.key(0), None, targets)
        first = first or metrics
    assert float(metrics["parse_loss"]) < 0.4 * float(first["parse_loss"])
    for name in ("side", "color", "shape"):  # all near chance at init (side: 4 classes, read off the relation word)
        assert float(first[f"parse_{name}_accuracy"]) < 0.5, name
        assert float(metrics[f"parse_{name}_accuracy"]) >= 0.75, name
    assert float(metrics["parse_side_accuracy"]) >= 0.9
    assert float(metrics["loss"]) == pytest.approx(float(metrics["contrastive_loss"] + metrics["parse_loss"]))
    with pytest.raises(ValueError, match="parse heads"):
        step(plain, images, ids, jax.random.key(0), None, targets)


def test_role_targets_hand_made(tokenizer):
    captions = ["a red circle above a large blue square", "a picture of a small green square"]
    targets = ct.caption_parse_targets(tokenizer, captions, 24)["role"]
    words = {v: k for k, v in tokenizer.vocab.items()}
    ids = tokenizer(captions)
    assert (targets >= 0).all()  # every token has a role, "none" included
    tagged = [[(words[ids[row, j]], ct.ROLES[targets[row, j]]) for j in np.nonzero(targets[row])[0]] for row in (0, 1)]
    assert tagged[0] == [("red</w>", "first"), ("circle</w>", "first"), ("large</w>", "second, below"),
                         ("blue</w>", "second, below"), ("square</w>", "second, below")]
    assert tagged[1] == [("small</w>", "first"), ("green</w>", "first"), ("square</w>", "first")]


def test_role_loss_is_the_mean_of_per_class_means():
    rng = np.random.default_rng(0)
    states = rng.standard_normal((2, 6, 4)).astype(np.float32)
    head = {"kernel": rng.standard_normal((4, len(ct.ROLES))).astype(np.float32),
            "bias": rng.standard_normal(len(ct.ROLES)).astype(np.float32)}
    labels = np.array([[0, 0, 0, 0, 1, 5], [0, 0, 0, 1, 1, -1]], np.int32)
    loss, metrics = ct.parse_loss({"role": head}, jnp.asarray(states), {"role": jnp.asarray(labels)})
    logits = states @ head["kernel"] + head["bias"]
    ce = -(logits - np.log(np.exp(logits).sum(-1, keepdims=True)))
    ce = np.take_along_axis(ce, np.maximum(labels, 0)[..., None], -1)[..., 0]
    present = [0, 1, 5]
    np.testing.assert_allclose(float(loss), np.mean([ce[labels == c].mean() for c in present]), rtol=1e-5)
    right = logits.argmax(-1) == labels
    np.testing.assert_allclose(float(metrics["parse_role_accuracy"]), right[labels >= 0].mean(), rtol=1e-6)
    np.testing.assert_allclose(float(metrics["parse_role_worst_class_accuracy"]),
                               min(right[labels == c].mean() for c in present), rtol=1e-6)


def test_heads_added_later_leave_the_first_heads_init_alone():
    """Session 13's color / shape / side heads keep the init they were trained from when new heads exist."""
    key = jax.random.key(0)
    every = ct.init_parse_heads(8, key)
    assert set(every) == set(ct.PARSE_TARGETS) and every["role"]["kernel"].shape == (8, len(ct.ROLES))
    for name, k in zip(("color", "shape", "side"), jax.random.split(key, 3)):
        expected = jax.random.normal(k, (8, len(ct.PARSE_TARGETS[name]))) / np.sqrt(8)
        np.testing.assert_array_equal(every[name]["kernel"], expected, err_msg=name)


def test_parse_heads_subset_and_unknown_names():
    heads = ct.init_parse_heads(8, jax.random.key(0), ["side"])
    assert set(heads) == {"side"} and heads["side"]["kernel"].shape == (8, len(shapes.RELATIONS))
    every = ct.init_parse_heads(8, jax.random.key(0))
    np.testing.assert_array_equal(heads["side"]["kernel"], every["side"]["kernel"])  # init by name, not by count
    with pytest.raises(ValueError, match="parse_targets"):
        ct.init_parse_heads(8, jax.random.key(0), ["side", "size"])


def test_train_refuses_bad_parse_settings_before_any_work():
    with pytest.raises(ValueError, match="parse_loss_weight"):
        ct.train(ct.CLIPTrainConfig(model="tiny", parse_loss_weight=-1.0))
    with pytest.raises(ValueError, match="parse_targets"):
        ct.train(ct.CLIPTrainConfig(model="tiny", parse_loss_weight=1.0, parse_targets=("side", "relation")))


def test_parse_heads_are_saved_beside_the_clip_and_read_back(tmp_path):
    heads = ct.init_parse_heads(8, jax.random.key(0), ["side", "color"])
    ct.save_parse_heads(tmp_path, heads)
    for folder in (tmp_path, tmp_path / "parse_heads"):
        loaded, config = ct.load_parse_heads(folder)
        assert set(loaded) == {"side", "color"} and config["layer"] == -1
        assert config["classes"]["side"] == list(shapes.RELATIONS)
        for name in heads:
            for part in ("kernel", "bias"):
                np.testing.assert_array_equal(np.asarray(loaded[name][part]), np.asarray(heads[name][part]))
    with pytest.raises(FileNotFoundError, match="no parse_heads/.*parse_loss_weight=0"):
        ct.load_parse_heads(tmp_path / "elsewhere")
