"""Run configuration: a YAML file plus ``key=value`` overrides -> frozen dataclasses.

``load_config("configs/tiny.yaml", ["steps=20", "mesh.data=2", "optim.lr=1e-4"])`` reads the file,
applies the overrides (dotted keys name nested sections; values are parsed as YAML scalars or
lists), and builds a ``TrainConfig``. Its ``kind`` (``jaxt2i.train.kinds``) decides what the ``model`` and
``loss`` sections hold: each kind declares their dataclasses. Any key that is not a field -- in the file or in an
override -- is an error that names the key and lists the valid ones, so a typo never trains silently with a
default. Values are checked against the fields' types (ints, floats, bools, strings, optionals,
tuples).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import yaml

from jaxt2i.data.sources import SOURCES
from jaxt2i.diffusion.schedules import ScheduleConfig
from jaxt2i.dtypes import DTYPES
from jaxt2i.train.kinds import kind_class
from jaxt2i.train.optim import OptimConfig
from jaxt2i.train.sharding import MeshConfig
from jaxt2i.train.state import TrainableConfig

NAN_POLICIES = ("abort", "skip")
STEP_FORMS = ("jit", "shard_map")


@dataclass(frozen=True)
class DataConfig:
    """Where training examples come from and how they are prepared.

    source: a name of ``jaxt2i.data.sources.SOURCES`` -- "shapes" (the shapes world), "folder" (metadata.jsonl
        or a Flickr30k-layout captions CSV), "tfds" (``name`` through TensorFlow Datasets; ``path`` is then its
        data_dir) -- or a ``package.module:Class`` path of a source of one's own.
    split: the source's split (shapes: "train" or "heldout"; tfds: e.g. "train[:90%]").
    image_size: square side images are resized (shorter side) and cropped to.
    crop: "center" or "random"; flip: random horizontal flips (off: captions mention left/right).
    num_examples: size of a generated set (shapes).
    options: keyword arguments of the source's own (shapes: ``seed``, ``captions_per_image``,
        ``two_object_probability``).
    captions_file, images_dir: override the folder's captions file and image location.
    cache_dir: folder of cached VAE latents + text embeddings (``jaxt2i.data.cache``); used when
        ``use_cache`` is true; ``write_cache`` first encodes the dataset into it.
    prefetch: batches prepared ahead in a background thread (0: none).
    """

    source: str = "shapes"
    path: str | None = None
    name: str | None = None
    split: str | None = None
    image_key: str = "image"
    caption_key: str | None = None
    captions_file: str | None = None
    images_dir: str | None = None
    image_size: int = 64
    crop: str = "center"
    flip: bool = False
    num_examples: int = 1024
    options: Any = None
    cache_dir: str | None = None
    use_cache: bool = False
    write_cache: bool = False
    prefetch: int = 2

    def __post_init__(self):
        if self.source not in SOURCES and ":" not in self.source:
            raise ValueError(f"data.source={self.source!r}; use one of {sorted(SOURCES)} or a 'package.module:Class' "
                             "path")
        if self.options is not None and not isinstance(self.options, Mapping):
            raise ValueError(f"data.options must be a mapping of the source's keyword arguments, got {self.options!r}")
        if self.crop not in ("center", "random"):
            raise ValueError(f"data.crop={self.crop!r}; use 'center' or 'random'")
        if (self.use_cache or self.write_cache) and not self.cache_dir:
            raise ValueError("data.use_cache / data.write_cache need data.cache_dir")


@dataclass(frozen=True)
class SampleConfig:
    """Sample grids from fixed prompts, saved as PNG under WORKDIR/samples/ every ``every`` steps (0: never).

    ``steps`` and ``guidance_scale`` are also what the exported model folder recommends (``jaxt2i.json``'s
    ``"sampling"``, ``jaxt2i generate``'s defaults) for kinds that export a pipeline (``unet``)."""

    every: int = 0
    prompts: tuple[str, ...] = ("a red circle", "a blue square to the left of a green triangle")
    steps: int = 20
    guidance_scale: float = 5.0
    sampler: str = "ddim"
    seed: int = 0
    use_ema: bool = True


@dataclass(frozen=True)
class TrainConfig:
    """One training run. See configs/*.yaml for commented examples.

    kind: what trains (a key of ``jaxt2i.train.kinds.KINDS``: "unet", "vae", "clip"); its module declares the
        ``model`` and ``loss`` sections (``Kind.ModelConfig``, ``Kind.LossConfig``), given here as mappings and
        built into those dataclasses.
    workdir: checkpoints/, metrics.jsonl, samples/, final/ go here; a run restarts from its latest checkpoint.
    steps: optimizer steps to run in total; batch_size: global batch (all hosts together).
    checkpoint_every / keep_checkpoints / async_checkpoints: Orbax checkpointing.
    log_every: metrics written every that many steps (and at the end).
    nan_policy: "abort" (stop with an error on a NaN/Inf loss) or "skip" (discard the step's update).
    form: "jit" (GSPMD with explicit shardings) or "shard_map" (explicit data-parallel pmean).
    compute_dtype: "float32", "bfloat16" or "float16" (activations; master weights stay float32).
    peak_tflops: peak dense TFLOP/s of one device for the MFU estimate (default: a table by device kind).
    coordinator_address / num_processes / process_id: multi-host start-up (or JAXT2I_* env variables).
    export_diffusers: also write WORKDIR/final_diffusers/ (a diffusers folder) at the end (kind "unet").
    schedule / sample: the noise schedule and the sample grids (diffusion kinds; ``sample.every`` for all).
    """

    kind: str = "unet"
    workdir: str = "workdir"
    steps: int = 1000
    seed: int = 0
    batch_size: int = 8
    checkpoint_every: int = 500
    keep_checkpoints: int = 3
    async_checkpoints: bool = True
    log_every: int = 10
    nan_policy: str = "abort"
    form: str = "jit"
    compute_dtype: str = "float32"
    peak_tflops: float | None = None
    tensorboard: bool = True
    progress: bool = True
    export_diffusers: bool = False
    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    model: Any = None
    data: DataConfig = field(default_factory=DataConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: Any = None
    trainable: TrainableConfig = field(default_factory=TrainableConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)

    def __post_init__(self):
        if self.nan_policy not in NAN_POLICIES:
            raise ValueError(f"nan_policy={self.nan_policy!r}; use one of {NAN_POLICIES}")
        if self.form not in STEP_FORMS:
            raise ValueError(f"form={self.form!r}; use one of {STEP_FORMS}")
        if self.compute_dtype not in DTYPES:
            raise ValueError(f"compute_dtype={self.compute_dtype!r}; use one of {sorted(DTYPES)}")
        for name in ("steps", "batch_size", "checkpoint_every", "keep_checkpoints", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        kind = kind_class(self.kind)
        for name, cls in (("model", kind.ModelConfig), ("loss", kind.LossConfig)):
            value = getattr(self, name)
            if value is None or isinstance(value, Mapping):
                object.__setattr__(self, name, from_dict(cls, value, f"{name}."))
            elif not isinstance(value, cls):
                raise ConfigError(f"{name}: kind {self.kind!r} takes a {cls.__name__}, got {type(value).__name__}")


class ConfigError(ValueError):
    """A config file or override that does not fit ``TrainConfig``."""


# ----------------------------------------------------------------------------- parsing


def _field_types(cls) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value, tp, key: str):
    """``value`` as type ``tp``, or a ConfigError naming ``key``."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        if isinstance(value, str) and value.lower() in ("none", "null") and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError:
                continue
        raise ConfigError(f"{key}: {value!r} is not a {_type_name(tp)}")
    if origin in (tuple, list):
        args = typing.get_args(tp)
        items = value if isinstance(value, (list, tuple)) else [value]
        elem = args[0] if args else Any
        return tuple(_coerce(v, elem, key) for v in items)
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        try:
            return int(value)
        except ValueError:
            raise ConfigError(f"{key}: expected an integer, got {value!r}") from None
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        try:
            return float(value)  # YAML reads "1e-4" as a string
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: expected a number, got {value!r}") from None
    if tp is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return str(value)
    return value


def from_dict(cls, data: Mapping[str, Any] | None, prefix: str = ""):
    """Builds dataclass ``cls`` from a nested dict; unknown keys raise a ConfigError listing the valid ones."""
    data = dict(data or {})
    types_ = _field_types(cls)
    unknown = [k for k in data if k not in types_]
    if unknown:
        where = f"section '{prefix.rstrip('.')}'" if prefix else "the top level"
        raise ConfigError(
            f"unknown config key '{prefix}{unknown[0]}'; valid keys in {where}: {', '.join(sorted(types_))}"
        )
    kwargs = {}
    for name, value in data.items():
        tp = types_[name]
        if dataclasses.is_dataclass(tp):
            if value is not None and not isinstance(value, Mapping):
                raise ConfigError(f"'{prefix}{name}' is a section; give its keys ({prefix}{name}.KEY=VALUE)")
            kwargs[name] = from_dict(tp, value, f"{prefix}{name}.")
        else:
            kwargs[name] = _coerce(value, tp, f"{prefix}{name}")
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: {e}") from e


def to_dict(cfg) -> dict:
    """A config dataclass -> plain nested dict (tuples as lists), the inverse of ``from_dict``."""
    out = {}
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        if dataclasses.is_dataclass(v):
            out[f.name] = to_dict(v)
        elif isinstance(v, tuple):
            out[f.name] = list(v)
        else:
            out[f.name] = v
    return out


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"a.b=value"`` -> ``(["a", "b"], value)``; the value is read as YAML (``[1, 2]``, ``true``, ``null``...)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key=value (e.g. steps=100 or mesh.fsdp=2)")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def apply_overrides(data: Mapping[str, Any], overrides: Sequence[str]) -> dict:
    """A nested dict with each ``key=value`` override set (creating sections as needed)."""
    data = _deep_copy(data)
    for text in overrides:
        path, value = parse_override(text)
        node = data
        for part in path[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"override {text!r}: '{part}' is not a section")
            node = child
        node[path[-1]] = value
    return data


def _deep_copy(d):
    return {k: _deep_copy(v) if isinstance(v, Mapping) else v for k, v in (d or {}).items()}


def load_config(path: str | Path | None, overrides: Sequence[str] = ()) -> TrainConfig:
    """YAML file (or None: all defaults) + overrides -> TrainConfig.

    ``optim.total_steps`` (the end of the cosine decay) defaults to ``steps`` when not given.
    """
    data: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {p} does not exist")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{p}: not valid YAML: {e}") from e
        if not isinstance(data, Mapping):
            raise ConfigError(f"{p}: the top level must be a mapping of keys, got {type(data).__name__}")
    data = apply_overrides(data, overrides)
    optim = data.get("optim")
    if optim is None or (isinstance(optim, Mapping) and "total_steps" not in optim):
        # the learning-rate schedule spans the run unless told otherwise
        data["optim"] = {**(optim or {}), "total_steps": data.get("steps", TrainConfig.steps)}
    return from_dict(TrainConfig, data)
