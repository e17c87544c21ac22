"""jaxt2i: text-to-image generation in JAX/Flax.

Public API (see README.md): ``load_pipeline``, ``Pipeline``, ``sample``.
"""

__version__ = "0.1.0"
