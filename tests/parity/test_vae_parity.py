"""KL-VAE parity against diffusers' AutoencoderKL (random weights, float32) and its single-file converter."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL as TorchAutoencoderKL
from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from safetensors.numpy import load_file

from jaxt2i.convert.core import ConversionError
from jaxt2i.convert.vae_keys import (
    diffusers_to_original,
    original_to_diffusers,
    params_from_diffusers,
    params_from_original,
    params_to_diffusers,
)
from jaxt2i.models.vae import (
    PRESETS,
    AutoencoderKL,
    DiagonalGaussian,
    VAEConfig,
    decode_latents,
    encode_to_latents,
)
from tests.parity.sd_reference import sharpen_and_perturb

TOL = 1e-4

# Shapes that exercise what the tiny preset does not: three levels with a repeated width (so the decoder's
# reversed block order matters), two layers per block, and the optional pieces switched off.
KEYMAP_CONFIGS = {
    "tiny": PRESETS["tiny"],
    "three_levels": VAEConfig(block_out_channels=(8, 16, 16), layers_per_block=2, norm_num_groups=4,
                              latent_channels=3, sample_size=16),
    "no_attention_no_quant": VAEConfig(block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4,
                                       mid_block_add_attention=False, use_quant_conv=False,
                                       use_post_quant_conv=False, sample_size=16),
}


def _torch_kwargs(config: VAEConfig) -> dict:
    return {k: v for k, v in config.to_diffusers().items() if not k.startswith("_")}


def torch_vae(config: VAEConfig, seed: int = 0) -> TorchAutoencoderKL:
    """diffusers' model with random weights; norms get non-trivial affine parameters and the attention logits
    are sharpened so that the softmax is far from uniform."""
    torch.manual_seed(seed)
    return sharpen_and_perturb(TorchAutoencoderKL(**_torch_kwargs(config)).eval())


def save_and_load(model: TorchAutoencoderKL, tmp_path) -> tuple[VAEConfig, dict, dict]:
    """save_pretrained (safetensors) -> our config and params; also returns the raw numpy state dict."""
    model.save_pretrained(tmp_path, safe_serialization=True)
    config = VAEConfig.from_diffusers(json.loads((tmp_path / "config.json").read_text()))
    state = load_file(str(tmp_path / "diffusion_pytorch_model.safetensors"))
    return config, params_from_diffusers(state, config, source=str(tmp_path)), state


def nchw(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(np.transpose(x, (0, 3, 1, 2))))


def nhwc(x: torch.Tensor) -> np.ndarray:
    return np.transpose(x.detach().numpy(), (0, 2, 3, 1))


def assert_close(ours, theirs, what: str, tol: float = TOL) -> None:
    ours, theirs = np.asarray(ours), np.asarray(theirs)
    assert ours.shape == theirs.shape, f"{what}: shape {ours.shape} vs {theirs.shape}"
    err = float(np.max(np.abs(ours - theirs)))
    assert err <= tol, f"{what}: max abs diff {err:.3g} > {tol:g}"


def check_parity(model: TorchAutoencoderKL, tmp_path, image_size: int, batch: int = 2) -> None:
    config, params, _ = save_and_load(model, tmp_path)
    rng = np.random.default_rng(0)
    images01 = rng.uniform(0.0, 1.0, (batch, image_size, image_size, 3)).astype(np.float32)
    x = 2.0 * images01 - 1.0
    f = config.downsample_factor
    z = rng.standard_normal((batch, image_size // f, image_size // f, config.latent_channels)).astype(np.float32)
    latents = (0.5 * z).astype(np.float32)  # roughly the scale a sampler produces
    with torch.no_grad():
        posterior = model.encode(nchw(x)).latent_dist
        ref_mean, ref_logvar = nhwc(posterior.mean), nhwc(posterior.logvar)
        ref_decoded = nhwc(model.decode(nchw(z)).sample)
        ref_images = nhwc(((model.decode(nchw(latents) / config.scaling_factor).sample + 1) / 2).clamp(0, 1))

    ours = AutoencoderKL(config)
    encode = jax.jit(lambda p, x: ours.apply({"params": p}, x, method=AutoencoderKL.encode))
    decode = jax.jit(lambda p, z: ours.apply({"params": p}, z, method=AutoencoderKL.decode))
    post = encode(params, jnp.asarray(x))
    assert_close(post.mean, ref_mean, "posterior mean")
    assert_close(post.logvar, ref_logvar, "posterior logvar")
    assert_close(decode(params, jnp.asarray(z)), ref_decoded, "decode(z)")
    to_images = jax.jit(decode_latents, static_argnums=2)
    to_latents = jax.jit(encode_to_latents, static_argnums=2)
    assert_close(to_images(params, jnp.asarray(latents), config), ref_images, "decode_latents")
    assert_close(to_latents(params, jnp.asarray(images01), config), ref_mean * config.scaling_factor,
                 "encode_to_latents")
    # The test means something only if the reference output is not degenerate.
    assert np.std(ref_decoded) > 0.05 and np.std(ref_mean) > 0.05


def test_tiny_parity(tmp_path):
    check_parity(torch_vae(PRESETS["tiny"]), tmp_path, image_size=32)


def test_three_level_parity(tmp_path):
    check_parity(torch_vae(KEYMAP_CONFIGS["three_levels"], seed=1), tmp_path, image_size=16)


@pytest.mark.slow
def test_sd_parity(tmp_path):
    model = torch_vae(PRESETS["sd"])
    assert sum(p.numel() for p in model.parameters()) == 83_653_863
    check_parity(model, tmp_path, image_size=64, batch=1)


@pytest.mark.parametrize("name", sorted(KEYMAP_CONFIGS))
def test_config_round_trip_through_diffusers(name, tmp_path):
    config = KEYMAP_CONFIGS[name]
    TorchAutoencoderKL(**_torch_kwargs(config)).save_pretrained(tmp_path)
    assert VAEConfig.from_diffusers(json.loads((tmp_path / "config.json").read_text())) == config


def test_export_matches_torch_state_dict(tmp_path):
    model = torch_vae(PRESETS["tiny"])
    config, params, state = save_and_load(model, tmp_path)
    exported = params_to_diffusers(params, config)
    assert sorted(exported) == sorted(state)
    for key, value in state.items():
        np.testing.assert_array_equal(exported[key], value, err_msg=key)


def test_legacy_attention_names_load_the_same(tmp_path):
    config, params, state = save_and_load(torch_vae(PRESETS["tiny"]), tmp_path)
    legacy_names = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    legacy = {}
    for key, value in state.items():
        for new, old in legacy_names.items():
            key = key.replace(f".attentions.0.{new}.", f".attentions.0.{old}.")
        legacy[key] = value
    assert any(".proj_attn." in k for k in legacy)
    jax.tree.map(np.testing.assert_array_equal, params_from_diffusers(legacy, config), params)
    legacy["encoder.mid_block.attentions.0.to_q.weight"] = state["encoder.mid_block.attentions.0.to_q.weight"]
    with pytest.raises(ConversionError, match="encoder.mid_block.attentions.0.query.weight"):
        params_from_diffusers(legacy, config)


@pytest.mark.parametrize("name", sorted(KEYMAP_CONFIGS))
def test_original_layout_agrees_with_diffusers_converter(name):
    config = KEYMAP_CONFIGS[name]
    state = {k: v.numpy() for k, v in torch_vae(config).state_dict().items()}
    original = diffusers_to_original(state, config)
    assert all(k.startswith("first_stage_model.") for k in original)
    q = original["first_stage_model.encoder.mid.attn_1.q.weight"] if config.mid_block_add_attention else None
    assert q is None or q.ndim == 4 and q.shape[2:] == (1, 1)
    # Independent code: diffusers' own single-file converter, given the whole "checkpoint" plus an unrelated model.
    checkpoint = {k: torch.from_numpy(v) for k, v in original.items()}
    checkpoint["model.diffusion_model.conv_in.weight"] = torch.zeros(2, 2)
    theirs = convert_ldm_vae_checkpoint(checkpoint, config.to_diffusers())
    assert sorted(theirs) == sorted(state)
    for key, value in theirs.items():
        np.testing.assert_array_equal(value.numpy(), state[key], err_msg=key)
    # Our inverse is exact, and loading either layout gives the same parameters.
    back = original_to_diffusers(original, config)
    assert sorted(back) == sorted(state)
    for key, value in back.items():
        np.testing.assert_array_equal(value, state[key], err_msg=key)
    jax.tree.map(np.testing.assert_array_equal, params_from_original(original, config),
                 params_from_diffusers(state, config))


def test_original_decoder_blocks_are_reversed():
    config = KEYMAP_CONFIGS["three_levels"]
    state = {k: v.numpy() for k, v in torch_vae(config).state_dict().items()}
    original = diffusers_to_original(state, config)
    np.testing.assert_array_equal(original["first_stage_model.decoder.up.2.block.0.conv1.weight"],
                                  state["decoder.up_blocks.0.resnets.0.conv1.weight"])
    np.testing.assert_array_equal(original["first_stage_model.decoder.up.0.block.0.nin_shortcut.weight"],
                                  state["decoder.up_blocks.2.resnets.0.conv_shortcut.weight"])
    assert "first_stage_model.decoder.up.0.upsample.conv.weight" not in original
    assert "first_stage_model.decoder.up.2.upsample.conv.weight" in original


def test_original_errors_name_the_key():
    config = PRESETS["tiny"]
    state = {k: v.numpy() for k, v in torch_vae(config).state_dict().items()}
    original = diffusers_to_original(state, config)
    missing = dict(original)
    del missing["first_stage_model.decoder.up.1.block.0.norm1.bias"]
    with pytest.raises(ConversionError, match=r"first_stage_model\.decoder\.up\.1\.block\.0\.norm1\.bias"):
        original_to_diffusers(missing, config)
    extra = dict(original, **{"first_stage_model.encoder.down.0.attn.0.q.weight": np.zeros((1,))})
    with pytest.raises(ConversionError, match=r"first_stage_model\.encoder\.down\.0\.attn\.0\.q\.weight"):
        original_to_diffusers(extra, config)
    bad = dict(original, **{"first_stage_model.encoder.mid.attn_1.k.weight": np.zeros((64, 64, 3, 3))})
    with pytest.raises(ConversionError, match=r"first_stage_model\.encoder\.mid\.attn_1\.k\.weight"):
        original_to_diffusers(bad, config)
    # Training-loss tensors of standalone VAE files are dropped on purpose.
    with_loss = dict(original, **{"first_stage_model.loss.logvar": np.zeros(())})
    assert sorted(original_to_diffusers(with_loss, config)) == sorted(state)
    with pytest.raises(ConversionError, match="encoder.conv_in.bias"):
        diffusers_to_original({k: v for k, v in state.items() if k != "encoder.conv_in.bias"}, config)
    with pytest.raises(ConversionError, match="encoder.extra.weight"):
        diffusers_to_original(dict(state, **{"encoder.extra.weight": np.zeros(1)}), config)


def test_diffusers_errors_name_the_key():
    config = PRESETS["tiny"]
    state = {k: v.numpy() for k, v in torch_vae(config).state_dict().items()}
    key = "decoder.up_blocks.1.resnets.0.conv_shortcut.weight"
    with pytest.raises(ConversionError, match=key.replace(".", r"\.")):
        params_from_diffusers({k: v for k, v in state.items() if k != key}, config, source="vae.safetensors")
    with pytest.raises(ConversionError, match=r"decoder\.up_blocks\.1\.attentions\.0\.to_q\.weight"):
        params_from_diffusers(dict(state, **{"decoder.up_blocks.1.attentions.0.to_q.weight": np.zeros((1, 1))}),
                              config)
    wrong = dict(state, **{"encoder.conv_out.weight": np.zeros((8, 64, 1, 1), np.float32)})
    with pytest.raises(ConversionError, match=r"^vae\.safetensors: .*encoder\.conv_out\.weight"):
        params_from_diffusers(wrong, config, source="vae.safetensors")


def _distribution_pair(seed: int = 0):
    rng = np.random.default_rng(seed)
    mean = rng.standard_normal((2, 3, 3, 4)).astype(np.float32)
    logvar = rng.uniform(-3.0, 1.0, (2, 3, 3, 4)).astype(np.float32)
    logvar[0, 0, 0, 0], logvar[1, 2, 2, 3] = -45.0, 33.0  # outside the clip range on both sides
    moments = np.concatenate([mean, logvar], axis=-1)
    return DiagonalGaussian.from_moments(jnp.asarray(moments)), DiagonalGaussianDistribution(nchw(moments))


def test_diagonal_gaussian_matches_diffusers():
    ours, theirs = _distribution_pair(0)
    other_ours, other_theirs = _distribution_pair(1)
    rel = lambda a, b: np.max(np.abs(np.asarray(a) - b) / np.maximum(np.abs(b), 1.0))
    assert rel(ours.logvar, nhwc(theirs.logvar)) == 0.0
    assert rel(ours.std, nhwc(theirs.std)) < 1e-6
    assert rel(ours.var, nhwc(theirs.var)) < 1e-6
    assert rel(ours.kl(), theirs.kl().numpy()) < 1e-5
    assert rel(ours.kl(other_ours), theirs.kl(other_theirs).numpy()) < 1e-5
    x = np.random.default_rng(2).standard_normal((2, 3, 3, 4)).astype(np.float32)
    assert rel(ours.nll(jnp.asarray(x)), theirs.nll(nchw(x)).numpy()) < 1e-5
    np.testing.assert_array_equal(ours.mode(), nhwc(theirs.mode()))


def test_diagonal_gaussian_sample_statistics_match_diffusers():
    rng = np.random.default_rng(0)
    mean = rng.standard_normal((1, 2, 2, 3)).astype(np.float32)
    logvar = rng.uniform(-2.0, 1.0, (1, 2, 2, 3)).astype(np.float32)
    moments = np.concatenate([mean, logvar], axis=-1)
    n = 20000
    ours = DiagonalGaussian.from_moments(jnp.asarray(np.repeat(moments, n, axis=0)))
    ours_samples = np.asarray(ours.sample(jax.random.key(0)))
    theirs = DiagonalGaussianDistribution(nchw(np.repeat(moments, n, axis=0)))
    theirs_samples = nhwc(theirs.sample(torch.Generator().manual_seed(0)))
    std = np.exp(0.5 * logvar[0])
    for samples in (ours_samples, theirs_samples):
        # 5 standard errors: fails only on a real bias in the location or scale.
        assert np.all(np.abs(samples.mean(0) - mean[0]) < 5 * std / np.sqrt(n))
        assert np.all(np.abs(samples.std(0) / std - 1.0) < 5 / np.sqrt(2 * n))
    assert np.max(np.abs(ours_samples.std(0) - theirs_samples.std(0)) / std) < 10 / np.sqrt(2 * n)
