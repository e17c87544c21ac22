"""Fixtures shared by the trainer tests."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from jaxt2i import presets
from jaxt2i.convert.load import LoadedModel, write_native
from jaxt2i.models.token_heads import TokenHeadsConfig, init_params as init_heads


def _random_tree(abstract, rng):
    return jax.tree.map(lambda a: (0.05 * rng.standard_normal(a.shape)).astype(np.float32), abstract)


@pytest.fixture(scope="session")
def parse_clip(tmp_path_factory):
    """A CLIP run's output folder as the clip kind writes it with heads: text_encoder (tiny_sd1's text tower,
    random weights) and parse_heads (parse_side and parse_role, type token_heads); plus a folder with another text
    encoder. Returns ``(root, heads)``: the folders ``root / "clip"`` and ``root / "other"``, and the heads' weights."""
    root = tmp_path_factory.mktemp("parse_clip")
    config = presets.get("tiny_sd1").configs()["text_encoder"]
    rng = np.random.default_rng(0)
    heads_config = TokenHeadsConfig(width=config.hidden_size, names=("parse_side", "parse_role"),
                                    classes=(("left of", "right of", "above", "below"),
                                             ("none", "first", "a", "b", "c", "d")))
    heads = jax.tree.map(np.asarray, init_heads(heads_config, jax.random.key(0)))
    for name in ("clip", "other"):
        configs = {"text_encoder": config}
        params = {"text_encoder": _random_tree(presets.abstract_params("text_encoder", config), rng)}
        if name == "clip":
            configs["parse_heads"], params["parse_heads"] = heads_config, heads
        write_native(str(root / name), LoadedModel(configs, params, None, {"pad": "eos", "folder": None}, "test",
                                                   family=None, types={"parse_heads": "token_heads"}))
    return root, heads
