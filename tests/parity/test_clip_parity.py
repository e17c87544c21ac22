"""CLIP text encoder vs transformers, and our original-layout tables vs diffusers' single-file converters.

References are random-weight transformers models (every parameter perturbed, so zero biases or unit norms
cannot hide a mapping bug), written with ``save_pretrained`` and read back as the loader would.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
safetensors_numpy = pytest.importorskip("safetensors.numpy")

from jaxt2i.convert.clip_keys import (  # noqa: E402
    SD1_PREFIX,
    SD2_PREFIX,
    diffusers_to_original,
    normalize_text_encoder_keys,
    original_to_diffusers,
    text_encoder_to_flax,
)
from jaxt2i.models.clip import PRESETS, CLIPTextConfig, CLIPTextModel, encode_text  # noqa: E402
from jaxt2i.tokenizer import CLIPTokenizer  # noqa: E402

PROMPTS = ["a photo of an astronaut riding a horse on mars", "", "A CAT!! 🐱, in Tokyo 1984 " * 3]
TOL = 1e-4


def torch_model(config: CLIPTextConfig, seed: int = 0):
    """transformers CLIPTextModel[WithProjection] for ``config`` with every parameter randomised."""
    hf_config = transformers.CLIPTextConfig(**config.to_diffusers())
    cls = transformers.CLIPTextModelWithProjection if config.projection_dim else transformers.CLIPTextModel
    torch.manual_seed(seed)
    model = cls(hf_config).eval()
    with torch.no_grad():
        for p in model.parameters():
            # Noise at the scale of transformers' own init keeps activations realistic at full size;
            # constant tensors (LayerNorm weights, zero biases) get 0.05 so they are no longer constant.
            scale = float(p.std()) if p.numel() > 1 and float(p.std()) > 0 else 0.05
            p.add_(torch.randn_like(p) * scale)
    return model


def torch_state_dict(model) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def torch_outputs(model, ids: np.ndarray):
    with torch.no_grad():
        return model(input_ids=torch.from_numpy(ids.astype(np.int64)), output_hidden_states=True)


def ids_for(config: CLIPTextConfig, pad: str) -> np.ndarray:
    ids = CLIPTokenizer.default(pad=pad)(PROMPTS)
    assert config.vocab_size == 49408
    return ids


@functools.lru_cache(maxsize=None)
def jitted(config: CLIPTextConfig):
    return jax.jit(CLIPTextModel(config).apply)


def assert_parity(config: CLIPTextConfig, model, params, ids):
    theirs = torch_outputs(model, ids)
    ours = jitted(config)({"params": params}, jnp.asarray(ids))
    np.testing.assert_allclose(ours.last_hidden_state, theirs.last_hidden_state.numpy(), atol=TOL, rtol=0)
    assert len(ours.hidden_states) == len(theirs.hidden_states) == config.num_layers + 1
    for i, (a, b) in enumerate(zip(ours.hidden_states, theirs.hidden_states)):
        np.testing.assert_allclose(a, b.numpy(), atol=TOL, rtol=0, err_msg=f"hidden_states[{i}]")
    if config.projection_dim:
        np.testing.assert_allclose(ours.text_embeds, theirs.text_embeds.numpy(), atol=TOL, rtol=0)
        with torch.no_grad():  # WithProjection does not return the pooled state: take it from its text model
            pooled = model.text_model(input_ids=torch.from_numpy(ids.astype(np.int64))).pooler_output
    else:
        pooled = theirs.pooler_output
    np.testing.assert_allclose(ours.pooled, pooled.numpy(), atol=TOL, rtol=0)


CASES = {
    "sd1": (PRESETS["tiny_sd1"], "eos"),
    "sd2": (PRESETS["tiny_sd2"], "zero"),
    "sd1_eos_49407_projection": (dataclasses.replace(PRESETS["tiny_sd1"], eos_token_id=49407, projection_dim=24),
                                 "eos"),
    "sd2_projection": (dataclasses.replace(PRESETS["tiny_sd2"], projection_dim=16), "zero"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_parity_from_save_pretrained(case, tmp_path):
    config, pad = CASES[case]
    model = torch_model(config)
    model.save_pretrained(tmp_path, safe_serialization=True)
    assert CLIPTextConfig.from_diffusers(tmp_path) == config  # the config.json transformers wrote
    state_dict = safetensors_numpy.load_file(str(tmp_path / "model.safetensors"))
    params = text_encoder_to_flax(state_dict, config, source=str(tmp_path))
    assert_parity(config, model, params, ids_for(config, pad))
    # Hub checkpoints name the same tensors with "text_model.": both layouts load to the same tree.
    hub_style = {("text_model." + k if not k.startswith(("text_model.", "text_projection")) else k): v
                 for k, v in state_dict.items()}
    again = text_encoder_to_flax(hub_style, config, source="hub-style")
    jax.tree_util.tree_map(np.testing.assert_array_equal, again, params)


def to_torch_tensors(sd):
    return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in sd.items()}


def test_sd1_original_layout_matches_diffusers():
    from diffusers.loaders.single_file_utils import convert_ldm_clip_checkpoint

    config = PRESETS["tiny_sd1"]
    expected = normalize_text_encoder_keys(torch_state_dict(torch_model(config)))
    original = diffusers_to_original(expected, config, SD1_PREFIX)
    assert all(k.startswith("cond_stage_model.transformer.text_model.") for k in original)
    unet_key = {"model.diffusion_model.out.0.weight": np.zeros(3, np.float32)}  # the rest of a real file
    theirs = convert_ldm_clip_checkpoint(to_torch_tensors({**original, **unet_key}))
    assert theirs.keys() == expected.keys()
    for k in expected:
        np.testing.assert_array_equal(theirs[k].numpy(), expected[k], err_msg=k)
    ours = original_to_diffusers({**original, **unet_key}, config, SD1_PREFIX)
    assert ours.keys() == expected.keys()
    for k in expected:
        np.testing.assert_array_equal(ours[k], expected[k], err_msg=k)
    # position_ids buffers in old files are dropped
    with_buffer = dict(original, **{SD1_PREFIX + "text_model.embeddings.position_ids": np.arange(77)[None]})
    assert original_to_diffusers(with_buffer, config, SD1_PREFIX).keys() == expected.keys()


@pytest.mark.parametrize("num_layers", [3, 23])
def test_sd2_original_layout_matches_diffusers(num_layers):
    """23 layers: the real SD 2 layout (24 resblocks; diffusers drops resblocks.23 by name). 3 layers: diffusers'
    ignore list names index 23 only, so it returns the extra (zero) block as layer 3; everything else must agree."""
    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint

    config = dataclasses.replace(PRESETS["tiny_sd2"], num_layers=num_layers)
    model = torch_model(config)
    expected = normalize_text_encoder_keys(torch_state_dict(model))
    original = diffusers_to_original(expected, config, SD2_PREFIX)
    assert original[SD2_PREFIX + "transformer.resblocks.0.attn.in_proj_weight"].shape == (3 * 32, 32)
    assert f"{SD2_PREFIX}transformer.resblocks.{num_layers}.mlp.c_proj.weight" in original
    assert f"{SD2_PREFIX}transformer.resblocks.{num_layers + 1}.ln_1.weight" not in original
    theirs = {k: v.numpy() for k, v in convert_open_clip_checkpoint(model, to_torch_tensors(original)).items()}
    extra = {k for k in theirs if k.startswith(f"text_model.encoder.layers.{num_layers}.")}
    assert len(extra) == (0 if num_layers == 23 else 16)
    assert all(not theirs[k].any() for k in extra)  # the identity block export writes
    assert theirs.keys() - extra == expected.keys()
    for k in expected:
        np.testing.assert_array_equal(theirs[k], expected[k], err_msg=k)
    ours = original_to_diffusers(original, config, SD2_PREFIX)
    assert ours.keys() == expected.keys()
    for k in expected:
        np.testing.assert_array_equal(ours[k], expected[k], err_msg=k)
    # original -> diffusers -> original is exact on every key the folder holds; the rest is the documented fill.
    back = diffusers_to_original(ours, config, SD2_PREFIX)
    assert back.keys() == original.keys()
    for k in original:
        np.testing.assert_array_equal(back[k], original[k], err_msg=k)


def test_openclip_with_projection_matches_diffusers():
    """An OpenCLIP tower with its projection (SDXL's second encoder layout): text_projection is [D, P] (x @ P)."""
    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint

    prefix = "conditioner.embedders.1.model."
    config = dataclasses.replace(PRESETS["tiny_sd2"], projection_dim=16)
    model = torch_model(config)
    expected = normalize_text_encoder_keys(torch_state_dict(model))
    original = diffusers_to_original(expected, config, prefix)
    assert original[prefix + "text_projection"].shape == (32, 16)
    converted = convert_open_clip_checkpoint(model, to_torch_tensors(original), prefix)
    theirs = {k: v.numpy() for k, v in converted.items()}
    extra = {k for k in theirs if k.startswith(f"text_model.encoder.layers.{config.num_layers}.")}
    assert theirs.keys() - extra == expected.keys()
    for k in expected:
        np.testing.assert_array_equal(theirs[k], expected[k], err_msg=k)
    ours = original_to_diffusers(original, config, prefix)
    for k in expected:
        np.testing.assert_array_equal(ours[k], expected[k], err_msg=k)


def test_exported_zero_block_is_identity_for_a_full_tower():
    """Loading our SD 2 export as a full (num_layers + 1)-layer tower: the extra block changes nothing, and
    the penultimate layer of the full tower is SD 2's conditioning."""
    config = PRESETS["tiny_sd2"]
    full = dataclasses.replace(config, num_layers=config.num_layers + 1)
    model = torch_model(config)
    original = diffusers_to_original(torch_state_dict(model), config, SD2_PREFIX)
    params = text_encoder_to_flax(original_to_diffusers(original, config, SD2_PREFIX), config, source="x")
    full_params = text_encoder_to_flax(original_to_diffusers(original, full, SD2_PREFIX), full, source="x")
    ids = jnp.asarray(ids_for(config, "zero"))
    reference = torch_outputs(model, np.asarray(ids)).last_hidden_state.numpy()
    np.testing.assert_allclose(jitted(full)({"params": full_params}, ids).last_hidden_state, reference, atol=TOL)
    encode = jax.jit(encode_text, static_argnames=("config", "layer"))
    np.testing.assert_allclose(encode(full_params, ids, config=full, layer=-2), reference, atol=TOL)
    np.testing.assert_allclose(encode(params, ids, config=config), reference, atol=TOL)


@pytest.mark.slow
@pytest.mark.parametrize("name,pad", [("sd15", "eos"), ("sd21", "zero")])
def test_full_size_parity(name, pad):
    config = PRESETS[name]
    model = torch_model(config)
    params = text_encoder_to_flax(torch_state_dict(model), config, source=name)
    assert sum(p.numel() for p in model.parameters()) == sum(x.size for x in jax.tree_util.tree_leaves(params))
    assert_parity(config, model, params, ids_for(config, pad))
