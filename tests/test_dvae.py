"""The dVAE (jaxt2i.models.dvae): shapes, presets, soft decoding, the jaxt2i folder round trip, and the restricted
reader of pickled modules refusing what it does not know. Parity with OpenAI's dall_e: tests/parity/."""

from __future__ import annotations

import os
import pickle
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import jaxt2i
from jaxt2i.convert.components import component
from jaxt2i.convert.core import ConversionError
from jaxt2i.convert.io import CheckpointReadError
from jaxt2i.convert.module_pickle import UnsafePickleError, read_module_pickle
from jaxt2i.dvae import DVAE
from jaxt2i.models import dvae

TINY = dvae.PRESETS["tiny"]


def random_params(abstract: dict, seed: int = 0) -> dict:
    """Random weights for an abstract tree without compiling an init: kernels N(0, 1 / fan_in) like dall_e's,
    biases N(0, 0.1^2) (non-zero, so every parameter reaches the output)."""
    rng = np.random.default_rng(seed)

    def leaf(path, a):
        if path[-1].key == "bias":
            return (0.1 * rng.standard_normal(a.shape)).astype(np.float32)
        return (rng.standard_normal(a.shape) / np.sqrt(np.prod(a.shape[:-1]))).astype(np.float32)

    return jax.tree_util.tree_map_with_path(leaf, abstract)


def _random_dvae(config: dvae.DVAEConfig, seed: int = 0) -> DVAE:
    return DVAE(config, {"encoder": random_params(dvae.encoder_abstract_params(config), seed),
                         "decoder": random_params(dvae.decoder_abstract_params(config), seed + 1)}, source="random")


def _images(batch: int, size: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((batch, size, size, 3), dtype=np.float32)


def test_tiny_shapes_and_ranges():
    model = _random_dvae(TINY)
    logits = model.encode(_images(2, 16))
    assert logits.shape == (2, 8, 8, TINY.vocab_size) and logits.dtype == jnp.float32
    tokens = model.tokens(_images(2, 16))
    assert tokens.shape == (2, 8, 8) and tokens.dtype == jnp.int32
    stats = model.decoder_stats(tokens)
    assert stats.shape == (2, 16, 16, 6) and stats.dtype == jnp.float32
    images = np.asarray(model.decode(tokens))
    assert images.shape == (2, 16, 16, 3) and images.min() >= 0.0 and images.max() <= 1.0
    np.testing.assert_allclose(images, np.asarray(dvae.stats_to_images(stats)))


def test_decoding_one_hot_probabilities_equals_decoding_tokens():
    model = _random_dvae(TINY)
    tokens = np.random.default_rng(1).integers(0, TINY.vocab_size, (2, 8, 8))
    one_hot = jax.nn.one_hot(tokens, TINY.vocab_size)
    np.testing.assert_allclose(model.decoder_stats(one_hot), model.decoder_stats(tokens), atol=1e-6)
    # a mixture of two tokens decodes from the mixture of their input rows (the input layer is linear)
    other = (tokens + 1) % TINY.vocab_size
    mix = 0.25 * one_hot + 0.75 * jax.nn.one_hot(other, TINY.vocab_size)
    assert not np.allclose(model.decode(mix), model.decode(tokens), atol=1e-3)


def test_map_and_unmap_pixels():
    x = jnp.linspace(0.0, 1.0, 11)
    mapped = dvae.map_pixels(x)
    np.testing.assert_allclose([mapped.min(), mapped.max()], [0.1, 0.9], atol=1e-7)
    np.testing.assert_allclose(dvae.unmap_pixels(mapped), x, atol=1e-6)
    np.testing.assert_array_equal(dvae.unmap_pixels(jnp.array([0.0, 1.0])), [0.0, 1.0])  # clipped


@pytest.mark.parametrize("name, tokens", [("openai", 32), ("shapes", 16), ("shapes_8x8", 8), ("tiny", 8)])
def test_presets_token_grids(name, tokens):
    assert dvae.get_config(name).token_grid == tokens


def test_residual_branch_gain_and_block_widths():
    config = dvae.PRESETS["openai"]
    assert config.post_gain == 1 / 64  # 4 groups x 2 blocks: 1 / 8**2
    tree = dvae.encoder_abstract_params(config)
    assert tree["group_2"]["block_1"]["id_path"]["kernel"].shape == (1, 1, 256, 512)
    assert "id_path" not in tree["group_2"]["block_2"]
    assert tree["group_2"]["block_1"]["conv_1"]["kernel"].shape == (3, 3, 256, 128)
    assert tree["output"]["kernel"].shape == (1, 1, 2048, 8192)
    dec = dvae.decoder_abstract_params(config)
    assert dec["input"]["kernel"].shape == (1, 1, 8192, 128)
    assert dec["group_1"]["block_1"]["conv_1"]["kernel"].shape == (1, 1, 128, 512)
    assert dec["output"]["kernel"].shape == (1, 1, 256, 6)


def test_bfloat16_compute_stays_close():
    model = _random_dvae(TINY)
    low = DVAE(model.config, model.params, jnp.bfloat16)
    x = _images(1, 16)
    logits = low.encode(x)
    assert logits.dtype == jnp.float32
    np.testing.assert_allclose(logits, model.encode(x), atol=0.1)


def test_config_errors_say_what_is_wrong():
    with pytest.raises(ValueError, match="multiple of 4"):
        dvae.DVAEConfig(n_hid=30)
    with pytest.raises(ValueError, match="image_size"):
        dvae.DVAEConfig(image_size=100)
    with pytest.raises(ValueError, match="Unknown dVAE preset"):
        dvae.get_config("nope")


def test_folder_round_trip(tmp_path):
    model = _random_dvae(TINY)
    model.save(tmp_path / "dvae")
    loaded = jaxt2i.load_dvae(tmp_path / "dvae")
    assert loaded.config == TINY
    for part in ("encoder", "decoder"):
        jax.tree.map(np.testing.assert_array_equal, loaded.params[part], model.params[part])
    x = _images(2, 16)
    np.testing.assert_array_equal(loaded.encode(x), model.encode(x))
    with pytest.raises(FileExistsError):
        model.save(tmp_path / "dvae")
    model.save(tmp_path / "dvae", overwrite=True)


def test_folder_with_one_part_and_the_missing_part_error(tmp_path):
    model = _random_dvae(TINY)
    DVAE(TINY, {"encoder": model.params["encoder"]}).save(tmp_path / "enc")
    loaded = jaxt2i.load_dvae(tmp_path / "enc")
    assert set(loaded.params) == {"encoder"}
    with pytest.raises(ValueError, match="has no decoder; load one with .*decoder_path"):
        loaded.decode(np.zeros((1, 8, 8), np.int32))


def test_components_registered_with_their_key_tables():
    model = _random_dvae(TINY)
    for part, kind in (("encoder", "dvae_encoder"), ("decoder", "dvae_decoder")):
        entry = component(kind)
        state_dict = entry.to_torch(model.params[part], TINY)
        assert "blocks.input.w" in state_dict and "blocks.output.conv.b" in state_dict
        back = entry.from_torch(state_dict, TINY, source="test")
        jax.tree.map(np.testing.assert_array_equal, back, jax.device_get(model.params[part]))
        with pytest.raises(ConversionError, match="missing"):
            entry.from_torch({k: v for k, v in state_dict.items() if k != "blocks.input.w"}, TINY, source="t")


# ------------------------------------------------------------------------------------- the restricted reader
class _RunsCommand:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


class _WritesFile:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


def _save(obj, path, legacy: bool) -> str:
    torch.save(obj, path, _use_new_zipfile_serialization=not legacy)
    return str(path)


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
@pytest.mark.parametrize("payload, name", [(_RunsCommand, "posix.system"), (_WritesFile, "io.open")])
def test_a_pickle_carrying_code_is_refused_and_does_nothing(tmp_path, legacy, payload, name):
    marker = tmp_path / "marker"
    path = _save({"_modules": payload(marker)}, tmp_path / "evil.pkl", legacy)
    with pytest.raises(UnsafePickleError, match=rf"refused .* asks for {name}\b.*Nothing from the file was run"):
        jaxt2i.load_dvae(path)
    assert not marker.exists()


def test_a_plain_pickle_carrying_code_is_refused(tmp_path):
    marker = tmp_path / "marker"
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps(_RunsCommand(marker), protocol=2))
    with pytest.raises(UnsafePickleError, match="posix.system"):
        read_module_pickle(path, ())
    assert not marker.exists()
    pickle.loads(path.read_bytes())  # what an ordinary unpickler does with the same bytes
    assert marker.exists()


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_an_unknown_module_class_is_refused_by_name(tmp_path, legacy):
    path = _save(torch.nn.Linear(3, 4), tmp_path / "linear.pkl", legacy)
    with pytest.raises(UnsafePickleError, match=r"torch\.nn\.modules\.linear\.Linear"):
        jaxt2i.load_dvae(path)


def test_a_known_but_wrong_module_is_a_clear_error(tmp_path):
    path = _save(torch.nn.Sequential(torch.nn.ReLU()), tmp_path / "relu.pkl", legacy=False)
    with pytest.raises(ConversionError, match="expected dall_e.encoder.Encoder"):
        jaxt2i.load_dvae(path)


def test_truncated_and_foreign_files_are_read_errors(tmp_path):
    path = _save(torch.nn.Sequential(torch.nn.ReLU()), tmp_path / "relu.pkl", legacy=True)
    record = read_module_pickle(path, ())
    assert record.cls == "torch.nn.modules.container.Sequential" and list(record.children) == ["0"]
    (tmp_path / "short.pkl").write_bytes(open(path, "rb").read()[:40])
    with pytest.raises(CheckpointReadError):
        read_module_pickle(tmp_path / "short.pkl", ())
    (tmp_path / "text.pkl").write_text("not a pickle")
    with pytest.raises(CheckpointReadError):
        read_module_pickle(tmp_path / "text.pkl", ())


def _strided_linear() -> torch.nn.Linear:
    """A Linear whose weight is a transposed view and whose bias starts inside a larger storage."""
    linear = torch.nn.Linear(3, 4)
    linear.weight = torch.nn.Parameter(torch.randn(3, 4).t())
    linear.bias = torch.nn.Parameter(torch.randn(10)[3:7])
    return linear


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_the_reader_rebuilds_strided_and_offset_tensors(tmp_path, legacy):
    linear = _strided_linear()
    path = _save(linear, tmp_path / "linear.pkl", legacy)
    record = read_module_pickle(path, [("torch.nn.modules.linear", "Linear")])
    assert record.cls == "torch.nn.modules.linear.Linear" and record.fields["in_features"] == 3
    for name, value in linear.state_dict().items():
        np.testing.assert_array_equal(record.state_dict()[name], value.numpy())


def test_the_reader_accepts_storages_named_for_a_gpu(tmp_path):
    """torch < 2 saved tensors from a GPU with storages named torch.cuda.FloatStorage."""
    linear = _strided_linear()
    path = _save(linear, tmp_path / "linear.pkl", legacy=False)
    gpu_path = tmp_path / "gpu.pkl"
    with zipfile.ZipFile(path) as source, zipfile.ZipFile(gpu_path, "w") as target:
        for info in source.infolist():
            data = source.read(info)
            if info.filename.endswith("data.pkl"):
                assert b"ctorch\nFloatStorage\n" in data
                data = data.replace(b"ctorch\nFloatStorage\n", b"ctorch.cuda\nFloatStorage\n")
            target.writestr(info, data)
    record = read_module_pickle(gpu_path, [("torch.nn.modules.linear", "Linear")])
    np.testing.assert_array_equal(record.parameters["weight"], linear.weight.detach().numpy())
