"""DALL-E's transformer: mask patterns, what each position can see, cached decoding, the loss, parameter counts."""

from __future__ import annotations

import dataclasses
import functools
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxt2i.convert import native
from jaxt2i.convert.components import component
from jaxt2i.models import attention_masks, dalle
from jaxt2i.models.dalle_sampling import teacher_forced_logits
from jaxt2i.nn.attention import default_backend

TINY = dalle.get_config("tiny")


def _direct_mask(kind: str, text_length: int, height: int, width: int, kernel: int) -> np.ndarray:
    """Which position may attend to which, decided one pair at a time on the (row, column) grid."""
    length = text_length + height * width
    out = np.zeros((length, length), bool)
    for i in range(length):
        for j in range(i + 1):  # causal: only earlier positions and itself
            if i < text_length or j < text_length:  # text sees earlier text; every image token sees all text
                out[i, j] = True
                continue
            (ri, ci), (rj, cj) = divmod(i - text_length, width), divmod(j - text_length, width)
            if kind == "full":
                out[i, j] = True
            elif kind == "row":  # the rest of its own row, and the previous row from its own column on
                out[i, j] = rj == ri or (rj == ri - 1 and cj >= ci)
            elif kind == "column":
                out[i, j] = cj == ci
            else:  # conv: cells of the causal kernel; a column past the grid's edge continues on the next row
                half = kernel // 2
                cells = [(ri - dr, ci + dc) for dr in range(half + 1) for dc in range(-half, half + 1)]
                out[i, j] = any(r * width + c == rj * width + cj for r, c in cells)
    return out


@pytest.mark.parametrize("layout", [(3, 3, 4, 3), (2, 4, 3, 5), (1, 2, 5, 1)])
@pytest.mark.parametrize("kind", attention_masks.KINDS)
def test_each_mask_kind_matches_a_direct_construction(kind, layout):
    text_length, height, width, kernel = layout
    got = attention_masks.attention_mask(kind, text_length, height, width, kernel)
    np.testing.assert_array_equal(got, _direct_mask(kind, text_length, height, width, kernel))


def test_masks_on_the_papers_4x4_example():
    """Fig. 11 of the paper: 6 text tokens, a 4x4 grid; row attention sees the token and the previous 4 (extent 5),
    ending at the token above; a 3x3 convolutional kernel."""
    text, width = 6, 4
    row = attention_masks.attention_mask("row", text, 4, width, 3)
    image = lambda r, c: text + r * width + c
    assert sorted(np.flatnonzero(row[image(2, 1)][text:])) == [5, 6, 7, 8, 9]  # (1,1) .. (2,1)
    conv = attention_masks.attention_mask("conv", text, 4, width, 3)
    assert sorted(np.flatnonzero(conv[image(2, 1)][text:])) == [4, 5, 6, 8, 9]  # (1,0),(1,1),(1,2),(2,0),(2,1)
    column = attention_masks.attention_mask("column", text, 4, width, 3)
    assert sorted(np.flatnonzero(column[image(3, 2)][text:])) == [2, 6, 10, 14]
    for mask in (row, conv, column):
        assert mask[image(0, 0), :text].all() and not mask[:text, text:].any()
        assert np.array_equal(mask[:text, :text], np.tril(np.ones((text, text), bool)))


def test_the_papers_layer_schedule():
    kinds = attention_masks.layer_kinds("dalle", 64)
    assert kinds[-1] == "conv"
    assert [i for i, k in enumerate(kinds) if k == "column"] == list(range(2, 63, 4))
    assert kinds.count("row") == 64 - 1 - 16
    assert dalle.get_config("dalle_12b").layer_kinds == kinds
    assert TINY.layer_kinds == ("row", "row", "column", "conv")
    masks = attention_masks.layer_masks(TINY.layer_kinds, 6, 4, 4, 3)
    assert masks.shape == (4, 22, 22)
    np.testing.assert_array_equal(masks[2], attention_masks.attention_mask("column", 6, 4, 4, 3))


def test_config_refuses_bad_layer_kinds_and_kernels():
    with pytest.raises(ValueError, match="one per layer"):
        dataclasses.replace(TINY, layer_kinds=("row", "diagonal", "row", "row"))
    with pytest.raises(ValueError, match="one per layer"):
        dataclasses.replace(TINY, layer_kinds=("row",))
    with pytest.raises(ValueError, match="odd"):
        dataclasses.replace(TINY, conv_kernel=4)
    assert dataclasses.replace(TINY, layer_kinds="full").layer_kinds == ("full",) * 4


def _tokens(config, batch, seed=0):
    k1, k2 = jax.random.split(jax.random.PRNGKey(seed))
    text = jax.random.randint(k1, (batch, config.text_length), 0, config.text_vocab_total)
    image = jax.random.randint(k2, (batch, config.image_height, config.image_width), 0, config.image_vocab_size)
    return text, image


@functools.lru_cache(maxsize=None)
def _model_and_params(config, seed=0):
    model = dalle.DalleTransformer(config)
    variables = model.init(jax.random.PRNGKey(seed), *_tokens(config, 1))
    return model, nn.unbox(variables["params"])


def _reachable(masks: np.ndarray) -> np.ndarray:
    """[L, L]: whether the input at j can influence the output at i through the layers' masks in turn."""
    reach = np.eye(masks.shape[-1], dtype=bool)
    for mask in masks:
        reach = (mask.astype(int) @ reach.astype(int)) > 0
    return reach


@pytest.mark.parametrize("kinds", [("full",), ("row",), ("column",), ("conv",), TINY.layer_kinds])
def test_a_token_changes_only_the_outputs_its_masks_reach(kinds):
    """Changing the token at position j changes the states exactly at the positions i the masks connect to j."""
    config = dataclasses.replace(TINY, num_layers=len(kinds), layer_kinds=kinds)
    model, params = _model_and_params(config)
    text, image = _tokens(config, 1, seed=1)
    base = np.concatenate([np.asarray(text), np.asarray(image).reshape(1, -1)], axis=1)[0]  # [L]
    length, t = config.sequence_length, config.text_length
    changed = np.repeat(base[None], length + 1, axis=0)  # row j changes position j; the last row changes nothing
    for j in range(length):
        vocab = config.text_vocab_total if j < t else config.image_vocab_size
        changed[j, j] = (changed[j, j] + 1) % vocab
    states = jax.jit(functools.partial(model.apply, method=dalle.DalleTransformer.states))(
        {"params": params}, changed[:, :t], changed[:, t:])
    differs = np.abs(np.asarray(states[:-1]) - np.asarray(states[-1:])).max(axis=-1) > 1e-6  # [j, i]
    expected = _reachable(attention_masks.layer_masks(kinds, t, config.image_height, config.image_width,
                                                      config.conv_kernel))
    np.testing.assert_array_equal(differs.T, expected)


@pytest.mark.parametrize("backend", ["xla", "chunked"])
def test_cached_decoding_gives_the_full_forward_logits_at_every_position(backend):
    model, params = _model_and_params(TINY)
    text, image = _tokens(TINY, 2, seed=3)
    with default_backend(backend):  # the full forward's attention; one query per cached step
        text_logits, image_logits = jax.jit(model.apply)({"params": params}, text, image)
    assert text_logits.shape == (2, TINY.text_length - 1, TINY.text_vocab_total)
    assert image_logits.shape == (2, TINY.image_length, TINY.image_vocab_size)
    cached = jax.jit(teacher_forced_logits, static_argnums=0)(model, params, text, image)
    np.testing.assert_allclose(np.asarray(cached), np.asarray(image_logits), atol=1e-5, rtol=0)


def test_remat_changes_nothing_in_the_forward():
    model, params = _model_and_params(TINY)
    text, image = _tokens(TINY, 2, seed=4)
    plain = model.apply({"params": params}, text, image)
    remat = dalle.DalleTransformer(TINY, remat=True).apply({"params": params}, text, image)
    for a, b in zip(plain, remat):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6, rtol=0)


def test_bfloat16_compute_keeps_float32_logits_and_a_bfloat16_cache():
    _, params = _model_and_params(TINY)
    model = dalle.DalleTransformer(TINY, dtype=jnp.bfloat16)
    text, image = _tokens(TINY, 2, seed=7)
    logits, cache = model.apply({"params": params}, text, method=dalle.DalleTransformer.prefill)
    assert logits.dtype == jnp.float32 and bool(jnp.isfinite(logits).all())
    assert {leaf.dtype for leaf in jax.tree.leaves(cache)} == {jnp.dtype(jnp.bfloat16)}
    _, reference = model.apply({"params": params}, text, image)
    assert reference.dtype == jnp.float32
    # The same bfloat16 arithmetic on both paths; 1e-2 is bfloat16's resolution at these magnitudes.
    np.testing.assert_allclose(np.asarray(logits), np.asarray(reference[:, 0]), atol=1e-2, rtol=0)


def test_the_loss_weights_text_and_image_as_configured():
    config = TINY
    text, image = _tokens(config, 2, seed=5)
    key_t, key_i = jax.random.split(jax.random.PRNGKey(6))
    text_logits = jax.random.normal(key_t, (2, config.text_length - 1, config.text_vocab_total))
    image_logits = jax.random.normal(key_i, (2, config.image_length, config.image_vocab_size))

    def mean_ce(logits, targets):  # written out: -log softmax at the target, averaged
        logp = np.asarray(jax.nn.log_softmax(logits, axis=-1))
        targets = np.asarray(targets).reshape(logp.shape[:2])
        return -np.mean(np.take_along_axis(logp, targets[..., None], axis=-1))

    text_ce, image_ce = mean_ce(text_logits, text[:, 1:]), mean_ce(image_logits, image)
    loss, parts = dalle.weighted_loss(text_logits, image_logits, text, image)
    np.testing.assert_allclose(float(loss), text_ce / 8 + 7 * image_ce / 8, rtol=1e-6)
    np.testing.assert_allclose([float(parts["text_loss"]), float(parts["image_loss"])], [text_ce, image_ce],
                               rtol=1e-6)
    loss, _ = dalle.weighted_loss(text_logits, image_logits, text, image, text_weight=0.25, image_weight=2.0)
    np.testing.assert_allclose(float(loss), 0.25 * text_ce + 2.0 * image_ce, rtol=1e-6)
    assert (config.text_loss_weight, config.image_loss_weight) == (1 / 8, 7 / 8)


def test_text_tokens_get_one_pad_per_position_after_the_eos():
    config = dataclasses.replace(TINY, text_length=6)
    eos = 39
    ids = np.array([[38, 5, 7, eos, eos, eos], [38, eos, 0, 0, 0, 0], [38, 1, 2, 3, 4, 5]])
    pads = config.text_vocab_size + np.arange(6)
    np.testing.assert_array_equal(dalle.prepare_text_tokens(ids, eos, config), [
        [38, 5, 7, eos, pads[4], pads[5]],
        [38, eos, pads[2], pads[3], pads[4], pads[5]],
        [38, 1, 2, 3, 4, 5]])
    np.testing.assert_array_equal(dalle.empty_caption(config, 2), np.stack([pads, pads]))
    with pytest.raises(ValueError, match=r"\[B, 6\]"):
        dalle.prepare_text_tokens(ids[:, :4], eos, config)


def test_big_kernels_carry_logical_axis_names():
    boxed = dalle.abstract_params(TINY, boxed=True)
    names = lambda *path: functools.reduce(lambda t, k: t[k], path, boxed).names
    assert names("blocks_0", "attn", "query", "kernel") == ("embed", "heads")
    assert names("blocks_0", "attn", "out", "kernel") == ("heads", "embed")
    assert names("blocks_0", "mlp", "fc", "kernel") == ("embed", "mlp")
    assert names("image_embed", "embedding") == ("vocab", "embed")
    plain = dalle.abstract_params(TINY, jnp.bfloat16)
    assert all(isinstance(x, jax.ShapeDtypeStruct) and x.dtype == jnp.bfloat16 for x in jax.tree.leaves(plain))


def test_the_component_type_round_trips_its_config_and_matches_init():
    entry = component("dalle_transformer")
    data = json.loads(json.dumps(native.config_to_dict(TINY)))
    back = native.config_from_dict(entry.config_cls, data, source="test")
    assert back == TINY
    shapes = lambda tree: jax.tree.map(lambda x: (x.shape, x.dtype), tree)
    assert shapes(entry.abstract_params(back)) == shapes(_model_and_params(TINY)[1])


def _count_from_the_paper(c: dalle.DalleConfig) -> int:
    d, text_rows = c.width, c.text_vocab_size + c.text_length
    embeddings = text_rows * d + c.text_length * d + c.image_vocab_size * d + (c.image_height + c.image_width) * d
    layer = 4 * (d * d + d) + (d * 4 * d + 4 * d) + (4 * d * d + d) + 2 * 2 * d  # attention, MLP, two LayerNorms
    heads = 2 * d + (d * text_rows + text_rows) + (d * c.image_vocab_size + c.image_vocab_size)
    return embeddings + c.num_layers * layer + heads


def test_the_12b_preset_has_twelve_billion_parameters():
    config = dalle.get_config("dalle_12b")
    assert (config.num_layers, config.num_heads, config.width, config.text_length) == (64, 62, 3968, 256)
    assert (config.image_height, config.image_width, config.text_vocab_size, config.image_vocab_size) == (
        32, 32, 16384, 8192)
    count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(dalle.abstract_params(config)))
    assert count == _count_from_the_paper(config) == 12_293_849_088
