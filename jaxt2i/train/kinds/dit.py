"""Kind ``dit``: a text-conditioned diffusion transformer (:mod:`jaxt2i.models.dit`, PixArt-alpha layout) as the
denoiser of a latent-diffusion model, on a frozen text encoder and frozen-VAE latents.

Everything but the denoiser is the ``unet`` kind's (:mod:`jaxt2i.train.kinds.unet`): text encoder and VAE from
presets or other runs' folders, text layers and an optional conditioner, the latent cache, condition dropout,
samples, the exported model folder (component ``transformer`` of type ``dit`` in place of ``unet``). The
transformer is ``model.transformer`` (a ``jaxt2i.models.dit.PRESETS`` name) with ``model.transformer_config``'s
fields over it; its input channels, latent size and text width follow the VAE, ``data.image_size`` and the text
encoder unless given. With a learned variance (``learn_sigma``) the loss is DiT's hybrid objective (noise MSE +
``loss.vlb_weight`` x the variational bound, :func:`jaxt2i.diffusion.variance.hybrid_loss`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from jaxt2i.models import dit
from jaxt2i.models.latent_diffusion import context_width
from jaxt2i.train.config import from_dict
from jaxt2i.train.kinds.unet import ModelConfig as UNetModelConfig
from jaxt2i.train.kinds.unet import UNetKind


@dataclasses.dataclass(frozen=True)
class ModelConfig(UNetModelConfig):
    """The ``unet`` kind's model section (text encoder, VAE, text layers, conditioner) with a transformer denoiser.

    transformer: a ``jaxt2i.models.dit.PRESETS`` name with ``conditioning: text`` (default ``tiny_text``).
    transformer_config: ``DiTConfig`` fields over the preset (e.g. ``{num_layers: 8, attention_head_dim: 48}``);
        ``in_channels`` defaults to the VAE's latent channels, ``sample_size`` to ``data.image_size`` over the VAE's
        downsampling factor, ``caption_channels`` to the width of the text states (the conditioner's, else the text
        encoder's).
    """

    transformer: str = "tiny_text"
    transformer_config: Any = None


def transformer_config(m: ModelConfig, configs: Mapping[str, Any], image_size: int) -> dit.DiTConfig:
    """The run's ``DiTConfig``: the preset, then the defaults that follow the other components, then
    ``m.transformer_config``."""
    if m.transformer not in dit.PRESETS:
        raise ValueError(f"model.transformer={m.transformer!r} is not a DiT preset; choose one of "
                         f"{', '.join(dit.PRESETS)}.")
    if m.transformer_config is not None and not isinstance(m.transformer_config, Mapping):
        raise ValueError(f"model.transformer_config must be a mapping of DiTConfig fields, got {m.transformer_config!r}")
    vae = configs["vae"]
    text = configs["conditioner"].width if "conditioner" in configs else configs["text_encoder"].hidden_size
    fields = dict(dataclasses.asdict(dit.PRESETS[m.transformer]), in_channels=vae.latent_channels,
                  sample_size=image_size // vae.downsample_factor, caption_channels=text, out_channels=None)
    fields.update(m.transformer_config or {})
    config = from_dict(dit.DiTConfig, fields, "model.transformer_config.")
    if config.conditioning != "text":
        raise ValueError(f"the dit kind trains a text-conditioned transformer; model.transformer={m.transformer!r} "
                         f"is {config.conditioning!r}-conditioned. Choose a text preset (e.g. tiny_text).")
    return config


class DiTKind(UNetKind):
    ModelConfig = ModelConfig

    def choose_denoiser(self, configs: dict, params: dict) -> tuple[dict, dict]:
        """The run's components with a fresh transformer (``transformer``) in place of the U-Net."""
        m = self.cfg.model
        for name in ("unet", "unet_config", "unet_init_from"):
            if getattr(m, name) is not None:
                raise ValueError(f"model.{name} is a setting of the U-Net; the dit kind trains a transformer "
                                 f"(model.transformer, model.transformer_config).")
        configs = {k: v for k, v in configs.items() if k != "unet"}
        params = {k: v for k, v in params.items() if k not in ("unet", "transformer")}
        configs["transformer"] = transformer_config(m, configs, self.cfg.data.image_size)
        width = context_width(configs["transformer"])
        text = configs["conditioner"].width if "conditioner" in configs else configs["text_encoder"].hidden_size
        if width != text:
            raise ValueError(f"model.transformer_config.caption_channels={width} but the text states are {text} wide; "
                             "leave it unset to follow the text encoder.")
        return configs, params
