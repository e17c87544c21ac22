"""Key tables of the CLIP text encoder: transformers (diffusers folders) <-> our Flax tree, and the original
single-file layouts <-> transformers.

Layouts:

* **transformers** (diffusers ``text_encoder/``): hub checkpoints name keys ``text_model.embeddings...``,
  ``text_model.encoder.layers.N...``, ``text_model.final_layer_norm...`` (+ ``text_projection.weight`` for
  ``CLIPTextModelWithProjection``); transformers >= 5.6 saves ``CLIPTextModel`` without ``text_model.``.
  :func:`normalize_text_encoder_keys` brings both to the prefixed form, which all tables here use.
* **SD 1.x single file** (``cond_stage_model.transformer.``): OpenAI CLIP in the transformers layout under a
  prefix (``cond_stage_model.transformer.text_model.…``).
* **SD 2.x single file** (``cond_stage_model.model.``): OpenCLIP: ``token_embedding.weight``,
  ``positional_embedding``, ``transformer.resblocks.N.{ln_1, attn.in_proj_weight/in_proj_bias (q, k, v stacked
  on the output axis), attn.out_proj, ln_2, mlp.c_fc, mlp.c_proj}``, ``ln_final``, ``text_projection``
  (``[D, P]``, applied as ``x @ P``) and ``logit_scale``. It holds 24 resblocks; SD 2 conditions on the
  penultimate layer, so diffusers' folders keep 23 and drop the last one, ``text_projection`` and
  ``logit_scale`` (see :data:`OPENCLIP_UNUSED`).
"""

from __future__ import annotations

import dataclasses
from typing import Mapping

import numpy as np

from jaxt2i.convert.core import ConversionError, Rule, dense, norm, rename_keys, to_flax, to_torch
from jaxt2i.models.clip import PRESETS, CLIPTextConfig, abstract_params

SD1_PREFIX = "cond_stage_model.transformer."
SD2_PREFIX = "cond_stage_model.model."
TEXT_MODEL = "text_model."
PROJECTION_KEY = "text_projection.weight"
# Top-level module names of transformers' CLIPTextModel (keys that may lack the ``text_model.`` prefix).
_TEXT_MODEL_ROOTS = ("embeddings.", "encoder.", "final_layer_norm.")
# Value export writes for OpenCLIP's logit_scale (unused by SD): log(100), the clamp every trained OpenCLIP hits.
LOGIT_SCALE_FILL = float(np.log(100.0))
OPENCLIP_UNUSED = (
    "the resblock after the last layer the config uses (SD 2.x: resblocks.23), when present",
    "text_projection, when the config has no projection_dim",
    "logit_scale",
)


# ----------------------------------------------------------------------------- transformers <-> flax
def diffusers_table(config: CLIPTextConfig) -> list[Rule]:
    """Rules: transformers ``CLIPTextModel[WithProjection]`` keys (``text_model.``-prefixed, as
    :func:`normalize_text_encoder_keys` returns them) <-> our :class:`~jaxt2i.models.clip.CLIPTextModel` tree."""
    t = TEXT_MODEL
    rules = [
        Rule(("token_embedding", "embedding"), f"{t}embeddings.token_embedding.weight"),
        Rule(("position_embedding", "embedding"), f"{t}embeddings.position_embedding.weight"),
    ]
    for i in range(config.num_layers):
        f, k = f"layers_{i}", f"{t}encoder.layers.{i}"
        rules += norm((f, "layer_norm1"), f"{k}.layer_norm1")
        for ours, theirs in (("query", "q_proj"), ("key", "k_proj"), ("value", "v_proj"), ("out", "out_proj")):
            rules += dense((f, "self_attn", ours), f"{k}.self_attn.{theirs}")
        rules += norm((f, "layer_norm2"), f"{k}.layer_norm2")
        rules += dense((f, "mlp", "fc1"), f"{k}.mlp.fc1")
        rules += dense((f, "mlp", "fc2"), f"{k}.mlp.fc2")
    rules += norm(("final_layer_norm",), f"{t}final_layer_norm")
    if config.projection_dim:
        rules += dense(("text_projection",), "text_projection", bias=False)
    return rules


def normalize_text_encoder_keys(state_dict: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Accepts both transformers layouts (with or without ``text_model.``) and returns the prefixed one.

    Drops the ``position_ids`` buffer older checkpoints carry. Keys that belong to neither layout are kept
    unchanged, so the converter reports them as unexpected under their own names.
    """
    out: dict[str, np.ndarray] = {}
    for key, value in state_dict.items():
        if key.endswith("embeddings.position_ids"):
            continue
        new = TEXT_MODEL + key if key.startswith(_TEXT_MODEL_ROOTS) else key
        if new in out:
            raise ConversionError(f"Text encoder state dict holds {new} twice (with and without 'text_model.').")
        out[new] = value
    return out


def text_encoder_to_flax(
    state_dict: Mapping[str, np.ndarray], config: CLIPTextConfig, *, source: str, dtype=None
) -> dict:
    """A transformers text-encoder state dict (either layout) -> our parameter tree, checked against the config."""
    return to_flax(normalize_text_encoder_keys(state_dict), diffusers_table(config), abstract_params(config),
                   source=source, dtype=dtype)


def text_encoder_to_torch(params: Mapping, config: CLIPTextConfig, *, prefixed: bool = True) -> dict[str, np.ndarray]:
    """Our parameter tree -> transformers state dict; ``prefixed=False`` writes transformers>=5.6's
    ``CLIPTextModel`` layout (no ``text_model.``; only valid without a projection)."""
    sd = to_torch(params, diffusers_table(config))
    if prefixed:
        return sd
    if config.projection_dim:
        raise ValueError("CLIPTextModelWithProjection keeps the 'text_model.' prefix; use prefixed=True.")
    return {k.removeprefix(TEXT_MODEL): v for k, v in sd.items()}


# ----------------------------------------------------------------------------- original single files
@dataclasses.dataclass(frozen=True)
class _Entry:
    """One tensor of an original file <-> one or more transformers tensors.

    kind: ``copy`` (same array), ``transpose`` (``[D, P]`` matrix <-> Linear weight ``[P, D]``) or ``qkv``
    (``[3D, ...]`` stacked q, k, v <-> three ``[D, ...]`` tensors).
    """

    original: str
    diffusers: tuple[str, ...]
    kind: str = "copy"


def _layout(prefix: str, layout: str | None) -> str:
    if layout is not None:
        if layout not in ("openai", "openclip"):
            raise ValueError(f"layout must be 'openai' or 'openclip'; got {layout!r}.")
        return layout
    if prefix.endswith("transformer."):
        return "openai"
    if prefix.endswith("model."):
        return "openclip"
    raise ValueError(f"Cannot tell the text-encoder layout from prefix {prefix!r}; pass layout='openai' "
                     "(HF CLIP keys, SD 1.x) or layout='openclip' (SD 2.x).")


def _openai_entries(config: CLIPTextConfig, prefix: str) -> list[_Entry]:
    return [_Entry(prefix + r.torch_key, (r.torch_key,)) for r in diffusers_table(config)]


def _openclip_entries(config: CLIPTextConfig, prefix: str) -> list[_Entry]:
    t = TEXT_MODEL
    entries = [
        _Entry(f"{prefix}token_embedding.weight", (f"{t}embeddings.token_embedding.weight",)),
        _Entry(f"{prefix}positional_embedding", (f"{t}embeddings.position_embedding.weight",)),
    ]
    for i in range(config.num_layers):
        o, d = f"{prefix}transformer.resblocks.{i}", f"{t}encoder.layers.{i}"
        for suffix in ("weight", "bias"):
            entries += [
                _Entry(f"{o}.ln_1.{suffix}", (f"{d}.layer_norm1.{suffix}",)),
                _Entry(f"{o}.attn.in_proj_{suffix}",
                       tuple(f"{d}.self_attn.{p}_proj.{suffix}" for p in "qkv"), "qkv"),
                _Entry(f"{o}.attn.out_proj.{suffix}", (f"{d}.self_attn.out_proj.{suffix}",)),
                _Entry(f"{o}.ln_2.{suffix}", (f"{d}.layer_norm2.{suffix}",)),
                _Entry(f"{o}.mlp.c_fc.{suffix}", (f"{d}.mlp.fc1.{suffix}",)),
                _Entry(f"{o}.mlp.c_proj.{suffix}", (f"{d}.mlp.fc2.{suffix}",)),
            ]
    entries += [_Entry(f"{prefix}ln_final.{s}", (f"{t}final_layer_norm.{s}",)) for s in ("weight", "bias")]
    if config.projection_dim:
        entries.append(_Entry(f"{prefix}text_projection", (PROJECTION_KEY,), "transpose"))
    return entries


def _openclip_resblock_keys(prefix: str, index: int) -> list[str]:
    o = f"{prefix}transformer.resblocks.{index}"
    names = ("ln_1.{}", "attn.in_proj_{}", "attn.out_proj.{}", "ln_2.{}", "mlp.c_fc.{}", "mlp.c_proj.{}")
    return [f"{o}.{name.format(s)}" for name in names for s in ("weight", "bias")]


def _openclip_unused_keys(config: CLIPTextConfig, prefix: str, present) -> list[str]:
    """The OpenCLIP tensors diffusers' folders leave out for this config (see OPENCLIP_UNUSED)."""
    unused = [f"{prefix}logit_scale"]
    if not config.projection_dim:
        unused.append(f"{prefix}text_projection")
    extra_block = _openclip_resblock_keys(prefix, config.num_layers)
    if present is None or any(k in present for k in extra_block):
        unused += extra_block
    return unused


def _entries(config: CLIPTextConfig, prefix: str, layout: str) -> list[_Entry]:
    return _openai_entries(config, prefix) if layout == "openai" else _openclip_entries(config, prefix)


def original_to_diffusers(
    state_dict: Mapping[str, np.ndarray],
    config: CLIPTextConfig,
    prefix: str = SD1_PREFIX,
    *,
    layout: str | None = None,
    source: str = "checkpoint",
) -> dict[str, np.ndarray]:
    """The text encoder of an original single-file checkpoint -> transformers state dict (``text_model.``-prefixed).

    Only keys under ``prefix`` are read (the rest of the file belongs to the U-Net and the VAE); all of them must
    be accounted for. ``layout`` is inferred from the prefix (``...transformer.``: OpenAI/HF keys, SD 1.x;
    ``...model.``: OpenCLIP, SD 2.x). OpenAI layout: the prefix is removed and ``position_ids`` dropped.
    OpenCLIP layout: ``in_proj`` is split into q/k/v, and exactly the tensors in :data:`OPENCLIP_UNUSED` are
    dropped: the resblock after the config's last layer (only if the file has it; a file with exactly
    ``num_layers`` resblocks is fine too), ``text_projection`` when the config has no projection, ``logit_scale``.

    Raises:
      ConversionError: on a missing or unexpected key or a shape mismatch, naming the key.
    """
    layout = _layout(prefix, layout)
    ours = {k: v for k, v in state_dict.items() if k.startswith(prefix)}
    if not ours:
        raise ConversionError(f"{source}: no text-encoder tensors under {prefix!r}. Is this an "
                              f"{'SD 2.x' if layout == 'openai' else 'SD 1.x'} checkpoint? Pass the matching prefix.")
    if layout == "openai":
        # Files written with transformers >= 5.6 may lack "text_model." under the prefix: accept both.
        stripped = normalize_text_encoder_keys({k[len(prefix):]: v for k, v in ours.items()})
        table = {r.torch_key: r.torch_key for r in diffusers_table(config)}
        return {k: np.asarray(v) for k, v in rename_keys(stripped, table, source=f"{source} ({prefix}*)").items()}
    entries = _entries(config, prefix, layout)
    ignore = _openclip_unused_keys(config, prefix, ours)
    extra = [k for k in ignore if k.startswith(f"{prefix}transformer.resblocks.") and k not in ours]
    if extra:
        raise ConversionError(f"{source}: the unused last resblock is incomplete; missing {', '.join(extra[:5])}.")
    # rename_keys checks completeness (missing/unexpected) against the explicit table.
    renamed = rename_keys(ours, {e.original: e.original for e in entries}, source=source, ignore=ignore)
    out: dict[str, np.ndarray] = {}
    for e in entries:
        value = np.asarray(renamed[e.original])
        if e.kind == "copy":
            out[e.diffusers[0]] = value
        elif e.kind == "transpose":
            out[e.diffusers[0]] = np.ascontiguousarray(value.T)
        else:
            width = config.hidden_size
            if value.shape[0] != 3 * width:
                raise ConversionError(f"{source}: {e.original} has shape {value.shape}; expected first axis "
                                      f"3 * hidden_size = {3 * width}. The checkpoint and the config disagree.")
            for i, key in enumerate(e.diffusers):
                out[key] = np.ascontiguousarray(value[i * width:(i + 1) * width])
    return out


def diffusers_to_original(
    state_dict: Mapping[str, np.ndarray],
    config: CLIPTextConfig,
    prefix: str = SD1_PREFIX,
    *,
    layout: str | None = None,
    fill_unused: bool = True,
    source: str = "text encoder",
) -> dict[str, np.ndarray]:
    """Inverse of :func:`original_to_diffusers`: transformers state dict (either layout) -> original keys.

    OpenAI layout: every key gets the prefix. OpenCLIP layout: q/k/v are stacked into ``in_proj``; with
    ``fill_unused`` (the default) the tensors diffusers' folders do not hold are written so that original
    tools find a complete OpenCLIP text tower:

    * one more resblock (index ``num_layers``, SD 2.x: 23) with all-zero weights. A zero block is an exact
      identity (both LayerNorms output 0, every projection then outputs its zero bias), so the full tower's
      last layer equals our last layer and SD 2's penultimate-layer conditioning is unchanged. The original
      24th block cannot be recovered from a diffusers folder.
    * ``text_projection``: the identity ``[D, D]`` when the config has no projection.
    * ``logit_scale`` = ``log(100)`` (:data:`LOGIT_SCALE_FILL`; SD never reads it).

    Raises:
      ConversionError: on a missing or unexpected key, naming it.
    """
    layout = _layout(prefix, layout)
    sd = normalize_text_encoder_keys(state_dict)
    entries = _entries(config, prefix, layout)
    mapping = {k: k for e in entries for k in e.diffusers}
    sd = rename_keys(sd, mapping, source=source)
    out: dict[str, np.ndarray] = {}
    for e in entries:
        values = [np.asarray(sd[k]) for k in e.diffusers]
        if e.kind == "copy":
            out[e.original] = values[0]
        elif e.kind == "transpose":
            out[e.original] = np.ascontiguousarray(values[0].T)
        else:
            out[e.original] = np.concatenate(values, axis=0)
    if layout == "openclip" and fill_unused:
        dtype = np.asarray(sd[f"{TEXT_MODEL}embeddings.token_embedding.weight"]).dtype
        template = _openclip_entries(dataclasses.replace(config, num_layers=1), prefix)
        for e in template:  # the zero block copies the shapes of block 0
            if ".resblocks.0." in e.original:
                key = e.original.replace(".resblocks.0.", f".resblocks.{config.num_layers}.")
                out[key] = np.zeros_like(out[e.original], dtype=dtype)
        if not config.projection_dim:
            out[f"{prefix}text_projection"] = np.eye(config.hidden_size, dtype=dtype)
        out[f"{prefix}logit_scale"] = np.asarray(LOGIT_SCALE_FILL, dtype=dtype)
    return out


def find_text_encoder_prefix(state_dict: Mapping[str, np.ndarray], *, source: str = "checkpoint") -> str:
    """The text-encoder prefix of an SD single file: :data:`SD2_PREFIX` (OpenCLIP) or :data:`SD1_PREFIX`."""
    for prefix in (SD2_PREFIX, SD1_PREFIX):
        if any(k.startswith(prefix) for k in state_dict):
            return prefix
    raise ConversionError(f"{source}: no text encoder found (no key starts with {SD1_PREFIX!r} or {SD2_PREFIX!r}). "
                          "Is this a Stable Diffusion 1.x/2.x checkpoint?")


def config_from_original(
    state_dict: Mapping[str, np.ndarray], prefix: str, *, layout: str | None = None, head_dim: int = 64,
    source: str = "checkpoint",
) -> CLIPTextConfig:
    """The config of the diffusers folder equivalent to a single file's text encoder, read from tensor shapes.

    Widths and depth come from the tensors; the number of heads is not stored, so it is ``hidden / head_dim``
    (64 in OpenAI's and OpenCLIP's towers). OpenAI layout: quick_gelu, SD 1.x token ids. OpenCLIP layout: gelu,
    and (as for SD 2.x) one layer fewer than the file's resblocks: the last one is the unused 24th.
    """
    layout = _layout(prefix, layout)
    base = PRESETS["sd15"] if layout == "openai" else PRESETS["sd21"]
    if layout == "openai":
        # Under the prefix: "text_model.embeddings..." (hub layout) or "embeddings..." (transformers >= 5.6).
        inner = prefix + (TEXT_MODEL if any(k.startswith(prefix + TEXT_MODEL) for k in state_dict) else "")
        emb = f"{inner}embeddings.token_embedding.weight"
        pos = f"{inner}embeddings.position_embedding.weight"
        blocks, fc1 = f"{inner}encoder.layers.", "mlp.fc1.weight"
    else:
        emb, pos = f"{prefix}token_embedding.weight", f"{prefix}positional_embedding"
        blocks, fc1 = f"{prefix}transformer.resblocks.", "mlp.c_fc.weight"
    for key in (emb, pos, f"{blocks}0.{fc1}"):
        if key not in state_dict:
            raise ConversionError(f"{source}: cannot read the text-encoder architecture: {key} is missing.")
    indices = {int(k[len(blocks):].split(".")[0]) for k in state_dict if k.startswith(blocks)}
    vocab, hidden = np.shape(state_dict[emb])
    return dataclasses.replace(
        base,
        vocab_size=int(vocab),
        hidden_size=int(hidden),
        max_position_embeddings=int(np.shape(state_dict[pos])[0]),
        intermediate_size=int(np.shape(state_dict[f"{blocks}0.{fc1}"])[0]),
        num_layers=len(indices) - (1 if layout == "openclip" else 0),
        num_heads=int(hidden) // head_dim,
    )
