"""jaxt2i: text-to-image generation in JAX/Flax.

Public API (see README.md): ``load_pipeline`` (every family: latent diffusion with a U-Net or a text DiT,
class-conditional DiT, DALL-E; shipped models by name), ``Pipeline`` / ``ClassPipeline`` / ``DallePipeline``,
``load_dvae`` (DALL-E's discrete VAE), ``sample`` (the sampling loop for any model).
"""

from jaxt2i.diffusion.samplers import sample
from jaxt2i.dvae import load_dvae
from jaxt2i.pipelines import ClassPipeline, DallePipeline, Pipeline, load_pipeline

__version__ = "0.1.0"
__all__ = ["ClassPipeline", "DallePipeline", "Pipeline", "load_dvae", "load_pipeline", "sample", "__version__"]
