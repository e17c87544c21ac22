"""Train the shapes-world KL-VAE: ``python scripts/train_shapes_vae.py --config configs/shapes_vae.yaml --out DIR``.

A thin entry point over :func:`jaxt2i.train.vae_trainer.train`; ``--set key=value`` overrides a config field
(YAML syntax for the value, e.g. ``--set steps=50``).
"""

from __future__ import annotations

from jaxt2i.train import vae_trainer
from jaxt2i.train.small import script_main

if __name__ == "__main__":
    script_main(None, __doc__.splitlines()[0], vae_trainer.VAETrainConfig, vae_trainer.train,
                out_help="output folder (params.safetensors, config.json, metrics)")
