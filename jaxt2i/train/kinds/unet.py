"""Kind ``unet``: a latent-diffusion U-Net (and its conditioner) on a frozen text encoder and frozen-VAE latents.

The run's components are :mod:`jaxt2i.models.latent_diffusion`'s: ``unet`` and, when the model has one,
``conditioner`` train (the conditioner in ``trainable.mode: full`` only; the LoRA and attention modes adapt the
U-Net's attention); ``vae`` and ``text_encoder`` are frozen (absent from the step's work when batches come from a
latent cache). ``model`` builds them from a preset or a pretrained model, with a VAE and a text encoder from other
runs' folders (``vae_from``, ``text_encoder_from``), a U-Net architecture of its own (``unet_config``) and a
conditioner (``conditioner``). The loss (:mod:`jaxt2i.train.kinds.diffusion`) is the denoising objective of
``loss``; batches are images + token ids from the data source, or cached latents + text states
(``data.use_cache``); the export is a complete latent-diffusion model folder (U-Net, conditioner, VAE, text
encoder, schedule, tokenizer, text layer, the sample section's steps and guidance as recommended sampling), plus
``lora.safetensors`` in LoRA mode and optionally a diffusers folder.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import warnings
from pathlib import Path
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from jax.experimental import multihost_utils

from jaxt2i import presets
from jaxt2i.convert.load import LoadedModel, read_any, write_diffusers_folder, write_native
from jaxt2i.convert.native import flatten_params
from jaxt2i.data.cache import CACHE_META, cache_fingerprint, check_fingerprint, read_fingerprint, write_cache
from jaxt2i.data.sources import make_source
from jaxt2i.diffusion.guidance import cfg_denoise_fn
from jaxt2i.diffusion.losses import LossConfig
from jaxt2i.diffusion.samplers import sample
from jaxt2i.images import save_png
from jaxt2i.models import clip, latent_diffusion, unet, vae
from jaxt2i.models.conditioner import ConditionerConfig
from jaxt2i.tokenizer import CLIPTokenizer
from jaxt2i.train import lora as lora_lib
from jaxt2i.train.config import from_dict
from jaxt2i.train.kinds.base import Kind, read_components
from jaxt2i.train.kinds.diffusion import DiffusionLoss, component_initializers
from jaxt2i.train.state import TrainState, components, host_tree

MODEL_COMPONENTS = ("text_encoder", "vae", "unet", "transformer", "conditioner")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Which models to train.

    preset: a ``jaxt2i.presets`` name ("tiny_sd1", "sd15", ...): the U-Net, VAE and text-encoder presets and
        the tokenizer padding, used when ``pretrained`` is None (training from scratch: fresh random init).
    unet / vae / text_encoder: override one component's preset name (``jaxt2i.models.*.PRESETS``).
    pretrained: a model ``jaxt2i.convert`` reads (jaxt2i folder, diffusers folder, single-file checkpoint);
        its architectures, weights, conditioner and tokenizer replace the presets; components it has beyond the
        latent-diffusion ones (e.g. ``clip_vision``) are exported unchanged.
    text_layer: which text-encoder hidden state conditions the U-Net (-1: last, SD1; -2: penultimate; 0: the
        token + position embeddings, no transformer layer), or a list of several (e.g. ``[0, -1]``, which a
        conditioner merges). None: the pretrained model's (-1 from scratch). Written to the exported folder.
    unet_config: the U-Net architecture as a mapping of ``UNetConfig`` fields (a fresh init).
    conditioner: a fresh conditioner (``jaxt2i.models.conditioner``) between the text encoder and the U-Net, as a
        mapping of ``ConditionerConfig`` fields (e.g. ``{rank: 6}``; ``width`` defaults to the text encoder's);
        it trains with the U-Net and needs two text layers (``text_layer: [0, -1]``).
    vae_from / text_encoder_from: model folders of a ``vae`` / ``clip`` run (their WORKDIR/final) whose VAE / text
        encoder replace the preset's, weights included; they stay frozen.
    unet_init_from: a model folder whose U-Net weights initialise this run's U-Net wherever a parameter's path
        and shape match; parameters it lacks keep their fresh init (growing a trained model).
    conditioner_init_from / conditioner_init_head: initialise the conditioner's ``down`` map from the per-token
        head ``conditioner_init_head`` (e.g. "parse_role") of a ``clip`` run's folder (its ``parse_heads``), so
        the rank-r numbers per token are that head's logits on the last text layer from step 0; the rank must
        equal the head's classes and the text encoder must be that folder's. Pair with ``trainable.freeze:
        [conditioner/down]`` to keep them so. ``conditioner_up_std``: the ``up`` kernel then starts as Gaussian
        noise of that std (seeded by ``seed``) instead of zeros.
    remat: rematerialise U-Net blocks in the backward pass (less memory, ~30% more compute).
    export_ema: write the EMA weights (when optim.ema_decay is set) to WORKDIR/final/, else the raw ones.
    """

    preset: str = "tiny_sd1"
    unet: str | None = None
    vae: str | None = None
    text_encoder: str | None = None
    pretrained: str | None = None
    unet_config: Any = None
    conditioner: Any = None
    vae_from: str | None = None
    text_encoder_from: str | None = None
    text_layer: int | list[int] | None = None
    unet_init_from: str | None = None
    conditioner_init_from: str | None = None
    conditioner_init_head: str = "parse_role"
    conditioner_up_std: float = 0.0
    remat: bool = False
    export_ema: bool = True


def _log(msg: str) -> None:
    if jax.process_index() == 0:
        print(f"[jaxt2i train] {msg}", flush=True, file=sys.stderr)


def unet_weights_that_fit(folder: str, config) -> dict[str, np.ndarray]:
    """``{"/"-path: float32 array}`` of the U-Net weights in model folder ``folder`` whose path and shape exist in
    a U-Net of ``config`` (``model.unet_init_from``). Raises ValueError when the folder's U-Net shares no parameter
    with it, or when a shared path has another shape."""
    where = f"model.unet_init_from={folder}"
    source = flatten_params(read_any(folder).params["unet"])
    target = {"/".join(k): v for k, v in traverse_util.flatten_dict(presets.abstract_params("unet", config)).items()}
    shared = sorted(set(source) & set(target))
    if not shared:
        raise ValueError(f"{where}: its U-Net has no parameter of this run's U-Net; is it the same family?")
    clash = [k for k in shared if tuple(np.shape(source[k])) != tuple(target[k].shape)]
    if clash:
        raise ValueError(f"{where}: {len(clash)} parameters differ in shape from this run's U-Net, e.g. {clash[0]} "
                         f"{tuple(np.shape(source[clash[0]]))} vs {tuple(target[clash[0]].shape)}; the two "
                         f"architectures must agree wherever they share a parameter.")
    fresh = sorted(set(target) - set(source))
    _log(f"U-Net: {len(shared)} of {len(target)} parameters from {folder}; fresh: {fresh[:8]}"
         f"{' ...' if len(fresh) > 8 else ''}")
    return {k: np.asarray(source[k], np.float32) for k in shared}


def conditioner_from_head(m: ModelConfig, configs: Mapping[str, Any], params: Mapping[str, Any], text_layer,
                          seed: int = 0) -> dict[str, np.ndarray]:
    """``{"down/kernel": [D, r], "down/bias": [r]}`` of the conditioner from head ``m.conditioner_init_head`` of the
    ``parse_heads`` in ``m.conditioner_init_from`` (see ``ModelConfig``), after checking that it fits the
    conditioner, the text layers and the text encoder; with ``m.conditioner_up_std > 0`` also ``"up/kernel"``
    [r, D], Gaussian of that std drawn from ``seed``."""
    where = f"model.conditioner_init_from={m.conditioner_init_from}"
    if m.conditioner_up_std < 0:
        raise ValueError(f"model.conditioner_up_std must be >= 0; got {m.conditioner_up_std}")
    config = configs.get("conditioner")
    if config is None:
        raise ValueError(f"{where}: the model has no conditioner; set model.conditioner={{rank: R}} (and "
                         f"model.text_layer=[0, -1]).")
    folder = read_components(m.conditioner_init_from, ("parse_heads", "text_encoder"), where)
    heads, name = folder.params["parse_heads"], m.conditioner_init_head
    if name not in heads:
        raise ValueError(f"{where}: no parse head {name!r}; it has {sorted(heads)} (model.conditioner_init_head).")
    kernel = np.asarray(heads[name]["kernel"], np.float32)
    bias = np.asarray(heads[name]["bias"], np.float32)
    if kernel.shape[1] != config.rank:
        raise ValueError(f"{where}: head {name!r} has {kernel.shape[1]} classes "
                         f"({folder.configs['parse_heads'].classes_of(name)}); set model.conditioner.rank="
                         f"{kernel.shape[1]} (now {config.rank}).")
    if not clip.is_last_layer(configs["text_encoder"].num_layers, text_layer[-1]):
        raise ValueError(f"{where}: the head reads the text encoder's last layer; the conditioner merges layer "
                         f"{text_layer[-1]}. Use model.text_layer=[0, -1].")
    ours, theirs = params.get("text_encoder"), folder.params["text_encoder"]
    same = ours is not None and jax.tree.structure(ours) == jax.tree.structure(theirs) and jax.tree.all(
        jax.tree.map(lambda a, b: np.array_equal(np.asarray(a, np.float32), b), ours, theirs))
    if not same:
        raise ValueError(f"{where}: the run's text encoder is not the one the head was trained on; set "
                         f"model.text_encoder_from={m.conditioner_init_from}.")
    values = {"down/kernel": kernel, "down/bias": bias}
    if m.conditioner_up_std:
        noise = np.random.default_rng([seed, 0x6D65]).standard_normal((config.rank, config.width))
        values["up/kernel"] = (m.conditioner_up_std * noise).astype(np.float32)
    return values


def conditioner_config(m: ModelConfig, text_config) -> ConditionerConfig:
    """``model.conditioner`` as a ``ConditionerConfig``; ``width`` defaults to ``text_config.hidden_size``."""
    if not isinstance(m.conditioner, Mapping):
        raise ValueError(f"model.conditioner must be a mapping of ConditionerConfig fields (e.g. {{rank: 6}}), "
                         f"got {m.conditioner!r}")
    return from_dict(ConditionerConfig, {"width": text_config.hidden_size, **m.conditioner}, "model.conditioner.")


_CACHED_DATA_FIELDS = ("source", "path", "name", "split", "image_key", "caption_key", "captions_file", "images_dir",
                       "image_size", "num_examples", "options")


class UNetKind(Kind):
    ModelConfig = ModelConfig
    LossConfig = LossConfig

    def __init__(self, cfg):
        super().__init__(cfg)
        m = cfg.model
        default_layer, self.extra = -1, None  # from scratch: the last layer, as Stable Diffusion
        if m.pretrained:
            loaded = read_any(m.pretrained)
            if loaded.family != "latent_diffusion":
                raise ValueError(f"model.pretrained={m.pretrained}: a {loaded.family!r} model, not a latent-diffusion "
                                 f"one (it holds {sorted(loaded.configs)}).")
            configs, params = dict(loaded.configs), dict(loaded.params)
            tok_settings, default_layer = dict(loaded.tokenizer), loaded.text_layer
            self.extra = dataclasses.replace(loaded, configs={k: v for k, v in configs.items()
                                                              if k not in MODEL_COMPONENTS})
            if loaded.schedule.prediction_type != cfg.loss.prediction_target:
                _log(f"warning: {m.pretrained} was trained for prediction_type={loaded.schedule.prediction_type!r} "
                     f"but loss.prediction_target={cfg.loss.prediction_target!r}")
        else:
            spec = presets.get(m.preset)
            configs, params = spec.configs(), {}
            for name, choice, table in (("unet", m.unet, unet.PRESETS), ("vae", m.vae, vae.PRESETS),
                                        ("text_encoder", m.text_encoder, clip.PRESETS)):
                if choice:
                    configs[name] = table[choice]
            tok_settings = {"pad": spec.tokenizer_pad, "folder": None}
        if m.unet_config is not None:
            if not isinstance(m.unet_config, Mapping):
                raise ValueError(f"model.unet_config must be a mapping of UNetConfig fields, got {m.unet_config!r}")
            configs["unet"] = from_dict(unet.UNetConfig, m.unet_config, "model.unet_config.")
            params.pop("unet", None)
        for name, folder in (("vae", m.vae_from), ("text_encoder", m.text_encoder_from)):
            if folder:
                got = read_components(folder, (name,), f"model.{name}_from")
                configs[name], params[name] = got.configs[name], got.params[name]
        if m.conditioner is not None:
            configs["conditioner"] = conditioner_config(m, configs["text_encoder"])
            params.pop("conditioner", None)
        configs, params = self.choose_denoiser(configs, params)
        self.configs = {k: configs[k] for k in MODEL_COMPONENTS if k in configs}
        self.params = {k: params[k] for k in MODEL_COMPONENTS if k in params}
        text_layer = clip.text_layer_setting(default_layer if m.text_layer is None else m.text_layer)
        try:
            self.models = latent_diffusion.build_models(self.configs, text_layer, dtype=self.dtype,
                                                        param_dtype=jnp.float32, remat=m.remat)
        except ValueError as e:
            raise ValueError(f"model.text_layer: {e}") from None
        last_layer = clip.is_last_layer(self.configs["text_encoder"].num_layers, text_layer)
        if cfg.export_diffusers and (not last_layer or "conditioner" in self.configs):
            raise ValueError(f"export_diffusers=true needs model.text_layer=-1 and no conditioner: a diffusers folder "
                             f"conditions on the last layer alone; this run on layer {text_layer}"
                             f"{' through a conditioner' if 'conditioner' in self.configs else ''}. Set "
                             f"export_diffusers=false.")
        folder = tok_settings.get("folder")
        self.tokenizer = (CLIPTokenizer.from_folder(folder) if folder
                          else CLIPTokenizer.default(pad=tok_settings.get("pad") or "eos"))
        self.tokenizer_settings = tok_settings
        conditioned = "conditioner" in self.configs and cfg.trainable.mode == "full"
        denoiser = self.models.denoiser_name
        self.trainable = (denoiser, "conditioner") if conditioned else (denoiser,)
        self._overrides = {}
        if m.unet_init_from:
            self._overrides["unet"] = unet_weights_that_fit(m.unet_init_from, self.configs["unet"])
        if m.conditioner_init_from:
            self._overrides["conditioner"] = conditioner_from_head(m, self.configs, self.params, text_layer, cfg.seed)
        uncond_ids = np.asarray(self.tokenizer([""]), np.int32)
        self._loss = DiffusionLoss(self.models, cfg.schedule, cfg.loss, uncond_ids)

    def choose_denoiser(self, configs: dict, params: dict) -> tuple[dict, dict]:
        """The run's components with the denoiser it trains (here: the preset's or pretrained model's U-Net)."""
        return configs, params

    # -- the state
    def initializers(self):
        return component_initializers(self.models)

    def initial_params(self):
        return self.params

    def overrides(self):
        return self._overrides

    def loss(self, components, batch, key, first_index, gather):
        return self._loss(components, batch, key, first_index)

    # -- data
    def batches(self, local_batch, position):
        return self.image_batches(local_batch, position, tokenize=self.tokenizer)

    def _cache_fingerprint(self, frozen) -> str:
        """What a latent cache for this run must have been encoded from: the frozen VAE and text encoder weights,
        the text layer and tokenizer, and the data settings that decide the examples."""
        tok = self.tokenizer
        settings = {f: getattr(self.cfg.data, f) for f in _CACHED_DATA_FIELDS}
        settings.update(text_layer=self.models.text_layer, pad_token_id=tok.pad_token_id, max_length=tok.max_length,
                        scaling_factor=self.configs["vae"].scaling_factor)
        return cache_fingerprint(host_tree({k: frozen[k] for k in ("vae", "text_encoder")}), settings)

    def prepare(self, state: TrainState) -> None:
        """Writes (``data.write_cache``) or checks (``data.use_cache``) the latent cache. Raises
        ``CacheMismatchError`` when the folder holds a cache of other encoders or data."""
        data = self.cfg.data
        if data.write_cache:
            self._write_cache(state.frozen)
        elif data.use_cache and (Path(data.cache_dir) / CACHE_META).exists():
            if read_fingerprint(data.cache_dir) is None:
                warnings.warn(f"the latent cache in {data.cache_dir} records no fingerprint, so it cannot be checked "
                              "against this run's VAE, text encoder and data; re-encode it (data.write_cache=true "
                              "with a new data.cache_dir) to be sure")
                return
            check_fingerprint(data.cache_dir, self._cache_fingerprint(state.frozen))

    def _write_cache(self, frozen) -> None:
        fingerprint = self._cache_fingerprint(frozen)
        if jax.process_index() == 0:
            source = make_source(dataclasses.replace(self.cfg.data, use_cache=False))
            models = self.models

            @jax.jit
            def enc_images(x):
                post = models.vae.apply({"params": frozen["vae"]}, x, method="encode")
                return post.mean.astype(jnp.float32), jnp.exp(0.5 * post.logvar.astype(jnp.float32))

            @jax.jit
            def enc_ids(ids):
                return latent_diffusion.text_states(models, frozen, ids).astype(jnp.float32)

            def encode_images(x):
                mean, std = enc_images(jnp.asarray(x))
                return np.asarray(mean), np.asarray(std)

            def encode_texts(texts):
                return np.asarray(enc_ids(jnp.asarray(self.tokenizer(list(texts)), jnp.int32)))

            _log(f"writing latent cache of {len(source)} examples to {self.cfg.data.cache_dir}")
            write_cache(source, self.cfg.data.cache_dir, encode_images, encode_texts,
                        image_size=self.cfg.data.image_size, scaling_factor=self.configs["vae"].scaling_factor,
                        batch_size=max(1, self.cfg.batch_size), fingerprint=fingerprint)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices("jaxt2i-latent-cache")

    # -- samples and export
    def _schedule(self):
        return dataclasses.replace(self.cfg.schedule, prediction_type=self.cfg.loss.prediction_target)

    def sample(self, state: TrainState, step: int, out_dir: Path) -> Path | None:
        """Samples ``sample.prompts`` with the current (EMA) weights and writes a PNG grid."""
        sc, models = self.cfg.sample, self.models
        prompts = list(sc.prompts)
        trained = state.ema_params if sc.use_ema and state.ema_params is not None else state.params
        params = components(trained, state.frozen, self.cfg.trainable)
        side = self.cfg.data.image_size // self.configs["vae"].downsample_factor
        ids = jnp.asarray(self.tokenizer(prompts), jnp.int32)
        uncond_ids = jnp.asarray(self.tokenizer([""] * len(prompts)), jnp.int32)
        channels = self.configs["vae"].latent_channels
        noise = jax.random.normal(jax.random.key(sc.seed), (len(prompts), side, side, channels), jnp.float32)
        schedule = self._schedule()

        @jax.jit
        def run_sampler(params, ids, uncond_ids, noise):
            def model_fn(x, t, c):
                return latent_diffusion.predict_noise(models, params, x, t, c)

            denoise = cfg_denoise_fn(model_fn, latent_diffusion.encode_text(models, params, ids),
                                     latent_diffusion.encode_text(models, params, uncond_ids), sc.guidance_scale)
            latents = sample(denoise, noise, sampler=sc.sampler, steps=sc.steps, schedule=schedule,
                             key=jax.random.key(sc.seed + 1))
            return latent_diffusion.decode(models, params, latents)

        images = host_tree(run_sampler(params, ids, uncond_ids, noise))
        if jax.process_index() != 0:
            return None
        path = out_dir / f"step_{step:08d}.png"
        save_png(path, images, metadata={"step": str(step), "prompts": json.dumps(prompts)})
        return path

    def model_folder(self, state: TrainState) -> LoadedModel:
        """The trained model (host arrays): the latent-diffusion components, the pretrained model's other ones."""
        trees = self.host_components(state, self.cfg.model.export_ema)
        sc = self.cfg.sample
        configs, params, types = dict(self.configs), {k: trees[k] for k in self.configs}, {}
        if self.extra is not None:
            configs.update(self.extra.configs)
            params.update({k: self.extra.params[k] for k in self.extra.configs})
            types.update({k: self.extra.component_type(k) for k in self.extra.configs})
        tok = {"pad": self.tokenizer_settings.get("pad") or "eos", "folder": self.tokenizer_settings.get("folder")}
        return LoadedModel(configs=configs, params=params, schedule=self._schedule(), tokenizer=tok,
                           source=str(self.cfg.workdir), text_layer=self.models.text_layer,
                           sampling={"steps": sc.steps, "guidance": sc.guidance_scale}, family="latent_diffusion",
                           types={k: v for k, v in types.items() if k != v})

    def export(self, state: TrainState, out: Path, *, overwrite: bool) -> None:
        """The trained U-Net and conditioner with the frozen encoders as a jaxt2i folder at ``out``
        (``lora.safetensors`` beside it in LoRA mode; ``WORKDIR/final_diffusers`` too with ``export_diffusers`` when
        writing ``WORKDIR/final``)."""
        model = self.model_folder(state)
        lora = host_tree(state.params[self.models.denoiser_name]) if self.cfg.trainable.mode == "lora" else None
        if jax.process_index() != 0:
            return
        write_native(str(out), model, overwrite=overwrite)
        if lora is not None:
            lora_lib.save_lora(str(Path(out) / "lora.safetensors"), lora, self.cfg.trainable.lora_alpha)
        if self.cfg.export_diffusers and overwrite:
            write_diffusers_folder(str(Path(self.cfg.workdir).absolute() / "final_diffusers"), model, overwrite=True)
