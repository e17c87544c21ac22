"""Kind ``unet``: a latent-diffusion U-Net conditioned on a frozen text encoder, trained on frozen-VAE latents.

The run's components: ``unet`` (trains), ``vae`` and ``text_encoder`` (frozen; absent from the step's work when
batches come from a latent cache). ``model`` builds them from a preset or a pretrained model, with a VAE and a text
encoder from other runs' folders (``vae_from``, ``text_encoder_from``) and a U-Net architecture of its own
(``unet_config``). The loss (:mod:`jaxt2i.train.kinds.diffusion`) is the denoising objective of ``loss``; batches
are images + token ids from the data source, or cached latents + contexts (``data.use_cache``); the export is a
complete model folder (U-Net, VAE, text encoder, schedule, tokenizer, text layer), plus ``lora.safetensors`` in
LoRA mode and optionally a diffusers folder.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import warnings
from pathlib import Path
from typing import Any

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
from jaxt2i.models import clip, unet, vae
from jaxt2i.models.vae import decode_latents
from jaxt2i.tokenizer import CLIPTokenizer
from jaxt2i.train import lora as lora_lib
from jaxt2i.train.config import from_dict
from jaxt2i.train.kinds.base import Kind, read_folder_components
from jaxt2i.train.kinds.diffusion import DiffusionLoss, Models, component_initializers
from jaxt2i.train.state import TrainState, host_tree, trained_components


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Which models to train.

    preset: a ``jaxt2i.presets`` name ("tiny_sd1", "sd15", ...): the U-Net, VAE and text-encoder presets and
        the tokenizer padding, used when ``pretrained`` is None (training from scratch: fresh random init).
    unet / vae / text_encoder: override one component's preset name (``jaxt2i.models.*.PRESETS``).
    pretrained: a model ``jaxt2i.convert`` reads (jaxt2i folder, diffusers folder, single-file checkpoint);
        its architectures, weights and tokenizer replace the presets.
    text_layer: which text-encoder hidden state conditions the U-Net (-1: last, SD1; -2: penultimate; 0: the
        token + position embeddings, no transformer layer). None: the pretrained model's (-1 from scratch). It is
        written to the exported folder, so sampling uses the same one. A list (e.g. ``[0, -1]``) conditions on
        several states at once (``CLIPTextModel.encode``).
    unet_config: the U-Net architecture as a mapping of ``UNetConfig`` fields (a fresh init).
    vae_from / text_encoder_from: model folders of a ``vae`` / ``clip`` run (their WORKDIR/final) whose VAE / text
        encoder replace the preset's, weights included; they stay frozen.
    unet_init_from: a model folder whose U-Net weights initialise this run's U-Net wherever a parameter's path
        and shape match; parameters it lacks keep their fresh init (growing a trained model).
    context_merge_from / context_merge_head: initialise a merging U-Net's ``context_merge/down``
        (``UNetConfig.context_merge_rank``) from the per-token head ``context_merge_head`` (e.g. "parse_role") of a
        ``clip`` run's folder, so the rank-r numbers per token are that head's logits on the last text layer from
        step 0; rank must equal the head's classes and the text encoder must be that folder's. Pair with
        ``trainable.freeze: [unet/context_merge/down]`` to keep them so. ``context_merge_up_std``: the merge's
        ``up`` kernel then starts as Gaussian noise of that std (seeded by ``seed``) instead of zeros.
    remat: rematerialise U-Net blocks in the backward pass (less memory, ~30% more compute).
    export_ema: write the EMA weights (when optim.ema_decay is set) to WORKDIR/final/, else the raw ones.
    """

    preset: str = "tiny_sd1"
    unet: str | None = None
    vae: str | None = None
    text_encoder: str | None = None
    pretrained: str | None = None
    unet_config: Any = None
    vae_from: str | None = None
    text_encoder_from: str | None = None
    text_layer: int | list[int] | None = None
    unet_init_from: str | None = None
    context_merge_from: str | None = None
    context_merge_head: str = "parse_role"
    context_merge_up_std: float = 0.0
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


def merge_from_head(m: ModelConfig, configs: dict, params: dict, text_layer, seed: int = 0) -> dict[str, np.ndarray]:
    """``{"context_merge/down/kernel": [D, r], "context_merge/down/bias": [r]}`` from head ``m.context_merge_head``
    of the ``parse_heads`` in ``m.context_merge_from`` (see ``ModelConfig``), after checking that it fits the
    U-Net, the text layers and the text encoder; with ``m.context_merge_up_std > 0`` also
    ``"context_merge/up/kernel"`` [r, D], Gaussian of that std drawn from ``seed``."""
    where = f"model.context_merge_from={m.context_merge_from}"
    if m.context_merge_up_std < 0:
        raise ValueError(f"model.context_merge_up_std must be >= 0; got {m.context_merge_up_std}")
    rank = configs["unet"].context_merge_rank
    if not rank:
        raise ValueError(f"{where}: the U-Net does not merge text layers; set model.unet_config.context_merge_rank "
                         f"(and model.text_layer=[0, -1]).")
    head_configs, head_params = read_folder_components(m.context_merge_from, ("parse_heads", "text_encoder"), where)
    heads = head_params["parse_heads"]
    if m.context_merge_head not in heads:
        raise ValueError(f"{where}: no head {m.context_merge_head!r}; it has {sorted(heads)} "
                         f"(model.context_merge_head).")
    kernel = np.asarray(heads[m.context_merge_head]["kernel"], np.float32)
    bias = np.asarray(heads[m.context_merge_head]["bias"], np.float32)
    if kernel.shape[1] != rank:
        raise ValueError(f"{where}: head {m.context_merge_head!r} has {kernel.shape[1]} classes "
                         f"({head_configs['parse_heads'].classes_of(m.context_merge_head)}); set "
                         f"model.unet_config.context_merge_rank={kernel.shape[1]} (now {rank}).")
    layers = configs["text_encoder"].num_layers
    if text_layer[-1] not in (-1, layers):
        raise ValueError(f"{where}: the head reads the text encoder's last layer; the merged layer is {text_layer[-1]}."
                         f" Use model.text_layer=[0, -1].")
    same = jax.tree.all(jax.tree.map(lambda a, b: np.array_equal(np.asarray(a, np.float32), b),
                                     params.get("text_encoder"), head_params["text_encoder"]))
    if not same:
        raise ValueError(f"{where}: the run's text encoder is not the one the head was trained on; set "
                         f"model.text_encoder_from={m.context_merge_from}.")
    values = {"context_merge/down/kernel": kernel, "context_merge/down/bias": bias}
    if m.context_merge_up_std:
        width = configs["unet"].cross_attention_dim
        noise = np.random.default_rng([seed, 0x6D65]).standard_normal((rank, width))
        values["context_merge/up/kernel"] = (m.context_merge_up_std * noise).astype(np.float32)
    return values


_CACHED_DATA_FIELDS = ("source", "path", "name", "split", "image_key", "caption_key", "captions_file", "images_dir",
                       "image_size", "num_examples", "options")


class UNetKind(Kind):
    ModelConfig = ModelConfig
    LossConfig = LossConfig
    trainable = ("unet",)

    def __init__(self, cfg):
        super().__init__(cfg)
        m = cfg.model
        default_layer = -1  # from scratch: the last layer, as Stable Diffusion
        if m.pretrained:
            loaded = read_any(m.pretrained)
            configs, params = dict(loaded.configs), dict(loaded.params)
            tok_settings = dict(loaded.tokenizer)
            default_layer = loaded.text_layer
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
            if not isinstance(m.unet_config, dict):
                raise ValueError(f"model.unet_config must be a mapping of UNetConfig fields, got {m.unet_config!r}")
            configs["unet"] = from_dict(unet.UNetConfig, m.unet_config, "model.unet_config.")
            params.pop("unet", None)
        for name, folder in (("vae", m.vae_from), ("text_encoder", m.text_encoder_from)):
            if folder:
                got_configs, got_params = read_folder_components(folder, (name,), f"model.{name}_from")
                configs[name], params[name] = got_configs[name], got_params[name]
        text_layer = clip.text_layer_setting(default_layer if m.text_layer is None else m.text_layer)
        try:
            last_layer = clip.is_last_layer(configs["text_encoder"].num_layers, text_layer)
            unet.check_text_layers(configs["unet"], text_layer)
        except ValueError as e:
            raise ValueError(f"model.text_layer: {e}") from None
        if cfg.export_diffusers and not last_layer:
            raise ValueError(f"export_diffusers=true needs model.text_layer=-1: a diffusers folder always conditions "
                             f"on the last layer, this run on layer {text_layer}. Set export_diffusers=false.")
        folder = tok_settings.get("folder")
        self.tokenizer = (CLIPTokenizer.from_folder(folder) if folder
                          else CLIPTokenizer.default(pad=tok_settings.get("pad") or "eos"))
        self.tokenizer_settings = tok_settings
        self.configs, self.params = configs, params
        self.models = Models(
            unet=unet.UNet(configs["unet"], dtype=self.dtype, param_dtype=jnp.float32, remat=m.remat),
            vae=vae.AutoencoderKL(configs["vae"], dtype=self.dtype, param_dtype=jnp.float32),
            text_encoder=clip.CLIPTextModel(configs["text_encoder"], dtype=self.dtype, param_dtype=jnp.float32),
            uncond_ids=np.asarray(self.tokenizer([""]), np.int32),
            text_layer=text_layer,
        )
        unet_overrides = {}
        if m.unet_init_from:
            unet_overrides.update(unet_weights_that_fit(m.unet_init_from, configs["unet"]))
        if m.context_merge_from:
            unet_overrides.update(merge_from_head(m, configs, params, text_layer, cfg.seed))
        self._overrides = {"unet": unet_overrides} if unet_overrides else {}
        self._loss = DiffusionLoss(self.models, cfg.schedule, cfg.loss)

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
            vae_mod, te_mod, layer = self.models.vae, self.models.text_encoder, self.models.text_layer

            @jax.jit
            def enc_images(x):
                post = vae_mod.apply({"params": frozen["vae"]}, x, method="encode")
                return post.mean.astype(jnp.float32), jnp.exp(0.5 * post.logvar.astype(jnp.float32))

            @jax.jit
            def enc_ids(ids):
                return te_mod.apply({"params": frozen["text_encoder"]}, ids, layer, method="encode").astype(jnp.float32)

            def encode_images(x):
                mean, std = enc_images(jnp.asarray(x))
                return np.asarray(mean), np.asarray(std)

            def encode_texts(texts):
                return np.asarray(enc_ids(jnp.asarray(self.tokenizer(list(texts)), jnp.int32)))

            _log(f"writing latent cache of {len(source)} examples to {self.cfg.data.cache_dir}")
            write_cache(source, self.cfg.data.cache_dir, encode_images, encode_texts, image_size=self.cfg.data.image_size,
                        scaling_factor=self.configs["vae"].scaling_factor, batch_size=max(1, self.cfg.batch_size),
                        fingerprint=fingerprint)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices("jaxt2i-latent-cache")

    # -- samples and export
    def _schedule(self):
        return dataclasses.replace(self.cfg.schedule, prediction_type=self.cfg.loss.prediction_target)

    def sample(self, state: TrainState, step: int, out_dir: Path) -> Path | None:
        """Samples ``sample.prompts`` with the current (EMA) weights and writes a PNG grid."""
        sc, models = self.cfg.sample, self.models
        prompts = list(sc.prompts)
        unet_params = trained_components(state, self.cfg.trainable, ema=sc.use_ema and state.ema_params is not None)
        frozen = state.frozen
        side = self.cfg.data.image_size // self.configs["vae"].downsample_factor
        ids = jnp.asarray(self.tokenizer(prompts), jnp.int32)
        uncond_ids = jnp.asarray(self.tokenizer([""] * len(prompts)), jnp.int32)
        noise = jax.random.normal(jax.random.key(sc.seed), (len(prompts), side, side,
                                                            self.configs["unet"].in_channels), jnp.float32)
        schedule, vae_config, dtype = self._schedule(), self.configs["vae"], self.dtype

        @jax.jit
        def run_sampler(unet_p, te_p, vae_p, ids, uncond_ids, noise):
            ctx = models.text_encoder.apply({"params": te_p}, ids, models.text_layer, method="encode")
            uctx = models.text_encoder.apply({"params": te_p}, uncond_ids, models.text_layer, method="encode")

            def model_fn(x, t, c):
                return models.unet.apply({"params": unet_p}, x, t, c)

            denoise = cfg_denoise_fn(model_fn, ctx, uctx, sc.guidance_scale)
            latents = sample(denoise, noise, sampler=sc.sampler, steps=sc.steps, schedule=schedule,
                             key=jax.random.key(sc.seed + 1))
            return decode_latents(vae_p, latents, vae_config, dtype=dtype)

        images = host_tree(run_sampler(unet_params["unet"], frozen["text_encoder"], frozen["vae"], ids, uncond_ids,
                                       noise))
        if jax.process_index() != 0:
            return None
        path = out_dir / f"step_{step:08d}.png"
        save_png(path, images, metadata={"step": str(step), "prompts": json.dumps(prompts)})
        return path

    def export(self, state: TrainState, out: Path, *, overwrite: bool) -> None:
        """The trained U-Net with the frozen encoders as a jaxt2i folder at ``out`` (``lora.safetensors`` beside it
        in LoRA mode; ``WORKDIR/final_diffusers`` too with ``export_diffusers`` when writing ``WORKDIR/final``)."""
        trees = self.host_components(state, self.cfg.model.export_ema)
        lora = host_tree(state.params["unet"]) if self.cfg.trainable.mode == "lora" else None
        if jax.process_index() != 0:
            return
        tok = {"pad": self.tokenizer_settings.get("pad") or "eos", "folder": self.tokenizer_settings.get("folder")}
        model = LoadedModel(configs=self.configs, params={k: trees[k] for k in ("unet", "vae", "text_encoder")},
                            schedule=self._schedule(), tokenizer=tok, source=str(self.cfg.workdir),
                            text_layer=self.models.text_layer)
        write_native(str(out), model, overwrite=overwrite)
        if lora is not None:
            lora_lib.save_lora(str(Path(out) / "lora.safetensors"), lora, self.cfg.trainable.lora_alpha)
        if self.cfg.export_diffusers and overwrite:
            write_diffusers_folder(str(Path(self.cfg.workdir).absolute() / "final_diffusers"), model, overwrite=True)
