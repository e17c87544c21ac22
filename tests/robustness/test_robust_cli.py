"""Out-of-range command lines for generate / img2img / inpaint / convert: a one-line error on stderr, exit status 2,
nothing written or overwritten; the image-size rule is one rule (CLI help, pipeline, U-Net); a full disk during
generate or convert leaves no partial file. Most cases are refused before the model loads, so they are fast."""

from __future__ import annotations

import errno
import hashlib
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from PIL import Image

from jaxt2i import cli
from jaxt2i.cli import main
from jaxt2i.convert import io as convert_io
from jaxt2i.pipelines import load_pipeline

ROOT = Path(__file__).resolve().parents[2]


def run(argv, capsys) -> tuple[int, str]:
    """``jaxt2i ARGV`` in this process -> (exit status, stderr)."""
    try:
        code = main([str(a) for a in argv])
    except SystemExit as e:  # argparse's own usage errors
        code = e.code
    return code, capsys.readouterr().err


def assert_refused(code: int, err: str, *needles: str) -> str:
    """Exit status 2 and exactly one error line (no traceback); returns that line."""
    errors = [line for line in err.splitlines() if "error" in line.lower()]
    assert code == 2, err
    assert "Traceback" not in err and len(errors) == 1, err
    for needle in needles:
        assert needle.lower() in errors[0].lower(), errors[0]
    return errors[0]


def files_in(folder) -> list[str]:
    return sorted(os.listdir(folder))


@pytest.fixture
def images(tmp_path) -> dict[str, Path]:
    paths = {name: tmp_path / f"{name}.png" for name in ("image", "image40", "mask", "mask32", "text")}
    Image.fromarray(np.full((64, 64, 3), 128, np.uint8)).save(paths["image"])
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(paths["image40"])
    Image.fromarray(np.full((64, 64), 255, np.uint8)).save(paths["mask"])
    Image.fromarray(np.full((32, 32), 255, np.uint8)).save(paths["mask32"])
    paths["text"].write_text("this is not an image")
    return paths


# -------------------------------------------------------------------------- refused before the model is loaded
@pytest.mark.parametrize("args, needle", [
    (["--steps", "0"], "steps must be an integer >= 1"),
    (["--steps", "-3"], "steps must be an integer >= 1"),
    (["--steps", "two"], "--steps"),
    (["--sampler", "warp"], "invalid choice: 'warp'"),
    (["--guidance", "-1"], "guidance scale must be a finite number >= 0"),
    (["--guidance", "nan"], "got nan"),
    (["--guidance", "inf"], "got inf"),
    (["--guidance=-inf"], "got -inf"),
    (["--num", "0"], "--num"),
    (["--candidates", "0"], "--candidates"),
    (["--size", "0x64"], "positive multiples"),
    (["--size", "64by64"], "WIDTHxHEIGHT"),
    (["--out", "picture.jpg-nope"], ".png"),
], ids=lambda v: "_".join(v) if isinstance(v, list) else None)
def test_generate_arguments_out_of_range(tmp_path, capsys, monkeypatch, args, needle):
    monkeypatch.chdir(tmp_path)
    loads = []
    monkeypatch.setattr(cli, "load_pipeline", lambda *a, **k: loads.append(a))
    code, err = run(["generate", "a red circle", *args], capsys)
    assert_refused(code, err, needle)
    assert loads == [] and files_in(tmp_path) == []


@pytest.mark.parametrize("command", ["img2img", "inpaint"])
@pytest.mark.parametrize("strength", ["1.5", "-0.1", "0", "nan"])
def test_strength_outside_zero_one(tmp_path, capsys, images, command, strength):
    before = files_in(tmp_path)
    mask = ["--mask", images["mask"]] if command == "inpaint" else []
    code, err = run([command, "x", "--image", images["image"], *mask, "--strength", strength,
                     "--out", tmp_path / "o.png"], capsys)
    assert_refused(code, err, "strength must be in (0, 1]")
    assert files_in(tmp_path) == before


@pytest.mark.parametrize("flag", ["--image", "--mask"])
def test_missing_input_files(tmp_path, capsys, images, flag):
    given = {"--image": images["image"], "--mask": images["mask"], flag: tmp_path / "nowhere.png"}
    code, err = run(["inpaint", "x", "--image", given["--image"], "--mask", given["--mask"],
                     "--out", tmp_path / "o.png"], capsys)
    assert_refused(code, err, "nowhere.png", "no such file")
    assert not (tmp_path / "o.png").exists()


def test_an_output_path_in_a_missing_folder_is_refused_and_not_created(tmp_path, capsys):
    code, err = run(["generate", "x", "--out", tmp_path / "missing" / "o.png"], capsys)
    assert_refused(code, err, "does not exist")
    assert not (tmp_path / "missing").exists()
    code, err = run(["generate", "x", "--out", tmp_path], capsys)
    assert_refused(code, err, "is a folder")


def test_usage_errors_are_one_line(capsys):
    code, err = run(["generate"], capsys)
    assert_refused(code, err, "prompt")
    assert err.count("\n") == 1


# ------------------------------------------------------------------------------- refused once the model is known
def test_the_size_rule_is_one_rule_computed_from_the_config(tmp_path, capsys):
    """The shapes model: VAE factor 4 (3 blocks) x U-Net downsampling 4 (3 blocks) = 16. 48x48 follows the rule;
    40x40 (a multiple of 8 and of the VAE's 4) does not, and every layer says so in the same terms."""
    pipe = load_pipeline("shapes")
    assert pipe.vae_scale_factor == 4 and pipe.size_multiple == 16
    pipe.check_image_size(48, 48)
    pipe.check_image_size(64, 96)
    rule = "positive multiples of 16 pixels (the VAE's factor 4 x the unet's downsampling 4)"
    assert pipe.size_rule == rule
    for h, w in ((40, 40), (48, 56), (8, 8)):
        with pytest.raises(ValueError, match=re.escape(rule)):
            pipe.check_image_size(h, w)
    with pytest.raises(ValueError, match=r"multiples of 4 \(the U-Net's downsampling.*VAE's factor x 4 pixels"):
        pipe.predict_noise(np.zeros((1, 10, 10, 4), np.float32), 1, pipe.encode_prompt(["x"]))
    assert "VAE's factor x the U-Net's downsampling" in cli.build_parser()._subparsers._group_actions[0].choices[
        "generate"].format_help().replace("\n", " ").replace("  ", " ")
    code, err = run(["generate", "x", "--size", "40x40", "--out", tmp_path / "o.png"], capsys)
    assert_refused(code, err, rule, "40x40")
    assert files_in(tmp_path) == []


@pytest.mark.slow  # compiles the shapes model at a new size (~10-20 s); the rule itself is checked above
def test_48x48_follows_the_rule_and_samples():
    images = load_pipeline("shapes").text_to_image("a red circle", steps=1, height=48, width=48)
    assert images.shape == (1, 48, 48, 3) and np.isfinite(images).all()


def test_a_dit_size_rule_uses_the_patch_size():
    pipe = load_pipeline("dit-shapes")
    assert pipe.size_multiple == 8 and "the transformer's patch size 2" in pipe.size_rule


def test_a_huge_size_is_refused_up_front(tmp_path, capsys):
    code, err = run(["generate", "x", "--size", "100000x100000", "--out", tmp_path / "o.png"], capsys)
    assert_refused(code, err, "100000x100000", "cannot fit", "GiB")
    assert files_in(tmp_path) == []


@pytest.mark.parametrize("case", ["image-not-an-image", "mask-not-an-image", "mask-wrong-size", "image-off-rule"])
def test_bad_input_images(tmp_path, capsys, images, case):
    image, mask, needle = {
        "image-not-an-image": ("text", "mask", "cannot read this image"),
        "mask-not-an-image": ("image", "text", "cannot read this image"),
        "mask-wrong-size": ("image", "mask32", "mask is 32x32 but the image is 64x64"),
        "image-off-rule": ("image40", "mask", "multiples of 16 pixels"),
    }[case]
    out = tmp_path / "o.png"
    command = ["inpaint", "x", "--image", images[image], "--mask", images[mask], "--steps", "1", "--out", out]
    if case == "image-off-rule":
        command = ["img2img", "x", "--image", images[image], "--steps", "1", "--out", out]
    code, err = run(command, capsys)
    assert_refused(code, err, needle)
    assert not out.exists()


def test_an_existing_output_is_never_overwritten(tmp_path, capsys, tiny_model):
    out = tmp_path / "o.png"
    out.write_bytes(b"the user's file")
    code, err = run(["generate", "x", "--model", tiny_model, "--steps", "1", "--out", out], capsys)
    assert code == 0, err
    assert out.read_bytes() == b"the user's file" and (tmp_path / "o-1.png").exists()


def test_running_out_of_device_memory_is_one_line_and_writes_nothing(tmp_path, capsys, monkeypatch, tiny_model):
    """Memory the up-front bound does not foresee runs out while sampling (XLA's RESOURCE_EXHAUSTED)."""
    def out_of_memory(self, *args, **kwargs):
        raise jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 8.00GiB.\nmore")

    monkeypatch.setattr(type(load_pipeline(tiny_model)), "text_to_image", out_of_memory)
    code, err = run(["generate", "x", "--model", tiny_model, "--steps", "1", "--out", tmp_path / "o.png"], capsys)
    errors = [line for line in err.splitlines() if "error" in line.lower()]
    assert code == 1 and "Traceback" not in err and len(errors) == 1, err
    assert "out of device memory" in errors[0] and "8.00GiB" in errors[0] and "--batch-size" in errors[0]
    assert files_in(tmp_path) == []


# ------------------------------------------------------------------------------------------------- a full disk
def _fill_disk_after(nbytes: int):
    """A file write that stores ``nbytes`` bytes and then fails as a full disk does."""
    def write(self, data):
        written = getattr(self, "_written", 0)
        if written + len(data) > nbytes:
            raise OSError(errno.ENOSPC, "No space left on device")
        self._written = written + len(data)
        return len(data)
    return write


def test_a_full_disk_during_generate_leaves_no_partial_png(tmp_path, capsys, monkeypatch, tiny_model):
    real_save = Image.Image.save

    def save_then_fail(self, fp, *args, **kwargs):
        real_save(self, fp, *args, **kwargs)  # bytes reach the file...
        fp.flush()
        raise OSError(errno.ENOSPC, "No space left on device")  # ...and the disk fills before the end

    monkeypatch.setattr(Image.Image, "save", save_then_fail)
    out = tmp_path / "o.png"
    code, err = run(["generate", "x", "--model", tiny_model, "--steps", "1", "--out", out], capsys)
    assert_refused(code, err, "No space left on device", str(out))
    assert files_in(tmp_path) == []


def test_a_full_disk_during_convert_leaves_no_destination_and_the_source_untouched(tmp_path, capsys, monkeypatch,
                                                                                   tiny_model):
    def digest(folder):
        return {name: hashlib.sha256((Path(folder) / name).read_bytes()).hexdigest() for name in os.listdir(folder)}

    source = tmp_path / "src"
    shutil.copytree(tiny_model, source)
    before = digest(source)
    real = convert_io._write_safetensors_raw
    calls = []

    def write_then_fail(path, tensors, metadata):
        calls.append(path)
        if len(calls) == 2:  # the first component is written; the second fills the disk half-way
            with open(path, "wb") as f:
                f.write(b"\0" * 100)
            raise OSError(errno.ENOSPC, "No space left on device")
        real(path, tensors, metadata)

    monkeypatch.setattr(convert_io, "_write_safetensors_raw", write_then_fail)
    out = tmp_path / "out"
    for dst, to in ((out, "jaxt2i"), (tmp_path / "diffusers", "diffusers")):
        calls.clear()
        code, err = run(["convert", source, dst, "--to", to], capsys)
        assert_refused(code, err, "No space left on device")
        assert not dst.exists()
    assert files_in(tmp_path) == ["src"] and digest(source) == before


def test_convert_refuses_a_damaged_source_and_bad_destinations(tmp_path, capsys, tiny_model):
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}garbage")
    code, err = run(["convert", broken, tmp_path / "out"], capsys)
    assert_refused(code, err, str(broken))
    assert not (tmp_path / "out").exists()
    code, err = run(["convert", tiny_model, tmp_path / "missing" / "out"], capsys)
    assert_refused(code, err, "does not exist")
    assert not (tmp_path / "missing").exists()
    (tmp_path / "taken").mkdir()
    code, err = run(["convert", tiny_model, tmp_path / "taken"], capsys)
    assert_refused(code, err, "already exists")
    code, err = run(["convert", tiny_model, tmp_path / "single.ckpt", "--to", "single-file"], capsys)
    assert_refused(code, err, ".safetensors")
    assert files_in(tmp_path) == ["broken.safetensors", "taken"]


def test_convert_accepts_a_shipped_model_name(tmp_path, capsys):
    code, err = run(["convert", "dit-shapes", tmp_path / "copy"], capsys)
    assert code == 0, err
    assert (tmp_path / "copy" / "jaxt2i.json").exists()


# ------------------------------------------------------------------------------------ the real command, end to end
def test_the_installed_command_refuses_nan_guidance_with_one_line_and_status_2(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-m", "jaxt2i.cli", "generate", "a red circle", "--guidance", "nan"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "jaxt2i generate: error: guidance scale must be a finite number >= 0 (<= 1 turns guidance off); got nan."]
    assert files_in(tmp_path) == []
