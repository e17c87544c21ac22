"""Random-weight PyTorch Stable Diffusion references (diffusers + transformers), written to disk in real formats."""

from __future__ import annotations

import os

import numpy as np
import torch

from jaxt2i.tokenizer import write_vocab_files

SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1,
                 set_alpha_to_one=False, skip_prk_steps=True)


def sharpen_and_perturb(model: torch.nn.Module) -> torch.nn.Module:
    """Norm affine parameters away from 1/0 and sharper attention logits (q/k x4), so that a wrong head split,
    scale or a dropped norm parameter shows up in a parity test. Uses torch's global RNG."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.2 * torch.randn_like(p))
            if ".to_q." in name or ".to_k." in name:
                p.mul_(4.0)
    return model


def _randomize_norms(module: torch.nn.Module, seed: int) -> None:
    """Norm weights/biases away from 1/0 so a swapped or dropped norm parameter cannot go unnoticed."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn(p.shape, generator=g))


def build_torch_pipeline(preset: str, seed: int = 0, in_channels: int | None = None):
    """A diffusers StableDiffusionPipeline with random weights for a jaxt2i preset ("tiny_sd1"/"tiny_sd2")."""
    from diffusers import (AutoencoderKL, UNet2DConditionModel)
    from transformers import CLIPTextConfig, CLIPTextModel

    from jaxt2i import presets

    spec = presets.get(preset)
    torch.manual_seed(seed)
    unet_cfg = spec.configs()["unet"].to_diffusers()
    if in_channels is not None:
        unet_cfg["in_channels"] = in_channels
    unet = UNet2DConditionModel(**unet_cfg).eval()
    vae = AutoencoderKL(**spec.configs()["vae"].to_diffusers()).eval()
    text = CLIPTextModel(CLIPTextConfig(**spec.configs()["text_encoder"].to_diffusers())).eval()
    for i, m in enumerate((unet, vae, text)):
        _randomize_norms(m, seed + i)
    return unet, vae, text, spec


def save_diffusers_folder(path: str, preset: str, seed: int = 0, in_channels: int | None = None):
    """Writes a diffusers-format folder and returns the torch modules (unet, vae, text_encoder)."""
    from diffusers import PNDMScheduler, StableDiffusionInpaintPipeline, StableDiffusionPipeline
    from transformers import CLIPTokenizer

    unet, vae, text, spec = build_torch_pipeline(preset, seed, in_channels)
    tok_dir = path + "-tokenizer-src"
    write_vocab_files(tok_dir, pad=spec.tokenizer_pad)
    tokenizer = CLIPTokenizer.from_pretrained(tok_dir)
    scheduler = PNDMScheduler(**SCHEDULER, prediction_type=spec.schedule.prediction_type)
    cls = StableDiffusionInpaintPipeline if unet.config.in_channels == 9 else StableDiffusionPipeline
    pipe = cls(vae=vae, text_encoder=text, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
               safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(path)
    _sd_like_scheduler_config(path)
    pipe.scheduler = PNDMScheduler.from_pretrained(path, subfolder="scheduler")
    return pipe


def _sd_like_scheduler_config(path: str) -> None:
    """Make scheduler_config.json look like the released SD ones: clip_sample false, no timestep_spacing (so each
    scheduler class uses its own default spacing, in diffusers and in jaxt2i alike)."""
    import json

    file = os.path.join(path, "scheduler", "scheduler_config.json")
    with open(file) as f:
        config = json.load(f)
    config["clip_sample"] = False
    config.pop("timestep_spacing", None)
    with open(file, "w") as f:
        json.dump(config, f, indent=2)


def to_numpy_state_dict(module: torch.nn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().cpu().numpy() for k, v in module.state_dict().items()}


def nchw(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(np.transpose(np.asarray(x, np.float32), (0, 3, 1, 2))))


def nhwc(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().numpy().transpose(0, 2, 3, 1)
