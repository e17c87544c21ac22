"""jaxt2i: text-to-image generation in JAX/Flax.

Public API (see README.md): ``load_pipeline``, ``Pipeline``, ``sample``.
"""

from jaxt2i.diffusion.samplers import sample
from jaxt2i.dvae import load_dvae
from jaxt2i.pipelines import Pipeline, load_pipeline

__version__ = "0.1.0"
__all__ = ["Pipeline", "load_pipeline", "sample", "__version__"]
