"""A small CLIP: a ViT image encoder, paired with :class:`~jaxt2i.models.clip.CLIPTextModel`, trained contrastively.

Image tower (OpenAI CLIP's ViT layout, small)::

    patches = conv_{P x P, stride P}(image)                 # [B, (H/P)(W/P), D], no bias
    x = [class_embedding; patches] + position_embedding      # [B, 1 + N, D]
    x = pre_layernorm(x); for each layer: x += attn(ln1(x)); x += mlp(ln2(x))   (bidirectional)
    pooled = post_layernorm(x[:, 0]); image_embeds = visual_projection(pooled)  # [B, P], no bias

:class:`CLIPModel` puts it beside a text tower with a ``text_projection`` and a learned temperature
``logit_scale`` (log of the inverse temperature, initialised at ``ln(1/0.07)`` and clipped at ``ln(100)`` as in
CLIP); :func:`contrastive_loss` is the symmetric InfoNCE loss over a batch of matching (image, caption) pairs.

Images enter in [0, 1], NHWC; the model maps them to [-1, 1] itself (no dataset-specific normalisation).
Parameter tree::

    vision_model/patch_embedding/kernel [P, P, 3, D], class_embedding [D], position_embedding/embedding [1+N, D],
    vision_model/pre_layernorm, layers_{i}/{layer_norm1, self_attn/{query,key,value,out}, layer_norm2,
    mlp/{fc1,fc2}}, post_layernorm, visual_projection/kernel [D, P]
    text_model/...  (CLIPTextModel with text_projection/kernel [Dt, P]),  logit_scale []
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import einops
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from jaxt2i.models.clip import ACTIVATIONS, CLIPEncoderLayer, CLIPTextConfig, CLIPTextModel, LayerNorm

LOGIT_SCALE_INIT = math.log(1.0 / 0.07)  # CLIP's initial temperature 0.07
LOGIT_SCALE_MAX = math.log(100.0)  # CLIP clips the inverse temperature at 100


@dataclasses.dataclass(frozen=True)
class CLIPVisionConfig:
    """Architecture of a ViT image tower; ``projection_dim`` is the size of the joint embedding space."""

    image_size: int = 64
    patch_size: int = 8
    num_channels: int = 3
    hidden_size: int = 64
    intermediate_size: int = 256
    num_layers: int = 4
    num_heads: int = 4
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    projection_dim: int = 64

    def __post_init__(self):
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"hidden_act must be one of {ACTIVATIONS}; got {self.hidden_act!r}.")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}.")
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}.")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


VISION_PRESETS: dict[str, CLIPVisionConfig] = {
    # 64x64 shapes-world images, 8x8 patches -> 64 patch tokens + the class token.
    "shapes": CLIPVisionConfig(),
    "tiny": CLIPVisionConfig(image_size=64, patch_size=16, hidden_size=32, intermediate_size=64, num_layers=2,
                             num_heads=2, projection_dim=16),
}


def vision_preset(name: str) -> CLIPVisionConfig:
    """A named image-tower preset (see ``VISION_PRESETS``)."""
    if name not in VISION_PRESETS:
        raise KeyError(f"Unknown CLIP vision preset {name!r}; choose one of {', '.join(VISION_PRESETS)}.")
    return VISION_PRESETS[name]


class CLIPVisionModel(nn.Module):
    """ViT image tower: ``images [B, H, W, 3]`` in [0, 1] -> ``(image_embeds [B, P], pooled [B, D])``."""

    config: CLIPVisionConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
        cfg, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        if images.shape[1:] != (cfg.image_size, cfg.image_size, cfg.num_channels):
            raise ValueError(f"CLIPVisionModel expects images [B, {cfg.image_size}, {cfg.image_size}, "
                             f"{cfg.num_channels}]; got {images.shape}. Resize them first.")
        x = 2.0 * images.astype(self.dtype) - 1.0
        p = cfg.patch_size
        x = nn.Conv(cfg.hidden_size, (p, p), strides=(p, p), padding="VALID", use_bias=False,
                    name="patch_embedding", **kw)(x)  # [B, H/P, W/P, D]
        x = einops.rearrange(x, "b h w d -> b (h w) d")
        init = nn.initializers.normal(cfg.hidden_size ** -0.5)
        cls = self.param("class_embedding", init, (cfg.hidden_size,), self.param_dtype).astype(self.dtype)
        x = jnp.concatenate([jnp.broadcast_to(cls, (x.shape[0], 1, cfg.hidden_size)), x], axis=1)
        positions = jnp.arange(cfg.num_patches + 1)[None, :]
        x = x + nn.Embed(cfg.num_patches + 1, cfg.hidden_size, embedding_init=nn.initializers.normal(0.02),
                         name="position_embedding", **kw)(positions)
        x = LayerNorm(cfg.layer_norm_eps, name="pre_layernorm", **kw)(x)
        for i in range(cfg.num_layers):
            x = CLIPEncoderLayer(cfg, causal=False, name=f"layers_{i}", **kw)(x)
        pooled = LayerNorm(cfg.layer_norm_eps, name="post_layernorm", **kw)(x[:, 0])
        embeds = nn.Dense(cfg.projection_dim, use_bias=False, name="visual_projection", **kw)(pooled)
        return embeds, pooled


def image_tower_abstract_params(config: CLIPVisionConfig, param_dtype: Any = jnp.float32) -> dict:
    """``{"vision_model": ..., "logit_scale": []}`` as ``jax.ShapeDtypeStruct`` leaves: the image side of a CLIP
    whose text tower is a model's text encoder (a model folder's ``clip_vision`` component)."""
    images = jax.ShapeDtypeStruct((1, config.image_size, config.image_size, config.num_channels), jnp.float32)
    vision = jax.eval_shape(CLIPVisionModel(config, param_dtype=param_dtype).init, jax.random.PRNGKey(0), images)
    return {"vision_model": vision["params"], "logit_scale": jax.ShapeDtypeStruct((), jnp.float32)}


@dataclasses.dataclass(frozen=True)
class CLIPConfig:
    """A text tower and an image tower that share a joint space of ``vision.projection_dim`` dimensions."""

    text: CLIPTextConfig
    vision: CLIPVisionConfig

    def __post_init__(self):
        if self.text.projection_dim != self.vision.projection_dim:
            raise ValueError(f"text.projection_dim ({self.text.projection_dim}) must equal vision.projection_dim "
                             f"({self.vision.projection_dim}): both towers project into the same space.")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "CLIPConfig":
        """Inverse of ``dataclasses.asdict``."""
        return cls(text=CLIPTextConfig(**d["text"]), vision=CLIPVisionConfig(**d["vision"]))


# The shapes-world CLIP: a narrow text tower (the 49408-token embedding dominates its size: 49408 x 64 x 4 B
# = 12.6 MB in float32, 6.3 MB in float16) and the `shapes` ViT, joined in a 64-dimensional space.
SHAPES_TEXT = CLIPTextConfig(hidden_size=64, intermediate_size=256, num_layers=4, num_heads=4,
                             hidden_act="quick_gelu", projection_dim=64)
PRESETS: dict[str, CLIPConfig] = {
    "shapes": CLIPConfig(text=SHAPES_TEXT, vision=VISION_PRESETS["shapes"]),
    "tiny": CLIPConfig(
        text=CLIPTextConfig(vocab_size=49408, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2,
                            projection_dim=16),
        vision=VISION_PRESETS["tiny"]),
}


def preset(name: str) -> CLIPConfig:
    """A named CLIP preset (see ``PRESETS``)."""
    if name not in PRESETS:
        raise KeyError(f"Unknown CLIP preset {name!r}; choose one of {', '.join(PRESETS)}.")
    return PRESETS[name]


def l2_normalize(x: jax.Array, eps: float = 1e-6) -> jax.Array:
    """``x / |x|`` along the last axis, in float32."""
    x = x.astype(jnp.float32)
    return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), eps * eps))


class CLIPModel(nn.Module):
    """Text and image towers with a learned temperature.

    ``__call__(input_ids [B, L], images [B, H, W, 3]) -> (image_embeds [B, P], text_embeds [B, P], logit_scale [])``
    with unit-norm float32 embeddings and the (unclipped) log inverse temperature.
    """

    config: CLIPConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def setup(self):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.text_model = CLIPTextModel(self.config.text, **kw)
        self.vision_model = CLIPVisionModel(self.config.vision, **kw)
        self.logit_scale = self.param("logit_scale", nn.initializers.constant(LOGIT_SCALE_INIT), (), jnp.float32)

    def get_text_features(self, input_ids: jax.Array) -> jax.Array:
        """``[B, L]`` ids -> unit-norm ``[B, P]`` text embeddings."""
        return l2_normalize(self.text_model(input_ids).text_embeds)

    def get_image_features(self, images: jax.Array) -> jax.Array:
        """``[B, H, W, 3]`` images in [0, 1] -> unit-norm ``[B, P]`` image embeddings."""
        return l2_normalize(self.vision_model(images)[0])

    def __call__(self, input_ids: jax.Array, images: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        return self.get_image_features(images), self.get_text_features(input_ids), self.logit_scale


def init_params(config: CLIPConfig, key: jax.Array, param_dtype: Any = jnp.float32) -> dict:
    """Randomly initialised parameters of :class:`CLIPModel` (the tree under ``"params"``)."""
    v = config.vision
    ids = jnp.zeros((1, config.text.max_position_embeddings), jnp.int32)
    images = jnp.zeros((1, v.image_size, v.image_size, v.num_channels), jnp.float32)
    return CLIPModel(config, param_dtype=param_dtype).init(key, ids, images)["params"]


def clipped_scale(logit_scale: jax.Array) -> jax.Array:
    """The inverse temperature ``exp(min(logit_scale, ln 100))`` (float32 scalar)."""
    return jnp.exp(jnp.minimum(jnp.asarray(logit_scale, jnp.float32), LOGIT_SCALE_MAX))


def contrastive_logits(image_embeds: jax.Array, text_embeds: jax.Array, logit_scale: jax.Array) -> jax.Array:
    """``[B, P]`` unit-norm image and text embeddings -> ``[B, B]`` logits, row i = image i against every text."""
    return clipped_scale(logit_scale) * jnp.einsum("ip,tp->it", image_embeds.astype(jnp.float32),
                                                   text_embeds.astype(jnp.float32))


def contrastive_loss(image_embeds: jax.Array, text_embeds: jax.Array, logit_scale: jax.Array,
                     negative_text_embeds: jax.Array | None = None) -> jax.Array:
    """Symmetric InfoNCE: the mean of the image->text and text->image cross-entropies, pair i matching i.

    Args: unit-norm ``[B, P]`` image and text embeddings; ``logit_scale`` the log inverse temperature (clipped at
    ln 100); optional unit-norm ``[N, P]`` ``negative_text_embeds`` (hard negatives, e.g. captions each image
    contradicts) that join the candidates of every image->text row only. Returns a float32 scalar.
    """
    logits = contrastive_logits(image_embeds, text_embeds, logit_scale)
    labels = jnp.arange(logits.shape[0])
    text_to_image = optax.softmax_cross_entropy_with_integer_labels(logits.T, labels)
    if negative_text_embeds is not None:
        logits = jnp.concatenate([logits, contrastive_logits(image_embeds, negative_text_embeds, logit_scale)], 1)
    image_to_text = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    return 0.5 * (jnp.mean(image_to_text) + jnp.mean(text_to_image))
