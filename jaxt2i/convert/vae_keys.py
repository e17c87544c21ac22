"""Key tables for the KL autoencoder: diffusers ``AutoencoderKL`` <-> our tree, and original <-> diffusers.

Three layouts meet here:

* **ours** (see :mod:`jaxt2i.models.vae`): NHWC Flax tree, e.g. ``encoder/down_blocks_0/resnets_1/conv1/kernel``.
* **diffusers**: ``encoder.down_blocks.0.resnets.1.conv1.weight``; mid-block attention as Linear layers
  ``to_q/to_k/to_v/to_out.0`` plus ``group_norm`` (older diffusers files say ``query/key/value/proj_attn``;
  :func:`normalize_diffusers_keys` renames those).
* **original** (CompVis latent-diffusion / single-file SD checkpoints, under ``first_stage_model.``):
  ``encoder.down.0.block.1.conv1.weight``, ``encoder.mid.block_1``/``attn_1``/``block_2``, attention
  ``norm/q/k/v/proj_out`` stored as 1x1 convolutions ``[C, C, 1, 1]``, ``nin_shortcut``, ``norm_out``, and the
  decoder's ``up.N`` numbered from the *highest* resolution, i.e. reversed relative to diffusers' ``up_blocks``.

:func:`diffusers_table` is the Rule table for :func:`jaxt2i.convert.core.to_flax`/``to_torch``;
:func:`original_to_diffusers` and :func:`diffusers_to_original` are explicit key maps with per-key transforms.
"""

from __future__ import annotations

import re
from typing import Any, Iterable, Mapping

import numpy as np

from jaxt2i.convert.core import ConversionError, Rule, conv, dense, norm, to_flax, to_torch
from jaxt2i.models.vae import VAEConfig, abstract_params

ORIGINAL_PREFIX = "first_stage_model."
# Keys of an original VAE checkpoint that belong to its training losses (LPIPS, discriminator), not the autoencoder.
ORIGINAL_LOSS_PREFIX = "loss."

# ---------------------------------------------------------------------------------------------------------------
# diffusers <-> ours


def _resnet_rules(flax_prefix: tuple[str, ...], torch_prefix: str, shortcut: bool) -> list[Rule]:
    rules = (norm(flax_prefix + ("norm1",), f"{torch_prefix}.norm1")
             + conv(flax_prefix + ("conv1",), f"{torch_prefix}.conv1")
             + norm(flax_prefix + ("norm2",), f"{torch_prefix}.norm2")
             + conv(flax_prefix + ("conv2",), f"{torch_prefix}.conv2"))
    if shortcut:
        rules += conv(flax_prefix + ("conv_shortcut",), f"{torch_prefix}.conv_shortcut")
    return rules


def _attention_rules(flax_prefix: tuple[str, ...], torch_prefix: str) -> list[Rule]:
    attn = flax_prefix + ("attention",)
    return (norm(flax_prefix + ("group_norm",), f"{torch_prefix}.group_norm")
            + dense(attn + ("query",), f"{torch_prefix}.to_q")
            + dense(attn + ("key",), f"{torch_prefix}.to_k")
            + dense(attn + ("value",), f"{torch_prefix}.to_v")
            + dense(attn + ("out",), f"{torch_prefix}.to_out.0"))


def _mid_rules(flax_prefix: tuple[str, ...], torch_prefix: str, config: VAEConfig) -> list[Rule]:
    rules = _resnet_rules(flax_prefix + ("resnets_0",), f"{torch_prefix}.resnets.0", shortcut=False)
    if config.mid_block_add_attention:
        rules += _attention_rules(flax_prefix + ("attentions_0",), f"{torch_prefix}.attentions.0")
    return rules + _resnet_rules(flax_prefix + ("resnets_1",), f"{torch_prefix}.resnets.1", shortcut=False)


def _encoder_rules(config: VAEConfig) -> list[Rule]:
    widths = config.block_out_channels
    rules = conv(("encoder", "conv_in"), "encoder.conv_in")
    in_ch = widths[0]
    for i, out_ch in enumerate(widths):
        for j in range(config.layers_per_block):
            rules += _resnet_rules(("encoder", f"down_blocks_{i}", f"resnets_{j}"),
                                   f"encoder.down_blocks.{i}.resnets.{j}", shortcut=in_ch != out_ch)
            in_ch = out_ch
        if i != len(widths) - 1:
            rules += conv(("encoder", f"down_blocks_{i}", "downsample", "conv"),
                          f"encoder.down_blocks.{i}.downsamplers.0.conv")
    rules += _mid_rules(("encoder", "mid_block"), "encoder.mid_block", config)
    rules += norm(("encoder", "conv_norm_out"), "encoder.conv_norm_out")
    return rules + conv(("encoder", "conv_out"), "encoder.conv_out")


def _decoder_rules(config: VAEConfig) -> list[Rule]:
    widths = config.block_out_channels[::-1]
    rules = conv(("decoder", "conv_in"), "decoder.conv_in")
    rules += _mid_rules(("decoder", "mid_block"), "decoder.mid_block", config)
    in_ch = widths[0]
    for i, out_ch in enumerate(widths):
        for j in range(config.layers_per_block + 1):
            rules += _resnet_rules(("decoder", f"up_blocks_{i}", f"resnets_{j}"),
                                   f"decoder.up_blocks.{i}.resnets.{j}", shortcut=in_ch != out_ch)
            in_ch = out_ch
        if i != len(widths) - 1:
            rules += conv(("decoder", f"up_blocks_{i}", "upsample", "conv"), f"decoder.up_blocks.{i}.upsamplers.0.conv")
    rules += norm(("decoder", "conv_norm_out"), "decoder.conv_norm_out")
    return rules + conv(("decoder", "conv_out"), "decoder.conv_out")


def diffusers_table(config: VAEConfig) -> list[Rule]:
    """Rules between a diffusers ``AutoencoderKL`` state dict (current attention names) and our parameter tree."""
    rules = _encoder_rules(config) + _decoder_rules(config)
    if config.use_quant_conv:
        rules += conv(("quant_conv",), "quant_conv")
    if config.use_post_quant_conv:
        rules += conv(("post_quant_conv",), "post_quant_conv")
    return rules


_LEGACY_ATTENTION = re.compile(r"^(.*\.attentions\.\d+)\.(query|key|value|proj_attn)\.(weight|bias)$")
_LEGACY_TO_CURRENT = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def normalize_diffusers_keys(state_dict: Mapping[str, Any], *, source: str = "state dict") -> dict[str, Any]:
    """Renames legacy diffusers attention keys (``query/key/value/proj_attn``) to ``to_q/to_k/to_v/to_out.0``.

    Every other key is kept as is. A file holding both spellings of the same tensor is an error.
    """
    out: dict[str, Any] = {}
    legacy_of: dict[str, str] = {}
    for key, value in state_dict.items():
        match = _LEGACY_ATTENTION.match(key)
        new_key = f"{match[1]}.{_LEGACY_TO_CURRENT[match[2]]}.{match[3]}" if match else key
        if new_key in out:
            legacy = legacy_of.get(new_key, key)
            raise ConversionError(f"{source}: both {legacy} and its current name {new_key} are present; "
                                  "the file mixes two attention layouts. Keep one.")
        if match:
            legacy_of[new_key] = key
        out[new_key] = value
    return out


def params_from_diffusers(
    state_dict: Mapping[str, Any], config: VAEConfig, *, source: str = "state dict", dtype: Any = None
) -> dict:
    """A diffusers ``AutoencoderKL`` state dict (numpy arrays, either attention naming) -> our parameter tree."""
    return to_flax(normalize_diffusers_keys(state_dict, source=source), diffusers_table(config),
                   abstract_params(config), source=source, dtype=dtype)


def params_to_diffusers(params: Mapping[str, Any], config: VAEConfig) -> dict[str, np.ndarray]:
    """Our parameter tree -> a diffusers ``AutoencoderKL`` state dict (numpy, current attention names)."""
    return to_torch(params, diffusers_table(config))


# ---------------------------------------------------------------------------------------------------------------
# original (first_stage_model.*) <-> diffusers

def _squeeze_1x1(key: str, t: np.ndarray) -> np.ndarray:
    t = np.asarray(t)
    if t.ndim == 2:  # some converted files already store the attention projections as linear weights
        return t
    if t.ndim == 4 and t.shape[2:] == (1, 1):
        return t[:, :, 0, 0]
    raise ConversionError(f"{key}: expected a 1x1 convolution weight [C, C, 1, 1], got shape {t.shape}.")


# transform name -> (original -> diffusers, diffusers -> original); each takes (key, tensor).
_ORIGINAL_TRANSFORMS = {
    "identity": (lambda key, t: t, lambda key, t: t),
    "conv1x1_to_linear": (_squeeze_1x1, lambda key, t: np.asarray(t)[:, :, None, None]),
}


def _pairs(original: str, diffusers: str, transform_weight: str = "identity") -> list[tuple[str, str, str]]:
    return [(f"{original}.weight", f"{diffusers}.weight", transform_weight),
            (f"{original}.bias", f"{diffusers}.bias", "identity")]


def _original_resnet(original: str, diffusers: str, shortcut: bool) -> list[tuple[str, str, str]]:
    pairs = []
    for name in ("norm1", "conv1", "norm2", "conv2"):
        pairs += _pairs(f"{original}.{name}", f"{diffusers}.{name}")
    if shortcut:
        pairs += _pairs(f"{original}.nin_shortcut", f"{diffusers}.conv_shortcut")
    return pairs


def _original_mid(original: str, diffusers: str, config: VAEConfig) -> list[tuple[str, str, str]]:
    pairs = _original_resnet(f"{original}.block_1", f"{diffusers}.resnets.0", shortcut=False)
    if config.mid_block_add_attention:
        attn_o, attn_d = f"{original}.attn_1", f"{diffusers}.attentions.0"
        pairs += _pairs(f"{attn_o}.norm", f"{attn_d}.group_norm")
        for name_o, name_d in (("q", "to_q"), ("k", "to_k"), ("v", "to_v"), ("proj_out", "to_out.0")):
            pairs += _pairs(f"{attn_o}.{name_o}", f"{attn_d}.{name_d}", "conv1x1_to_linear")
    return pairs + _original_resnet(f"{original}.block_2", f"{diffusers}.resnets.1", shortcut=False)


def original_key_map(config: VAEConfig) -> list[tuple[str, str, str]]:
    """``(original key, diffusers key, transform)`` for every VAE tensor; original keys carry no prefix."""
    widths = config.block_out_channels
    levels = len(widths)
    pairs = _pairs("encoder.conv_in", "encoder.conv_in")
    in_ch = widths[0]
    for i, out_ch in enumerate(widths):
        for j in range(config.layers_per_block):
            pairs += _original_resnet(f"encoder.down.{i}.block.{j}", f"encoder.down_blocks.{i}.resnets.{j}",
                                      shortcut=in_ch != out_ch)
            in_ch = out_ch
        if i != levels - 1:
            pairs += _pairs(f"encoder.down.{i}.downsample.conv", f"encoder.down_blocks.{i}.downsamplers.0.conv")
    pairs += _original_mid("encoder.mid", "encoder.mid_block", config)
    pairs += _pairs("encoder.norm_out", "encoder.conv_norm_out")
    pairs += _pairs("encoder.conv_out", "encoder.conv_out")

    pairs += _pairs("decoder.conv_in", "decoder.conv_in")
    pairs += _original_mid("decoder.mid", "decoder.mid_block", config)
    in_ch = widths[-1]
    for i in range(levels):  # diffusers' up_blocks.i is the original's up.(levels - 1 - i)
        level = levels - 1 - i
        out_ch = widths[level]
        for j in range(config.layers_per_block + 1):
            pairs += _original_resnet(f"decoder.up.{level}.block.{j}", f"decoder.up_blocks.{i}.resnets.{j}",
                                      shortcut=in_ch != out_ch)
            in_ch = out_ch
        if level != 0:
            pairs += _pairs(f"decoder.up.{level}.upsample.conv", f"decoder.up_blocks.{i}.upsamplers.0.conv")
    pairs += _pairs("decoder.norm_out", "decoder.conv_norm_out")
    pairs += _pairs("decoder.conv_out", "decoder.conv_out")

    if config.use_quant_conv:
        pairs += _pairs("quant_conv", "quant_conv")
    if config.use_post_quant_conv:
        pairs += _pairs("post_quant_conv", "post_quant_conv")
    return pairs


def original_to_diffusers(
    state_dict: Mapping[str, Any],
    config: VAEConfig,
    *,
    prefix: str = ORIGINAL_PREFIX,
    source: str = "checkpoint",
    ignore_prefixes: Iterable[str] = (ORIGINAL_LOSS_PREFIX,),
) -> dict[str, Any]:
    """The VAE part of an original checkpoint -> a diffusers ``AutoencoderKL`` state dict.

    Args:
      state_dict: a whole single-file checkpoint (keys outside ``prefix`` belong to other models and are not
        looked at) or, with ``prefix=""``, a standalone original VAE file.
      prefix: where the VAE lives in ``state_dict``.
      ignore_prefixes: key prefixes (after ``prefix``) that may be present and are dropped: by default the
        training-loss modules (``loss.*``) that standalone VAE checkpoints sometimes carry.

    Raises:
      ConversionError: naming the key, for a missing or unexpected VAE tensor or a malformed attention weight.
    """
    ignore_prefixes = tuple(ignore_prefixes)
    vae = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
    pairs = original_key_map(config)
    missing = [prefix + o for o, _, _ in pairs if o not in vae]
    if missing:
        raise ConversionError(
            f"{source}: missing {len(missing)} VAE tensor(s), e.g. {', '.join(missing[:5])}. Is the VAE config "
            "right for this checkpoint (block_out_channels, layers_per_block, mid_block_add_attention)?")
    known = {o for o, _, _ in pairs}
    unexpected = sorted(prefix + k for k in vae if k not in known and not k.startswith(ignore_prefixes))
    if unexpected:
        raise ConversionError(
            f"{source}: {len(unexpected)} unexpected VAE tensor(s), e.g. {', '.join(unexpected[:5])}. "
            "Is this checkpoint for a different VAE architecture?")
    return {d: _ORIGINAL_TRANSFORMS[t][0](prefix + o, vae[o]) for o, d, t in pairs}


def diffusers_to_original(
    state_dict: Mapping[str, Any], config: VAEConfig, *, prefix: str = ORIGINAL_PREFIX, source: str = "state dict"
) -> dict[str, Any]:
    """A diffusers ``AutoencoderKL`` state dict (current names) -> original keys under ``prefix``.

    Every tensor must be accounted for: missing or unexpected keys raise :class:`ConversionError`.
    """
    pairs = original_key_map(config)
    missing = [d for _, d, _ in pairs if d not in state_dict]
    if missing:
        raise ConversionError(f"{source}: missing {len(missing)} tensor(s), e.g. {', '.join(missing[:5])}.")
    known = {d for _, d, _ in pairs}
    unexpected = sorted(k for k in state_dict if k not in known)
    if unexpected:
        raise ConversionError(f"{source}: {len(unexpected)} unexpected tensor(s), e.g. {', '.join(unexpected[:5])}.")
    return {prefix + o: _ORIGINAL_TRANSFORMS[t][1](d, state_dict[d]) for o, d, t in pairs}


def params_from_original(
    state_dict: Mapping[str, Any],
    config: VAEConfig,
    *,
    prefix: str = ORIGINAL_PREFIX,
    source: str = "checkpoint",
    dtype: Any = None,
) -> dict:
    """The VAE of an original single-file checkpoint (numpy arrays) -> our parameter tree."""
    diffusers = original_to_diffusers(state_dict, config, prefix=prefix, source=source)
    return params_from_diffusers(diffusers, config, source=source, dtype=dtype)


def params_to_original(params: Mapping[str, Any], config: VAEConfig, *, prefix: str = ORIGINAL_PREFIX) -> dict:
    """Our parameter tree -> original-layout VAE tensors under ``prefix`` (numpy)."""
    return diffusers_to_original(params_to_diffusers(params, config), config, prefix=prefix)
