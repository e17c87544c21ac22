import ml_dtypes
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from jaxt2i.convert.io import CheckpointReadError, read_safetensors, read_state_dict, write_safetensors


def test_safetensors_round_trip_all_dtypes_and_scalars(tmp_path):
    tensors = {
        "f32": np.arange(6, dtype=np.float32).reshape(2, 3),
        "bf16": np.linspace(-2, 2, 5).astype(ml_dtypes.bfloat16),
        "f16": np.ones((0, 3), np.float16),
        "scalar": np.float32(2.5),
        "i64": np.array([1, -2], np.int64),
    }
    path = tmp_path / "x.safetensors"
    write_safetensors(path, tensors, metadata={"format": "pt"})
    back = read_safetensors(str(path))
    for k, v in tensors.items():
        assert back[k].dtype == np.asarray(v).dtype and back[k].shape == np.shape(v), k
        np.testing.assert_array_equal(np.asarray(back[k], np.float64), np.asarray(v, np.float64))
    theirs = load_file(str(path))  # the reference reader agrees with our writer
    assert theirs["bf16"].dtype == torch.bfloat16 and theirs["scalar"].shape == ()
    np.testing.assert_array_equal(theirs["f32"].numpy(), tensors["f32"])


def test_safetensors_views_are_read_only_and_outlive_the_file(tmp_path):
    path = tmp_path / "w.safetensors"
    write_safetensors(path, {"a": np.arange(4, dtype=np.float32), "b": np.full((2, 2), 7, np.int64)})
    views, copies = read_safetensors(str(path)), read_safetensors(str(path), copy=True)
    with pytest.raises(ValueError, match="read-only"):
        views["a"][0] = 1.0
    copies["a"][0] = 1.0  # ordinary arrays
    write_safetensors(path, {"a": np.zeros(4, np.float32)})  # replaced on disk (temp file + rename)...
    np.testing.assert_array_equal(views["a"], np.arange(4, dtype=np.float32))  # ...the views keep the old data
    np.testing.assert_array_equal(views["b"], np.full((2, 2), 7))
    path.unlink()
    assert float(views["a"].sum()) == 6.0


def test_unknown_extension_and_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_state_dict(str(tmp_path / "nope.safetensors"))
    (tmp_path / "weights.h5").write_bytes(b"x")
    with pytest.raises(CheckpointReadError, match="unknown checkpoint extension"):
        read_state_dict(str(tmp_path / "weights.h5"))


def test_corrupt_header_is_a_clear_error(tmp_path):
    path = tmp_path / "bad.safetensors"
    path.write_bytes((10).to_bytes(8, "little") + b"{not json}")
    with pytest.raises(CheckpointReadError, match="not valid JSON"):
        read_safetensors(str(path))
