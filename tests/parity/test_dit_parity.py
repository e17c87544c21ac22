"""DiT parity against diffusers' DiTTransformer2DModel / PixArtTransformer2DModel (random weights, float32), the
conversion both ways, and the original facebookresearch/DiT state-dict layout."""

from __future__ import annotations

import dataclasses
import json

import jax
import numpy as np
import pytest
import torch
from diffusers import DiTTransformer2DModel, PixArtTransformer2DModel
from diffusers.models.embeddings import get_2d_sincos_pos_embed
from flax import traverse_util
from safetensors.numpy import load_file

from jaxt2i.convert import components
from jaxt2i.convert.core import _TRANSFORMS, ConversionError
from jaxt2i.convert.dit_keys import (
    config_from_original,
    diffusers_table,
    original_dit_to_diffusers,
    params_from_diffusers,
    params_to_diffusers,
)
from jaxt2i.convert.io import read_state_dict
from jaxt2i.models.dit import PRESETS, DiT, DiTConfig, abstract_params

TOL = 1e-4

# (config, latent sizes): the configured size and a larger one (the position table is rebuilt for it).
PARITY_CONFIGS = {
    "class": (PRESETS["tiny"], (8, 12)),
    # patch 4, 3 channels, no learned sigma, heads at a DiT paper width (384 / 6)
    "class_p4": (DiTConfig(sample_size=16, patch_size=4, in_channels=3, out_channels=3, num_layers=1,
                           num_attention_heads=6, attention_head_dim=64, num_classes=5), (16, 24)),
    "text": (PRESETS["tiny_text"], (8, 12)),
    # PixArt-1024-like: resolution and aspect-ratio embeddings, interpolation scale 2
    "text_sizes": (DiTConfig(sample_size=16, num_layers=1, num_attention_heads=2, attention_head_dim=24,
                             conditioning="text", caption_channels=20, use_additional_conditions=True,
                             interpolation_scale=2.0), (16, 8)),
}


def torch_class(config: DiTConfig):
    return DiTTransformer2DModel if config.conditioning == "class" else PixArtTransformer2DModel


def torch_kwargs(config: DiTConfig) -> dict:
    return {k: v for k, v in config.to_diffusers().items() if not k.startswith("_")}


def randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every parameter random (diffusers and DiT zero some at init): weights N(0, 1/fan_in), biases N(0, 0.1^2);
    q and k doubled so attention is far from uniform and a wrong head split or mask shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim > 1:
                fan_in = int(np.prod(p.shape[1:]))
                value = torch.randn(p.shape, generator=g) / fan_in ** 0.5
                p.copy_(value * (2.0 if ".to_q." in name or ".to_k." in name else 1.0))
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return model.eval()


def torch_forward(model, config: DiTConfig, sample, timesteps, condition, mask=None, sizes=None) -> np.ndarray:
    """The diffusers model on NHWC numpy inputs; returns NHWC numpy."""
    x = torch.from_numpy(np.ascontiguousarray(sample.transpose(0, 3, 1, 2)))
    t = torch.from_numpy(np.asarray(timesteps))
    with torch.no_grad():
        if config.conditioning == "class":
            out = model(x, t, torch.from_numpy(condition)).sample
        else:
            added = {k: torch.from_numpy(v) for k, v in (sizes or {"resolution": None, "aspect_ratio": None}).items()
                     if v is not None} or {"resolution": None, "aspect_ratio": None}
            out = model(x, encoder_hidden_states=torch.from_numpy(condition), timestep=t, added_cond_kwargs=added,
                        encoder_attention_mask=None if mask is None else torch.from_numpy(mask)).sample
    return out.numpy().transpose(0, 2, 3, 1)


def random_inputs(config: DiTConfig, size: int, batch: int = 2, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    inputs = {"sample": rng.standard_normal((batch, size, size, config.in_channels)).astype(np.float32),
              "timesteps": np.array([999.0, 37.5], np.float32)[:batch]}
    if config.conditioning == "class":
        inputs["condition"] = np.array([1, config.null_class], np.int64)[:batch]
        return inputs
    inputs["condition"] = rng.standard_normal((batch, 6, config.caption_channels)).astype(np.float32)
    inputs["mask"] = np.array([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]], np.float32)[:batch]  # padding in row 0
    if config.use_additional_conditions:
        pixels = 8 * size
        inputs["sizes"] = {"resolution": np.array([[pixels, pixels]] * batch, np.float32),
                           "aspect_ratio": np.ones((batch, 1), np.float32)}
    return inputs


def jax_forward(config: DiTConfig, params, inputs: dict) -> np.ndarray:
    kwargs = dict(inputs.get("sizes") or {})
    if "mask" in inputs:
        kwargs["condition_mask"] = inputs["mask"]
    return np.asarray(jax.jit(DiT(config).apply)({"params": params}, inputs["sample"], inputs["timesteps"],
                                                 inputs["condition"], **kwargs))


@pytest.fixture(scope="module", params=sorted(PARITY_CONFIGS))
def saved_dit(request, tmp_path_factory):
    """(config, sizes, torch model, numpy state dict, our params) after save_pretrained -> our loader."""
    config, sizes = PARITY_CONFIGS[request.param]
    torch.manual_seed(0)
    model = randomize(torch_class(config)(**torch_kwargs(config)))
    path = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(path, safe_serialization=True)
    loaded_config = DiTConfig.from_diffusers(json.loads((path / "config.json").read_text()))
    assert loaded_config == config
    state = load_file(str(path / "diffusion_pytorch_model.safetensors"))
    params = components.params_from_torch("dit", state, loaded_config, source=str(path))
    return config, sizes, model, state, params


def test_forward_matches_diffusers(saved_dit):
    config, sizes, model, _, params = saved_dit
    for size in sizes:
        inputs = random_inputs(config, size)
        expected = torch_forward(model, config, inputs["sample"], inputs["timesteps"], inputs["condition"],
                                 inputs.get("mask"), inputs.get("sizes"))
        got = jax_forward(config, params, inputs)
        assert got.shape == expected.shape == (2, size, size, config.out_channels)
        assert np.abs(expected).max() > 0.1  # the comparison is not between two near-zero tensors
        np.testing.assert_allclose(got, expected, rtol=0, atol=TOL, err_msg=f"latent size {size}")
        if "mask" in inputs:  # the padded text positions change diffusers' output unless masked
            unmasked = torch_forward(model, config, inputs["sample"], inputs["timesteps"], inputs["condition"],
                                     None, inputs.get("sizes"))
            assert np.abs(got - unmasked)[0].max() > 10 * TOL


def test_export_round_trip(saved_dit):
    config, _, _, state, params = saved_dit
    exported = params_to_diffusers(params, config)
    jax.tree.map(np.testing.assert_array_equal, exported, dict(state))  # same keys, same tensors
    jax.tree.map(np.testing.assert_array_equal, params_from_diffusers(exported, config), params)


def test_conversion_errors_name_the_key(saved_dit):
    config, _, _, state, _ = saved_dit
    dropped = "transformer_blocks.0.attn1.to_k.bias"
    with pytest.raises(ConversionError, match=dropped.replace(".", r"\.")):
        params_from_diffusers({k: v for k, v in state.items() if k != dropped}, config)
    with pytest.raises(ConversionError, match=r"transformer_blocks\.9\.ff\.net\.2\.bias"):
        params_from_diffusers(dict(state, **{"transformer_blocks.9.ff.net.2.bias": np.zeros(1)}), config)
    with pytest.raises(ConversionError, match=r"pos_embed\.proj\.weight"):
        params_from_diffusers(dict(state, **{"pos_embed.proj.weight": np.zeros((1, 1, 1, 1), np.float32)}), config)


# -- the original facebookresearch/DiT layout --------------------------------------------------------------------------


def original_state_dict(state: dict, config: DiTConfig) -> dict:
    """A diffusers DiT state dict (shared embedders: block 0's) written in the original DiT code's key names."""
    out = {"x_embedder.proj.weight": state["pos_embed.proj.weight"],
           "x_embedder.proj.bias": state["pos_embed.proj.bias"],
           "pos_embed": get_2d_sincos_pos_embed(config.width, config.base_grid, base_size=config.base_grid,
                                                output_type="pt").float()[None].numpy(),
           "final_layer.linear.weight": state["proj_out_2.weight"], "final_layer.linear.bias": state["proj_out_2.bias"],
           "final_layer.adaLN_modulation.1.weight": state["proj_out_1.weight"],
           "final_layer.adaLN_modulation.1.bias": state["proj_out_1.bias"]}
    emb = "transformer_blocks.0.norm1.emb"
    for leaf in ("weight", "bias"):
        out[f"t_embedder.mlp.0.{leaf}"] = state[f"{emb}.timestep_embedder.linear_1.{leaf}"]
        out[f"t_embedder.mlp.2.{leaf}"] = state[f"{emb}.timestep_embedder.linear_2.{leaf}"]
    out["y_embedder.embedding_table.weight"] = state[f"{emb}.class_embedder.embedding_table.weight"]
    for i in range(config.num_layers):
        t = f"transformer_blocks.{i}"
        for leaf in ("weight", "bias"):
            out[f"blocks.{i}.attn.qkv.{leaf}"] = np.concatenate(
                [state[f"{t}.attn1.to_{n}.{leaf}"] for n in "qkv"], axis=0)
            for original, diffusers in [("attn.proj", "attn1.to_out.0"), ("mlp.fc1", "ff.net.0.proj"),
                                        ("mlp.fc2", "ff.net.2"), ("adaLN_modulation.1", "norm1.linear")]:
                out[f"blocks.{i}.{original}.{leaf}"] = state[f"{t}.{diffusers}.{leaf}"]
    return out


def tied_embedders(state: dict, config: DiTConfig) -> dict:
    """The diffusers state dict with every block's timestep/label embedder replaced by block 0's."""
    tied = dict(state)
    for key in state:
        if key.startswith("transformer_blocks.0.norm1.emb."):
            for i in range(1, config.num_layers):
                tied[key.replace("transformer_blocks.0.", f"transformer_blocks.{i}.", 1)] = state[key]
    return tied


@pytest.mark.parametrize("name, num_heads", [("class", 2), ("class_p4", None)])
def test_original_checkpoint_loads_like_diffusers(name, num_heads, tmp_path):
    config, _ = PARITY_CONFIGS[name]
    config = dataclasses.replace(config, num_layers=2)
    torch.manual_seed(1)
    model = randomize(torch_class(config)(**torch_kwargs(config)))
    state = tied_embedders({k: v.numpy() for k, v in model.state_dict().items()}, config)
    path = tmp_path / "DiT-tiny.pt"
    torch.save({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in original_state_dict(state, config).items()},
               path)
    original = read_state_dict(path)
    assert config_from_original(original, num_heads=num_heads) == config
    converted = original_dit_to_diffusers(original, source=str(path))
    assert converted.keys() == state.keys()
    params = params_from_diffusers(converted, config, source=str(path))
    jax.tree.map(np.testing.assert_array_equal, params, params_from_diffusers(state, config))


def test_original_checkpoint_errors():
    config = dataclasses.replace(PARITY_CONFIGS["class"][0], num_layers=1)
    state = {k: v.numpy() for k, v in randomize(torch_class(config)(**torch_kwargs(config))).state_dict().items()}
    original = original_state_dict(state, config)
    with pytest.raises(ConversionError, match=r"blocks\.0\.mlp\.fc1\.bias"):
        original_dit_to_diffusers({k: v for k, v in original.items() if k != "blocks.0.mlp.fc1.bias"})
    with pytest.raises(ConversionError, match=r"blocks\.0\.attn\.q_norm\.weight"):
        original_dit_to_diffusers(dict(original, **{"blocks.0.attn.q_norm.weight": np.ones(16)}))
    with pytest.raises(ConversionError, match="learned position table"):
        original_dit_to_diffusers(dict(original, pos_embed=original["pos_embed"] + 0.01))
    with pytest.raises(ConversionError, match="num_heads"):
        config_from_original(original)  # width 32 is none of the paper's sizes
    with pytest.raises(ConversionError, match="'ema'"):
        original_dit_to_diffusers({"ema.x_embedder.proj.weight": np.zeros(1)})


# -- full-size key tables (torch's meta device: no memory, no weights) -------------------------------------------------


@pytest.mark.parametrize("config", [PRESETS["DiT-XL/2"], PRESETS["PixArt-alpha-512"],
                                    dataclasses.replace(PRESETS["PixArt-alpha-512"], sample_size=128)],
                         ids=["DiT-XL/2", "PixArt-alpha-512", "PixArt-alpha-1024"])
def test_full_size_tables_match_diffusers_model(config):
    with torch.device("meta"):
        model = torch_class(config)(**torch_kwargs(config))
    torch_shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    table = diffusers_table(config)
    assert sorted(r.torch_key for r in table) == sorted(torch_shapes)
    # each rule's transform maps the torch shape onto our leaf's shape (zero-stride views: no memory)
    converted = {r.flax_path: _TRANSFORMS[r.transform][0](np.broadcast_to(np.int8(0), torch_shapes[r.torch_key])).shape
                 for r in table}
    abstract = traverse_util.flatten_dict(abstract_params(config))
    assert converted == {path: leaf.shape for path, leaf in abstract.items()}
