"""CLIP tokenizer: the packaged vocabulary is OpenAI CLIP's, and ids are what SD pipelines compute."""

import hashlib
import json
import random
import warnings

import numpy as np
import pytest
import transformers

from jaxt2i.tokenizer import CLIPTokenizer, SubsetTokenizer, packaged_folder, vocabulary_from_captions, write_vocab_files

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

# Ids of the real CLIP vocabulary as published with other tokenizers of it (Apple's ml-stable-diffusion tests,
# open_clip, the SD pipelines' tokenizer/ folders): [BOS] + tokens + [EOS].
KNOWN_IDS = {
    "a photo of a cat": [49406, 320, 1125, 539, 320, 2368, 49407],
    "a photo of an astronaut riding a horse on mars": [49406, 320, 1125, 539, 550, 18376, 6765, 320, 4558, 525,
                                                       7496, 49407],
    "Apple CoreML developer tools on a Macbook Air are fast": [49406, 3055, 19622, 5780, 10929, 5771, 525, 320,
                                                               20617, 1922, 631, 1953, 49407],
    "the black dog": [49406, 518, 1449, 1929, 49407],
}
# sha256 of the packaged files: the vocabulary of OpenAI's bpe_simple_vocab_16e6.txt.gz (sha256 924691ac...804a)
# in the vocab.json / merges.txt form of SD's tokenizer/ folders (49408 tokens, 48894 merges).
PACKAGED_SHA256 = {
    "vocab.json": "3f0c4f7d2086b61b38487075278ea9ed04edb53a03cbb045b86c27190fa8fb69",
    "merges.txt": "9fd691f7c8039210e0fced15865466c65820d09b63988b0174bfe25de299051a",
}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """transformers' CLIPTokenizer for SD1 (pad <|endoftext|>) and SD2 (pad '!') loaded from written folders."""
    tokenizers = {}
    for pad in ("eos", "zero"):
        folder = tmp_path_factory.mktemp(f"tok_{pad}")
        write_vocab_files(folder, pad=pad)
        tokenizers[pad] = (folder, transformers.CLIPTokenizer.from_pretrained(str(folder)))
    return tokenizers


def reference_ids(tok, prompts):
    """What a Stable Diffusion pipeline computes."""
    return np.asarray(tok(prompts, padding="max_length", max_length=77, truncation=True)["input_ids"])


def ours_quiet(tok, prompts):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return tok(prompts)


def test_packaged_vocabulary_is_openai_clip():
    folder = packaged_folder()
    for name, digest in PACKAGED_SHA256.items():
        assert hashlib.sha256((folder / name).read_bytes()).hexdigest() == digest, name
    vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
    merges = (folder / "merges.txt").read_text(encoding="utf-8").splitlines()[1:]
    assert len(vocab) == 49408 and len(merges) == 48894
    # Layout: 256 byte characters, their </w> forms, one token per merge in rank order, then BOS and EOS.
    assert vocab["!"] == 0 and vocab["!</w>"] == 256 and vocab["<|startoftext|>"] == 49406
    assert all(vocab["".join(m.split(" "))] == 512 + rank for rank, m in enumerate(merges))
    tok = CLIPTokenizer.default()
    for prompt, ids in KNOWN_IDS.items():
        row = tok(prompt)[0]
        np.testing.assert_array_equal(row[:len(ids)], ids, err_msg=prompt)
        assert (row[len(ids):] == 49407).all()
    assert (CLIPTokenizer.default(pad="zero")("a photo of a cat")[0][7:] == 0).all()


@pytest.mark.parametrize("pad", ["eos", "zero"])
def test_ids_equal_the_pipeline_call(reference, pad):
    ours = ours_quiet(CLIPTokenizer.default(pad=pad), PROMPTS)
    theirs = reference_ids(reference[pad][1], PROMPTS)
    assert ours.dtype == np.int32 and ours.shape == (len(PROMPTS), 77)
    for prompt, a, b in zip(PROMPTS, ours, theirs):
        np.testing.assert_array_equal(a, b, err_msg=repr(prompt))


def test_ids_equal_the_pipeline_call_on_random_unicode(reference):
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


def test_truncation_keeps_eos_and_warns_for_each_long_prompt():
    tok = CLIPTokenizer.default()
    for _ in range(2):  # the backend keeps the last call's truncation settings: a second round must count again
        with pytest.warns(UserWarning, match=r"Prompt 1 is too long: 25 token\(s\)") as caught:
            ids = tok(["a cat", "a " * 100])
        assert len(caught) == 1
        assert ids[1, 0] == 49406 and ids[1, -1] == 49407 and (ids[1, 1:-1] == 320).all()
        np.testing.assert_array_equal(ids[0, :4], [49406, 320, 2368, 49407])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tok(["a " * 75])  # exactly fills the 75 slots: no warning


def test_single_string_empty_prompt_and_empty_list():
    tok = CLIPTokenizer.default()
    ids = tok("")
    assert ids.shape == (1, 77)
    assert ids[0, 0] == 49406 and (ids[0, 1:] == 49407).all()
    assert tok([]).shape == (0, 77)


def test_encode_gives_the_word_tokens_only():
    tok = CLIPTokenizer.default()
    assert tok.encode("astronaut riding") == [18376, 6765]
    assert tok.encode("") == []
    assert tok.vocab["a</w>"] == 320 and tok.bos_token_id == 49406 and tok.eos_token_id == 49407


def test_sd2_folder_pads_with_its_special_tokens_map(tmp_path):
    """SD2's tokenizer/ says pad <|endoftext|> in tokenizer_config.json and '!' in special_tokens_map.json, with
    its other special tokens as dicts; the pipeline pads with '!'."""
    write_vocab_files(tmp_path, pad="eos")
    (tmp_path / "special_tokens_map.json").write_text(json.dumps({
        "bos_token": {"content": "<|startoftext|>", "lstrip": False, "normalized": True, "rstrip": False},
        "eos_token": {"content": "<|endoftext|>", "lstrip": False, "normalized": True, "rstrip": False},
        "pad_token": "!",
        "unk_token": {"content": "<|endoftext|>", "lstrip": False, "normalized": True, "rstrip": False}}))
    tok = CLIPTokenizer.from_folder(tmp_path)
    assert tok.pad_token_id == 0 and tok.max_length == 77
    pipeline = transformers.CLIPTokenizer.from_pretrained(str(tmp_path))
    np.testing.assert_array_equal(ours_quiet(tok, PROMPTS), reference_ids(pipeline, PROMPTS))
    # "normalized" special tokens also match upper-case spellings; every other prompt tokenizes as the packaged SD2.
    plain = [p for p in PROMPTS if "<|" not in p]
    np.testing.assert_array_equal(ours_quiet(tok, plain), ours_quiet(CLIPTokenizer.default(pad="zero"), plain))
    assert tok("<|ENDOFTEXT|>")[0, 1] == 49407


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


def test_from_folder_reads_model_max_length(tmp_path):
    write_vocab_files(tmp_path, pad="zero")
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(dict(config, model_max_length=16)))
    ids = CLIPTokenizer.from_folder(tmp_path)(["a photo of a cat"])
    assert ids.shape == (1, 16) and (ids[0, 7:] == 0).all()


def test_errors_are_explicit(tmp_path):
    with pytest.raises(ValueError, match="pad must be"):
        CLIPTokenizer.default(pad="zeros")
    with pytest.raises(FileNotFoundError, match="vocab.json"):
        CLIPTokenizer.from_folder(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        CLIPTokenizer.from_folder(tmp_path / "missing")
    with pytest.raises(TypeError, match="Prompt 1"):
        CLIPTokenizer.default()(["ok", None])


def test_a_subset_tokenizer_keeps_the_captions_ids_in_order_and_reads_others_as_unknown():
    base = CLIPTokenizer.default(max_length=12)
    captions = ["a red circle", "a blue square left of a red circle"]
    kept = vocabulary_from_captions(base, captions)
    assert kept == sorted(set(kept)) and {base.bos_token_id, base.eos_token_id, base.pad_token_id} <= set(kept)
    sub = SubsetTokenizer(base, kept)
    assert sub.vocab_size == len(kept) + 1 and sub.unk_token_id == len(kept)
    ids = sub(captions)
    np.testing.assert_array_equal(np.asarray(kept)[ids], base(captions))  # a relabelling of the base ids
    assert ids.dtype == np.int32 and sub.eos_token_id == kept.index(base.eos_token_id)
    with pytest.warns(UserWarning, match="outside this model's vocabulary.*purple"):
        odd = sub(["a purple circle"])
    base_odd = base(["a purple circle"])[0]
    assert (odd[0] == sub.unk_token_id).sum() == 1
    np.testing.assert_array_equal(odd[0][odd[0] != sub.unk_token_id],
                                  np.searchsorted(kept, base_odd[base_odd != base.encode("purple")[0]]))


def test_a_subset_tokenizer_refuses_ids_it_cannot_use():
    base = CLIPTokenizer.default(max_length=12)
    kept = vocabulary_from_captions(base, ["a red circle"])
    with pytest.raises(ValueError, match="strictly increasing"):
        SubsetTokenizer(base, kept[::-1])
    with pytest.raises(ValueError, match="strictly increasing"):
        SubsetTokenizer(base, [*kept, base.vocab_size])
    with pytest.raises(ValueError, match="EOS"):
        SubsetTokenizer(base, [i for i in kept if i != base.eos_token_id])
    with pytest.raises(ValueError, match="non-empty"):
        SubsetTokenizer(base, [])
