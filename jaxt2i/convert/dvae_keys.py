"""OpenAI's dVAE (the ``dall_e`` package) <-> jaxt2i's :mod:`jaxt2i.models.dvae`: key tables and pickle reading.

OpenAI released the dVAE as ``encoder.pkl`` / ``decoder.pkl``: ``torch.save`` of whole ``dall_e.Encoder`` /
``dall_e.Decoder`` modules. :func:`read_dall_e_pickle` reads one with jaxt2i's restricted reader
(:mod:`jaxt2i.convert.module_pickle`: only the ``dall_e`` classes below and weightless ``torch.nn`` plumbing are
accepted, nothing is imported or run; the ``dall_e`` package need not be installed) and returns the config the
module recorded plus the Flax parameters.

The ``dall_e`` state-dict layout (``module.state_dict()``) is also this component's torch layout in
:mod:`jaxt2i.convert.components`::

    blocks.input.{w,b}                          -> input/{kernel,bias}
    blocks.group_G.block_I.id_path.{w,b}        -> group_G/block_I/id_path/{kernel,bias}
    blocks.group_G.block_I.res_path.conv_K.{w,b} -> group_G/block_I/conv_K/{kernel,bias}
    blocks.output.conv.{w,b}                    -> output/{kernel,bias}

(``w`` is ``[out, in, kh, kw]``, transposed to HWIO.)
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Mapping

import numpy as np

from jaxt2i.convert.core import ConversionError, Rule, to_flax, to_torch
from jaxt2i.convert.module_pickle import ModuleRecord, read_module_pickle
from jaxt2i.models.dvae import DVAEConfig, decoder_abstract_params, encoder_abstract_params

ENCODER_CLASS = "dall_e.encoder.Encoder"
DECODER_CLASS = "dall_e.decoder.Decoder"
# The dall_e classes a released pickle may name; nothing else of the package is accepted.
DALL_E_CLASSES = (("dall_e.encoder", "Encoder"), ("dall_e.encoder", "EncoderBlock"),
                  ("dall_e.decoder", "Decoder"), ("dall_e.decoder", "DecoderBlock"), ("dall_e.utils", "Conv2d"))
# Config fields each dall_e top-level module records (attrs attributes of the instance).
_RECORDED_FIELDS = {
    ENCODER_CLASS: ("vocab_size", "n_hid", "n_blk_per_group", "input_channels"),
    DECODER_CLASS: ("vocab_size", "n_hid", "n_blk_per_group", "n_init", "output_channels"),
}
PART = {ENCODER_CLASS: "encoder", DECODER_CLASS: "decoder"}


def _conv(flax_prefix: tuple[str, ...], torch_prefix: str) -> list[Rule]:
    return [Rule(flax_prefix + ("kernel",), f"{torch_prefix}.w", "conv"),
            Rule(flax_prefix + ("bias",), f"{torch_prefix}.b")]


def _block_rules(group: int, block: int, n_in: int, n_out: int) -> list[Rule]:
    flax_prefix, torch_prefix = (f"group_{group}", f"block_{block}"), f"blocks.group_{group}.block_{block}"
    rules = _conv(flax_prefix + ("id_path",), f"{torch_prefix}.id_path") if n_in != n_out else []
    for k in range(1, 5):
        rules += _conv(flax_prefix + (f"conv_{k}",), f"{torch_prefix}.res_path.conv_{k}")
    return rules


def _group_rules(config: DVAEConfig, widths: list[int], first_in: int) -> list[Rule]:
    rules, n_in = [], first_in
    for g, width in enumerate(widths, start=1):
        for b in range(1, config.n_blk_per_group + 1):
            rules += _block_rules(g, b, n_in, width)
            n_in = width
    return rules


def encoder_table(config: DVAEConfig) -> list[Rule]:
    """The key table of the encoder (``dall_e`` state-dict keys <-> our tree)."""
    widths = [config.group_width(g) for g in range(config.group_count)]
    return (_conv(("input",), "blocks.input") + _group_rules(config, widths, config.n_hid)
            + _conv(("output",), "blocks.output.conv"))


def decoder_table(config: DVAEConfig) -> list[Rule]:
    """The key table of the decoder (``dall_e`` state-dict keys <-> our tree)."""
    widths = [config.group_width(g) for g in reversed(range(config.group_count))]
    return (_conv(("input",), "blocks.input") + _group_rules(config, widths, config.n_init)
            + _conv(("output",), "blocks.output.conv"))


def encoder_from_torch(state_dict: Mapping[str, np.ndarray], config: DVAEConfig, *, source: str,
                       dtype: Any = None) -> dict:
    """``dall_e.Encoder`` state dict -> our encoder tree (every key checked)."""
    return to_flax(state_dict, encoder_table(config), encoder_abstract_params(config), source=source, dtype=dtype)


def decoder_from_torch(state_dict: Mapping[str, np.ndarray], config: DVAEConfig, *, source: str,
                       dtype: Any = None) -> dict:
    """``dall_e.Decoder`` state dict -> our decoder tree (every key checked)."""
    return to_flax(state_dict, decoder_table(config), decoder_abstract_params(config), source=source, dtype=dtype)


def encoder_to_torch(params: Mapping[str, Any], config: DVAEConfig) -> dict[str, np.ndarray]:
    """Our encoder tree -> a ``dall_e.Encoder`` state dict (``load_state_dict`` accepts it)."""
    return to_torch(params, encoder_table(config))


def decoder_to_torch(params: Mapping[str, Any], config: DVAEConfig) -> dict[str, np.ndarray]:
    """Our decoder tree -> a ``dall_e.Decoder`` state dict (``load_state_dict`` accepts it)."""
    return to_torch(params, decoder_table(config))


def config_from_record(record: ModuleRecord, source: str) -> DVAEConfig:
    """The :class:`DVAEConfig` a pickled ``dall_e.Encoder``/``Decoder`` describes (the other part's fields keep
    their defaults). The number of groups is counted from the recorded ``blocks``."""
    fields = record.fields
    missing = [f for f in _RECORDED_FIELDS[record.cls] if not isinstance(fields.get(f), int)]
    if missing:
        raise ConversionError(f"{source}: the pickled {record.cls} records no integer {', '.join(missing)}; "
                              "it is not a module of the dall_e 0.1 package.")
    blocks = record.children.get("blocks")
    groups = [name for name in (blocks.children if blocks else {}) if name.startswith("group_")]
    if not groups:
        raise ConversionError(f"{source}: the pickled {record.cls} has no blocks.group_* modules.")
    kwargs = {f: fields[f] for f in _RECORDED_FIELDS[record.cls]}
    factor = 2 ** (len(groups) - 1)
    try:
        return DVAEConfig(group_count=len(groups), image_size=32 * factor, **kwargs)
    except ValueError as e:
        raise ConversionError(f"{source}: the pickled {record.cls} describes an unsupported dVAE ({e}).") from None


def read_dall_e_pickle(path: str | os.PathLike, *, dtype: Any = None) -> tuple[str, DVAEConfig, dict]:
    """Reads OpenAI's ``encoder.pkl`` or ``decoder.pkl`` (or any ``torch.save`` of a ``dall_e`` Encoder/Decoder).

    Returns:
      ``(part, config, params)``: ``part`` is ``"encoder"`` or ``"decoder"``, ``config`` what the module recorded
      (``image_size`` 32 tokens per side, the size OpenAI's model works at), ``params`` our tree as numpy arrays
      (``dtype``: their storage dtype, default float32).

    Raises:
      jaxt2i.convert.module_pickle.UnsafePickleError: the pickle names a global outside the dVAE's classes.
      ConversionError: it is some other module, or its tensors do not fit the architecture it records.
    """
    path = os.fspath(path)
    record = read_module_pickle(path, DALL_E_CLASSES)
    if record.cls not in PART:
        raise ConversionError(f"{path}: holds a pickled {record.cls}; expected {ENCODER_CLASS} or {DECODER_CLASS}.")
    config = config_from_record(record, path)
    state_dict = record.state_dict()
    if record.cls == ENCODER_CLASS:
        return "encoder", config, encoder_from_torch(state_dict, config, source=path, dtype=dtype)
    return "decoder", config, decoder_from_torch(state_dict, config, source=path, dtype=dtype)


def merge_configs(encoder: DVAEConfig | None, decoder: DVAEConfig | None, source: str) -> DVAEConfig:
    """One config for an encoder and a decoder read separately: each part's own fields from it; the fields both
    use (vocabulary, widths, blocks, groups) must agree."""
    if encoder is None or decoder is None:
        config = encoder or decoder
        if config is None:
            raise ValueError("merge_configs needs at least one config.")
        return config
    shared = ("vocab_size", "n_hid", "n_blk_per_group", "group_count")
    differ = [f"{f} ({getattr(encoder, f)} vs {getattr(decoder, f)})" for f in shared
              if getattr(encoder, f) != getattr(decoder, f)]
    if differ:
        raise ConversionError(f"{source}: the encoder and decoder disagree on {', '.join(differ)}; jaxt2i's dVAE "
                              "holds one config for both. Load them as two separate dVAEs.")
    return dataclasses.replace(encoder, n_init=decoder.n_init, output_channels=decoder.output_channels)
