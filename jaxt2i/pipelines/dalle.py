"""The DALL-E pipeline: captions -> text tokens -> image tokens drawn one by one by the transformer -> the dVAE
decoder's pixels, as one jitted program; best-of-N by CLIP score when the model folder carries a CLIP.

A ``dalle`` model folder (``jaxt2i train`` with ``kind: dalle`` writes one) holds a ``dalle_transformer``
component (:mod:`jaxt2i.models.dalle`), the dVAE's ``dvae_decoder`` (and usually its ``dvae_encoder``;
:mod:`jaxt2i.models.dvae`), optionally a CLIP (``text_encoder`` + ``clip_vision``) that ranks candidates, the
tokenizer settings, and the recommended sampling: ``"sampling": {"guidance"}`` plus ``"extras":
{"token_sampling": {"temperature", "top_k", "top_p"}}`` in its ``jaxt2i.json``; a transformer trained with a
compact text table also stores ``"extras": {"text_vocabulary": [CLIP ids]}``, read through a ``SubsetTokenizer``.

Sampling (:func:`jaxt2i.models.dalle_sampling.sample_image_tokens`) is one ``lax.scan`` over the
``image_height * image_width`` image positions with a key/value cache; the logits are divided by the temperature
and filtered by top-k, then top-p. Guidance contrasts each caption with the empty caption (a pad at every position,
what training drops captions to), or with a negative prompt when one is given, on the logits; a scale <= 1 runs
the captions alone, as the diffusion pipelines do.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxt2i.convert.load import LoadedModel
from jaxt2i.dtypes import as_dtype
from jaxt2i.eval import clip_metrics, rerank
from jaxt2i.models import dvae as dvae_model
from jaxt2i.models.dalle import DalleTransformer, prepare_text_tokens
from jaxt2i.models.dalle_sampling import sample_image_tokens
from jaxt2i.devices import place
from jaxt2i.pipelines.common import (ProgressBar, ProgressFn, cast_floats, check_sampling_args, example_seeds,
                                     map_examples, seed_keys)
from jaxt2i.tokenizer import CLIPTokenizer, SubsetTokenizer

TRANSFORMER_TYPE, ENCODER_TYPE, DECODER_TYPE = "dalle_transformer", "dvae_encoder", "dvae_decoder"
TOKEN_SAMPLING = "token_sampling"  # the jaxt2i.json "extras" entry of the recommended temperature, top_k, top_p
TEXT_VOCABULARY = "text_vocabulary"  # the "extras" entry of a compact text table: the CLIP ids it keeps
TOKEN_SAMPLING_KEYS = ("temperature", "top_k", "top_p")
# Without a recommendation: plain sampling from the model's distribution, as the DALL-E paper draws.
FALLBACK_SAMPLING = {"guidance": 1.0, "temperature": 1.0, "top_k": None, "top_p": None}
SAMPLER_NAME = "autoregressive"


def token_sampling_settings(raw: Any, source: str) -> dict:
    """Checks ``{"temperature": float > 0, "top_k": int >= 1 | None, "top_p": float in (0, 1] | None}`` (each key
    optional) and returns it as a plain dict; raises ValueError naming ``source``."""
    if not isinstance(raw, Mapping):
        raise ValueError(f"{source}: {TOKEN_SAMPLING} must be a mapping like {{\"temperature\": 1.0, \"top_k\": 64, "
                         f"\"top_p\": null}}, got {raw!r}.")
    unknown = sorted(set(raw) - set(TOKEN_SAMPLING_KEYS))
    if unknown:
        raise ValueError(f"{source}: {TOKEN_SAMPLING} has unknown keys {unknown}; known: {list(TOKEN_SAMPLING_KEYS)}.")
    out = {}
    if raw.get("temperature") is not None:
        out["temperature"] = check_temperature(raw["temperature"], f"{source}: {TOKEN_SAMPLING}.temperature")
    if "top_k" in raw:
        out["top_k"] = check_top_k(raw["top_k"], f"{source}: {TOKEN_SAMPLING}.top_k")
    if "top_p" in raw:
        out["top_p"] = check_top_p(raw["top_p"], f"{source}: {TOKEN_SAMPLING}.top_p")
    return out


def check_temperature(value: Any, what: str = "temperature") -> float:
    """A temperature: a finite number > 0."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.number)) or not np.isfinite(value) \
            or value <= 0:
        raise ValueError(f"{what} must be a number > 0 (1: the model's distribution), got {value!r}.")
    return float(value)


def check_top_k(value: Any, what: str = "top_k") -> int | None:
    """A top-k: an int >= 1, or None (no top-k filter)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{what} must be an integer >= 1 (or 0 / None: no top-k filter), got {value!r}.")
    return int(value)


def check_top_p(value: Any, what: str = "top_p") -> float | None:
    """A nucleus mass: a number in (0, 1], or None (no top-p filter)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float, np.number)) or not 0.0 < float(value) <= 1.0:
        raise ValueError(f"{what} must be a number in (0, 1] (1 / None: no top-p filter), got {value!r}.")
    return float(value)


@dataclasses.dataclass(frozen=True)
class _Spec:
    """The static part of a sampling program (one compiled program per distinct value)."""

    transformer: DalleTransformer
    dvae: dvae_model.DVAEConfig
    decoder_dtype: Any
    top_k: int | None
    use_top_p: bool
    guided: bool


@functools.partial(jax.jit, static_argnames=("spec",))
def _program(params, text_tokens, uncond_tokens, key, temperature, top_p, guidance, *, spec: _Spec):
    """text_tokens [B, T] int32 -> (image tokens [B, h, w] int32, images [B, h*f, w*f, 3] float32 in [0, 1]).

    ``params``: ``{"transformer": tree, "decoder": tree}``; ``uncond_tokens`` [B, T] (used when ``spec.guided``).
    """
    tokens = sample_image_tokens(spec.transformer, params["transformer"], text_tokens, key, temperature=temperature,
                                 top_k=spec.top_k, top_p=top_p if spec.use_top_p else None,
                                 guidance_scale=guidance if spec.guided else 1.0,
                                 uncond_tokens=uncond_tokens if spec.guided else None)
    images = dvae_model.decode(params["decoder"], tokens, spec.dvae, dtype=spec.decoder_dtype)
    return tokens, images


@functools.partial(jax.jit, static_argnames=("spec",))
def _program_per_example(params, text_tokens, uncond_tokens, keys, temperature, top_p, guidance, *, spec: _Spec):
    """:func:`_program` with one key per example (keys [B]): example ``i`` as a batch of one with ``keys[i]``."""
    def one(example, key):
        return _program(params, example["text"], example["uncond"], key, temperature, top_p, guidance, spec=spec)

    return map_examples(one, {"text": text_tokens, "uncond": uncond_tokens}, keys)


@functools.partial(jax.jit, static_argnames=("config", "dtype"))
def _encode_tokens(params, images, *, config: dvae_model.DVAEConfig, dtype):
    """Images [B, H, W, 3] in [0, 1] -> the dVAE encoder's most likely tokens [B, H/f, W/f] int32."""
    return jnp.argmax(dvae_model.encode(params, images, config, dtype=dtype), axis=-1).astype(jnp.int32)


_decode_tokens = jax.jit(dvae_model.decode, static_argnames=("config", "dtype"))


def _one_of_type(loaded: LoadedModel, kind: str, required: bool = True) -> str | None:
    names = [name for name in loaded.configs if loaded.component_type(name) == kind]
    if len(names) > 1 or (required and not names):
        found = {name: loaded.component_type(name) for name in loaded.configs}
        raise ValueError(f"{loaded.source}: a DALL-E model holds one {kind!r} component; it has {found}.")
    return names[0] if names else None


def _prompt_list(prompts: str | Sequence[str], what: str = "prompt") -> list[str]:
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts:
        raise ValueError(f"Give at least one {what}.")
    return prompts


class DallePipeline:
    """A loaded DALL-E model: transformer + dVAE (+ CLIP for reranking) + tokenizer + recommended sampling.

    Attributes: configs / params / types (component name -> config, tree, type), transformer (the linen module,
    computing in ``dtype``), transformer_name, tokenizer (the CLIP BPE at ``text_length``), sampling (the
    recommended ``{"guidance", "temperature", "top_k", "top_p", "steps"}``; ``steps`` is the number of image
    tokens, one transformer call each), source.
    """

    def __init__(self, loaded: LoadedModel, dtype: str | Any = "float32"):
        if loaded.family != "dalle":
            raise ValueError(f"{loaded.source}: a {loaded.family!r} model is not a DALL-E model; load it with "
                             "jaxt2i.load_pipeline, which picks the pipeline of its family.")
        self.dtype = as_dtype(dtype)
        self.source, self.types = loaded.source, dict(loaded.types)
        self.configs = dict(loaded.configs)
        self.transformer_name = _one_of_type(loaded, TRANSFORMER_TYPE)
        self.decoder_name = _one_of_type(loaded, DECODER_TYPE)
        self.encoder_name = _one_of_type(loaded, ENCODER_TYPE, required=False)
        config = self.configs[self.transformer_name]
        dvae_config = self.configs[self.decoder_name]
        if dvae_config.vocab_size != config.image_vocab_size:
            raise ValueError(f"{loaded.source}: the dVAE has {dvae_config.vocab_size} image tokens but the transformer "
                             f"draws from {config.image_vocab_size}; they must be the same vocabulary.")
        self.tokenizer = self._tokenizer(loaded.tokenizer, config.text_length, loaded.extras.get(TEXT_VOCABULARY))
        if self.tokenizer.vocab_size > config.text_vocab_size:
            raise ValueError(f"{loaded.source}: the tokenizer has {self.tokenizer.vocab_size} ids but the "
                             f"transformer reads {config.text_vocab_size}; the folder's tokenizer does not fit the "
                             "transformer.")
        self.transformer = DalleTransformer(config, dtype=self.dtype, param_dtype=self.dtype)
        self.decoder_dtype = jnp.float32 if jnp.dtype(self.dtype) == jnp.float16 else self.dtype
        self.params = {name: jax.device_put(cast_floats(tree, self._param_dtype(name)))
                       for name, tree in loaded.params.items()}
        token_sampling = token_sampling_settings(loaded.extras.get(TOKEN_SAMPLING, {}), loaded.source)
        self.extras = dict(loaded.extras)
        self.sampling = {**FALLBACK_SAMPLING, **dict(loaded.sampling), **token_sampling,
                         "steps": config.image_length}
        self._clip = None

    @staticmethod
    def _tokenizer(settings: Mapping[str, Any], length: int,
                   vocabulary: Sequence[int] | None = None) -> CLIPTokenizer | SubsetTokenizer:
        folder = settings.get("folder")
        backend = (CLIPTokenizer.from_folder(folder) if folder else
                   CLIPTokenizer.default(pad=settings.get("pad") or "eos")).backend
        tokenizer = CLIPTokenizer(backend, length)
        return tokenizer if vocabulary is None else SubsetTokenizer(tokenizer, vocabulary)

    def _param_dtype(self, name: str):
        if name == self.transformer_name:
            return self.dtype
        return self.decoder_dtype if name in (self.decoder_name, self.encoder_name) else jnp.float32

    # ------------------------------------------------------------------------------ what it is
    @property
    def config(self):
        """The transformer's :class:`jaxt2i.models.dalle.DalleConfig`."""
        return self.configs[self.transformer_name]

    @property
    def dvae_config(self) -> dvae_model.DVAEConfig:
        return self.configs[self.decoder_name]

    @property
    def default_size(self) -> tuple[int, int]:
        """(height, width) of the images: the transformer's token grid times the dVAE's factor (the only size)."""
        f = self.dvae_config.downsample_factor
        return self.config.image_height * f, self.config.image_width * f

    def resolve_sampling(self, guidance_scale: float | None = None, temperature: float | None = None,
                         top_k: int | None = None, top_p: float | None = None) -> dict:
        """The settings a call uses: ``{"guidance", "temperature", "top_k", "top_p"}`` -- each given value, else the
        model's recommendation (:attr:`sampling`), else plain sampling (guidance 1, temperature 1, no filters).
        ``top_k=0`` and ``top_p=1`` turn a recommended filter off."""
        s = self.sampling
        guidance = float(s["guidance"] if guidance_scale is None else guidance_scale)
        check_sampling_args(guidance_scale=guidance)
        top_k = s["top_k"] if top_k is None else (None if top_k == 0 else top_k)
        top_p = s["top_p"] if top_p is None else (None if top_p == 1 else top_p)
        return {"guidance": guidance, "temperature": check_temperature(s["temperature"] if temperature is None
                                                                        else temperature),
                "top_k": check_top_k(top_k), "top_p": check_top_p(top_p)}

    def sampling_defaults(self, steps: int | None = None, guidance: float | None = None) -> tuple[int, float]:
        """``(steps, guidance)`` as every family reports them: steps is always the number of image tokens (one
        transformer call each; a given value has no effect), guidance the given value or the recommended one."""
        return self.config.image_length, self.resolve_sampling(guidance_scale=guidance)["guidance"]

    def image_metadata(self, **settings) -> dict[str, str]:
        """The settings of a :meth:`text_to_image` call with keywords ``settings`` (guidance_scale, temperature,
        top_k, top_p), as text for an image file's metadata."""
        used = self.resolve_sampling(**settings)
        return {"sampler": SAMPLER_NAME, "steps": str(self.config.image_length),
                **{k: "none" if v is None else f"{v:g}" for k, v in used.items()}}

    # ------------------------------------------------------------------------------ functional pieces
    def text_tokens(self, prompts: str | Sequence[str]) -> np.ndarray:
        """Prompts -> the transformer's text tokens, int32 [B, text_length] (BPE, then a pad per position)."""
        ids = self.tokenizer(_prompt_list(prompts))
        return prepare_text_tokens(ids, self.tokenizer.eos_token_id, self.config)

    def encode_image(self, images) -> jax.Array:
        """Images [B, H, W, 3] in [0, 1] -> the dVAE's most likely tokens [B, H/f, W/f] int32 (this family's
        latents)."""
        if self.encoder_name is None:
            raise ValueError(f"{self.source} has no dVAE encoder (component type {ENCODER_TYPE!r}); it can only draw "
                             "images, not encode them.")
        return _encode_tokens(self.params[self.encoder_name], jnp.asarray(images, jnp.float32),
                              config=self.dvae_config, dtype=self.decoder_dtype)

    def decode_latents(self, tokens) -> jax.Array:
        """Image tokens [B, h, w] int -> images [B, h*f, w*f, 3] float32 in [0, 1] (the dVAE decoder's mean)."""
        return _decode_tokens(self.params[self.decoder_name], jnp.asarray(tokens, jnp.int32), config=self.dvae_config,
                              dtype=self.decoder_dtype)

    def ranking_clip(self):
        """The ``(encode_images, encode_texts)`` CLIP of the folder's ``text_encoder`` + ``clip_vision`` (which
        ranks candidates), or None when it has none."""
        if self._clip is None:
            self._clip = clip_metrics.clip_for_model(self)
            vision = self.configs.get("clip_vision")
            if self._clip is not None and vision.image_size != self.default_size[0]:
                raise ValueError(f"{self.source}: its CLIP reads {vision.image_size}x{vision.image_size} images but "
                                 f"the model draws {self.default_size[1]}x{self.default_size[0]}; it cannot rank "
                                 "them.")
        return self._clip

    # ------------------------------------------------------------------------------ sampling
    def sample_tokens(self, prompts: str | Sequence[str], seed: int = 0, guidance_scale: float | None = None,
                      temperature: float | None = None, top_k: int | None = None, top_p: float | None = None,
                      negative_prompt: str | Sequence[str] | None = None) -> np.ndarray:
        """Prompts -> sampled image tokens int32 [B, image_height, image_width] (see :meth:`text_to_image`)."""
        return self._draw(prompts, seed, negative_prompt, self.resolve_sampling(guidance_scale, temperature, top_k,
                                                                                 top_p))[0]

    def _draw(self, prompts, seed, negative_prompt, used: dict, sharding=None) -> tuple[np.ndarray, np.ndarray]:
        """-> (tokens [B, h, w] int32, images [B, H, W, 3] float32), both numpy; ``seed``: an int or one per
        image (see :meth:`text_to_image`)."""
        text = self.text_tokens(prompts)
        guided = used["guidance"] > 1.0
        uncond = self._uncond_tokens(negative_prompt, len(text)) if guided else None
        spec = _Spec(self.transformer, self.dvae_config, self.decoder_dtype, used["top_k"], used["top_p"] is not None,
                     guided)
        params = {"transformer": self.params[self.transformer_name], "decoder": self.params[self.decoder_name]}
        seeds = example_seeds(seed, len(text))
        text, uncond = place((jnp.asarray(text), uncond), sharding)
        settings = (jnp.float32(used["temperature"]), jnp.float32(used["top_p"] or 1.0), jnp.float32(used["guidance"]))
        if seeds is None:
            tokens, images = _program(params, text, uncond, jax.random.key(seed), *settings, spec=spec)
        else:
            tokens, images = _program_per_example(params, text, uncond, place(seed_keys(seeds), sharding), *settings,
                                                  spec=spec)
        return np.asarray(tokens), np.asarray(images)

    def _uncond_tokens(self, negative_prompt, batch: int) -> jax.Array:
        """[B, T]: the empty caption (pads only) for each prompt, or the negative prompts' tokens."""
        if not negative_prompt:
            pads = self.config.text_vocab_size + np.arange(self.config.text_length, dtype=np.int32)
            return jnp.asarray(np.broadcast_to(pads, (batch, self.config.text_length)))
        negatives = _prompt_list(negative_prompt, "negative prompt")
        if len(negatives) == 1:
            negatives = negatives * batch
        if len(negatives) != batch:
            raise ValueError(f"{len(negatives)} negative prompts for {batch} prompts; give one, or one per prompt.")
        return jnp.asarray(self.text_tokens(negatives))

    def text_to_image(self, prompts: str | Sequence[str], negative_prompt: str | Sequence[str] | None = None,
                      steps: int | None = None, guidance_scale: float | None = None, sampler: str | None = None,
                      seed: int | Sequence[int] = 0, height: int | None = None, width: int | None = None,
                      latents=None, *, temperature: float | None = None, top_k: int | None = None,
                      top_p: float | None = None, candidates: int = 1, use_karras_sigmas: bool = False,
                      eta: float = 0.0, progress: bool | ProgressFn = False,
                      sharding: jax.sharding.Sharding | None = None) -> np.ndarray:
        """Prompts -> float32 images [B, H, W, 3] in [0, 1]: sample image tokens, decode them with the dVAE.

        Args:
          prompts: a caption or a list of captions (truncated to the transformer's ``text_length`` tokens).
          negative_prompt: what guidance steers away from instead of the empty caption (one, or one per prompt).
          guidance_scale: classifier-free guidance on the logits ("super-conditioning"); <= 1 samples the
            captions alone. temperature: divides the logits (> 0). top_k: keep the k most likely tokens (0: all).
            top_p: nucleus mass (1: all). Each None: the model's recommendation (:attr:`sampling`).
          seed: the draw; the same seed and settings give the same images. One seed per prompt draws image ``i``
            as a call with prompt ``i`` alone and ``seed[i]`` does.
          candidates: draw this many images per prompt (seeds :func:`jaxt2i.eval.rerank.candidate_seed`) and keep
            the one the folder's CLIP scores closest to its prompt (DALL-E's reranking); needs a CLIP.
          height, width: None or the model's :attr:`default_size` (its token grid is fixed).
          steps, sampler, use_karras_sigmas, eta: the diffusion families' settings, accepted so every family takes
            the same call; they have no effect here (an autoregressive model draws its ``image_height *
            image_width`` tokens one by one). latents: must be None (there is no starting noise).
          progress: True or ``fn(done, total)``: reports the one sampling program's start and end.
          sharding: where the batch goes (see :meth:`jaxt2i.pipelines.Pipeline.text_to_image`).
        """
        del steps, sampler, use_karras_sigmas, eta
        if latents is not None:
            raise ValueError("a DALL-E model draws image tokens; it starts from no latents. Leave latents=None "
                             "(seed chooses the draw).")
        default_h, default_w = self.default_size
        if (height or default_h, width or default_w) != (default_h, default_w):
            raise ValueError(f"this DALL-E model draws {default_w}x{default_h} images only (its token grid is "
                             f"{self.config.image_width}x{self.config.image_height}); got {width}x{height}.")
        if isinstance(candidates, bool) or int(candidates) != candidates or candidates < 1:
            raise ValueError(f"candidates must be an integer >= 1; got {candidates!r}.")
        prompts = _prompt_list(prompts)
        seeds = example_seeds(seed, len(prompts))
        seed = seed if seeds is None else seeds  # an array: best-of-N offsets every image's seed
        used = self.resolve_sampling(guidance_scale, temperature, top_k, top_p)
        clip = self.ranking_clip() if candidates > 1 else None
        if candidates > 1 and clip is None:
            raise ValueError(f"candidates={candidates} needs a CLIP to rank them and {self.source} has none (no "
                             "text_encoder + clip_vision components); train with model.clip_from=FOLDER, or rank "
                             "with jaxt2i.eval.rerank.best_of and a CLIP of your own.")
        report = (progress if callable(progress) else ProgressBar()) if progress else None
        if report is not None:
            report(0, candidates)
        done = []

        def draw(candidate_seed) -> np.ndarray:
            images = self._draw(prompts, candidate_seed, negative_prompt, used, sharding)[1]
            done.append(candidate_seed)
            if report is not None:
                report(len(done), candidates)
            return images

        images, _ = rerank.best_of(draw, prompts, int(candidates), seed, clip)
        return images

    def __repr__(self) -> str:
        cfg = self.config
        return (f"DallePipeline(source={self.source!r}, dtype={jnp.dtype(self.dtype).name}, "
                f"tokens={cfg.image_height}x{cfg.image_width} of {cfg.image_vocab_size}, "
                f"clip={'clip_vision' in self.configs})")
