"""jaxt2i.diffusion: noise schedules, samplers (one lax.scan loop for any denoiser), guidance, learned variance."""

from jaxt2i.diffusion.guidance import cfg_denoise_fn, combine, guidance_rescale
from jaxt2i.diffusion.plans import SAMPLERS, SamplingPlan, make_plan
from jaxt2i.diffusion.samplers import (
    img2img_start,
    inpaint_post_step_fn,
    noisy_known_latents,
    sample,
    sampler_timesteps,
)
from jaxt2i.diffusion.schedules import ScheduleConfig, add_noise, velocity
from jaxt2i.diffusion.variance import ddpm_learned_range_step, hybrid_loss, learned_range_log_variance, vlb_terms

__all__ = [
    "SAMPLERS",
    "SamplingPlan",
    "ScheduleConfig",
    "add_noise",
    "velocity",
    "cfg_denoise_fn",
    "combine",
    "guidance_rescale",
    "img2img_start",
    "inpaint_post_step_fn",
    "make_plan",
    "noisy_known_latents",
    "sample",
    "sampler_timesteps",
    "ddpm_learned_range_step",
    "hybrid_loss",
    "learned_range_log_variance",
    "vlb_terms",
]
