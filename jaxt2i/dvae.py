"""DALL-E's discrete VAE as one object: ``jaxt2i.load_dvae(encoder_path, decoder_path=None)``.

It reads OpenAI's released ``encoder.pkl`` / ``decoder.pkl`` (safely, without the ``dall_e`` package: see
:mod:`jaxt2i.convert.dvae_keys`) and jaxt2i model folders holding components of type ``dvae_encoder`` /
``dvae_decoder`` (:meth:`DVAE.save` writes one; ``jaxt2i train`` exports the same), and returns a :class:`DVAE`::

    dvae = jaxt2i.load_dvae("encoder.pkl", "decoder.pkl")
    logits = dvae.encode(images)            # [B, 256, 256, 3] in [0, 1] -> [B, 32, 32, 8192]
    images = dvae.decode(logits.argmax(-1))  # [B, 32, 32] int -> [B, 256, 256, 3] in [0, 1]
    dvae.save("dvae_folder")

Its functional pieces (``dvae.encoder`` / ``dvae.decoder`` linen modules, ``dvae.params``, ``dvae.config``) are the
ones of :mod:`jaxt2i.models.dvae`, for use inside other JAX code.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Mapping

import jax
import jax.numpy as jnp

from jaxt2i.convert import dvae_keys, native
from jaxt2i.convert.core import ConversionError
from jaxt2i.convert.load import LoadedModel, read_native, write_native
from jaxt2i.dtypes import as_dtype
from jaxt2i.models import dvae as dvae_model
from jaxt2i.models.dvae import DVAEConfig

# The component type (and name, in folders this module writes) of each part.
COMPONENT_TYPES = {"encoder": "dvae_encoder", "decoder": "dvae_decoder"}

_encode = jax.jit(dvae_model.encode, static_argnames=("config", "dtype"))
_decoder_stats = jax.jit(dvae_model.decoder_stats, static_argnames=("config", "dtype"))
_decode = jax.jit(dvae_model.decode, static_argnames=("config", "dtype"))


@dataclasses.dataclass(frozen=True)
class DVAE:
    """A dVAE's config, parameters and jitted encode/decode.

    params: ``{"encoder": tree, "decoder": tree}``; a part that was not loaded is absent (its methods then say
    how to load it). dtype: the compute dtype (logits and decoder statistics are float32 whatever it is).
    source: where it was read from.
    """

    config: DVAEConfig
    params: Mapping[str, Any]
    dtype: Any = jnp.float32
    source: str = ""

    @property
    def encoder(self) -> dvae_model.Encoder:
        """The encoder module (apply it to mapped pixels: see :func:`jaxt2i.models.dvae.encode`)."""
        return dvae_model.Encoder(self.config, dtype=self.dtype)

    @property
    def decoder(self) -> dvae_model.Decoder:
        """The decoder module (tokens or token probabilities -> logit-Laplace statistics)."""
        return dvae_model.Decoder(self.config, dtype=self.dtype)

    def _params(self, part: str) -> Any:
        if part not in self.params:
            argument = "encoder_path" if part == "encoder" else "decoder_path"
            raise ValueError(f"this dVAE ({self.source}) has no {part}; load one with "
                             f"jaxt2i.load_dvae(..., {argument}=...).")
        return self.params[part]

    def encode(self, images: jax.Array) -> jax.Array:
        """Images [B, H, W, C] float in [0, 1] -> token logits [B, H/f, W/f, vocab_size] float32."""
        return _encode(self._params("encoder"), jnp.asarray(images, jnp.float32), self.config, dtype=self.dtype)

    def tokens(self, images: jax.Array) -> jax.Array:
        """Images [B, H, W, C] in [0, 1] -> the most likely tokens [B, H/f, W/f] int32."""
        return jnp.argmax(self.encode(images), axis=-1).astype(jnp.int32)

    def decode(self, tokens: jax.Array) -> jax.Array:
        """Tokens [B, h, w] int (or token probabilities [B, h, w, vocab_size]) -> images [B, h*f, w*f, C] float32
        in [0, 1]: the logit-Laplace mean, unmapped."""
        return _decode(self._params("decoder"), _tokens(tokens), self.config, dtype=self.dtype)

    def decoder_stats(self, tokens: jax.Array) -> jax.Array:
        """Tokens [B, h, w] int (or probabilities [B, h, w, vocab_size]) -> the raw logit-Laplace statistics
        [B, h*f, w*f, 2C] float32 (``mu`` channels, then log-scales)."""
        return _decoder_stats(self._params("decoder"), _tokens(tokens), self.config, dtype=self.dtype)

    def save(self, folder: str | os.PathLike, *, overwrite: bool = False) -> None:
        """Writes a jaxt2i model folder (components ``dvae_encoder`` / ``dvae_decoder``) that :func:`load_dvae`
        reads; ``folder`` must not exist unless ``overwrite``."""
        names = {COMPONENT_TYPES[part]: part for part in self.params}
        model = LoadedModel(configs={name: self.config for name in names},
                            params={name: jax.device_get(self.params[part]) for name, part in names.items()},
                            schedule=None, tokenizer={"pad": None, "folder": None}, source=self.source, family=None)
        write_native(os.fspath(folder), model, overwrite=overwrite)


def _tokens(tokens: jax.Array) -> jax.Array:
    tokens = jnp.asarray(tokens)
    return tokens.astype(jnp.int32) if jnp.issubdtype(tokens.dtype, jnp.integer) else tokens.astype(jnp.float32)


def _read_folder(path: str, dtype: Any) -> dict[str, tuple[DVAEConfig, dict]]:
    model = read_native(path, dtype=dtype)
    parts = {}
    for name in model.configs:
        for part, kind in COMPONENT_TYPES.items():
            if model.component_type(name) == kind:
                if part in parts:
                    raise ConversionError(f"{path}: holds two dVAE {part}s; pass the model folder of one dVAE.")
                parts[part] = (model.configs[name], model.params[name])
    if not parts:
        raise ConversionError(f"{path}: a jaxt2i model folder without a {' or '.join(COMPONENT_TYPES.values())} "
                              f"component (it has {sorted(model.configs)}).")
    return parts


def _read(path: str | os.PathLike, dtype: Any) -> dict[str, tuple[DVAEConfig, dict]]:
    """The dVAE parts ``{"encoder"|"decoder": (config, params)}`` that a folder or a pickle holds."""
    path = os.fspath(path)
    if os.path.isdir(path):
        if not native.is_native_folder(path):
            raise FileNotFoundError(f"{path} is a folder without {native.MANIFEST}; pass a jaxt2i dVAE folder or "
                                    "OpenAI's encoder.pkl / decoder.pkl.")
        return _read_folder(path, dtype)
    part, config, params = dvae_keys.read_dall_e_pickle(path, dtype=dtype)
    return {part: (config, params)}


def load_dvae(encoder_path: str | os.PathLike | None, decoder_path: str | os.PathLike | None = None, *,
              dtype: str | Any = "float32", param_dtype: str | Any = "float32") -> DVAE:
    """Loads a dVAE from OpenAI's pickles (``encoder.pkl``, ``decoder.pkl``) or a jaxt2i model folder.

    Args:
      encoder_path: OpenAI's ``encoder.pkl`` (or any ``torch.save`` of a ``dall_e.Encoder``), or a jaxt2i folder
        (which may hold the decoder too); None to load a decoder alone.
      decoder_path: ``decoder.pkl`` or a folder holding a decoder; None for an encoder alone (or the folder's).
      dtype: compute dtype (``"float32"``, ``"bfloat16"``, ``"float16"``); param_dtype: storage dtype.

    Pickles are read without the ``dall_e`` package and without running anything they ask for: a pickle naming
    any class or function beyond the dVAE's own is refused (``jaxt2i.convert.module_pickle.UnsafePickleError``).
    """
    if encoder_path is None and decoder_path is None:
        raise ValueError("load_dvae needs encoder_path, decoder_path or both.")
    param_dtype = as_dtype(param_dtype)
    parts: dict[str, tuple[DVAEConfig, dict]] = {}
    for expected, path in (("encoder", encoder_path), ("decoder", decoder_path)):
        if path is None:
            continue
        found = _read(path, param_dtype)
        if not os.path.isdir(path) and expected not in found:
            other = "decoder_path" if expected == "encoder" else "encoder_path"
            raise ConversionError(f"{path} holds the dVAE's {next(iter(found))}, not its {expected}; pass it as "
                                  f"{other}.")
        for part in found:
            if part in parts:
                raise ConversionError(f"two dVAE {part}s given ({encoder_path} and {decoder_path}); pass one.")
        parts.update(found)
    config = dvae_keys.merge_configs(parts.get("encoder", (None,))[0], parts.get("decoder", (None,))[0],
                                     f"{encoder_path} + {decoder_path}")
    params = {part: jax.tree.map(jnp.asarray, tree) for part, (_, tree) in parts.items()}
    source = " + ".join(os.fspath(p) for p in (encoder_path, decoder_path) if p is not None)
    return DVAE(config, params, as_dtype(dtype), source)
