"""Reading every checkpoint kind into one in-memory form, and writing it back out.

``LoadedModel`` (configs + Flax params + schedule + tokenizer settings) is what every reader returns:
- :func:`read_diffusers_folder`: a diffusers-format folder (``model_index.json``: Stable Diffusion, DiT), safetensors
  or .bin, fp16 variants;
- :func:`read_single_file`: an original Stable Diffusion ``.safetensors``/``.ckpt`` (SD1, SD2, inpainting; EMA), or
  an original DiT ``.pt`` (its transformer; the rest of the pipeline from ``config``);
- :func:`read_native`: a folder written by ``jaxt2i convert``.
Writers: :func:`write_native`, :func:`write_diffusers_folder`, :func:`write_single_file`.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import shutil
import sys
from typing import Any, Mapping

import numpy as np
from tqdm import tqdm

from jaxt2i import presets
from jaxt2i.convert import clip_keys, dit_keys, native, unet_keys, vae_keys
from jaxt2i.convert.components import component, params_from_torch, params_to_torch
from jaxt2i.convert.core import ConversionError, Rule, to_flax
from jaxt2i.convert.io import atomic_folder, read_state_dict, write_safetensors
from jaxt2i.diffusion import schedules
from jaxt2i.diffusion.schedules import ScheduleConfig
from jaxt2i.models import clip, latent_diffusion
from jaxt2i.tokenizer import write_vocab_files

COMPONENT_NAMES = ("text_encoder", "vae", "unet")  # the Stable Diffusion components every other format holds
_SD_COMPONENTS = {name: name for name in COMPONENT_NAMES}
# diffusers pipeline classes -> (the jaxt2i family that loads them, {component folder: component type}).
DIFFUSERS_PIPELINES = {"StableDiffusionPipeline": ("latent_diffusion", _SD_COMPONENTS),
                       "StableDiffusionInpaintPipeline": ("latent_diffusion", _SD_COMPONENTS),
                       "DiTPipeline": ("dit", {"transformer": "dit", "vae": "vae"})}


@dataclasses.dataclass
class LoadedModel:
    """Everything a model folder holds, independent of the file format it came from.

    configs: component name -> config dataclass; params: component name -> Flax tree (numpy arrays);
    types: component name -> its type in ``jaxt2i.convert.components`` when the two differ (the name otherwise);
    family: the pipeline family that loads it (``"latent_diffusion"``), None for components alone (a VAE or a
    CLIP a training stage wrote); schedule: the noise schedule (None without a denoiser);
    tokenizer: {"pad": "eos"|"zero", "folder": path or None}; source: where it was read from;
    text_layer: which hidden state(s) of the text encoder condition the denoiser (``CLIPTextModel.encode``'s
    ``layer``: -1 the last, as in every diffusers and single-file checkpoint; 0 the token + position embeddings;
    a tuple: several, for a conditioner). Only jaxt2i's own format can store another value than -1.
    sampling: the model's recommended sampling settings (``{"steps": int, "guidance": float}``, either may be
    absent; ``jaxt2i generate``'s defaults), stored only by jaxt2i's own format.
    extras: family-specific settings kept with the model (the ``dit`` family's class names: ``{"id2label":
    {"0": "tench, Tinca tinca", ...}}``, as in diffusers' model index).
    shared: component name -> the shipped model (``jaxt2i.shipped``) whose identical component :func:`write_native`
    refers to instead of writing the weights (for models built to ship inside the package; readers leave it empty).
    """

    configs: dict[str, Any]
    params: dict[str, dict]
    schedule: ScheduleConfig | None
    tokenizer: dict
    source: str
    text_layer: int | tuple[int, ...] = -1
    sampling: dict = dataclasses.field(default_factory=dict)
    family: str | None = "latent_diffusion"
    types: dict[str, str] = dataclasses.field(default_factory=dict)
    extras: dict = dataclasses.field(default_factory=dict)
    shared: dict[str, str] = dataclasses.field(default_factory=dict)

    def component_type(self, name: str) -> str:
        """The ``jaxt2i.convert.components`` type of component ``name``."""
        return self.types.get(name, name)


def _each(items, what: str):
    """``items`` (components) with a progress bar on stderr when it is a terminal (tqdm stays silent otherwise)."""
    items = list(items)
    return tqdm(items, desc=f"{what} components", unit="component", disable=None, leave=False, file=sys.stderr)


# ----------------------------------------------------------------------------------------------- diffusers folders
def is_diffusers_folder(path: str | os.PathLike) -> bool:
    return os.path.isfile(os.path.join(path, "model_index.json"))


def _read_json(path: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} is missing; the diffusers folder is incomplete.") from None
    except json.JSONDecodeError as e:
        raise ConversionError(f"{path} is not valid JSON ({e}).") from None


def _weight_file(folder: str, stem: str, variant: str | None) -> list[str]:
    """The weight file(s) of one component folder, safetensors first; sharded checkpoints give several."""
    candidates = [stem, "diffusion_pytorch_model", "model", "pytorch_model"]
    suffixes = [f".{variant}" if variant else ""] + ([] if variant else [".fp16"])
    for suffix in suffixes:
        for ext in (".safetensors", ".bin"):
            for name in dict.fromkeys(candidates):
                single = os.path.join(folder, f"{name}{suffix}{ext}")
                if os.path.isfile(single):
                    return [single]
                index = single + ".index.json"
                if os.path.isfile(index):
                    weight_map = _read_json(index).get("weight_map")
                    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                        raise ConversionError(f"{index}: a shard index needs a \"weight_map\" of tensor name -> "
                                              "shard file; this one has none. The download is incomplete.")
                    return [os.path.join(folder, s) for s in sorted(set(weight_map.values()))]
    raise FileNotFoundError(
        f"{folder}: no weights found (looked for {stem}{{,.fp16}}.safetensors / .bin and sharded indexes).")


def _read_component_state_dict(folder: str, stem: str, variant: str | None) -> tuple[dict, str]:
    files = _weight_file(folder, stem, variant)
    state_dict: dict[str, np.ndarray] = {}
    for file in files:
        state_dict.update(read_state_dict(file))
    return state_dict, files[0] if len(files) == 1 else folder


def schedule_from_folder(path: str) -> ScheduleConfig:
    """The scheduler config of a diffusers folder (SD defaults when it has none)."""
    config_path = os.path.join(path, "scheduler", "scheduler_config.json")
    return ScheduleConfig.from_diffusers(_read_json(config_path)) if os.path.isfile(config_path) else ScheduleConfig()


def configs_from_folder(path: str, types: Mapping[str, str] = _SD_COMPONENTS) -> dict[str, Any]:
    """Component configs from a diffusers folder's ``*/config.json`` files (``types``: folder -> component type)."""
    return {name: _diffusers_config(os.path.join(path, name, "config.json"), kind) for name, kind in types.items()}


def _diffusers_config(path: str, kind: str) -> Any:
    """The config of one diffusers component from its ``config.json``; a bad value names the file."""
    data = _read_json(path)
    try:
        return component(kind).config_cls.from_diffusers(data)
    except ConversionError:
        raise
    except (TypeError, ValueError, KeyError) as e:
        raise ConversionError(f"{path}: not a valid {kind} config ({type(e).__name__}: {e}).") from None


def tokenizer_settings_from_folder(path: str) -> dict:
    folder = os.path.join(path, "tokenizer")
    return {"folder": folder if os.path.isdir(folder) else None, "pad": None}


def read_diffusers_folder(path: str, *, variant: str | None = None, dtype: Any = None) -> LoadedModel:
    """Reads a diffusers-format folder of a pipeline class in :data:`DIFFUSERS_PIPELINES` (Stable Diffusion, DiT).
    ``variant="fp16"`` picks ``*.fp16.*`` weight files."""
    path = os.fspath(path)
    index = _read_json(os.path.join(path, "model_index.json"))
    class_name = index.get("_class_name")
    if class_name not in DIFFUSERS_PIPELINES:
        raise ConversionError(f"{path}: model_index.json names {class_name!r}; jaxt2i reads "
                              f"{', '.join(DIFFUSERS_PIPELINES)} folders.")
    family, types = DIFFUSERS_PIPELINES[class_name]
    configs = configs_from_folder(path, types)
    params = {}
    for name in _each(types, "reading"):
        kind = types[name]
        sd, source = _read_component_state_dict(os.path.join(path, name), component(kind).weight_stem, variant)
        params[name] = params_from_torch(kind, sd, configs[name], source=source, dtype=dtype)
    extras = {"id2label": dict(index["id2label"])} if isinstance(index.get("id2label"), dict) else {}
    tokenizer = tokenizer_settings_from_folder(path) if "text_encoder" in types else {"folder": None, "pad": None}
    return LoadedModel(configs, params, schedule_from_folder(path), tokenizer, path, family=family,
                       types={k: v for k, v in types.items() if k != v}, extras=extras)


# --------------------------------------------------------------------------------------------- original single files
# Buffers of the original LDM training code that are not model weights.
_LDM_BUFFERS = (
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod",
    "posterior_variance", "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2",
    "logvar", "model_ema.decay", "model_ema.num_updates", "cond_stage_model.transformer.text_model.embeddings.position_ids",
)
_PREFIXES = {
    "unet": unet_keys.ORIGINAL_PREFIX,
    "vae": vae_keys.ORIGINAL_PREFIX,
    "text_encoder_sd1": clip_keys.SD1_PREFIX,
    "text_encoder_sd2": clip_keys.SD2_PREFIX,
}
_EMA_PREFIX = "model_ema."


def detect_single_file(state_dict: Mapping[str, np.ndarray], source: str) -> str:
    """Names the pipeline preset a single file matches, from tensor shapes: sd15, sd15_inpaint, sd21, sd2_inpaint."""
    conv_in = state_dict.get(unet_keys.ORIGINAL_PREFIX + "input_blocks.0.0.weight")
    if conv_in is None:
        raise ConversionError(f"{source}: no {unet_keys.ORIGINAL_PREFIX}input_blocks.0.0.weight; this is not an "
                              "original Stable Diffusion checkpoint. For a diffusers folder pass the folder.")
    inpaint = conv_in.shape[1] == 9
    if any(k.startswith(clip_keys.SD2_PREFIX) for k in state_dict):
        return "sd2_inpaint" if inpaint else "sd21"
    if any(k.startswith(clip_keys.SD1_PREFIX) for k in state_dict):
        return "sd15_inpaint" if inpaint else "sd15"
    raise ConversionError(f"{source}: no text encoder ({clip_keys.SD1_PREFIX}* or {clip_keys.SD2_PREFIX}*) found.")


def _ema_unet_tensors(state_dict: Mapping[str, np.ndarray], source: str) -> dict[str, np.ndarray]:
    """``model_ema.diffusion_model<key without dots>`` -> ``model.diffusion_model.<key>`` for every U-Net key."""
    out = {}
    for key in state_dict:
        if key.startswith(unet_keys.ORIGINAL_PREFIX):
            ema_key = _EMA_PREFIX + key[len("model."):].replace(".", "")
            if ema_key not in state_dict:
                raise ConversionError(f"{source}: EMA weights requested but {ema_key} (EMA of {key}) is missing; "
                                      "load without ema=True.")
            out[key] = state_dict[ema_key]
    return out


def _check_stray_keys(state_dict: Mapping[str, np.ndarray], source: str) -> None:
    known = tuple(_PREFIXES.values()) + (_EMA_PREFIX,)
    stray = sorted(k for k in state_dict if not k.startswith(known) and k not in _LDM_BUFFERS)
    if stray:
        raise ConversionError(f"{source}: {len(stray)} tensor(s) that belong to no Stable Diffusion component, "
                              f"e.g. {', '.join(stray[:5])}. Is this a different kind of checkpoint?")


def read_single_file(path: str, *, config: str | None = None, ema: bool = False, dtype: Any = None) -> LoadedModel:
    """Reads an original single-file SD checkpoint (.safetensors or .ckpt).

    Args:
      config: a pipeline preset name (``sd15``, ``sd21``, ``sd21_base``, ...) or a diffusers folder whose
        ``*/config.json`` and scheduler config describe the architecture; default: detected from tensor shapes.
      ema: use the EMA copy of the U-Net (``model_ema.*``) instead of the trained weights.
    """
    path = os.fspath(path)
    state_dict = read_state_dict(path)
    if "x_embedder.proj.weight" in state_dict:  # facebookresearch/DiT's layout
        return _read_original_dit(path, state_dict, config, dtype)
    _check_stray_keys(state_dict, path)
    if config is not None and is_diffusers_folder(config):
        configs, schedule = configs_from_folder(config), schedule_from_folder(config)
        tokenizer = tokenizer_settings_from_folder(config)
    else:
        spec = presets.get(config or detect_single_file(state_dict, path))
        configs, schedule, tokenizer = spec.configs(), spec.schedule, {"folder": None, "pad": spec.tokenizer_pad}
    if ema:
        state_dict = {**state_dict, **_ema_unet_tensors(state_dict, path)}
    text_prefix = _PREFIXES["text_encoder_sd2"] if any(
        k.startswith(_PREFIXES["text_encoder_sd2"]) for k in state_dict) else _PREFIXES["text_encoder_sd1"]
    torch_layout = {
        "unet": unet_keys.original_to_diffusers(state_dict, configs["unet"], source=path),
        "vae": vae_keys.original_to_diffusers(state_dict, configs["vae"], source=path),
        "text_encoder": clip_keys.original_to_diffusers(state_dict, configs["text_encoder"], text_prefix, source=path),
    }
    params = {}
    for name in _each(COMPONENT_NAMES, "converting"):
        try:
            params[name] = params_from_torch(name, torch_layout[name], configs[name], source=path, dtype=dtype)
        except ConversionError as e:
            raise _name_original_key(e, torch_layout[name], state_dict) from e
    return LoadedModel(configs, params, schedule, tokenizer, path)


def _read_original_dit(path: str, state_dict: Mapping[str, np.ndarray], config: str | None, dtype) -> LoadedModel:
    """An original DiT checkpoint (facebookresearch's ``DiT-XL-2-256x256.pt``: the transformer alone) with the VAE,
    schedule and class names of ``config``, a diffusers ``DiTPipeline`` folder or a jaxt2i ``dit`` folder."""
    if config is None or not os.path.isdir(config):
        raise ConversionError(
            f"{path} is an original DiT checkpoint: it holds the transformer alone. Name a model that has the rest "
            f"of the pipeline (VAE, scheduler, class names) with config=FOLDER (`--config FOLDER`): a diffusers "
            f"DiTPipeline folder such as facebook/DiT-XL-2-256, or a jaxt2i DiT folder.")
    base = read_any(config, dtype=dtype)
    if base.family != "dit":
        raise ConversionError(f"config={config} is a {base.family!r} model; an original DiT checkpoint takes its VAE, "
                              f"scheduler and class names from a DiT model (a diffusers DiTPipeline folder).")
    name = next(k for k in base.configs if base.component_type(k) == "dit")
    width = int(np.shape(state_dict["x_embedder.proj.weight"])[0])
    heads = base.configs[name].num_attention_heads if base.configs[name].width == width else None  # else the paper's
    dit_config = dit_keys.config_from_original(state_dict, num_heads=heads, source=path)
    params = params_from_torch("dit", dit_keys.original_dit_to_diffusers(state_dict, source=path), dit_config,
                               source=path, dtype=dtype)
    return dataclasses.replace(base, configs={**base.configs, name: dit_config}, params={**base.params, name: params},
                               source=path)


def _name_original_key(error: ConversionError, renamed: Mapping[str, Any], original: Mapping[str, Any]):
    """``error`` (which names a diffusers key) extended with the single file's own key for that tensor.

    Renaming to the diffusers layout keeps each tensor's memory (a rename, a reshape or a slice of a fused
    ``in_proj``), so the file's key is the one original tensor sharing memory with the renamed one.
    """
    tensor = renamed.get(error.torch_key) if error.torch_key else None
    if tensor is None:
        return error
    owners = [k for k, v in original.items() if np.may_share_memory(np.asarray(v), np.asarray(tensor))]
    if len(owners) != 1:
        return error
    return ConversionError(f"{error} In the single file this tensor is {owners[0]}.", torch_key=error.torch_key)


def write_single_file(path: str, model: LoadedModel, *, overwrite: bool = False) -> None:
    """Writes an original-layout single-file ``.safetensors`` (SD1 or SD2 text-encoder layout from the config)."""
    path = os.fspath(path)
    if not path.endswith(".safetensors"):
        raise ValueError(f"{path}: single files are written as .safetensors only.")
    if os.path.exists(path) and not overwrite:
        raise FileExistsError(f"{path} exists; choose a new name or pass overwrite=True.")
    _check_stable_diffusion_layout(model, "an original single-file checkpoint")
    torch_layout = {name: params_to_torch(name, model.params[name], model.configs[name]) for name in COMPONENT_NAMES}
    text_prefix = (_PREFIXES["text_encoder_sd1"] if model.configs["text_encoder"].hidden_act == "quick_gelu"
                   else _PREFIXES["text_encoder_sd2"])
    tensors = {
        **unet_keys.diffusers_to_original(torch_layout["unet"], model.configs["unet"]),
        **vae_keys.diffusers_to_original(torch_layout["vae"], model.configs["vae"]),
        **clip_keys.diffusers_to_original(torch_layout["text_encoder"], model.configs["text_encoder"], text_prefix),
    }
    write_safetensors(path, tensors, metadata={"format": "pt", "written_by": "jaxt2i"})


# ----------------------------------------------------------------------------------------------- jaxt2i's own format
def read_native(path: str, *, dtype: Any = None) -> LoadedModel:
    """Reads a jaxt2i model folder (``jaxt2i convert``, ``jaxt2i train``'s exports; any family, any version)."""
    path = os.fspath(path)
    manifest = native.read_manifest(path)
    version = manifest.get("upgraded_from", native.FORMAT_VERSION)
    configs, params, types = {}, {}, {}
    for name, entry in _each(manifest["components"].items(), "reading"):
        kind = entry["type"]
        config, abstract = _component_config(path, name, kind, entry["config"])
        folder = native.shared_component_folder(path, name, entry)
        flat = native.read_component(folder, name, version)
        rules = [Rule(tuple(k.split("/")), k, "identity") for k in flat]
        params[name] = to_flax(flat, rules, abstract, source=os.path.join(folder, f"{name}.safetensors"), dtype=dtype)
        configs[name] = config
        if kind != name:
            types[name] = kind
    schedule = manifest.get("schedule")
    schedule = None if schedule is None else _schedule_config(path, schedule)
    tokenizer = dict(manifest.get("tokenizer", {}))
    tok_folder = os.path.join(path, "tokenizer")
    tokenizer["folder"] = tok_folder if os.path.isdir(tok_folder) else None
    text_layer = clip.text_layer_setting(manifest.get("text_layer", -1))
    family = manifest.get("family")
    if family == "latent_diffusion":
        _check_latent_diffusion(path, configs, text_layer)
    native.check_weight_files(path, manifest)
    sampling = native.sampling_settings(manifest.get("sampling", {}), path)
    extras = manifest.get("extras") or {}
    if not isinstance(extras, dict):
        raise ConversionError(f"{path}: jaxt2i.json \"extras\" must be an object; got {extras!r}.")
    return LoadedModel(configs, params, schedule, tokenizer, path, text_layer, sampling, family, types, extras)


def _component_config(path: str, name: str, kind: str, data: Mapping[str, Any]) -> tuple[Any, dict]:
    """(config, abstract parameter tree) of component ``name`` of the jaxt2i folder ``path``; a config that does not
    build a model (a wrong type, a bad value) is a ConversionError naming the manifest and the component."""
    manifest = os.path.join(path, native.MANIFEST)
    try:
        config = native.config_from_dict(component(kind).config_cls, data, source=manifest)
        return config, presets.abstract_params(kind, config)
    except ConversionError as e:
        raise e if manifest in str(e) else ConversionError(f"{manifest}: component {name!r}: {e}") from None
    except Exception as e:  # noqa: BLE001 -- any failure to build the model from these values is the config's
        raise ConversionError(f"{manifest}: component {name!r} ({kind}) has a config that does not build a model "
                              f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}). Fix the value "
                              "or rewrite the folder with `jaxt2i convert`.") from None


def _schedule_config(path: str, data: Mapping[str, Any]) -> ScheduleConfig:
    """The folder's noise schedule, checked by computing it; a bad value is a ConversionError naming the manifest."""
    manifest = os.path.join(path, native.MANIFEST)
    try:
        schedule = native.config_from_dict(ScheduleConfig, data, source=manifest)
        schedules.alphas_cumprod(schedule)
        return schedule
    except ConversionError:
        raise
    except Exception as e:  # noqa: BLE001 -- as in _component_config
        raise ConversionError(f"{manifest}: \"schedule\" {dict(data)} is not a valid noise schedule "
                              f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}).") from None


def _check_latent_diffusion(path: str, configs: Mapping[str, Any], text_layer) -> None:
    missing = [name for name in ("text_encoder", "vae") if name not in configs]
    if missing:
        raise ConversionError(f"{path}: a latent-diffusion folder needs a text_encoder, a vae and a denoiser (unet or "
                              f"transformer); {missing} missing.")
    try:
        latent_diffusion.denoiser_name(configs)
    except ValueError as e:
        raise ConversionError(f"{path}: {e}") from None
    try:
        latent_diffusion.check_text_layer(configs, text_layer)
    except ValueError as e:
        raise ConversionError(f"{path}: jaxt2i.json \"text_layer\": {e}") from None


def write_native(path: str, model: LoadedModel, *, overwrite: bool = False) -> None:
    """Writes ``model`` as a jaxt2i model folder (see :mod:`jaxt2i.convert.native`); ``path`` must not exist unless
    ``overwrite`` (nothing the user had is replaced silently). Parameters are written in their own dtypes."""
    sampling = native.sampling_settings(model.sampling or {}, str(path))
    text_layer = model.text_layer
    manifest = {
        "format": "jaxt2i",
        "version": native.FORMAT_VERSION,
        "family": model.family,
        "components": {name: {"type": model.component_type(name), "config": native.config_to_dict(config),
                              **({"from": model.shared[name]} if name in model.shared else {})}
                       for name, config in model.configs.items()},
        "schedule": None if model.schedule is None else native.config_to_dict(model.schedule),
        "tokenizer": {"pad": model.tokenizer.get("pad")},
        "text_layer": list(text_layer) if isinstance(text_layer, (list, tuple)) else int(text_layer),
    }
    for name in model.shared:  # the shipped model must hold the same component
        native.shared_component_folder(path, name, manifest["components"][name])
    if sampling:
        manifest["sampling"] = sampling
    if model.extras:
        manifest["extras"] = model.extras
    with atomic_folder(path, overwrite=overwrite) as staging:
        for name, tree in _each([(k, v) for k, v in model.params.items() if k not in model.shared], "writing"):
            write_safetensors(os.path.join(staging, f"{name}.safetensors"), native.flatten_params(tree),
                              metadata={"format": "jaxt2i"})
        native.write_manifest(staging, manifest)
        if model.tokenizer.get("folder"):
            shutil.copytree(model.tokenizer["folder"], os.path.join(staging, "tokenizer"))


# ----------------------------------------------------------------------------------------------- diffusers export
def _check_stable_diffusion_layout(model: LoadedModel, kind: str) -> None:
    """Refuses to export to ``kind`` (a diffusers folder, an original single file) a model those formats cannot
    express: another family, components beyond the text encoder, VAE and U-Net (e.g. a conditioner), or
    conditioning on another text-encoder layer than the last (they always condition on the last layer's output)."""
    parts = sorted(model.configs)
    if model.family != "latent_diffusion" or parts != sorted(COMPONENT_NAMES):
        raise ConversionError(
            f"{model.source}: {kind} holds exactly a Stable Diffusion text encoder, VAE and U-Net; this model "
            f"(family {model.family!r}) has {parts}, which it cannot express. Keep it in jaxt2i's format "
            f"(--to jaxt2i).")
    if not clip.is_last_layer(model.configs["text_encoder"].num_layers, model.text_layer):
        raise ConversionError(
            f"{model.source}: this model's U-Net is conditioned on text-encoder hidden state {model.text_layer} "
            f"(jaxt2i.json \"text_layer\"), which {kind} cannot express: it would be sampled with the last layer's "
            f"output instead. Keep it in jaxt2i's format (--to jaxt2i).")


def write_diffusers_folder(path: str, model: LoadedModel, *, overwrite: bool = False) -> None:
    """Writes a diffusers-format folder that ``StableDiffusionPipeline.from_pretrained`` (and jaxt2i) can load."""
    _check_stable_diffusion_layout(model, "a diffusers folder")
    with atomic_folder(path, overwrite=overwrite) as staging:
        classes = {"text_encoder": "CLIPTextModel", "vae": "AutoencoderKL", "unet": "UNet2DConditionModel"}
        for name in _each(COMPONENT_NAMES, "writing"):
            folder = os.path.join(staging, name)
            os.makedirs(folder)
            config = model.configs[name].to_diffusers()
            with open(os.path.join(folder, "config.json"), "w") as f:
                json.dump(config, f, indent=2)
            write_safetensors(os.path.join(folder, f"{component(name).weight_stem}.safetensors"),
                              params_to_torch(name, model.params[name], model.configs[name]),
                              metadata={"format": "pt"})
        tok_folder = os.path.join(staging, "tokenizer")
        if model.tokenizer.get("folder"):
            shutil.copytree(model.tokenizer["folder"], tok_folder)
        else:
            write_vocab_files(tok_folder, pad=model.tokenizer.get("pad") or "eos")
        os.makedirs(os.path.join(staging, "scheduler"))
        with open(os.path.join(staging, "scheduler", "scheduler_config.json"), "w") as f:
            json.dump(_scheduler_config(model.schedule), f, indent=2)
        index = {
            "_class_name": "StableDiffusionPipeline",
            "text_encoder": ["transformers", classes["text_encoder"]],
            "tokenizer": ["transformers", "CLIPTokenizer"],
            "unet": ["diffusers", classes["unet"]],
            "vae": ["diffusers", classes["vae"]],
            "scheduler": ["diffusers", "PNDMScheduler"],
            "safety_checker": [None, None],
            "feature_extractor": [None, None],
            "requires_safety_checker": False,
        }
        with open(os.path.join(staging, "model_index.json"), "w") as f:
            json.dump(index, f, indent=2)


def _scheduler_config(schedule: ScheduleConfig) -> dict:
    config = {"_class_name": "PNDMScheduler", "skip_prk_steps": True}
    for field in dataclasses.fields(schedule):
        value = getattr(schedule, field.name)
        if value is not None:
            config[field.name] = list(value) if isinstance(value, tuple) else value
    return config


# ----------------------------------------------------------------------------------------------------- dispatch
def read_any(path: str, *, config: str | None = None, ema: bool = False, dtype: Any = None,
             variant: str | None = None) -> LoadedModel:
    """Reads any supported checkpoint kind (see the module docstring) from ``path``."""
    path = os.fspath(path)
    if os.path.isdir(path):
        if native.is_native_folder(path):
            return read_native(path, dtype=dtype)
        if is_diffusers_folder(path):
            return read_diffusers_folder(path, variant=variant, dtype=dtype)
        raise FileNotFoundError(f"{path} is a folder but has neither model_index.json (diffusers) nor "
                                f"{native.MANIFEST} (jaxt2i). Point at the model folder itself.")
    if os.path.isfile(path):
        return read_single_file(path, config=config, ema=ema, dtype=dtype)
    hint = ""
    matches = glob.glob(path + "*")
    if matches:
        hint = f" Did you mean {matches[0]}?"
    raise FileNotFoundError(f"No model at {path}.{hint}")
