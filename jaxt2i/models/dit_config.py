"""Configuration of the diffusion transformers (:mod:`jaxt2i.models.dit`): :class:`DiTConfig`, its diffusers
config.json reader/writer (``DiTTransformer2DModel``, ``PixArtTransformer2DModel`` and the legacy
``Transformer2DModel`` names) and the named presets (the DiT paper's sizes, PixArt-alpha 512, tiny ones)."""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

CLASS = "class"
TEXT = "text"
CONDITIONINGS = (CLASS, TEXT)
DEFAULT_NORM_EPS = {CLASS: 1e-5, TEXT: 1e-6}
_CLASS_NAMES = {"DiTTransformer2DModel": CLASS, "PixArtTransformer2DModel": TEXT}
_NORM_TYPES = {"ada_norm_zero": CLASS, "ada_norm_single": TEXT}
_LEGACY_CLASS_NAME = "Transformer2DModel"

# diffusers' constructor defaults of each layout's class: a config.json omits entries at their default.
_DIFFUSERS_DEFAULTS: dict[str, dict[str, Any]] = {
    CLASS: dict(num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=None, num_layers=28,
                dropout=0.0, sample_size=32, patch_size=2, num_embeds_ada_norm=1000, upcast_attention=False,
                norm_eps=1e-5),
    TEXT: dict(num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8, num_layers=28,
               dropout=0.0, cross_attention_dim=1152, sample_size=128, patch_size=2, num_embeds_ada_norm=1000,
               upcast_attention=False, norm_eps=1e-6, interpolation_scale=None, use_additional_conditions=None,
               caption_channels=None),
}
# Entries whose value is fixed in the architectures implemented here (key: accepted values).
_DIFFUSERS_FIXED: dict[str, tuple] = {
    "activation_fn": ("gelu-approximate",),
    "attention_bias": (True,),
    "norm_elementwise_affine": (False,),
    "only_cross_attention": (False,),
    "double_self_attention": (False,),
    "num_vector_embeds": (None,),
    "attention_type": ("default", None),
}
_DIFFUSERS_IGNORED = ("norm_num_groups", "use_linear_projection", "norm_type")  # no effect on patched inputs


@dataclasses.dataclass(frozen=True)
class DiTConfig:
    """Architecture of a DiT (``conditioning="class"``) or PixArt-alpha-style text DiT (``"text"``).

    ``None`` fields resolve in ``__post_init__``: ``out_channels`` -> ``2 * in_channels`` (learned sigma),
    ``norm_eps`` -> 1e-5 (class) / 1e-6 (text), ``interpolation_scale`` -> 1 (class) /
    ``max(sample_size // 64, 1)`` (text), ``use_additional_conditions`` -> ``sample_size == 128`` (text; the PixArt
    1024 rule of diffusers), False (class). ``num_classes`` is used by the class layout only (its label table has
    ``num_classes + 1`` rows, the last being the null class); ``caption_channels`` by the text layout only.
    """

    sample_size: int = 32
    patch_size: int = 2
    in_channels: int = 4
    out_channels: int | None = None
    num_layers: int = 28
    num_attention_heads: int = 16
    attention_head_dim: int = 72
    conditioning: str = CLASS
    num_classes: int = 1000
    caption_channels: int = 4096
    norm_eps: float | None = None
    interpolation_scale: float | None = None
    use_additional_conditions: bool | None = None
    dropout: float = 0.0
    # Recorded for round-tripping; attention scores and softmax are always float32 here.
    upcast_attention: bool = False

    def __post_init__(self):
        if self.conditioning not in CONDITIONINGS:
            raise ValueError(f"DiTConfig: conditioning={self.conditioning!r}; use one of {CONDITIONINGS}.")
        text = self.conditioning == TEXT
        resolved = {
            "out_channels": 2 * self.in_channels if self.out_channels is None else self.out_channels,
            "norm_eps": DEFAULT_NORM_EPS[self.conditioning] if self.norm_eps is None else self.norm_eps,
            "interpolation_scale": (float(max(self.sample_size // 64, 1)) if text else 1.0)
            if self.interpolation_scale is None else float(self.interpolation_scale),
            "use_additional_conditions": (text and self.sample_size == 128)
            if self.use_additional_conditions is None else bool(self.use_additional_conditions),
        }
        for name, value in resolved.items():
            object.__setattr__(self, name, value)
        self._validate()

    def _validate(self) -> None:
        def need(ok: bool, message: str) -> None:
            if not ok:
                raise ValueError(f"DiTConfig: {message}")

        for name in ("sample_size", "patch_size", "in_channels", "out_channels", "num_layers",
                     "num_attention_heads", "attention_head_dim"):
            need(isinstance(getattr(self, name), int) and getattr(self, name) >= 1,
                 f"{name}={getattr(self, name)!r} must be a positive int.")
        need(self.sample_size % self.patch_size == 0,
             f"sample_size={self.sample_size} is not a multiple of patch_size={self.patch_size}.")
        need(self.width % 4 == 0, f"width {self.width} (heads x head dim) must be a multiple of 4 for the 2-D "
                                  "sine-cosine position table.")
        if self.conditioning == CLASS:
            need(self.num_classes >= 1, f"num_classes={self.num_classes} must be >= 1.")
            need(self.interpolation_scale == 1.0, f"interpolation_scale={self.interpolation_scale}: the class "
                                                  "layout (diffusers' DiTTransformer2DModel) has none; use 1.")
            need(not self.use_additional_conditions, "use_additional_conditions is a text-layout (PixArt) option.")
        else:
            need(isinstance(self.caption_channels, int) and self.caption_channels >= 1,
                 f"caption_channels={self.caption_channels!r} must be a positive int (the text states' width).")
            need(not self.use_additional_conditions or self.width % 3 == 0,
                 f"use_additional_conditions needs a width divisible by 3 (got {self.width}).")

    # -- derived quantities ------------------------------------------------------------------------------------------

    @property
    def width(self) -> int:
        """Model width: heads x head dim."""
        return self.num_attention_heads * self.attention_head_dim

    @property
    def learn_sigma(self) -> bool:
        """Whether the output carries the variance values after the noise (``out_channels == 2 * in_channels``)."""
        return self.out_channels == 2 * self.in_channels

    @property
    def null_class(self) -> int:
        """The label id of the unconditional ("null") class of the class layout."""
        return self.num_classes

    @property
    def base_grid(self) -> int:
        """Tokens per side at ``sample_size``: the grid the position table is scaled to."""
        return self.sample_size // self.patch_size

    # -- diffusers config.json ---------------------------------------------------------------------------------------

    @classmethod
    def from_diffusers(cls, config: Mapping[str, Any]) -> "DiTConfig":
        """Reads a diffusers transformer config.json dict: ``DiTTransformer2DModel``, ``PixArtTransformer2DModel``,
        or the legacy ``Transformer2DModel`` with ``norm_type`` ``"ada_norm_zero"`` / ``"ada_norm_single"`` (as in
        facebook/DiT-XL-2-256 and the PixArt-alpha folders). Anything else is refused with a ValueError."""
        config = dict(config)
        layout = _layout_of(config)
        defaults = _DIFFUSERS_DEFAULTS[layout]
        for key, allowed in _DIFFUSERS_FIXED.items():
            if key in config and config[key] not in allowed:
                raise ValueError(f"DiTConfig.from_diffusers: {key}={config[key]!r} is not supported "
                                 f"(only {allowed[0]!r}).")
        known = set(_DIFFUSERS_DEFAULTS[TEXT]) | set(_DIFFUSERS_FIXED) | set(_DIFFUSERS_IGNORED)
        unknown = sorted(k for k in config if k not in known and not k.startswith("_"))
        if unknown:
            raise ValueError(f"DiTConfig.from_diffusers: unknown config entries {unknown}; this transformer variant "
                             "is not supported.")
        get = lambda key: config.get(key, defaults.get(key))
        sample_size = get("sample_size")
        if isinstance(sample_size, (list, tuple)):
            if len(set(sample_size)) != 1:
                raise ValueError(f"DiTConfig.from_diffusers: sample_size={sample_size} is not square.")
            sample_size = sample_size[0]
        kwargs = dict(
            sample_size=int(sample_size), patch_size=get("patch_size"), in_channels=get("in_channels"),
            out_channels=get("out_channels") or get("in_channels"), num_layers=get("num_layers"),
            num_attention_heads=get("num_attention_heads"), attention_head_dim=get("attention_head_dim"),
            conditioning=layout, norm_eps=float(get("norm_eps")), dropout=float(get("dropout")),
            upcast_attention=bool(get("upcast_attention")),
        )
        if layout == CLASS:
            for key in ("cross_attention_dim", "caption_channels"):
                if config.get(key) is not None:
                    raise ValueError(f"DiTConfig.from_diffusers: {key}={config[key]!r} in an adaLN-Zero (class) "
                                     "transformer is not supported; DiT has no cross-attention.")
            return cls(num_classes=get("num_embeds_ada_norm"), **kwargs)
        return cls(**kwargs, **_text_fields(config, defaults, kwargs))

    def to_diffusers(self) -> dict[str, Any]:
        """The diffusers config.json dict (``DiTTransformer2DModel`` / ``PixArtTransformer2DModel``)."""
        out: dict[str, Any] = dict(
            num_attention_heads=self.num_attention_heads, attention_head_dim=self.attention_head_dim,
            in_channels=self.in_channels, out_channels=self.out_channels, num_layers=self.num_layers,
            dropout=self.dropout, norm_num_groups=32, attention_bias=True, sample_size=self.sample_size,
            patch_size=self.patch_size, activation_fn="gelu-approximate", upcast_attention=self.upcast_attention,
            norm_elementwise_affine=False, norm_eps=self.norm_eps,
        )
        if self.conditioning == CLASS:
            return {"_class_name": "DiTTransformer2DModel", **out, "num_embeds_ada_norm": self.num_classes,
                    "norm_type": "ada_norm_zero"}
        return {"_class_name": "PixArtTransformer2DModel", **out, "num_embeds_ada_norm": 1000,
                "norm_type": "ada_norm_single", "cross_attention_dim": self.width,
                "interpolation_scale": self.interpolation_scale,
                "use_additional_conditions": self.use_additional_conditions,
                "caption_channels": self.caption_channels, "attention_type": "default"}


def _layout_of(config: Mapping[str, Any]) -> str:
    """``"class"`` or ``"text"`` from a diffusers config's class name and norm type; ValueError otherwise."""
    class_name = config.get("_class_name")
    norm_type = config.get("norm_type")
    if class_name in _CLASS_NAMES:
        layout = _CLASS_NAMES[class_name]
        if norm_type is not None and _NORM_TYPES.get(norm_type) != layout:
            raise ValueError(f"DiTConfig.from_diffusers: {class_name} with norm_type={norm_type!r} is inconsistent.")
        return layout
    if class_name == _LEGACY_CLASS_NAME and norm_type in _NORM_TYPES:
        if config.get("patch_size") is None or config.get("in_channels") is None:
            raise ValueError("DiTConfig.from_diffusers: this Transformer2DModel has no patch_size/in_channels; only "
                             "patched-latent transformers (DiT, PixArt) are supported.")
        return _NORM_TYPES[norm_type]
    raise ValueError(
        f"DiTConfig.from_diffusers: expected a DiTTransformer2DModel or PixArtTransformer2DModel config (or a "
        f"Transformer2DModel with norm_type 'ada_norm_zero' / 'ada_norm_single'); got _class_name={class_name!r}, "
        f"norm_type={norm_type!r}. Continuous-input or vector-input transformers are not DiTs.")


def _text_fields(config: Mapping[str, Any], defaults: Mapping[str, Any], kwargs: Mapping[str, Any]) -> dict:
    """The text-layout fields of a PixArt config; refuses a missing caption projection or a narrow context."""
    caption = config.get("caption_channels", defaults["caption_channels"])
    if caption is None:
        raise ValueError("DiTConfig.from_diffusers: caption_channels is null; the text layout needs the caption "
                         "projection (PixArt-alpha has caption_channels=4096).")
    width = kwargs["num_attention_heads"] * kwargs["attention_head_dim"]
    cross = config.get("cross_attention_dim", defaults["cross_attention_dim"])
    if cross != width:
        raise ValueError(f"DiTConfig.from_diffusers: cross_attention_dim={cross} must equal the width {width} (the "
                         "caption projection maps the text states to the width).")
    return dict(caption_channels=caption, interpolation_scale=config.get("interpolation_scale"),
                use_additional_conditions=config.get("use_additional_conditions"))


def _preset(depth: int, width: int, heads: int, patch: int) -> DiTConfig:
    return DiTConfig(num_layers=depth, num_attention_heads=heads, attention_head_dim=width // heads, patch_size=patch)


# (depth, width, heads) of the DiT paper's model sizes.
DIT_SIZES = {"XL": (28, 1152, 16), "L": (24, 1024, 16), "B": (12, 768, 12), "S": (12, 384, 6)}

PRESETS: dict[str, DiTConfig] = {
    f"DiT-{size}/{patch}": _preset(*dims, patch) for size, dims in DIT_SIZES.items() for patch in (2, 4, 8)
}
PRESETS["PixArt-alpha-512"] = DiTConfig(sample_size=64, conditioning=TEXT, caption_channels=4096)
PRESETS["tiny"] = DiTConfig(sample_size=8, num_layers=2, num_attention_heads=2, attention_head_dim=16,
                            num_classes=10)
PRESETS["tiny_text"] = DiTConfig(sample_size=8, num_layers=2, num_attention_heads=2, attention_head_dim=16,
                                 conditioning=TEXT, caption_channels=32)
