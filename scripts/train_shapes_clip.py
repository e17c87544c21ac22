"""Train the shapes-world CLIP: ``python scripts/train_shapes_clip.py --config configs/shapes_clip.yaml --out DIR``.

A thin entry point over :func:`jaxt2i.train.clip_trainer.train`; ``--set key=value`` overrides a config field
(YAML syntax for the value, e.g. ``--set steps=50``).
"""

from __future__ import annotations

from jaxt2i.train import clip_trainer
from jaxt2i.train.small import script_main

if __name__ == "__main__":
    script_main(None, __doc__.splitlines()[0], clip_trainer.CLIPTrainConfig, clip_trainer.train,
                out_help="output folder (params.safetensors, config.json, text_encoder/, metrics)")
