"""Key tables of the diffusion transformers (:mod:`jaxt2i.models.dit`), both layouts.

* :func:`diffusers_table`: diffusers ``DiTTransformer2DModel`` (class layout) or ``PixArtTransformer2DModel`` (text
  layout) state-dict keys <-> our Flax tree, as :class:`~jaxt2i.convert.core.Rule` s for ``to_flax`` / ``to_torch``.
  Self- and cross-attention projections are ``attn{1,2}.to_q/to_k/to_v/to_out.0`` there, ``query/key/value/out``
  here; the feed-forward is ``ff.net.0.proj`` / ``ff.net.2`` there, ``ff/proj`` / ``ff/out`` here; everything else
  keeps its name (dots become path steps). The fixed position table is not a tensor of either.
* :func:`original_dit_to_diffusers`: the state dict of the original facebookresearch/DiT code (e.g. the released
  ``DiT-XL-2-256x256.pt``) -> diffusers keys; :func:`config_from_original` infers its :class:`DiTConfig`.

  ======================================  ===================================================================
  original                                diffusers
  ======================================  ===================================================================
  x_embedder.proj                         pos_embed.proj
  t_embedder.mlp.0 / .2                   transformer_blocks.N.norm1.emb.timestep_embedder.linear_1 / 2
  y_embedder.embedding_table              transformer_blocks.N.norm1.emb.class_embedder.embedding_table
  pos_embed                               (none: the fixed sine-cosine table; checked, then dropped)
  blocks.N.attn.qkv (fused q, k, v)       transformer_blocks.N.attn1.to_q / to_k / to_v
  blocks.N.attn.proj                      transformer_blocks.N.attn1.to_out.0
  blocks.N.mlp.fc1 / fc2                  transformer_blocks.N.ff.net.0.proj / ff.net.2
  blocks.N.adaLN_modulation.1             transformer_blocks.N.norm1.linear
  final_layer.adaLN_modulation.1          proj_out_1
  final_layer.linear                      proj_out_2
  ======================================  ===================================================================

  The original model has one timestep and one label embedder; diffusers keeps a copy in every block (and
  conditions the final layer on block 0's), so they are copied into every block, as diffusers' own conversion
  script does. Note the timestep features differ slightly between the two codes (frequency shift 1 in diffusers,
  0 in the original); converted weights reproduce diffusers' ``DiTPipeline``.
"""

from __future__ import annotations

import math
import re
from typing import Any, Mapping

import numpy as np

from jaxt2i.convert.core import ConversionError, Rule, conv, dense, to_flax, to_torch
from jaxt2i.models.dit import CLASS, DiTConfig, abstract_params
from jaxt2i.nn.embeddings import sincos_position_table_2d

Path = tuple[str, ...]

# Attention heads of the original DiT sizes, by width (the original state dict does not record them).
ORIGINAL_HEADS_BY_WIDTH = {1152: 16, 1024: 16, 768: 12, 384: 6}
# Largest deviation accepted between a checkpoint's stored pos_embed and the table we rebuild.
_POS_EMBED_ATOL = 1e-5


# -- diffusers <-> Flax ----------------------------------------------------------------------------------------------


def _attention_rules(f: Path, t: str) -> list[Rule]:
    return (dense(f + ("query",), f"{t}.to_q") + dense(f + ("key",), f"{t}.to_k") + dense(f + ("value",), f"{t}.to_v")
            + dense(f + ("out",), f"{t}.to_out.0"))


def _feed_forward_rules(f: Path, t: str) -> list[Rule]:
    return dense(f + ("proj",), f"{t}.net.0.proj") + dense(f + ("out",), f"{t}.net.2")


def _timestep_mlp_rules(f: Path, t: str) -> list[Rule]:
    return dense(f + ("linear_1",), f"{t}.linear_1") + dense(f + ("linear_2",), f"{t}.linear_2")


def _class_block_rules(f: Path, t: str) -> list[Rule]:
    emb_f, emb_t = f + ("norm1", "emb"), f"{t}.norm1.emb"
    return (_timestep_mlp_rules(emb_f + ("timestep_embedder",), f"{emb_t}.timestep_embedder")
            + [Rule(emb_f + ("class_embedder", "embedding"), f"{emb_t}.class_embedder.embedding_table.weight")]
            + dense(f + ("norm1", "linear"), f"{t}.norm1.linear")
            + _attention_rules(f + ("attn1",), f"{t}.attn1") + _feed_forward_rules(f + ("ff",), f"{t}.ff"))


def _text_block_rules(f: Path, t: str) -> list[Rule]:
    return ([Rule(f + ("scale_shift_table",), f"{t}.scale_shift_table")]
            + _attention_rules(f + ("attn1",), f"{t}.attn1") + _attention_rules(f + ("attn2",), f"{t}.attn2")
            + _feed_forward_rules(f + ("ff",), f"{t}.ff"))


def _text_trunk_rules(config: DiTConfig) -> list[Rule]:
    emb_f, emb_t = ("adaln_single", "emb"), "adaln_single.emb"
    rules = _timestep_mlp_rules(emb_f + ("timestep_embedder",), f"{emb_t}.timestep_embedder")
    if config.use_additional_conditions:
        for name in ("resolution_embedder", "aspect_ratio_embedder"):
            rules += _timestep_mlp_rules(emb_f + (name,), f"{emb_t}.{name}")
    rules += dense(("adaln_single", "linear"), "adaln_single.linear")
    rules += _timestep_mlp_rules(("caption_projection",), "caption_projection")
    return rules


def diffusers_table(config: DiTConfig) -> list[Rule]:
    """Rules mapping every diffusers tensor of ``config`` (DiT or PixArt layout) to a leaf of our tree."""
    rules = conv(("pos_embed", "proj"), "pos_embed.proj")
    class_layout = config.conditioning == CLASS
    if not class_layout:
        rules += _text_trunk_rules(config)
    block_rules = _class_block_rules if class_layout else _text_block_rules
    for i in range(config.num_layers):
        rules += block_rules((f"transformer_blocks_{i}",), f"transformer_blocks.{i}")
    if class_layout:
        return rules + dense(("proj_out_1",), "proj_out_1") + dense(("proj_out_2",), "proj_out_2")
    return rules + [Rule(("scale_shift_table",), "scale_shift_table")] + dense(("proj_out",), "proj_out")


def diffusers_keys(config: DiTConfig) -> list[str]:
    """All diffusers state-dict keys of a transformer with this config, in table order."""
    return [rule.torch_key for rule in diffusers_table(config)]


def params_from_diffusers(
    state_dict: Mapping[str, Any], config: DiTConfig, *, source: str = "state dict", dtype: Any = None
) -> dict:
    """A diffusers ``DiTTransformer2DModel`` / ``PixArtTransformer2DModel`` state dict (numpy) -> our parameter tree
    (checked key by key, see :func:`jaxt2i.convert.core.to_flax`)."""
    return to_flax(state_dict, diffusers_table(config), abstract_params(config), source=source, dtype=dtype)


def params_to_diffusers(params: Mapping[str, Any], config: DiTConfig) -> dict[str, np.ndarray]:
    """Our parameter tree -> a diffusers state dict (numpy) of the same layout."""
    return to_torch(params, diffusers_table(config))


# -- original facebookresearch/DiT -> diffusers ----------------------------------------------------------------------

_ORIGINAL_BLOCK = re.compile(r"blocks\.(\d+)\.")
_ORIGINAL_BLOCK_NAMES = {  # original module in a block -> diffusers module in transformer_blocks.N
    "attn.proj": "attn1.to_out.0",
    "mlp.fc1": "ff.net.0.proj",
    "mlp.fc2": "ff.net.2",
    "adaLN_modulation.1": "norm1.linear",
}
_ORIGINAL_TOP_NAMES = {
    "x_embedder.proj": "pos_embed.proj",
    "final_layer.adaLN_modulation.1": "proj_out_1",
    "final_layer.linear": "proj_out_2",
}
_ORIGINAL_SHARED_NAMES = {  # copied into every block
    "t_embedder.mlp.0": "norm1.emb.timestep_embedder.linear_1",
    "t_embedder.mlp.2": "norm1.emb.timestep_embedder.linear_2",
    "y_embedder.embedding_table": "norm1.emb.class_embedder.embedding_table",
}


def _original_depth(state_dict: Mapping[str, Any], source: str) -> int:
    blocks = {int(m.group(1)) for k in state_dict if (m := _ORIGINAL_BLOCK.match(k))}
    if not blocks or "x_embedder.proj.weight" not in state_dict:
        raise ConversionError(f"{source}: not an original DiT state dict (no x_embedder.proj.weight / blocks.N.*). "
                              "A training checkpoint holds it under 'ema' or 'model'; pass that dict.")
    if blocks != set(range(len(blocks))):
        raise ConversionError(f"{source}: block indices {sorted(blocks)} are not 0..{len(blocks) - 1}.")
    return len(blocks)


def _expected_original_keys(depth: int) -> set[str]:
    modules = list(_ORIGINAL_TOP_NAMES) + list(_ORIGINAL_SHARED_NAMES)
    for i in range(depth):
        modules += [f"blocks.{i}.{name}" for name in list(_ORIGINAL_BLOCK_NAMES) + ["attn.qkv"]]
    keys = {f"{m}.{leaf}" for m in modules for leaf in ("weight", "bias")}
    return (keys - {"y_embedder.embedding_table.bias"}) | {"pos_embed"}


def _check_pos_embed(table: np.ndarray, width: int, source: str) -> None:
    """The stored position table must be the fixed sine-cosine one we rebuild (it is dropped, not loaded)."""
    tokens = table.reshape(-1, width).shape[0]
    side = math.isqrt(tokens)
    if side * side != tokens:
        raise ConversionError(f"{source}: pos_embed has {tokens} positions, not a square grid.", torch_key="pos_embed")
    expected = sincos_position_table_2d(width, side, side)
    error = float(np.max(np.abs(table.reshape(tokens, width).astype(np.float64) - expected)))
    if error > _POS_EMBED_ATOL:
        raise ConversionError(f"{source}: pos_embed differs from the fixed 2-D sine-cosine table by {error:.3g}; a "
                              "learned position table is not supported.", torch_key="pos_embed")


def original_dit_to_diffusers(state_dict: Mapping[str, Any], *, source: str = "checkpoint") -> dict[str, np.ndarray]:
    """Original DiT state dict (``DiT-XL-2-256x256.pt`` layout, numpy) -> diffusers ``DiTTransformer2DModel`` keys.

    The fused ``attn.qkv`` is split into ``to_q``, ``to_k``, ``to_v``; the shared timestep and label embedders are
    copied into every block; ``pos_embed`` is checked against the fixed table and dropped. Any missing or unexpected
    key is a :class:`ConversionError` naming it.
    """
    depth = _original_depth(state_dict, source)
    expected = _expected_original_keys(depth)
    missing = sorted(expected - set(state_dict))
    if missing:
        raise ConversionError(f"{source}: missing {len(missing)} original DiT tensor(s), e.g. "
                              f"{', '.join(missing[:5])}.")
    unexpected = sorted(set(state_dict) - expected)
    if unexpected:
        raise ConversionError(f"{source}: {len(unexpected)} unexpected tensor(s) for an original DiT, e.g. "
                              f"{', '.join(unexpected[:5])}.")
    width = int(np.shape(state_dict["x_embedder.proj.weight"])[0])
    _check_pos_embed(np.asarray(state_dict["pos_embed"]), width, source)

    out: dict[str, np.ndarray] = {}
    for key, value in state_dict.items():
        if key == "pos_embed":
            continue
        module, leaf = key.rsplit(".", 1)
        if module in _ORIGINAL_TOP_NAMES:
            out[f"{_ORIGINAL_TOP_NAMES[module]}.{leaf}"] = value
        elif module in _ORIGINAL_SHARED_NAMES:
            for i in range(depth):
                out[f"transformer_blocks.{i}.{_ORIGINAL_SHARED_NAMES[module]}.{leaf}"] = value
        else:
            block, name = _ORIGINAL_BLOCK.match(module), module.split(".", 2)[2]
            prefix = f"transformer_blocks.{block.group(1)}"
            if name == "attn.qkv":
                out.update(_split_qkv(np.asarray(value), f"{prefix}.attn1", leaf, width, key, source))
            else:
                out[f"{prefix}.{_ORIGINAL_BLOCK_NAMES[name]}.{leaf}"] = value
    return out


def _split_qkv(value: np.ndarray, prefix: str, leaf: str, width: int, key: str, source: str) -> dict:
    if value.shape[0] != 3 * width:
        raise ConversionError(f"{source}: {key} has shape {value.shape}; expected {3 * width} rows (q, k, v).",
                              torch_key=key)
    q, k, v = np.split(value, 3, axis=0)
    return {f"{prefix}.to_q.{leaf}": q, f"{prefix}.to_k.{leaf}": k, f"{prefix}.to_v.{leaf}": v}


def config_from_original(
    state_dict: Mapping[str, Any], *, num_heads: int | None = None, sample_size: int | None = None,
    source: str = "checkpoint",
) -> DiTConfig:
    """Infers the :class:`DiTConfig` (class layout) of an original DiT state dict from its tensor shapes.

    Patch size, input channels and width from ``x_embedder.proj.weight`` [D, C, p, p]; depth from the
    ``blocks.N`` indices; ``num_classes`` from the label table (its last row is the null class); output channels
    (learned sigma when twice the input) from ``final_layer.linear``; the latent size from ``pos_embed`` (or
    ``sample_size``); heads from :data:`ORIGINAL_HEADS_BY_WIDTH` (the paper's sizes) unless ``num_heads`` is given.
    """
    depth = _original_depth(state_dict, source)
    width, in_channels, patch, _ = (int(d) for d in np.shape(state_dict["x_embedder.proj.weight"]))
    heads = num_heads or ORIGINAL_HEADS_BY_WIDTH.get(width)
    if heads is None:
        raise ConversionError(f"{source}: width {width} is not one of the DiT paper's sizes "
                              f"{sorted(ORIGINAL_HEADS_BY_WIDTH)}; pass num_heads=.")
    if sample_size is None:
        if "pos_embed" not in state_dict:
            raise ConversionError(f"{source}: no pos_embed to read the latent size from; pass sample_size=.")
        sample_size = math.isqrt(int(np.prod(np.shape(state_dict["pos_embed"]))) // width) * patch
    out_rows = int(np.shape(state_dict["final_layer.linear.weight"])[0])
    table_rows = int(np.shape(state_dict["y_embedder.embedding_table.weight"])[0])
    return DiTConfig(sample_size=sample_size, patch_size=patch, in_channels=in_channels,
                     out_channels=out_rows // (patch * patch), num_layers=depth, num_attention_heads=heads,
                     attention_head_dim=width // heads, conditioning=CLASS, num_classes=table_rows - 1)
