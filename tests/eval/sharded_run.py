"""The evaluation runs that tests/eval/test_streamed_eval.py compares between device counts and processes.

    python tests/eval/sharded_run.py OUT_DIR      # writes OUT_DIR/shapes.json and OUT_DIR/painter.json

Run it with ``XLA_FLAGS=--xla_force_host_platform_device_count=4`` for 4 host devices, or under JAX's distributed
runtime (``JAXT2I_COORDINATOR``, ``JAXT2I_NUM_PROCESSES``, ``JAXT2I_PROCESS_ID``) as several processes; the test
imports it to make the single-device numbers in its own process.
"""

from __future__ import annotations

import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

from jaxt2i.shapes import report, world
from jaxt2i.shapes.cli import eval_main

# The shipped model on a few prompts: 4 images per call (a multiple of 4 devices and of 2, so every layout draws the
# same batches with the same seeds), 16 real renders per reference set.
SHAPES_ARGS = ["--model", "shapes", "--n", "2", "--steps", "1", "--guidance", "3", "--batch-size", "4",
               "--n-real", "16", "--reference-cache", "off"]


class ShardedPainter:
    """A model whose ``text_to_image`` takes ``sharding=`` and computes on it: it paints each prompt's scene (read
    back from its text) and runs the batch through a jitted program placed on ``sharding``. It records every call's
    batch size and device count."""

    def __init__(self):
        self.calls = []

    def text_to_image(self, prompts, *, seed, steps, guidance_scale, sharding=None):
        devices = 1 if sharding is None else sharding.mesh.size
        self.calls.append((len(prompts), devices))
        if len(prompts) % devices:
            raise ValueError(f"a batch of {len(prompts)} cannot be split over {devices} devices")
        images = np.stack([_paint(text) for text in prompts])
        placed = jax.device_put(images) if sharding is None else jax.device_put(images, sharding)
        return np.asarray(jax.jit(lambda x: jnp.clip(x * guidance_scale / guidance_scale, 0.0, 1.0))(placed))


def _paint(text: str) -> np.ndarray:
    """The prompt's objects side by side (right for "left of" / "right of", wrong for "above" / "below")."""
    objects, relation = world.parse_caption(text)
    offsets = [(0, 0)] if relation is None else [(-14, 0), (14, 0)]
    scene = world.Scene(tuple(world.Obj(c, s, z or "small", (32.0 + dx, 32.0 + dy), 12)
                              for (c, s, z), (dx, dy) in zip(objects, offsets)), relation)
    return world.render(scene).astype(np.float32) / 255.0


def painter_result() -> tuple[dict, list]:
    """The painter's evaluation (3 prompts per group, batches of 3) and its calls."""
    painter = ShardedPainter()
    result = report.evaluate_pipeline(painter, guidance_scales=(2.0,), n=3, steps=1, seed=0, batch_size=3)
    return result, painter.calls


def run(out_dir: str) -> None:
    os.makedirs(out_dir, exist_ok=True)
    assert eval_main([*SHAPES_ARGS, "--out", os.path.join(out_dir, "shapes.json")]) == 0
    result, calls = painter_result()
    if jax.process_index() == 0:
        with open(os.path.join(out_dir, "painter.json"), "w") as f:
            json.dump({"result": result, "calls": calls, "devices": jax.local_device_count(),
                       "processes": jax.process_count()}, f)


if __name__ == "__main__":
    run(sys.argv[1])
