"""dVAE parity with OpenAI's ``dall_e`` package (0.1): its Encoder/Decoder with random weights are saved whole with
``torch.save`` (how OpenAI's encoder.pkl / decoder.pkl were made), read by ``jaxt2i.load_dvae`` with the ``dall_e``
package made unimportable, and compared in float32."""

from __future__ import annotations

import contextlib
import importlib.abc
import sys

import dall_e
import jax
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import jaxt2i
from jaxt2i.convert import dvae_keys
from jaxt2i.convert.core import _TRANSFORMS, ConversionError
from jaxt2i.convert.module_pickle import UnsafePickleError
from jaxt2i.models import dvae

TOL = 1e-4
# dall_e's smallest sizes (its validators: n_hid >= 64, vocab_size >= 512); two blocks per group so that blocks
# with and without an id_path convolution both occur; 32x32 images -> 4x4 tokens.
SMALL = dict(n_hid=64, n_blk_per_group=2, vocab_size=512)
N_INIT = 16
IMAGE = 32


def _perturbed(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Weights 1.5x dall_e's N(0, 1/fan_in) and biases N(0, 0.1^2) instead of zeros, so every parameter shows."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith(".b"):
                p.copy_(0.1 * torch.randn(p.shape, generator=generator))
            else:
                p.mul_(1.5)
    return module.eval()


@pytest.fixture(scope="module")
def reference():
    torch.manual_seed(0)
    encoder = _perturbed(dall_e.Encoder(**SMALL), 1)
    decoder = _perturbed(dall_e.Decoder(n_init=N_INIT, **SMALL), 2)
    return encoder, decoder


class _Blocker(importlib.abc.MetaPathFinder):
    """Refuses (and records) every import of ``dall_e``."""

    def __init__(self):
        self.attempts = []

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "dall_e":
            self.attempts.append(name)
            raise ImportError(f"{name} is blocked in this test")
        return None


@contextlib.contextmanager
def dall_e_unimportable():
    """The ``dall_e`` package unimportable (and forgotten by ``sys.modules``) inside the block."""
    blocker = _Blocker()
    with pytest.MonkeyPatch.context() as patch:
        for name in [m for m in sys.modules if m.split(".")[0] == "dall_e"]:
            patch.delitem(sys.modules, name)
        patch.setattr(sys, "meta_path", [blocker, *sys.meta_path])
        yield blocker


def _nchw(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def _nhwc(x: torch.Tensor) -> np.ndarray:
    return x.detach().numpy().transpose(0, 2, 3, 1)


def _save(module, path, legacy: bool) -> str:
    torch.save(module, path, _use_new_zipfile_serialization=not legacy)
    return str(path)


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_pickles_load_without_dall_e_and_match_it(reference, tmp_path, legacy):
    encoder, decoder = reference
    enc_path = _save(encoder, tmp_path / "encoder.pkl", legacy)
    dec_path = _save(decoder, tmp_path / "decoder.pkl", legacy)
    with dall_e_unimportable() as blocker:
        model = jaxt2i.load_dvae(enc_path, dec_path)
        assert blocker.attempts == [] and "dall_e" not in sys.modules
    assert model.config == dvae.DVAEConfig(n_init=N_INIT, image_size=256, **SMALL)

    images = np.random.default_rng(0).random((2, IMAGE, IMAGE, 3), dtype=np.float32)
    with torch.no_grad():
        ref_logits = _nhwc(encoder(dall_e.map_pixels(_nchw(images))))
    logits = np.asarray(model.encode(images))
    assert logits.shape == (2, 4, 4, 512) and np.abs(ref_logits).max() > 1.0
    np.testing.assert_allclose(logits, ref_logits, atol=TOL, rtol=0)

    tokens = ref_logits.argmax(-1)
    with torch.no_grad():  # OpenAI's usage notebook
        one_hot = F.one_hot(torch.from_numpy(tokens), num_classes=512).permute(0, 3, 1, 2).float()
        ref_stats = decoder(one_hot).float()
        ref_images = dall_e.unmap_pixels(torch.sigmoid(ref_stats[:, :3]))
    assert np.abs(ref_stats.numpy()).max() > 0.5
    np.testing.assert_allclose(model.decoder_stats(tokens), _nhwc(ref_stats), atol=TOL, rtol=0)
    np.testing.assert_allclose(model.decode(tokens), _nhwc(ref_images), atol=TOL, rtol=0)


def test_decoding_probabilities_matches_dall_e(reference, tmp_path):
    encoder, decoder = reference
    model = jaxt2i.load_dvae(None, _save(decoder, tmp_path / "decoder.pkl", legacy=False))
    assert set(model.params) == {"decoder"}
    probs = np.random.default_rng(1).dirichlet(np.ones(512), size=(1, 4, 4)).astype(np.float32)
    with torch.no_grad():
        ref = _nhwc(decoder(_nchw(probs)))
    np.testing.assert_allclose(model.decoder_stats(probs), ref, atol=TOL, rtol=0)


def test_exported_weights_load_into_dall_e(reference, tmp_path):
    encoder, _ = reference
    model = jaxt2i.load_dvae(_save(encoder, tmp_path / "encoder.pkl", legacy=False))
    state_dict = dvae_keys.encoder_to_torch(model.params["encoder"], model.config)
    fresh = dall_e.Encoder(**SMALL)
    fresh.load_state_dict({k: torch.tensor(v) for k, v in state_dict.items()}, strict=True)
    for key, value in encoder.state_dict().items():
        np.testing.assert_array_equal(fresh.state_dict()[key].numpy(), value.numpy())


def test_a_part_given_in_the_wrong_place_is_named(reference, tmp_path):
    _, decoder = reference
    path = _save(decoder, tmp_path / "decoder.pkl", legacy=False)
    with pytest.raises(ConversionError, match="holds the dVAE's decoder, not its encoder; pass it as decoder_path"):
        jaxt2i.load_dvae(path)


def test_a_dall_e_module_with_a_foreign_class_inside_is_refused(tmp_path):
    encoder = dall_e.Encoder(**SMALL)
    encoder.blocks.output.relu = torch.nn.GELU()
    path = _save(encoder, tmp_path / "encoder.pkl", legacy=False)
    with pytest.raises(UnsafePickleError, match=r"torch\.nn\.modules\.activation\.GELU"):
        jaxt2i.load_dvae(path)


@pytest.mark.parametrize("part", ["encoder", "decoder"])
def test_openai_preset_matches_dall_e_defaults(part):
    """Every tensor of dall_e's default Encoder/Decoder (built on the meta device: shapes only) has its place in
    the ``openai`` preset's tree, with the same shape and the same total count (53.8M / 43.8M)."""
    module = (dall_e.Encoder if part == "encoder" else dall_e.Decoder)(device=torch.device("meta"))
    config = dvae.get_config("openai")
    table = dvae_keys.encoder_table(config) if part == "encoder" else dvae_keys.decoder_table(config)
    abstract = (dvae.encoder_abstract_params if part == "encoder" else dvae.decoder_abstract_params)(config)
    shapes = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    assert sorted(r.torch_key for r in table) == sorted(shapes)
    for rule in table:
        leaf = abstract
        for key in rule.flax_path:
            leaf = leaf[key]
        expected = _TRANSFORMS[rule.transform][0](np.broadcast_to(np.uint8(0), shapes[rule.torch_key])).shape
        assert leaf.shape == expected, rule.torch_key
    ours = sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(abstract))
    assert ours == sum(p.numel() for p in module.parameters())
    assert ours == {"encoder": 53_786_240, "decoder": 43_829_766}[part]
