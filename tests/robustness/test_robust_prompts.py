"""Prompts a careless or hostile user may type: empty, 10,000 characters, unusual Unicode (combining marks,
right-to-left text, emoji, NUL and control characters, lone surrogates -- what undecodable bytes on a command line
become). Each becomes 77 token ids, truncated as CLIP truncates (BOS, the first 75 tokens, EOS), and samples."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from jaxt2i.cli import main
from jaxt2i.pipelines import load_pipeline
from jaxt2i.tokenizer import CLIPTokenizer

BOS, EOS = 49406, 49407
PROMPTS = {
    "empty": "",
    "whitespace": " \t\n ",
    "10k-words": ("a red circle " * 800)[:10_000],
    "10k-one-word": "x" * 10_000,
    "10k-emoji": "\U0001F431" * 10_000,
    "combining-marks": "e\u0301\u0302\u0303\u0304" * 40,
    "right-to-left": "\u202eשלום עולם مرحبا بالعالم\u202c",
    "emoji-sequences": "\U0001F431\u200d\U0001F464\U0001F3F3\ufe0f\u200d\U0001F308" * 20,
    "nul-and-controls": "a\x00b\x1b[31m\x07c",
    "lone-surrogates": "a red \udcff\udc80 circle \ud800",
}


@pytest.fixture(scope="module")
def tokenizer() -> CLIPTokenizer:
    return CLIPTokenizer.default()


@pytest.mark.parametrize("name", list(PROMPTS))
def test_every_prompt_becomes_77_ids_truncated_as_clip_does(tokenizer, name):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ids = tokenizer(PROMPTS[name])
    assert ids.shape == (1, 77) and ids.dtype == np.int32
    assert ids[0, 0] == BOS and EOS in ids[0, 1:]
    too_long = [w for w in caught if "too long" in str(w.message)]
    if name.startswith("10k"):  # truncated: BOS, 75 tokens, EOS, no padding left; a warning says so
        assert ids[0, -1] == EOS and EOS not in ids[0, 1:-1] and len(too_long) == 1
    if name in ("empty", "whitespace"):
        assert list(ids[0, :2]) == [BOS, EOS]


def test_truncation_keeps_the_first_tokens(tokenizer):
    long = tokenizer(PROMPTS["10k-words"])
    short = tokenizer("a red circle " * 30)
    assert np.array_equal(long, short)


def test_lone_surrogates_read_as_replacement_characters(tokenizer):
    assert np.array_equal(tokenizer("a \udcff b"), tokenizer("a \ufffd b"))


def test_the_pipeline_samples_every_prompt(tiny_model):
    """One prompt at a time, as `jaxt2i generate` runs them (the same compiled programs as the CLI tests here)."""
    pipe = load_pipeline(tiny_model)
    for prompt in PROMPTS.values():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            image = pipe.text_to_image(prompt, steps=1, guidance_scale=7.5, seed=0, progress=lambda done, total: None)
        assert image.shape == (1, 32, 32, 3) and np.isfinite(image).all()


def test_the_command_line_takes_undecodable_bytes(tiny_model, tmp_path, capsys):
    """Python turns bytes of argv that are not UTF-8 into lone surrogates (surrogateescape)."""
    out = tmp_path / "o.png"
    prompt = b"a red \xff\xfe circle".decode("utf-8", "surrogateescape")
    assert main(["generate", prompt, "--model", tiny_model, "--steps", "1", "--out", str(out)]) == 0, \
        capsys.readouterr().err
    assert out.exists()
