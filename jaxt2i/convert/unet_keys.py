"""Key tables of the Stable Diffusion U-Net.

* :func:`diffusers_table`: diffusers ``UNet2DConditionModel`` state-dict keys <-> our Flax tree
  (:class:`jaxt2i.models.unet.UNet`), as :class:`~jaxt2i.convert.core.Rule` s for ``to_flax`` / ``to_torch``.
* :func:`original_key_map`, :func:`original_to_diffusers`, :func:`diffusers_to_original`: the original (CompVis /
  Stability) single-file layout ``model.diffusion_model.*`` <-> diffusers keys. The two layouts store every U-Net
  tensor with the same shape (SD1's 1x1-conv ``proj_in``/``proj_out`` are 1x1 convs in both; SD2's are Linear in
  both), so the map is a pure renaming; only the names differ:

  ================================  =============================================================
  original                          diffusers
  ================================  =============================================================
  time_embed.0 / .2                 time_embedding.linear_1 / linear_2
  input_blocks.0.0                  conv_in
  input_blocks.N.0 (N >= 1)         down_blocks.b.resnets.l       (N = 1 + b * (L + 1) + l)
  input_blocks.N.1                  down_blocks.b.attentions.l
  input_blocks.N.0.op               down_blocks.b.downsamplers.0.conv   (N = 1 + b * (L + 1) + L)
  middle_block.0 / .1 / .2          mid_block.resnets.0 / attentions.0 / resnets.1
  output_blocks.M.0                 up_blocks.u.resnets.l         (M = u * (L + 1) + l)
  output_blocks.M.1                 up_blocks.u.attentions.l
  output_blocks.M.1.conv / .2.conv  up_blocks.u.upsamplers.0.conv (l = L; .2 when the block has attention)
  out.0 / out.2                     conv_norm_out / conv_out
  in_layers.0 / in_layers.2         norm1 / conv1                 (inside a ResNet block)
  emb_layers.1                      time_emb_proj
  out_layers.0 / out_layers.3       norm2 / conv2
  skip_connection                   conv_shortcut
  ================================  =============================================================

  Inside a spatial transformer the names agree (norm, proj_in, transformer_blocks.k.{norm1, attn1.to_q, ...,
  ff.net.0.proj, ff.net.2}, proj_out).
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from jaxt2i.convert.core import ConversionError, Rule, conv, dense, norm, rename_keys, to_flax, to_torch
from jaxt2i.models.unet import UNetConfig, abstract_params

ORIGINAL_PREFIX = "model.diffusion_model."

Path = tuple[str, ...]

_RESNET_ORIGINAL_NAMES = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}


# -- diffusers <-> Flax ----------------------------------------------------------------------------------------------


def _resnet_rules(f: Path, t: str, in_channels: int, out_channels: int) -> list[Rule]:
    rules = (norm(f + ("norm1",), f"{t}.norm1") + conv(f + ("conv1",), f"{t}.conv1")
             + dense(f + ("time_emb_proj",), f"{t}.time_emb_proj")
             + norm(f + ("norm2",), f"{t}.norm2") + conv(f + ("conv2",), f"{t}.conv2"))
    if in_channels != out_channels:
        rules += conv(f + ("conv_shortcut",), f"{t}.conv_shortcut")
    return rules


def _projection_rules(f: Path, t: str, linear: bool) -> list[Rule]:
    """proj_in/proj_out: a torch Linear (SD2) or 1x1 Conv2d (SD1); always a Flax Dense on our side."""
    if linear:
        return dense(f, t)
    return [Rule(f + ("kernel",), f"{t}.weight", "conv1x1_linear"), Rule(f + ("bias",), f"{t}.bias")]


def _attention_rules(f: Path, t: str) -> list[Rule]:
    return (dense(f + ("query",), f"{t}.to_q", bias=False) + dense(f + ("key",), f"{t}.to_k", bias=False)
            + dense(f + ("value",), f"{t}.to_v", bias=False) + dense(f + ("out",), f"{t}.to_out.0"))


def _transformer_rules(f: Path, t: str, depth: int, linear: bool) -> list[Rule]:
    rules = norm(f + ("norm",), f"{t}.norm") + _projection_rules(f + ("proj_in",), f"{t}.proj_in", linear)
    for k in range(depth):
        fb, tb = f + (f"transformer_blocks_{k}",), f"{t}.transformer_blocks.{k}"
        rules += (norm(fb + ("norm1",), f"{tb}.norm1") + _attention_rules(fb + ("attn1",), f"{tb}.attn1")
                  + norm(fb + ("norm2",), f"{tb}.norm2") + _attention_rules(fb + ("attn2",), f"{tb}.attn2")
                  + norm(fb + ("norm3",), f"{tb}.norm3")
                  + dense(fb + ("ff", "proj"), f"{tb}.ff.net.0.proj") + dense(fb + ("ff", "out"), f"{tb}.ff.net.2"))
    return rules + _projection_rules(f + ("proj_out",), f"{t}.proj_out", linear)


def up_resnet_in_channels(config: UNetConfig, up_index: int, layer: int) -> int:
    """Input channels (hidden + concatenated skip) of ResNet ``layer`` in up block ``up_index``."""
    reversed_channels = list(reversed(config.block_out_channels))
    out = reversed_channels[up_index]
    prev_out = reversed_channels[max(up_index - 1, 0)]
    skip_source = reversed_channels[min(up_index + 1, config.num_blocks - 1)]
    hidden = prev_out if layer == 0 else out
    skip = skip_source if layer == config.layers_per_block else out
    return hidden + skip


def diffusers_table(config: UNetConfig) -> list[Rule]:
    """Rules mapping every diffusers ``UNet2DConditionModel`` tensor of ``config`` to a leaf of our tree."""
    cfg, lin = config, config.use_linear_projection
    rules = conv(("conv_in",), "conv_in")
    rules += dense(("time_embedding", "linear_1"), "time_embedding.linear_1")
    rules += dense(("time_embedding", "linear_2"), "time_embedding.linear_2")

    for b, channels in enumerate(cfg.block_out_channels):
        f, t = (f"down_blocks_{b}",), f"down_blocks.{b}"
        for layer in range(cfg.layers_per_block):
            in_channels = channels if layer else cfg.block_out_channels[max(b - 1, 0)]
            rules += _resnet_rules(f + (f"resnets_{layer}",), f"{t}.resnets.{layer}", in_channels, channels)
            if cfg.down_has_attention(b):
                rules += _transformer_rules(f + (f"attentions_{layer}",), f"{t}.attentions.{layer}",
                                            cfg.transformer_depth(b), lin)
        if b < cfg.num_blocks - 1:
            rules += conv(f + ("downsamplers_0", "conv"), f"{t}.downsamplers.0.conv")

    mid = cfg.block_out_channels[-1]
    rules += _resnet_rules(("mid_block", "resnets_0"), "mid_block.resnets.0", mid, mid)
    rules += _transformer_rules(("mid_block", "attentions_0"), "mid_block.attentions.0", cfg.transformer_depth(-1),
                                lin)
    rules += _resnet_rules(("mid_block", "resnets_1"), "mid_block.resnets.1", mid, mid)

    for u, channels in enumerate(reversed(cfg.block_out_channels)):
        f, t = (f"up_blocks_{u}",), f"up_blocks.{u}"
        for layer in range(cfg.layers_per_block + 1):
            rules += _resnet_rules(f + (f"resnets_{layer}",), f"{t}.resnets.{layer}",
                                   up_resnet_in_channels(cfg, u, layer), channels)
            if cfg.up_has_attention(u):
                rules += _transformer_rules(f + (f"attentions_{layer}",), f"{t}.attentions.{layer}",
                                            cfg.transformer_depth(cfg.num_blocks - 1 - u), lin)
        if u < cfg.num_blocks - 1:
            rules += conv(f + ("upsamplers_0", "conv"), f"{t}.upsamplers.0.conv")

    rules += norm(("conv_norm_out",), "conv_norm_out") + conv(("conv_out",), "conv_out")
    return rules


def diffusers_keys(config: UNetConfig) -> list[str]:
    """All diffusers state-dict keys of a U-Net with this config, in table order."""
    return [rule.torch_key for rule in diffusers_table(config)]


def params_from_diffusers(
    state_dict: Mapping[str, Any], config: UNetConfig, *, source: str = "state dict", dtype: Any = None
) -> dict:
    """A diffusers ``UNet2DConditionModel`` state dict (numpy arrays) -> our parameter tree (checked, see to_flax)."""
    return to_flax(state_dict, diffusers_table(config), abstract_params(config), source=source, dtype=dtype)


def params_to_diffusers(params: Mapping[str, Any], config: UNetConfig) -> dict[str, np.ndarray]:
    """Our parameter tree -> a diffusers ``UNet2DConditionModel`` state dict (numpy)."""
    return to_torch(params, diffusers_table(config))


# -- original single file <-> diffusers ------------------------------------------------------------------------------


def _module_prefixes(config: UNetConfig) -> list[tuple[str, str, bool]]:
    """(diffusers module prefix, original module prefix, is_resnet) for every module of the U-Net."""
    cfg = config
    per_block = cfg.layers_per_block + 1
    pairs = [("time_embedding.linear_1", "time_embed.0", False), ("time_embedding.linear_2", "time_embed.2", False),
             ("conv_in", "input_blocks.0.0", False)]
    for b in range(cfg.num_blocks):
        for layer in range(cfg.layers_per_block):
            n = 1 + b * per_block + layer
            pairs.append((f"down_blocks.{b}.resnets.{layer}", f"input_blocks.{n}.0", True))
            if cfg.down_has_attention(b):
                pairs.append((f"down_blocks.{b}.attentions.{layer}", f"input_blocks.{n}.1", False))
        if b < cfg.num_blocks - 1:
            n = 1 + b * per_block + cfg.layers_per_block
            pairs.append((f"down_blocks.{b}.downsamplers.0.conv", f"input_blocks.{n}.0.op", False))
    pairs += [("mid_block.resnets.0", "middle_block.0", True), ("mid_block.attentions.0", "middle_block.1", False),
              ("mid_block.resnets.1", "middle_block.2", True)]
    for u in range(cfg.num_blocks):
        for layer in range(per_block):
            m = u * per_block + layer
            pairs.append((f"up_blocks.{u}.resnets.{layer}", f"output_blocks.{m}.0", True))
            if cfg.up_has_attention(u):
                pairs.append((f"up_blocks.{u}.attentions.{layer}", f"output_blocks.{m}.1", False))
        if u < cfg.num_blocks - 1:
            m = u * per_block + cfg.layers_per_block
            slot = 2 if cfg.up_has_attention(u) else 1
            pairs.append((f"up_blocks.{u}.upsamplers.0.conv", f"output_blocks.{m}.{slot}.conv", False))
    pairs += [("conv_norm_out", "out.0", False), ("conv_out", "out.2", False)]
    return pairs


def _to_original(key: str, prefixes: list[tuple[str, str, bool]]) -> str:
    for diffusers_prefix, original_prefix, is_resnet in prefixes:
        if key.startswith(diffusers_prefix + "."):
            rest = key[len(diffusers_prefix) + 1:]
            if is_resnet:
                layer, _, leaf = rest.partition(".")
                rest = f"{_RESNET_ORIGINAL_NAMES[layer]}.{leaf}"
            return original_prefix + "." + rest
    raise AssertionError(f"no original name for diffusers key {key}")  # the table and the prefixes disagree


def original_key_map(config: UNetConfig, prefix: str = ORIGINAL_PREFIX) -> dict[str, str]:
    """Original single-file key (with ``prefix``) -> diffusers key, for every U-Net tensor of ``config``."""
    prefixes = _module_prefixes(config)
    return {prefix + _to_original(key, prefixes): key for key in diffusers_keys(config)}


def original_to_diffusers(
    state_dict: Mapping[str, np.ndarray], config: UNetConfig, *, prefix: str = ORIGINAL_PREFIX,
    source: str = "checkpoint",
) -> dict[str, np.ndarray]:
    """Original-layout U-Net tensors -> diffusers keys (tensors unchanged; the layouts share shapes).

    Only keys under ``prefix`` are considered: a full single-file checkpoint also holds the VAE
    (``first_stage_model.``), the text encoder (``cond_stage_model.``) and maybe EMA weights, which belong to
    their own converters. Every key under ``prefix`` must be a U-Net tensor of ``config`` and every U-Net tensor
    must be present, else :class:`ConversionError` names the key.
    """
    unet_part = {k: v for k, v in state_dict.items() if k.startswith(prefix)}
    if not unet_part:
        raise ConversionError(f"{source}: no U-Net tensors (keys starting with {prefix!r}); is this a Stable "
                              "Diffusion single-file checkpoint?")
    return rename_keys(unet_part, original_key_map(config, prefix), source=source)


def diffusers_to_original(
    state_dict: Mapping[str, np.ndarray], config: UNetConfig, *, prefix: str = ORIGINAL_PREFIX,
    source: str = "state dict",
) -> dict[str, np.ndarray]:
    """diffusers U-Net keys -> original single-file keys under ``prefix``; exact inverse of
    :func:`original_to_diffusers`."""
    inverse = {diffusers: original for original, diffusers in original_key_map(config, prefix).items()}
    return rename_keys(state_dict, inverse, source=source)


def params_from_original(
    state_dict: Mapping[str, Any], config: UNetConfig, *, prefix: str = ORIGINAL_PREFIX, source: str = "checkpoint",
    dtype: Any = None,
) -> dict:
    """The U-Net part of an original single-file checkpoint -> our parameter tree."""
    diffusers = original_to_diffusers(state_dict, config, prefix=prefix, source=source)
    return params_from_diffusers(diffusers, config, source=source, dtype=dtype)


def params_to_original(
    params: Mapping[str, Any], config: UNetConfig, *, prefix: str = ORIGINAL_PREFIX
) -> dict[str, np.ndarray]:
    """Our parameter tree -> original single-file U-Net keys under ``prefix``."""
    return diffusers_to_original(params_to_diffusers(params, config), config, prefix=prefix)
