"""The conditioner (a learned map from text states to the U-Net's context) and the latent-diffusion functions."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest

from jaxt2i import presets
from jaxt2i.models import latent_diffusion
from jaxt2i.models.conditioner import Conditioner, ConditionerConfig, abstract_params

CONFIG = ConditionerConfig(width=8, rank=3)


def _random_tree(abstract, seed: int = 0, scale: float = 0.3) -> dict:
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: (scale * rng.standard_normal(s.shape)).astype(np.float32), abstract)


def _states(batch: int = 2, tokens: int = 5, width: int = 8, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((batch, 2, tokens, width)).astype(np.float32)


def test_merge_is_first_state_plus_a_rank_r_map_of_the_second():
    params = _random_tree(abstract_params(CONFIG))
    states = _states()
    got = np.asarray(Conditioner(CONFIG).apply({"params": params}, states))
    down, up = params["down"], params["up"]
    want = states[:, 0] + (states[:, 1] @ down["kernel"] + down["bias"]) @ up["kernel"] + up["bias"]
    assert got.shape == (2, 5, 8)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_fresh_conditioner_returns_the_first_state_whatever_the_second():
    states = _states()
    params = Conditioner(CONFIG).init(jax.random.PRNGKey(0), states)["params"]
    assert np.abs(np.asarray(params["down"]["kernel"])).max() > 0  # down is random, up is zero
    other = states.copy()
    other[:, 1] = _states(seed=7)[:, 1]
    for s in (states, other):
        np.testing.assert_array_equal(np.asarray(Conditioner(CONFIG).apply({"params": params}, s)), s[:, 0])


@pytest.mark.parametrize("changes, match", [({"rank": 0}, "rank"), ({"width": 2, "rank": 3}, "exceeds"),
                                            ({"num_inputs": 3}, "exactly"), ({"rank": True}, "rank")])
def test_config_validation(changes, match):
    with pytest.raises(ValueError, match=match):
        dataclasses.replace(CONFIG, **changes)


def test_wrong_states_shape_is_refused_with_the_expected_shape():
    params = _random_tree(abstract_params(CONFIG))
    with pytest.raises(ValueError, match=r"\[B, 2, L, 8\]"):
        Conditioner(CONFIG).apply({"params": params}, _states()[:, 0])


def _tiny_configs(with_conditioner: bool) -> dict:
    configs = presets.get("tiny_sd1").configs()
    if with_conditioner:
        configs["conditioner"] = ConditionerConfig(width=configs["text_encoder"].hidden_size, rank=2)
    return configs


def _tiny_params(configs: dict) -> dict:
    return {name: _random_tree(presets.abstract_params(name, cfg), seed=i, scale=0.05)
            for i, (name, cfg) in enumerate(configs.items())}


def test_encode_text_runs_the_conditioner_on_the_stacked_text_states():
    configs = _tiny_configs(True)
    models = latent_diffusion.build_models(configs, (0, -1))
    params = _tiny_params(configs)
    ids = np.random.default_rng(0).integers(0, 49407, (2, 77)).astype(np.int32)
    states = latent_diffusion.text_states(models, params, ids)
    assert states.shape == (2, 2, 77, configs["text_encoder"].hidden_size)
    context = latent_diffusion.encode_text(models, params, ids)
    np.testing.assert_allclose(context, models.conditioner.apply({"params": params["conditioner"]}, states),
                               rtol=1e-6, atol=1e-6)
    plain = latent_diffusion.build_models(_tiny_configs(False), (0, -1))
    concatenated = latent_diffusion.encode_text(plain, params, ids)
    np.testing.assert_array_equal(concatenated, np.concatenate([states[:, 0], states[:, 1]], axis=1))


def test_text_layer_must_fit_the_conditioner():
    configs = _tiny_configs(True)
    for bad in (-1, (0,), (0, 1, -1)):
        with pytest.raises(ValueError, match="merges 2 text layers"):
            latent_diffusion.build_models(configs, bad)
    narrow = {**configs, "conditioner": ConditionerConfig(width=16, rank=2)}
    with pytest.raises(ValueError, match="different widths"):
        latent_diffusion.build_models(narrow, (0, -1))
    with pytest.raises(ValueError, match="does not exist"):
        latent_diffusion.build_models(_tiny_configs(False), 9)
