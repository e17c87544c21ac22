"""U-Net parity against diffusers' UNet2DConditionModel (random weights, float32) and its single-file converter."""

from __future__ import annotations

import dataclasses
import json

import jax
import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint
from flax import traverse_util
from safetensors.numpy import load_file

from jaxt2i.convert.core import _TRANSFORMS, ConversionError
from jaxt2i.convert.unet_keys import (
    ORIGINAL_PREFIX,
    diffusers_table,
    diffusers_to_original,
    original_to_diffusers,
    params_from_diffusers,
    params_from_original,
    params_to_diffusers,
)
from jaxt2i.models.unet import PRESETS, UNet, UNetConfig, abstract_params
from tests.parity.sd_reference import sharpen_and_perturb

TOL = 1e-4

# tiny_sd1: 1x1-conv projections, a plain block at the bottom (upsampler at output_blocks.M.1.conv);
# tiny_sd2: linear projections, per-block heads, attention everywhere (upsampler at .2.conv), 2 layers per block;
# three_levels: a repeated width (no shortcut in the second down block), two transformer layers per block,
# a context width different from the channels.
PARITY_CONFIGS = {
    "tiny_sd1": (PRESETS["tiny_sd1"], 16),
    "tiny_sd2": (PRESETS["tiny_sd2"], 16),
    "tiny_sd1_inpaint": (dataclasses.replace(PRESETS["tiny_sd1"], in_channels=9), 16),
    "three_levels": (UNetConfig(
        sample_size=8, block_out_channels=(32, 32, 64), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=(1, 2, 4), cross_attention_dim=24, transformer_layers_per_block=2,
        use_linear_projection=True), 8),
}


def _torch_kwargs(config: UNetConfig) -> dict:
    return {k: v for k, v in config.to_diffusers().items() if not k.startswith("_")}


def torch_unet(config: UNetConfig, seed: int = 0) -> UNet2DConditionModel:
    """diffusers' model with random weights; norms get non-trivial affine parameters and attention logits are
    sharpened so that a wrong head split or scale shows up."""
    torch.manual_seed(seed)
    return sharpen_and_perturb(UNet2DConditionModel(**_torch_kwargs(config)).eval())


def torch_forward(model, sample: np.ndarray, timesteps, context: np.ndarray) -> np.ndarray:
    """Runs the torch model on NHWC numpy inputs; returns NHWC numpy."""
    t = torch.tensor(timesteps) if np.ndim(timesteps) else float(timesteps)
    with torch.no_grad():
        out = model(torch.from_numpy(np.ascontiguousarray(sample.transpose(0, 3, 1, 2))), t,
                    torch.from_numpy(context)).sample
    return out.numpy().transpose(0, 2, 3, 1)


def random_inputs(config: UNetConfig, size: int, batch: int = 2, seed: int = 0):
    rng = np.random.default_rng(seed)
    sample = rng.standard_normal((batch, size, size, config.in_channels)).astype(np.float32)
    context = rng.standard_normal((batch, 7, config.cross_attention_dim)).astype(np.float32)
    return sample, context


@pytest.fixture(scope="module", params=sorted(PARITY_CONFIGS))
def saved_unet(request, tmp_path_factory):
    """(config, latent size, torch model, numpy state dict, our params) after save_pretrained -> our loader."""
    config, size = PARITY_CONFIGS[request.param]
    model = torch_unet(config)
    path = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(path, safe_serialization=True)
    loaded_config = UNetConfig.from_diffusers(json.loads((path / "config.json").read_text()))
    assert loaded_config == config
    state = load_file(str(path / "diffusion_pytorch_model.safetensors"))
    params = params_from_diffusers(state, loaded_config, source=str(path))
    return config, size, model, state, params


def test_forward_matches_diffusers(saved_unet):
    config, size, model, _, params = saved_unet
    sample, context = random_inputs(config, size)
    timesteps = np.array([999.0, 37.5], np.float32)  # one integral, one fractional
    expected = torch_forward(model, sample, timesteps, context)
    got = np.asarray(jax.jit(UNet(config).apply)({"params": params}, sample, timesteps, context))
    assert got.shape == expected.shape == sample.shape[:3] + (config.out_channels,)
    assert np.abs(expected).max() > 0.1  # the comparison is not between two near-zero tensors
    np.testing.assert_allclose(got, expected, rtol=0, atol=TOL)


def test_export_round_trip(saved_unet):
    config, _, _, state, params = saved_unet
    exported = params_to_diffusers(params, config)
    assert exported.keys() == state.keys()
    for key, value in state.items():
        np.testing.assert_array_equal(exported[key], value, err_msg=key)


def test_original_layout_matches_diffusers_converter(saved_unet):
    config, _, _, state, params = saved_unet
    original = diffusers_to_original(state, config)
    assert all(k.startswith(ORIGINAL_PREFIX) for k in original)
    # diffusers' own (independent) single-file converter reads our original layout back to the model's keys.
    converted = convert_ldm_unet_checkpoint(dict(original), config.to_diffusers())
    assert converted.keys() == state.keys()
    for key, value in state.items():
        np.testing.assert_array_equal(converted[key], value, err_msg=key)

    # Our inverse is exact, and keys of other models in a full checkpoint are left alone.
    full_checkpoint = dict(original, **{"first_stage_model.decoder.conv_in.weight": np.zeros(1),
                                        "cond_stage_model.transformer.x": np.zeros(1)})
    back = original_to_diffusers(full_checkpoint, config)
    assert back.keys() == state.keys()
    assert all(back[k] is state[k] for k in state)
    from_original = params_from_original(full_checkpoint, config)
    jax.tree.map(np.testing.assert_array_equal, from_original, params)


def test_original_layout_errors_name_the_key(saved_unet):
    config, _, _, state, _ = saved_unet
    original = diffusers_to_original(state, config)
    missing = dict(original)
    dropped = f"{ORIGINAL_PREFIX}middle_block.1.proj_out.weight"
    del missing[dropped]
    with pytest.raises(ConversionError, match=dropped.replace(".", r"\.")):
        original_to_diffusers(missing, config)
    extra_key = f"{ORIGINAL_PREFIX}input_blocks.99.0.in_layers.0.weight"
    with pytest.raises(ConversionError, match=extra_key.replace(".", r"\.")):
        original_to_diffusers(dict(original, **{extra_key: np.zeros(1)}), config)
    with pytest.raises(ConversionError, match="model.diffusion_model"):
        original_to_diffusers({"first_stage_model.x": np.zeros(1)}, config)


@pytest.mark.parametrize("name", ["sd15", "sd15_inpaint", "sd21", "sd2_inpaint"])
def test_full_size_tables_match_diffusers_model(name):
    """Keys and shapes of the full-size models (built on torch's meta device: no memory, no weights)."""
    config = PRESETS[name]
    with torch.device("meta"):
        model = UNet2DConditionModel(**_torch_kwargs(config))
    torch_shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    table = diffusers_table(config)
    assert {r.torch_key for r in table} == set(torch_shapes)
    abstract = traverse_util.flatten_dict(abstract_params(config))
    assert {r.flax_path for r in table} == set(abstract)
    for rule in table:  # the transform of each rule maps the torch shape onto our leaf's shape
        converted = _TRANSFORMS[rule.transform][0](np.empty(torch_shapes[rule.torch_key], np.int8))
        assert converted.shape == abstract[rule.flax_path].shape, rule

    # The original layout at full size (12 input blocks: two-digit indices) through diffusers' converter.
    state = {k: np.full(1, i) for i, k in enumerate(torch_shapes)}
    original = diffusers_to_original(state, config)
    converted = convert_ldm_unet_checkpoint(original, config.to_diffusers())
    assert converted.keys() == state.keys()
    assert all(converted[k] is state[k] for k in state)


def _full_size_parity(name: str):
    config = PRESETS[name]
    model = torch_unet(config)
    state = {k: v.numpy() for k, v in model.state_dict().items()}
    params = params_from_diffusers(state, config, source=name)
    sample, context = random_inputs(config, 64, batch=1)
    context = np.ascontiguousarray(np.tile(context, (1, 11, 1))[:, :77])  # 77 tokens, as from CLIP
    timesteps = np.array([617.5], np.float32)
    expected = torch_forward(model, sample, timesteps, context)
    del model, state
    got = np.asarray(jax.jit(UNet(config).apply)({"params": params}, sample, timesteps, context))
    assert np.abs(expected).max() > 0.1
    np.testing.assert_allclose(got, expected, rtol=0, atol=TOL)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["sd15", "sd21"])
def test_full_size_forward_matches_diffusers(name):
    _full_size_parity(name)
