"""CLIP BPE tokenizer: ids equal to transformers' CLIPTokenizer built from the same vocabulary."""

import json
import random
import warnings

import numpy as np
import pytest

from jaxt2i.tokenizer import CLIPTokenizer, load_packaged_vocab, write_vocab_files

PROMPTS = [
    "a photo of an astronaut riding a horse on mars",
    "A Photo Of An ASTRONAUT, Riding a HoRsE!",
    "Hello, World!!! it's 1984... (really?) [x] {y} #tag @user 50% $3.50 a+b=c",
    "don't WE'LL they're I'M it'S you've she'd",
    "3.14159 1234567890 ①½²٣",
    "héllo naïve café crème brûlée Ångström straße",
    "東京タワー 서울 北京烤鸭 日本語のテキスト",
    "🐱🚀 emoji 👩‍👩‍👧 🇺🇸 ❤️",
    "tab\there\nnew   line\r\n\tend",
    "",
    "   ",
    "  leading and trailing  ",
    "e\u0301 ǅ ﬁ ΟΔΥΣΣΕΥΣ Σ İstanbul",
    "x\x1cy\x1fz\u00a0w\u3000v\u200bu\u2028t\x85s",
    "special <|endoftext|> inside <|startoftext|> and <|ENDOFTEXT|> upper",
    "wow!!",
    "a " * 100,
    "masterpiece, best quality, " * 10,
]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """transformers' CLIPTokenizer for SD1 (pad <|endoftext|>) and SD2 (pad '!') from the packaged vocabulary."""
    transformers = pytest.importorskip("transformers")
    tokenizers = {}
    for pad in ("eos", "zero"):
        folder = tmp_path_factory.mktemp(f"tok_{pad}")
        write_vocab_files(folder, pad=pad)
        tokenizers[pad] = (folder, transformers.CLIPTokenizer.from_pretrained(str(folder)))
    return tokenizers


def reference_ids(tok, prompts):
    return np.asarray(tok(prompts, padding="max_length", max_length=77, truncation=True)["input_ids"])


def ours_quiet(tok, prompts):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return tok(prompts)


@pytest.mark.parametrize("pad", ["eos", "zero"])
def test_ids_equal_transformers(reference, pad):
    ours = ours_quiet(CLIPTokenizer.default(pad=pad), PROMPTS)
    theirs = reference_ids(reference[pad][1], PROMPTS)
    assert ours.dtype == np.int32 and ours.shape == (len(PROMPTS), 77)
    for prompt, a, b in zip(PROMPTS, ours, theirs):
        np.testing.assert_array_equal(a, b, err_msg=repr(prompt))


def test_ids_equal_transformers_on_random_unicode(reference):
    """Random strings over letters, marks, digits, symbols, controls, CJK, emoji and odd whitespace."""
    codepoints = (list(range(0, 0x250)) + list(range(0x300, 0x370)) + list(range(0x2000, 0x2070))
                  + list(range(0x3000, 0x3040)) + [0x1F600, 0x1F680, 0x1F1FA, 0x200D, 0xFE0F, 0x4E00, 0xAC00,
                                                   0xFF01, 0xFB01, 0x1D400, 0x2163, 0x0660])
    pool = [chr(c) for c in codepoints] + list("abcst '") * 8
    rng = random.Random(0)
    prompts = ["".join(rng.choice(pool) for _ in range(rng.randint(0, 40))) for _ in range(400)]
    ours = ours_quiet(CLIPTokenizer.default(pad="zero"), prompts)
    theirs = reference_ids(reference["zero"][1], prompts)
    for prompt, a, b in zip(prompts, ours, theirs):
        np.testing.assert_array_equal(a, b, err_msg=ascii(prompt))


def test_known_ids_of_openai_vocabulary():
    """Ids of the real CLIP vocabulary (as in openai/clip-vit-large-patch14's vocab.json)."""
    vocab, merges = load_packaged_vocab()
    assert len(vocab) == 49408 and len(merges) == 48894
    assert vocab["!"] == 0 and vocab["a</w>"] == 320 and vocab["<|startoftext|>"] == 49406
    ids = CLIPTokenizer.default()("a photo of a cat")[0]
    np.testing.assert_array_equal(ids[:7], [49406, 320, 1125, 539, 320, 2368, 49407])
    assert (ids[7:] == 49407).all()
    assert (CLIPTokenizer.default(pad="zero")("a photo of a cat")[0][7:] == 0).all()


def test_truncation_keeps_eos_and_warns():
    tok = CLIPTokenizer.default()
    with pytest.warns(UserWarning, match=r"25 token\(s\)"):
        ids = tok(["a " * 100])
    assert ids[0, 0] == 49406 and ids[0, -1] == 49407 and (ids[0, 1:-1] == 320).all()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tok(["a " * 75])  # exactly fills the 75 slots: no warning


def test_single_string_and_empty():
    tok = CLIPTokenizer.default()
    ids = tok("")
    assert ids.shape == (1, 77)
    assert ids[0, 0] == 49406 and (ids[0, 1:] == 49407).all()


def test_from_folder_written_by_us_and_by_transformers(reference, tmp_path):
    folder, tok = reference["zero"]
    ours = CLIPTokenizer.from_folder(folder)
    assert ours.pad_token_id == 0 and ours.max_length == 77
    tok.save_pretrained(tmp_path)  # transformers 5 writes tokenizer.json + tokenizer_config.json only
    from_json = CLIPTokenizer.from_folder(tmp_path)
    assert from_json.pad_token_id == 0
    expected = reference_ids(tok, PROMPTS[:12])
    np.testing.assert_array_equal(ours(PROMPTS[:12]), expected)
    np.testing.assert_array_equal(from_json(PROMPTS[:12]), expected)


def test_from_folder_reads_pad_token_dict(tmp_path):
    write_vocab_files(tmp_path, pad="eos")
    (tmp_path / "special_tokens_map.json").write_text(json.dumps({"pad_token": {"content": "!", "lstrip": False}}))
    assert CLIPTokenizer.from_folder(tmp_path).pad_token_id == 0


def test_errors_are_explicit(tmp_path):
    with pytest.raises(ValueError, match="pad must be"):
        CLIPTokenizer.default(pad="zeros")
    with pytest.raises(FileNotFoundError, match="vocab.json"):
        CLIPTokenizer.from_folder(tmp_path)
    with pytest.raises(TypeError, match="Prompt 1"):
        CLIPTokenizer.default()(["ok", None])
