"""The training loop: models + state + data + step + checkpoints + metrics, from a ``TrainConfig``.

``run(cfg)`` does, in order:

1. joins a multi-host run when configured (``coordinator_address`` / ``num_processes`` / ``process_id``);
2. builds the models from a preset (fresh init) or reads a pretrained model (``model.pretrained``);
3. builds the mesh and the sharded train state, or restores the latest checkpoint in
   ``WORKDIR/checkpoints/`` together with the data position (so a restarted run continues exactly);
4. iterates: batch -> step -> metrics (loss, grad norm, lr, steps/s, images/s, MFU) to
   ``WORKDIR/metrics.jsonl`` (+ TensorBoard when available) and a progress line on stderr; sample
   grids every ``sample.every`` steps; a checkpoint every ``checkpoint_every`` steps;
5. on SIGTERM: finishes the current step, saves, returns normally (the CLI exits 0);
6. at the end: saves a last checkpoint and writes the final weights in jaxt2i's format to
   ``WORKDIR/final/`` (and LoRA adapters alone to ``WORKDIR/final/lora.safetensors``).

A NaN/Inf loss either aborts (``nan_policy="abort"``: ``NonFiniteLossError``) or discards that
step's update (``"skip"``: the step counter advances, weights and optimizer state do not; this
keeps a copy of the state, i.e. twice its memory).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxt2i.train import checkpoint as ckpt_lib
from jaxt2i.train.config import TrainConfig, to_dict
from jaxt2i.train.metrics import MetricsWriter, ProgressBar, mfu, peak_flops_per_device

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or Inf and ``nan_policy`` is "abort"."""


class ModelBundle(NamedTuple):
    """What ``build_models`` returns: modules, initial weights (None: fresh init) and their metadata."""

    models: Any  # jaxt2i.train.state.Models
    params: dict | None
    configs: dict
    tokenizer: Any
    tokenizer_settings: dict
    overrides: dict | None = None  # {model: {"/"-path: array}} set after init (init_train_state's overrides)


def _log(msg: str):
    if jax.process_index() == 0:
        print(f"[jaxt2i train] {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- models


def build_models(cfg: TrainConfig) -> ModelBundle:
    """Modules (computing in ``compute_dtype``) and, for a pretrained model, its weights and tokenizer."""
    from jaxt2i import presets
    from jaxt2i.models import clip, unet, vae
    from jaxt2i.tokenizer import CLIPTokenizer
    from jaxt2i.train.state import Models

    dtype = _DTYPES[cfg.compute_dtype]
    m = cfg.model
    params = None
    default_layer = -1  # from scratch: the last layer, as Stable Diffusion
    if m.pretrained:
        from jaxt2i.convert.load import read_any

        loaded = read_any(m.pretrained)
        configs, params = dict(loaded.configs), dict(loaded.params)
        tok_settings = dict(loaded.tokenizer)
        default_layer = loaded.text_layer
        if loaded.schedule.prediction_type != cfg.loss.prediction_target:
            _log(f"warning: {m.pretrained} was trained for prediction_type={loaded.schedule.prediction_type!r} "
                 f"but loss.prediction_target={cfg.loss.prediction_target!r}")
    else:
        spec = presets.get(m.preset)
        configs = spec.configs()
        if m.unet:
            configs["unet"] = unet.PRESETS[m.unet]
        if m.vae:
            configs["vae"] = vae.PRESETS[m.vae]
        if m.text_encoder:
            configs["text_encoder"] = clip.PRESETS[m.text_encoder]
        tok_settings = {"pad": spec.tokenizer_pad, "folder": None}
    params = _replace_components(m, configs, params)
    text_layer = clip.text_layer_setting(default_layer if m.text_layer is None else m.text_layer)
    try:
        last_layer = clip.is_last_layer(configs["text_encoder"].num_layers, text_layer)
        unet.check_text_layers(configs["unet"], text_layer)
    except ValueError as e:
        raise ValueError(f"model.text_layer: {e}") from None
    if cfg.export_diffusers and not last_layer:
        raise ValueError(f"export_diffusers=true needs model.text_layer=-1: a diffusers folder always conditions on "
                         f"the last layer, this run on layer {text_layer}. Set export_diffusers=false (WORKDIR/final "
                         f"is a jaxt2i folder that records the layer).")
    folder = tok_settings.get("folder")
    tokenizer = CLIPTokenizer.from_folder(folder) if folder else CLIPTokenizer.default(pad=tok_settings.get("pad") or "eos")
    models = Models(
        unet=unet.UNet(configs["unet"], dtype=dtype, param_dtype=jnp.float32, remat=m.remat),
        vae=vae.AutoencoderKL(configs["vae"], dtype=dtype, param_dtype=jnp.float32),
        text_encoder=clip.CLIPTextModel(configs["text_encoder"], dtype=dtype, param_dtype=jnp.float32),
        uncond_ids=np.asarray(tokenizer([""]), np.int32),
        text_layer=text_layer,
    )
    unet_overrides = {}
    if m.unet_init_from:
        unet_overrides.update(unet_weights_that_fit(m.unet_init_from, configs["unet"]))
    if m.context_merge_from:
        unet_overrides.update(merge_from_parse_head(m, configs, params, text_layer, cfg.seed))
    overrides = {"unet": unet_overrides} if unet_overrides else None
    return ModelBundle(models, params, configs, tokenizer, tok_settings, overrides)


def unet_weights_that_fit(folder: str, config) -> dict[str, np.ndarray]:
    """``{"/"-path: float32 array}`` of the U-Net weights in model folder ``folder`` whose path and shape exist in
    a U-Net of ``config`` (``model.unet_init_from``); logs what stays freshly initialised. Raises ValueError when
    the folder's U-Net shares no parameter with it, or when a shared path has another shape."""
    from flax import traverse_util

    from jaxt2i import presets
    from jaxt2i.convert.load import read_any
    from jaxt2i.convert.native import flatten_params

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


def merge_from_parse_head(m, configs: dict, params: dict | None, text_layer, seed: int = 0
                          ) -> dict[str, np.ndarray]:
    """``{"context_merge/down/kernel": [D, r], "context_merge/down/bias": [r]}`` from the parse head
    ``m.context_merge_head`` saved in ``m.context_merge_from`` (see ``ModelConfig``), after checking that it fits
    the U-Net, the text layers and the text encoder it is applied to; with ``m.context_merge_up_std > 0`` also
    ``"context_merge/up/kernel"`` [r, D], Gaussian of that std drawn from ``seed``."""
    from jaxt2i.train.clip_trainer import load_parse_heads

    where = f"model.context_merge_from={m.context_merge_from}"
    if m.context_merge_up_std < 0:
        raise ValueError(f"model.context_merge_up_std must be >= 0; got {m.context_merge_up_std}")
    rank = configs["unet"].context_merge_rank
    if not rank:
        raise ValueError(f"{where}: the U-Net does not merge text layers; set model.unet_config.context_merge_rank "
                         f"(and model.text_layer=[0, -1]).")
    heads, head_config = load_parse_heads(m.context_merge_from)
    if m.context_merge_head not in heads:
        raise ValueError(f"{where}: no parse head {m.context_merge_head!r}; it has {sorted(heads)} "
                         f"(model.context_merge_head).")
    kernel = np.asarray(heads[m.context_merge_head]["kernel"], np.float32)
    bias = np.asarray(heads[m.context_merge_head]["bias"], np.float32)
    if kernel.shape[1] != rank:
        raise ValueError(f"{where}: head {m.context_merge_head!r} has {kernel.shape[1]} classes "
                         f"({head_config['classes'][m.context_merge_head]}); set "
                         f"model.unet_config.context_merge_rank={kernel.shape[1]} (now {rank}).")
    layers = configs["text_encoder"].num_layers
    if text_layer[-1] not in (-1, layers):
        raise ValueError(f"{where}: the head reads the text encoder's last layer; the merged layer is {text_layer[-1]}."
                         f" Use model.text_layer=[0, -1].")
    own = Path(m.context_merge_from) / "text_encoder"
    te = (params or {}).get("text_encoder")
    if te is None or not own.is_dir():
        raise ValueError(f"{where}: the head belongs to the text encoder in {own}; set model.text_encoder_from={own}.")
    _, head_te = read_component_folder(str(own), "text_encoder")
    same = jax.tree.all(jax.tree.map(lambda a, b: np.array_equal(np.asarray(a, np.float32), b), te, head_te))
    if not same:
        raise ValueError(f"{where}: the run's text encoder is not the one the head was trained on; set "
                         f"model.text_encoder_from={own}.")
    values = {"context_merge/down/kernel": kernel, "context_merge/down/bias": bias}
    if m.context_merge_up_std:
        width = configs["unet"].cross_attention_dim
        noise = np.random.default_rng([seed, 0x6D65]).standard_normal((rank, width))
        values["context_merge/up/kernel"] = (m.context_merge_up_std * noise).astype(np.float32)
    return values


def read_component_folder(folder: str, name: str):
    """``(config, params)`` of component ``name`` ("vae" / "text_encoder") from a folder with ``params.safetensors``
    (a ``/``-flattened Flax tree) and ``config.json`` (the config dataclass' fields), checked against the
    architecture's abstract tree; weights as float32 numpy arrays."""
    from jaxt2i import presets
    from jaxt2i.convert import native
    from jaxt2i.convert.components import COMPONENTS
    from jaxt2i.convert.io import read_safetensors

    path = Path(folder)
    for f in ("params.safetensors", "config.json"):
        if not (path / f).is_file():
            raise FileNotFoundError(f"model.{name}_from: {path / f} is missing; point at a folder written by the "
                                    f"shapes trainers (scripts/train_shapes_vae.py OUT/, train_shapes_clip.py OUT/text_encoder/).")
    config = native.config_from_dict(COMPONENTS[name].config_cls, json.loads((path / "config.json").read_text()),
                                     source=str(path / "config.json"))
    flat = {k: np.asarray(v, np.float32) for k, v in read_safetensors(str(path / "params.safetensors")).items()}
    expected = {"/".join(str(getattr(p, "key", p)) for p in kp): leaf.shape for kp, leaf in
                jax.tree_util.tree_flatten_with_path(presets.abstract_params(name, config))[0]}
    missing, unexpected = sorted(set(expected) - set(flat)), sorted(set(flat) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{path / 'params.safetensors'} does not fit its config.json: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}.")
    for k, shape in expected.items():
        if tuple(flat[k].shape) != tuple(shape):
            raise ValueError(f"{path / 'params.safetensors'}: {k} has shape {flat[k].shape}, config.json says {shape}.")
    return config, native.unflatten_params(flat)


def _replace_components(m, configs: dict, params: dict | None) -> dict | None:
    """Applies ``model.unet_config`` / ``vae_from`` / ``text_encoder_from`` to ``configs`` (in place) and returns
    the initial weights (None entries: fresh init)."""
    from jaxt2i.models import unet

    params = dict(params) if params else {}
    if m.unet_config is not None:
        if not isinstance(m.unet_config, dict):
            raise ValueError(f"model.unet_config must be a mapping of UNetConfig fields, got {m.unet_config!r}")
        from jaxt2i.train.config import from_dict

        configs["unet"] = from_dict(unet.UNetConfig, m.unet_config, "model.unet_config.")  # YAML reads 1e-5 as text
        params.pop("unet", None)
    for name, folder in (("vae", m.vae_from), ("text_encoder", m.text_encoder_from)):
        if folder:
            configs[name], params[name] = read_component_folder(folder, name)
    return params or None


# ----------------------------------------------------------------------------- data


def _encoders(models, frozen, text_layer: int):
    """Host-callable VAE and text encoders over the frozen weights, for writing a latent cache."""
    vae_mod, te_mod = models.vae, models.text_encoder

    @jax.jit
    def enc_images(x):
        post = vae_mod.apply({"params": frozen["vae"]}, x, method="encode")
        return post.mean.astype(jnp.float32), jnp.exp(0.5 * post.logvar.astype(jnp.float32))

    @jax.jit
    def enc_ids(ids):
        return te_mod.apply({"params": frozen["text_encoder"]}, ids, text_layer, method="encode").astype(jnp.float32)

    return enc_images, enc_ids


def _host_params(tree):
    """A (possibly multi-host sharded) tree -> numpy arrays on this host."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        tree = multihost_utils.process_allgather(tree, tiled=True)
    return jax.tree.map(lambda x: np.asarray(jax.device_get(x)), tree)


_CACHED_DATA_FIELDS = ("source", "path", "name", "split", "image_key", "caption_key", "captions_file", "images_dir",
                       "image_size", "num_examples", "synthetic_seed", "synthetic_two_object_probability")


def latent_cache_fingerprint(cfg: TrainConfig, bundle: ModelBundle, frozen) -> str:
    """What a latent cache for this run must have been encoded from: the frozen VAE and text encoder weights, the
    text layer and tokenizer, and the data settings that decide the examples (``jaxt2i.data.cache``)."""
    from jaxt2i.data.cache import cache_fingerprint

    tok = bundle.tokenizer
    settings = {f: getattr(cfg.data, f) for f in _CACHED_DATA_FIELDS}
    settings.update(text_layer=bundle.models.text_layer, pad_token_id=tok.pad_token_id, max_length=tok.max_length,
                    scaling_factor=bundle.configs["vae"].scaling_factor)
    encoders = {k: frozen[k] for k in ("vae", "text_encoder")}
    return cache_fingerprint(_host_params(encoders), settings)


def write_latent_cache(cfg: TrainConfig, bundle: ModelBundle, frozen) -> None:
    """Encodes the configured dataset into ``data.cache_dir`` with the frozen VAE and text encoder (host 0).

    Raises ``CacheMismatchError`` if the folder already holds a cache of other encoders or data."""
    from jaxt2i.data.cache import write_cache

    fingerprint = latent_cache_fingerprint(cfg, bundle, frozen)
    from jaxt2i.data.pipeline import make_source

    if jax.process_index() == 0:
        source = make_source(dataclasses.replace(cfg.data, use_cache=False), seed=cfg.seed)
        enc_images, enc_ids = _encoders(bundle.models, frozen, bundle.models.text_layer)
        tok = bundle.tokenizer

        def encode_images(x):
            mean, std = enc_images(jnp.asarray(x))
            return np.asarray(mean), np.asarray(std)

        def encode_texts(texts):
            return np.asarray(enc_ids(jnp.asarray(tok(list(texts)), jnp.int32)))

        _log(f"writing latent cache of {len(source)} examples to {cfg.data.cache_dir}")
        write_cache(source, cfg.data.cache_dir, encode_images, encode_texts, image_size=cfg.data.image_size,
                    scaling_factor=bundle.configs["vae"].scaling_factor, batch_size=max(1, cfg.batch_size),
                    fingerprint=fingerprint)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("jaxt2i-latent-cache")


def check_latent_cache(cfg: TrainConfig, bundle: ModelBundle, frozen) -> None:
    """Raises ``CacheMismatchError`` when ``data.cache_dir`` was encoded from other encoders or data than this run's; warns
    when it records no fingerprint (a cache from before jaxt2i wrote them), since it cannot be checked."""
    from jaxt2i.data.cache import CACHE_META, check_fingerprint, read_fingerprint

    if not (Path(cfg.data.cache_dir) / CACHE_META).exists():
        return  # no cache at all: the source says so when it opens the folder
    if read_fingerprint(cfg.data.cache_dir) is None:
        warnings.warn(f"the latent cache in {cfg.data.cache_dir} records no fingerprint (written by an older jaxt2i), "
                      "so it cannot be checked against this run's VAE, text encoder and data; re-encode it "
                      "(data.write_cache=true with a new data.cache_dir) to be sure")
        return
    check_fingerprint(cfg.data.cache_dir, latent_cache_fingerprint(cfg, bundle, frozen))


def make_batches(cfg: TrainConfig, tokenizer, local_batch: int, position: dict | None):
    """This host's ``BatchIterator`` at ``position``."""
    from jaxt2i.data.pipeline import BatchIterator, make_source

    source = make_source(cfg.data, seed=cfg.seed)
    return BatchIterator(
        source, local_batch, seed=cfg.seed, image_size=cfg.data.image_size, tokenize=tokenizer,
        crop=cfg.data.crop, flip=cfg.data.flip, host=jax.process_index(), num_hosts=jax.process_count(),
        position=position, prefetch=cfg.data.prefetch,
    )


def _host_position(data: dict, cfg: TrainConfig, local_batch: int, step: int) -> dict:
    """This host's data position from a checkpoint's data item."""
    hosts = data.get("hosts") or []
    if len(hosts) == jax.process_count():
        return hosts[jax.process_index()]
    if hosts:
        _log(f"warning: the checkpoint was written by {len(hosts)} hosts, this run has {jax.process_count()}; "
             "the data order restarts at an approximate position")
    return {"consumed": step * local_batch, "skipped": 0}


# ----------------------------------------------------------------------------- FLOPs


def step_flops(step_fn, state, batch, mesh) -> float | None:
    """FLOPs of one train step (forward + backward of the objective, global batch), from XLA's cost analysis.

    Uses ``step_fn.lower`` when the step exposes it; otherwise lowers the step's objective gradient on
    abstract unsharded inputs (no compilation). The optimizer update (a few FLOPs per parameter) is added.
    """
    from jaxt2i.train.sharding import shard_batch

    try:
        if hasattr(step_fn, "lower"):
            analysis = step_fn.lower(state, batch).cost_analysis()
        else:
            grad = jax.value_and_grad(step_fn.objective, has_aux=True)
            global_batch = shard_batch(batch, mesh)
            abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                                    (state.params, state.frozen, global_batch))
            key = jax.ShapeDtypeStruct((2,), jnp.uint32)
            analysis = jax.jit(grad).lower(*abstract, key, jnp.int32(0)).cost_analysis()
    except Exception as e:  # noqa: BLE001 -- MFU is informative only
        _log(f"MFU unavailable: cost analysis failed ({type(e).__name__}: {e})")
        return None
    if isinstance(analysis, (list, tuple)):
        analysis = analysis[0] if analysis else None
    flops = (analysis or {}).get("flops")
    if not flops or flops <= 0:
        return None
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.params))
    return float(flops) + 12.0 * n_params  # AdamW + clipping + EMA: roughly a dozen FLOPs per parameter


# ----------------------------------------------------------------------------- samples and export


def _trained_unet(state, cfg: TrainConfig, ema: bool):
    from jaxt2i.train.state import trained_unet_params

    ema = ema and state.ema_params is not None
    return trained_unet_params(state, cfg.trainable, ema=ema)


def sample_grid(state, cfg: TrainConfig, bundle: ModelBundle, step: int, out_dir: Path) -> Path | None:
    """Samples ``cfg.sample.prompts`` with the current (EMA) weights and writes a PNG grid; returns its path."""
    from jaxt2i.diffusion.guidance import cfg_denoise_fn
    from jaxt2i.diffusion.samplers import sample
    from jaxt2i.images import save_png
    from jaxt2i.models.vae import decode_latents

    sc = cfg.sample
    models = bundle.models
    prompts = list(sc.prompts)
    unet_params = _trained_unet(state, cfg, sc.use_ema)
    frozen = state.frozen
    ucfg = bundle.configs["unet"]
    factor = bundle.configs["vae"].downsample_factor
    side = cfg.data.image_size // factor
    schedule = dataclasses.replace(cfg.schedule, prediction_type=cfg.loss.prediction_target)
    ids = jnp.asarray(bundle.tokenizer(prompts), jnp.int32)
    uncond_ids = jnp.asarray(bundle.tokenizer([""] * len(prompts)), jnp.int32)
    noise = jax.random.normal(jax.random.key(sc.seed), (len(prompts), side, side, ucfg.in_channels), jnp.float32)
    unet_mod, te_mod = models.unet, models.text_encoder

    @jax.jit
    def run_sampler(unet_p, te_p, vae_p, ids, uncond_ids, noise):
        ctx = te_mod.apply({"params": te_p}, ids, models.text_layer, method="encode")
        uctx = te_mod.apply({"params": te_p}, uncond_ids, models.text_layer, method="encode")

        def model_fn(x, t, c):
            return unet_mod.apply({"params": unet_p}, x, t, c)

        denoise = cfg_denoise_fn(model_fn, ctx, uctx, sc.guidance_scale)
        latents = sample(denoise, noise, sampler=sc.sampler, steps=sc.steps, schedule=schedule,
                         key=jax.random.key(sc.seed + 1))
        return decode_latents(vae_p, latents, bundle.configs["vae"], dtype=_DTYPES[cfg.compute_dtype])

    images = run_sampler(unet_params, frozen["text_encoder"], frozen["vae"], ids, uncond_ids, noise)
    images = _host_params(images)
    if jax.process_index() != 0:
        return None
    path = out_dir / f"step_{step:08d}.png"
    save_png(path, images, metadata={"step": str(step), "prompts": json.dumps(prompts)})
    return path


def export_final(state, cfg: TrainConfig, bundle: ModelBundle, workdir: Path, out: Path | None = None) -> Path:
    """Writes the trained weights with the frozen encoders in jaxt2i's format to ``WORKDIR/final/``.

    With ``out``, writes there instead and refuses to replace an existing folder (and skips ``final_diffusers``).
    """
    from jaxt2i.convert.load import LoadedModel, write_diffusers_folder, write_native
    from jaxt2i.train import lora as lora_lib

    final = workdir / "final" if out is None else Path(out)
    unet_params = _host_params(_trained_unet(state, cfg, cfg.model.export_ema))
    frozen = _host_params({k: v for k, v in state.frozen.items() if k in ("vae", "text_encoder")})
    lora = _host_params(state.params) if cfg.trainable.mode == "lora" else None
    if jax.process_index() != 0:
        return final
    schedule = dataclasses.replace(cfg.schedule, prediction_type=cfg.loss.prediction_target)
    tok = {"pad": bundle.tokenizer_settings.get("pad") or "eos", "folder": bundle.tokenizer_settings.get("folder")}
    model = LoadedModel(configs=bundle.configs, params={"unet": unet_params, **frozen}, schedule=schedule,
                        tokenizer=tok, source=str(workdir), text_layer=bundle.models.text_layer)
    write_native(str(final), model, overwrite=out is None)
    if lora is not None:
        lora_lib.save_lora(str(final / "lora.safetensors"), lora, cfg.trainable.lora_alpha)
    if cfg.export_diffusers and out is None:
        write_diffusers_folder(str(workdir / "final_diffusers"), model, overwrite=True)
    return final


def export_checkpoint(cfg: TrainConfig, out: str | os.PathLike, step: int | None = None) -> tuple[Path, int]:
    """Writes checkpoint ``step`` (default: the newest) of ``cfg.workdir`` as a jaxt2i model folder at ``out``.

    The same weights ``export_final`` would write had the run stopped there (EMA U-Net when
    ``model.export_ema``, plus the frozen VAE and text encoder). Opens the checkpoints read-only, so it is
    safe while the run is still training. Returns ``(folder, step)``; ``out`` must not exist yet.
    """
    from jaxt2i.train.sharding import make_mesh
    from jaxt2i.train.state import init_train_state

    out = Path(out)
    if out.exists():
        raise FileExistsError(f"{out} already exists; choose a new folder (nothing is overwritten).")
    workdir = Path(cfg.workdir).absolute()
    checkpointer = ckpt_lib.Checkpointer(workdir / "checkpoints", read_only=True)
    try:
        step = checkpointer.latest_step() if step is None else int(step)
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {checkpointer.directory} yet; train first (or wait for "
                                    f"checkpoint_every={cfg.checkpoint_every} steps).")
        bundle = build_models(cfg)
        state, _ = init_train_state(bundle.models, bundle.params, cfg.optim, cfg.trainable, make_mesh(cfg.mesh),
                                    seed=cfg.seed, overrides=bundle.overrides)
        state, _ = checkpointer.restore(state, step)
    finally:
        checkpointer.close()
    return export_final(state, cfg, bundle, workdir, out=out), step


# ----------------------------------------------------------------------------- the loop


@dataclasses.dataclass
class RunResult:
    """What ``run`` returns: the last step reached, whether it stopped on a signal, and where things are."""

    step: int
    preempted: bool
    workdir: Path
    final_dir: Path | None
    last_metrics: dict
    skipped_examples: int
    skipped_steps: int


def _finite(x: float) -> bool:
    return math.isfinite(x)


def handle_nonfinite(loss: float, step: int, policy: str, prev_state, where: str = "WORKDIR/checkpoints"):
    """What to do after step ``step`` produced a NaN/Inf ``loss``.

    ``policy="abort"`` raises ``NonFiniteLossError``; ``"skip"`` returns ``prev_state`` (the state before
    the step) with its step counter advanced, so the update is discarded but the run moves on to the
    next batch and RNG stream, exactly as a resumed run would.
    """
    if policy == "abort":
        raise NonFiniteLossError(
            f"loss is {loss} at step {step}; stopping. Lower optim.lr, keep optim.grad_clip_norm, check the "
            f"data, or set nan_policy=skip to discard such steps (the last checkpoint is in {where})."
        )
    if prev_state is None:
        raise ValueError("nan_policy='skip' needs the state from before the step")
    _log(f"step {step}: loss is {loss}; update discarded (nan_policy=skip)")
    return prev_state.replace(step=prev_state.step + 1)


def _copy_state(state):
    return jax.tree.map(lambda x: x.copy() if isinstance(x, jax.Array) else x, state)


def run(
    cfg: TrainConfig,
    *,
    on_step_end: Callable[[int, dict, dict], None] | None = None,
    guard: ckpt_lib.PreemptionGuard | None = None,
) -> RunResult:
    """Trains per ``cfg`` (see the module docstring). ``on_step_end(step, metrics, context)`` is called after
    every step (context: ``{"checkpointer", "state"}``), for tools and tests. The SIGTERM handler is installed
    first thing, so a signal during start-up also ends in a saved checkpoint (after the first step)."""
    if guard is not None:
        return _run(cfg, on_step_end, guard)
    with ckpt_lib.PreemptionGuard() as guard:
        return _run(cfg, on_step_end, guard)


def _run(cfg: TrainConfig, on_step_end, guard: ckpt_lib.PreemptionGuard) -> RunResult:
    from jaxt2i.train import distributed
    from jaxt2i.train.sharding import local_batch_size, make_mesh
    from jaxt2i.train.state import init_train_state
    from jaxt2i.train.step import make_train_step

    distributed.maybe_initialize(cfg.coordinator_address, cfg.num_processes, cfg.process_id)
    primary = jax.process_index() == 0
    workdir = Path(cfg.workdir).absolute()
    workdir.mkdir(parents=True, exist_ok=True)
    if primary:
        (workdir / "config.json").write_text(json.dumps(to_dict(cfg), indent=1))

    bundle = build_models(cfg)
    mesh = make_mesh(cfg.mesh)
    local_batch = local_batch_size(cfg.batch_size, mesh)
    checkpointer = ckpt_lib.Checkpointer(workdir / "checkpoints", keep=cfg.keep_checkpoints,
                                         async_save=cfg.async_checkpoints)

    def init():
        return init_train_state(bundle.models, bundle.params, cfg.optim, cfg.trainable, mesh, seed=cfg.seed,
                                overrides=bundle.overrides)

    state, shardings, data_item, restored = ckpt_lib.restore_or_init(checkpointer, init)
    start = 0 if restored is None else int(restored)
    if restored is not None:
        _log(f"resumed from {checkpointer.directory}/{restored}")
    if cfg.data.write_cache:
        write_latent_cache(cfg, bundle, state.frozen)
    elif cfg.data.use_cache:
        check_latent_cache(cfg, bundle, state.frozen)
    position = _host_position(data_item, cfg, local_batch, start) if restored is not None else None
    batches = make_batches(cfg, bundle.tokenizer, local_batch, position)

    step_fn = make_train_step(
        bundle.models, cfg.schedule, cfg.loss, cfg.optim, cfg.trainable, compute_dtype=_DTYPES[cfg.compute_dtype],
        mesh=mesh, state_shardings=shardings, form=cfg.form, remat=cfg.model.remat,
    )
    writer = MetricsWriter(workdir, tensorboard=cfg.tensorboard, truncate_after=start if restored is not None else None,
                           enabled=primary, log=_log)
    progress = ProgressBar(cfg.steps, start, enabled=cfg.progress and primary)
    peak = peak_flops_per_device(jax.devices()[0].device_kind, cfg.peak_tflops)
    flops = None
    sample_dir = workdir / "samples"

    saved = {start} if restored is not None else set()

    def save(step: int):
        hosts = ckpt_lib.gather_host_positions(batches.position())
        checkpointer.save(step, state, {"step": step, "hosts": hosts, "skipped_steps": skipped_steps})
        saved.add(step)

    step, preempted, last = start, False, {}
    skipped_steps = int(data_item.get("skipped_steps", 0)) if restored is not None else 0
    t_last, images_since, steps_since = None, 0, 0
    try:
        while step < cfg.steps:
            batch = next(batches)
            prev = _copy_state(state) if cfg.nan_policy == "skip" else None
            if flops is None and peak is not None and step == start:
                flops = step_flops(step_fn, state, batch, mesh)
            state, metrics = step_fn(state, batch)
            loss = float(metrics["loss"])  # waits for the step
            step += 1
            if not _finite(loss):
                state = handle_nonfinite(loss, step, cfg.nan_policy, prev, where=str(checkpointer.directory))
                skipped_steps += 1
            prev = None
            now = time.perf_counter()
            if t_last is None:
                t_last = now  # the first step includes compilation; rates start after it
            else:
                steps_since += 1
                images_since += cfg.batch_size
            rec = {"loss": loss, "grad_norm": float(metrics["grad_norm"]), "lr": float(metrics["lr"])}
            if step % cfg.log_every == 0 or step == cfg.steps:
                if steps_since:
                    dt = now - t_last
                    rec["steps_per_s"] = steps_since / dt
                    rec["images_per_s"] = images_since / dt
                    u = mfu(flops, rec["steps_per_s"], jax.device_count(), peak)
                    if u is not None:
                        rec["mfu"] = u
                    t_last, images_since, steps_since = now, 0, 0
                rec["skipped_examples"] = batches.skipped
                writer.write(step, rec)
            last = rec
            progress.update(step, f"loss {loss:.4f}")
            if cfg.sample.every and step % cfg.sample.every == 0:
                sample_grid(state, cfg, bundle, step, sample_dir)
            stop = guard.should_stop()
            if step % cfg.checkpoint_every == 0 or stop:
                save(step)
            if on_step_end is not None:
                on_step_end(step, rec, {"checkpointer": checkpointer, "state": state})
            if stop:
                preempted = True
                _log(f"{guard.signal_name or 'stop'} received: saved step {step}, exiting")
                break
        final_dir = None
        if not preempted:
            if step not in saved:
                save(step)
            final_dir = export_final(state, cfg, bundle, workdir)
            if cfg.sample.every and step % cfg.sample.every:
                sample_grid(state, cfg, bundle, step, sample_dir)
    finally:
        progress.close()
        batches.close()
        checkpointer.close()
        writer.close()
    return RunResult(step, preempted, workdir, final_dir, last, batches.skipped, skipped_steps)
