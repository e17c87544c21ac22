"""Train the shapes-world CLIP: ``python scripts/train_shapes_clip.py --config configs/shapes_clip.yaml --out DIR``.

A thin entry point over :func:`jaxt2i.train.clip_trainer.train`; ``--set key=value`` overrides a config field
(YAML syntax for the value, e.g. ``--set steps=50``).
"""

from __future__ import annotations

import argparse

import yaml

from jaxt2i.train import clip_trainer


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="YAML file of CLIPTrainConfig fields")
    parser.add_argument("--out", required=True, help="output folder (params.safetensors, config.json, text_encoder/, metrics)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field")
    args = parser.parse_args(argv)
    overrides = {}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            parser.error(f"--set expects KEY=VALUE, got {item!r}")
        overrides[key] = yaml.safe_load(value)
    cfg = clip_trainer.load_yaml_config(args.config, clip_trainer.CLIPTrainConfig, overrides)
    clip_trainer.train(cfg, args.out, log=lambda line: print(line, flush=True))


if __name__ == "__main__":
    main()
