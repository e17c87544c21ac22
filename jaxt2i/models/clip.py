"""CLIP text encoder (the text tower of OpenAI CLIP / OpenCLIP), as Stable Diffusion uses it.

A pre-LayerNorm causal transformer over 77 token positions:
``x = token_emb(ids) + pos_emb; for each layer: x += attn(ln1(x)); x += mlp(ln2(x)); out = final_ln(x)``.
The pooled output is the final-LN'd state at the EOS token; ``CLIPTextModelWithProjection`` adds a bias-free
projection of it (``text_embeds``).

Presets: ``sd15`` (OpenAI ViT-L/14 text tower, SD 1.x), ``sd21`` (OpenCLIP ViT-H/14 text tower as diffusers'
SD 2.x folders store it: 23 of its 24 layers, because SD 2 conditions on the penultimate layer), and
``tiny_sd1`` / ``tiny_sd2`` for tests. Parameter tree (flax names)::

    token_embedding/embedding      [vocab, D]
    position_embedding/embedding   [max_positions, D]
    layers_{i}/layer_norm1, self_attn/{query,key,value,out}, layer_norm2, mlp/{fc1,fc2}
    final_layer_norm/{scale,bias}
    text_projection/kernel         [D, P]   (only when projection_dim is set)
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import struct

from jaxt2i.nn.attention import MultiHeadAttention

ACTIVATIONS = ("quick_gelu", "gelu")


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
    """Architecture of a CLIP text tower.

    ``projection_dim`` set means the model has a ``text_projection`` (transformers'
    ``CLIPTextModelWithProjection``); ``None`` means plain ``CLIPTextModel`` (what SD 1.x/2.x use).
    ``eos_token_id`` decides how the pooled output finds the EOS token, as in transformers: ``2`` (the legacy
    value stored in SD 1.x/2.x configs) takes the position of the largest id, any other value the first
    position holding that id. ``bos_token_id``/``pad_token_id`` are carried for config round trips only.
    """

    vocab_size: int = 49408
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_layers: int = 12
    num_heads: int = 12
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    projection_dim: int | None = None
    bos_token_id: int = 49406
    eos_token_id: int = 49407
    pad_token_id: int = 1

    def __post_init__(self):
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"hidden_act must be one of {ACTIVATIONS}; got {self.hidden_act!r}.")
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}.")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @classmethod
    def from_diffusers(cls, config: Mapping[str, Any] | str | os.PathLike) -> "CLIPTextConfig":
        """From a transformers ``config.json`` of ``CLIPTextModel`` / ``CLIPTextModelWithProjection``
        (a dict, the file, or the folder holding it, e.g. ``<pipeline>/text_encoder``).

        The projection is kept only for ``CLIPTextModelWithProjection``: SD configs store a
        ``projection_dim`` although their ``CLIPTextModel`` has no projection weights.
        """
        if not isinstance(config, Mapping):
            path = Path(config)
            path = path / "config.json" if path.is_dir() else path
            config = json.loads(path.read_text(encoding="utf-8"))
        config = dict(config)
        if "text_config" in config:  # a full CLIPModel config: take its text tower
            config = dict(config["text_config"])
        defaults = cls()
        architectures = config.get("architectures") or ["CLIPTextModel"]
        with_projection = any("WithProjection" in a for a in architectures)
        eos = config.get("eos_token_id", defaults.eos_token_id)
        if isinstance(eos, (list, tuple)):
            raise ValueError(f"eos_token_id must be a single id for a CLIP text encoder; got {eos}.")
        return cls(
            vocab_size=config.get("vocab_size", defaults.vocab_size),
            hidden_size=config.get("hidden_size", 512),  # transformers' CLIPTextConfig defaults
            intermediate_size=config.get("intermediate_size", 2048),
            num_layers=config.get("num_hidden_layers", 12),
            num_heads=config.get("num_attention_heads", 8),
            max_position_embeddings=config.get("max_position_embeddings", 77),
            hidden_act=config.get("hidden_act", "quick_gelu"),
            layer_norm_eps=float(config.get("layer_norm_eps") or 1e-5),
            projection_dim=config.get("projection_dim", 512) if with_projection else None,
            bos_token_id=config.get("bos_token_id", defaults.bos_token_id),
            eos_token_id=eos,
            pad_token_id=config.get("pad_token_id", defaults.pad_token_id),
        )

    def to_diffusers(self) -> dict[str, Any]:
        """A transformers ``config.json`` dict (``CLIPTextModel``, or ``...WithProjection`` when projection_dim
        is set). Without a projection, ``projection_dim`` is written as ``hidden_size`` (unused by the model)."""
        return {
            "architectures": ["CLIPTextModelWithProjection" if self.projection_dim else "CLIPTextModel"],
            "model_type": "clip_text_model",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "projection_dim": self.projection_dim or self.hidden_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "max_position_embeddings": self.max_position_embeddings,
            "hidden_act": self.hidden_act,
            "layer_norm_eps": self.layer_norm_eps,
            "attention_dropout": 0.0,
            "initializer_range": 0.02,
            "initializer_factor": 1.0,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "pad_token_id": self.pad_token_id,
        }


# SD 1.x text_encoder/config.json: OpenAI CLIP ViT-L/14 text tower; legacy token ids (eos 2 -> argmax pooling).
_SD15 = CLIPTextConfig(
    hidden_size=768, intermediate_size=3072, num_layers=12, num_heads=12, hidden_act="quick_gelu",
    bos_token_id=0, eos_token_id=2, pad_token_id=1,
)
# SD 2.x text_encoder/config.json: OpenCLIP ViT-H/14 text tower without its last (24th) layer.
_SD21 = CLIPTextConfig(
    hidden_size=1024, intermediate_size=4096, num_layers=23, num_heads=16, hidden_act="gelu",
    bos_token_id=0, eos_token_id=2, pad_token_id=1,
)
PRESETS: dict[str, CLIPTextConfig] = {
    "sd15": _SD15,
    "sd21": _SD21,
    "tiny_sd1": dataclasses.replace(_SD15, hidden_size=32, intermediate_size=37, num_layers=2, num_heads=4),
    "tiny_sd2": dataclasses.replace(_SD21, hidden_size=32, intermediate_size=64, num_layers=3, num_heads=2),
}
sd15, sd21, tiny_sd1, tiny_sd2 = (PRESETS[k] for k in ("sd15", "sd21", "tiny_sd1", "tiny_sd2"))


def preset(name: str) -> CLIPTextConfig:
    """A named preset (see ``PRESETS``)."""
    if name not in PRESETS:
        raise KeyError(f"Unknown CLIP text preset {name!r}; choose one of {', '.join(PRESETS)}.")
    return PRESETS[name]


@struct.dataclass
class CLIPTextOutput:
    """Outputs of :class:`CLIPTextModel`.

    last_hidden_state: ``[B, L, D]`` after the final LayerNorm (SD 1.x conditioning).
    hidden_states: ``num_layers + 1`` arrays ``[B, L, D]``: the embeddings, then each layer's output
      (before the final LayerNorm).
    pooled: ``[B, D]`` final-LN'd state at the EOS token.
    text_embeds: ``[B, P]`` projection of ``pooled``, or None without a projection.
    """

    last_hidden_state: jax.Array
    hidden_states: tuple[jax.Array, ...]
    pooled: jax.Array
    text_embeds: jax.Array | None = None


def eos_positions(input_ids: jax.Array, eos_token_id: int) -> jax.Array:
    """``[B, L]`` ids -> ``[B]`` index of the EOS token, with transformers' rule: the largest id when
    ``eos_token_id == 2`` (legacy configs), else the first occurrence of ``eos_token_id``."""
    if eos_token_id == 2:
        return jnp.argmax(input_ids, axis=-1)
    return jnp.argmax(input_ids == eos_token_id, axis=-1)


def quick_gelu(x: jax.Array) -> jax.Array:
    """OpenAI CLIP's sigmoid approximation of GELU."""
    return x * jax.nn.sigmoid(1.702 * x)


def _activation(name: str):
    return quick_gelu if name == "quick_gelu" else (lambda x: jax.nn.gelu(x, approximate=False))


class LayerNorm(nn.Module):
    """LayerNorm over the last axis (params ``scale``, ``bias``), computed in float32; returns ``dtype``."""

    epsilon: float = 1e-5
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        features = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (features,), self.param_dtype)
        bias = self.param("bias", nn.initializers.zeros, (features,), self.param_dtype)
        x = x.astype(jnp.float32)
        mean = jnp.mean(x, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
        y = (x - mean) * jax.lax.rsqrt(var + self.epsilon)
        return (y * scale.astype(jnp.float32) + bias.astype(jnp.float32)).astype(self.dtype)


class CLIPMLP(nn.Module):
    """``fc2(act(fc1(x)))``: ``[B, L, D] -> [B, L, D]``. ``config``: any CLIP tower config (text or vision)."""

    config: Any
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        x = nn.Dense(cfg.intermediate_size, dtype=self.dtype, param_dtype=self.param_dtype, name="fc1")(x)
        x = _activation(cfg.hidden_act)(x)
        return nn.Dense(cfg.hidden_size, dtype=self.dtype, param_dtype=self.param_dtype, name="fc2")(x)


class CLIPEncoderLayer(nn.Module):
    """Pre-LN self-attention block: ``[B, L, D] -> [B, L, D]``; causal for the text tower, bidirectional for ViT.

    ``config``: any CLIP tower config with hidden_size, intermediate_size, num_heads, head_dim, hidden_act and
    layer_norm_eps.
    """

    config: Any
    causal: bool = True
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = _layer_norm(cfg, "layer_norm1", **kw)(x)
        h = MultiHeadAttention(
            num_heads=cfg.num_heads, head_dim=cfg.head_dim, qkv_bias=True, out_bias=True, name="self_attn", **kw
        )(h, causal=self.causal)
        x = x + h
        h = _layer_norm(cfg, "layer_norm2", **kw)(x)
        return x + CLIPMLP(cfg, name="mlp", **kw)(h)


def _layer_norm(cfg: Any, name: str, **kw) -> LayerNorm:
    return LayerNorm(epsilon=cfg.layer_norm_eps, name=name, **kw)


class CLIPTextModel(nn.Module):
    """CLIP text transformer. ``__call__(input_ids [B, L] int32) -> CLIPTextOutput`` (``L <= 77``).

    ``dtype`` is the compute dtype, ``param_dtype`` the storage dtype; LayerNorms and softmax run in float32.
    """

    config: CLIPTextConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def setup(self):
        cfg = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        init = nn.initializers.normal(0.02)
        self.token_embedding = nn.Embed(cfg.vocab_size, cfg.hidden_size, embedding_init=init, **kw)
        self.position_embedding = nn.Embed(cfg.max_position_embeddings, cfg.hidden_size, embedding_init=init, **kw)
        self.layers = [CLIPEncoderLayer(cfg, **kw) for _ in range(cfg.num_layers)]
        self.final_layer_norm = _layer_norm(cfg, "final_layer_norm", **kw)
        if cfg.projection_dim:
            self.text_projection = nn.Dense(cfg.projection_dim, use_bias=False, **kw)

    def embed(self, input_ids: jax.Array) -> jax.Array:
        """``[B, L]`` ids -> ``[B, L, D]`` token + position embeddings."""
        length = input_ids.shape[-1]
        if length > self.config.max_position_embeddings:
            raise ValueError(
                f"Got {length} tokens; the text encoder takes at most {self.config.max_position_embeddings}. "
                "Tokenize with truncation (jaxt2i.tokenizer.CLIPTokenizer does).")
        positions = jnp.arange(length)[None, :]
        return self.token_embedding(input_ids) + self.position_embedding(positions)

    def __call__(self, input_ids: jax.Array) -> CLIPTextOutput:
        input_ids = jnp.asarray(input_ids, jnp.int32)
        x = self.embed(input_ids)
        hidden_states = [x]
        for layer in self.layers:
            x = layer(x)
            hidden_states.append(x)
        last = self.final_layer_norm(x)
        batch = jnp.arange(input_ids.shape[0])
        pooled = last[batch, eos_positions(input_ids, self.config.eos_token_id)]
        text_embeds = self.text_projection(pooled) if self.config.projection_dim else None
        return CLIPTextOutput(
            last_hidden_state=last, hidden_states=tuple(hidden_states), pooled=pooled, text_embeds=text_embeds)

    def encode(self, input_ids: jax.Array, layer: int | Sequence[int] = -1) -> jax.Array:
        """``[B, L]`` ids -> ``[B, L, D]``: the output of ``layer`` followed by the final LayerNorm.

        ``layer`` indexes ``hidden_states`` (0 = embeddings, -1 = last layer, -2 = penultimate: SD 2's
        conditioning from a full 24-layer OpenCLIP tower, or "CLIP skip 2"). Layers after it are not run.
        A sequence of ``k`` layers (e.g. ``(0, -1)``, what a conditioner reads) gives each one's state after the
        final LayerNorm, stacked in that order: ``[B, k, L, D]``.
        """
        stops = hidden_state_indices(self.config.num_layers, layer)
        x = self.embed(jnp.asarray(input_ids, jnp.int32))
        states = {0: x}
        for i, block in enumerate(self.layers[:max(stops)]):
            x = block(x)
            states[i + 1] = x
        outputs = [self.final_layer_norm(states[stop]) for stop in stops]
        return outputs[0] if isinstance(text_layer_setting(layer), int) else jnp.stack(outputs, axis=1)


def hidden_state_index(num_layers: int, layer: int) -> int:
    """``layer`` as ``CLIPTextModel.encode`` takes it (-1 the last layer, 0 the embeddings) -> the number of
    transformer layers it runs, in ``[0, num_layers]``; ``== num_layers`` is the last layer, the only one diffusers
    and single-file checkpoints condition on. Raises ValueError for a non-integer or a layer that does not exist."""
    if isinstance(layer, bool) or not isinstance(layer, int):
        raise ValueError(f"text layer {layer!r}: use an integer (-1: the last layer, 0: the embeddings).")
    if not -num_layers - 1 <= layer <= num_layers:
        raise ValueError(f"text layer {layer} does not exist in a {num_layers}-layer text encoder: use "
                         f"{-num_layers - 1} .. -1 or 0 .. {num_layers} (-1: the last layer, 0: the embeddings).")
    return layer % (num_layers + 1)


def text_layer_setting(layer: Any) -> int | tuple[int, ...]:
    """A text-layer setting as code keeps it: an int, or a tuple of ints for a list (from JSON / YAML)."""
    return tuple(layer) if isinstance(layer, (list, tuple)) else layer


def hidden_state_indices(num_layers: int, layer: int | Sequence[int]) -> tuple[int, ...]:
    """:func:`hidden_state_index` of one layer or of each of a non-empty sequence of distinct layers."""
    layers = text_layer_setting(layer)
    if isinstance(layers, tuple):
        if not layers:
            raise ValueError("text layers: give at least one layer (e.g. [0, -1]), or one integer.")
        stops = tuple(hidden_state_index(num_layers, one) for one in layers)
        if len(set(stops)) != len(stops):
            raise ValueError(f"text layers {list(layers)} name the same hidden state twice; list each once.")
        return stops
    return (hidden_state_index(num_layers, layers),)


def is_last_layer(num_layers: int, layer: int | Sequence[int]) -> bool:
    """Whether ``layer`` conditions on the last layer's output alone (what diffusers / SD checkpoints express)."""
    return hidden_state_indices(num_layers, layer) == (num_layers,)


def abstract_params(config: CLIPTextConfig, param_dtype: Any = jnp.float32) -> dict:
    """The parameter tree as ``jax.ShapeDtypeStruct`` leaves (no computation), for converters and sharding."""
    model = CLIPTextModel(config, param_dtype=param_dtype)
    ids = jax.ShapeDtypeStruct((1, config.max_position_embeddings), jnp.int32)
    return jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros(ids.shape, ids.dtype)))["params"]


def encode_text(
    params: Mapping[str, Any],
    input_ids: jax.Array,
    config: CLIPTextConfig,
    layer: int | Sequence[int] = -1,
    dtype: Any = jnp.float32,
) -> jax.Array:
    """Pure function: ``[B, L]`` ids -> ``[B, L, D]`` hidden state of ``layer`` after the final LayerNorm.

    ``layer=-1`` is SD 1.x's conditioning (and SD 2.x's with diffusers' 23-layer folders); ``layer=-2`` on a
    full 24-layer OpenCLIP tower is SD 2.x's penultimate-layer conditioning ("CLIP skip").
    """
    model = CLIPTextModel(config, dtype=dtype)
    return model.apply({"params": params}, input_ids, layer, method=CLIPTextModel.encode)
