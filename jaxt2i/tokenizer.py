"""CLIP byte-level BPE tokenizer in pure Python, id-for-id equal to transformers' ``CLIPTokenizer``.

The text goes through the same steps as the tokenizer Stable Diffusion pipelines use (transformers 5,
backed by the *tokenizers* library):

1. special tokens (``<|startoftext|>``, ``<|endoftext|>``, the unknown and the pad token) written literally
   in the prompt are cut out first and map straight to their ids;
2. the rest is normalised: Unicode NFC, every run of whitespace -> one space, lower case (character by character);
3. it is split into words with CLIP's pattern (letters runs, single digits, runs of other symbols, English
   contractions), whitespace dropped; each word is split again with the GPT-2 byte-level pattern;
4. each piece is UTF-8 encoded, mapped to printable "byte characters", the last one marked with ``</w>``,
   and merged with the BPE ranks;
5. ``[BOS] + tokens + [EOS]``, truncated to ``max_length`` (keeping EOS, with a warning naming how many
   tokens were dropped), padded with the pad token.

The vocabulary ships with the package (``assets/bpe_simple_vocab_16e6.txt.gz``, the file OpenAI's and
open-clip's tokenizers read); :func:`write_vocab_files` writes the ``vocab.json``/``merges.txt`` pair that
transformers reads.
"""

from __future__ import annotations

import functools
import gzip
import json
import os
import unicodedata
import warnings
from importlib import resources
from pathlib import Path
from typing import Sequence

import numpy as np
import regex

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
MAX_LENGTH = 77
# Number of merges used from the packaged file: the vocabulary is 49408 = 512 byte tokens + merges + 2 specials.
_NUM_MERGES = 49152 - 256 - 2

# CLIP's word pattern (letter runs, single digits, other-symbol runs, contractions); whitespace is discarded.
_CLIP_PATTERN = regex.compile(
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
)
# The GPT-2 byte-level pattern, applied to each CLIP word (it splits e.g. a lower-cased "<|endoftext|>").
_BYTE_LEVEL_PATTERN = regex.compile(
    r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
)
_WHITESPACE = regex.compile(r"\s+")


@functools.lru_cache(maxsize=None)
def bytes_to_unicode() -> dict[int, str]:
    """Byte value -> a printable character standing for it (GPT-2 / CLIP byte-level alphabet, 256 entries)."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table  # insertion order (printable bytes first) is the vocabulary order


def packaged_bpe_path() -> Path:
    """Path of the BPE merges file that ships with jaxt2i (``bpe_simple_vocab_16e6.txt.gz``)."""
    return Path(str(resources.files("jaxt2i") / "assets" / "bpe_simple_vocab_16e6.txt.gz"))


def load_packaged_vocab(path: str | os.PathLike | None = None) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Derives the CLIP vocabulary and merge list from the gzipped merges file.

    Returns:
      vocab: token -> id (49408 entries): 256 byte characters, their ``</w>`` forms, one token per merge,
        then ``<|startoftext|>`` (49406) and ``<|endoftext|>`` (49407).
      merges: the 48894 merges in rank order.
    """
    path = packaged_bpe_path() if path is None else Path(path)
    with gzip.open(path, "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    merges = [tuple(line.split()) for line in lines[1 : _NUM_MERGES + 1]]
    byte_chars = list(bytes_to_unicode().values())
    tokens = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m) for m in merges] + [BOS_TOKEN, EOS_TOKEN]
    return {t: i for i, t in enumerate(tokens)}, merges


def write_vocab_files(folder: str | os.PathLike, *, pad: str = "eos") -> None:
    """Writes a diffusers/transformers ``tokenizer/`` folder from the packaged vocabulary.

    Files: ``vocab.json``, ``merges.txt``, ``special_tokens_map.json`` and ``tokenizer_config.json``
    (pad token ``<|endoftext|>`` for ``pad="eos"`` (SD1), ``!`` for ``pad="zero"`` (SD2); model_max_length 77).
    """
    pad_token = _pad_token(pad)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab, merges = load_packaged_vocab()
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text(
        "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8"
    )
    special = {"bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN, "unk_token": EOS_TOKEN, "pad_token": pad_token}
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2), encoding="utf-8")
    config = dict(special, tokenizer_class="CLIPTokenizer", model_max_length=MAX_LENGTH, do_lower_case=True)
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")


def _pad_token(pad: str) -> str:
    if pad == "eos":
        return EOS_TOKEN
    if pad == "zero":
        return "!"
    raise ValueError(
        f"pad must be 'eos' (SD1: pad with <|endoftext|>) or 'zero' (SD2/OpenCLIP: pad with '!', id 0); got {pad!r}.")


def _token_content(value) -> str | None:
    """A token as stored in special_tokens_map.json / tokenizer_config.json: a string or {"content": ...}."""
    if isinstance(value, dict):
        return value.get("content")
    return value


class CLIPTokenizer:
    """Prompts -> ``int32 [B, max_length]`` ids, exactly as transformers' ``CLIPTokenizer`` with
    ``padding="max_length", truncation=True`` (what Stable Diffusion pipelines call).

    Build it with :meth:`default` (the packaged vocabulary) or :meth:`from_folder` (a diffusers ``tokenizer/``).
    """

    def __init__(
        self,
        vocab: dict[str, int],
        merges: Sequence[tuple[str, str]],
        *,
        pad_token: str = EOS_TOKEN,
        unk_token: str = EOS_TOKEN,
        bos_token: str = BOS_TOKEN,
        eos_token: str = EOS_TOKEN,
        max_length: int = MAX_LENGTH,
    ):
        for name, token in (("pad", pad_token), ("unk", unk_token), ("bos", bos_token), ("eos", eos_token)):
            if token not in vocab:
                raise ValueError(f"The {name} token {token!r} is not in the vocabulary.")
        if max_length < 2:
            raise ValueError(f"max_length must leave room for BOS and EOS; got {max_length}.")
        self.vocab = dict(vocab)
        self.merge_ranks = {tuple(m): i for i, m in enumerate(merges)}
        self.bos_token_id = vocab[bos_token]
        self.eos_token_id = vocab[eos_token]
        self.pad_token_id = vocab[pad_token]
        self.unk_token_id = vocab[unk_token]
        self.max_length = max_length
        self.pad_token = pad_token
        self._byte_chars = bytes_to_unicode()
        specials = sorted({bos_token, eos_token, unk_token, pad_token}, key=len, reverse=True)
        self._special_pattern = regex.compile("|".join(regex.escape(s) for s in specials))
        # Per-instance cache of word -> token ids (the merge table differs between instances).
        self._word_ids = functools.lru_cache(maxsize=65536)(self._word_ids_uncached)

    # ------------------------------------------------------------------ constructors
    @classmethod
    def default(cls, pad: str = "eos", max_length: int = MAX_LENGTH) -> "CLIPTokenizer":
        """The packaged CLIP vocabulary. ``pad="eos"``: SD1 (OpenAI CLIP) pads with ``<|endoftext|>`` (49407);
        ``pad="zero"``: SD2 (OpenCLIP) pads with ``!`` (id 0)."""
        vocab, merges = load_packaged_vocab()
        return cls(vocab, merges, pad_token=_pad_token(pad), max_length=max_length)

    @classmethod
    def from_folder(cls, path: str | os.PathLike) -> "CLIPTokenizer":
        """Reads a diffusers/transformers tokenizer folder.

        Vocabulary from ``vocab.json`` + ``merges.txt`` (or from ``tokenizer.json`` when those are absent);
        pad/unk/bos/eos tokens and ``model_max_length`` from ``special_tokens_map.json`` and
        ``tokenizer_config.json`` (transformers' defaults where neither says).
        """
        folder = Path(path)
        if not folder.is_dir():
            raise FileNotFoundError(f"Tokenizer folder {folder} does not exist.")
        vocab, merges = _read_vocab(folder)
        settings = {}
        for name in ("tokenizer_config.json", "special_tokens_map.json"):  # the latter wins, as in transformers
            file = folder / name
            if file.exists():
                settings.update(json.loads(file.read_text(encoding="utf-8")))
        tokens = {
            key: _token_content(settings.get(f"{key}_token")) or default
            for key, default in (("pad", EOS_TOKEN), ("unk", EOS_TOKEN), ("bos", BOS_TOKEN), ("eos", EOS_TOKEN))
        }
        max_length = settings.get("model_max_length", MAX_LENGTH)
        if not isinstance(max_length, int) or max_length > 10_000:  # transformers writes a huge int for "unset"
            max_length = MAX_LENGTH
        return cls(
            vocab, merges, pad_token=tokens["pad"], unk_token=tokens["unk"], bos_token=tokens["bos"],
            eos_token=tokens["eos"], max_length=max_length,
        )

    # ------------------------------------------------------------------ tokenisation
    def _bpe(self, word: str) -> list[str]:
        """Byte characters of one word -> BPE tokens (lowest-rank pair first, leftmost on ties)."""
        parts = list(word[:-1]) + [word[-1] + "</w>"]
        ranks = self.merge_ranks
        while len(parts) > 1:
            best_rank, best = None, None
            for pair in zip(parts, parts[1:]):
                rank = ranks.get(pair)
                if rank is not None and (best_rank is None or rank < best_rank):
                    best_rank, best = rank, pair
            if best is None:
                break
            merged, i = [], 0
            while i < len(parts):
                if i + 1 < len(parts) and (parts[i], parts[i + 1]) == best:
                    merged.append(parts[i] + parts[i + 1])
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
        return parts

    def _word_ids_uncached(self, word: str) -> tuple[int, ...]:
        chars = "".join(self._byte_chars[b] for b in word.encode("utf-8"))
        return tuple(self.vocab.get(t, self.unk_token_id) for t in self._bpe(chars))

    def _normalize(self, text: str) -> str:
        text = unicodedata.normalize("NFC", text)
        text = _WHITESPACE.sub(" ", text)
        return "".join(c.lower() for c in text)

    def _text_ids(self, text: str) -> list[int]:
        ids: list[int] = []
        for word in _CLIP_PATTERN.findall(self._normalize(text)):
            for piece in _BYTE_LEVEL_PATTERN.findall(word):
                ids.extend(self._word_ids(piece))
        return ids

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` without BOS/EOS, truncation or padding."""
        ids: list[int] = []
        start = 0
        for match in self._special_pattern.finditer(text):
            ids.extend(self._text_ids(text[start : match.start()]))
            ids.append(self.vocab[match.group()])
            start = match.end()
        ids.extend(self._text_ids(text[start:]))
        return ids

    def _encode_padded(self, text: str) -> tuple[list[int], int]:
        """``[BOS] + ids + [EOS] + pads`` of length max_length, and the number of tokens cut off."""
        ids = self.encode(text)
        room = self.max_length - 2
        dropped = max(0, len(ids) - room)
        ids = [self.bos_token_id] + ids[:room] + [self.eos_token_id]
        return ids + [self.pad_token_id] * (self.max_length - len(ids)), dropped

    def __call__(self, prompts: str | Sequence[str]) -> np.ndarray:
        """Tokenises one prompt or a list of prompts.

        Returns:
          ``int32 [B, max_length]`` ids (``B = 1`` for a single string). Prompts longer than
          ``max_length - 2`` tokens are truncated (EOS kept) with a ``UserWarning`` per prompt.
        """
        if isinstance(prompts, str):
            prompts = [prompts]
        rows = []
        for index, prompt in enumerate(prompts):
            if not isinstance(prompt, str):
                raise TypeError(f"Prompt {index} is a {type(prompt).__name__}; prompts must be strings.")
            ids, dropped = self._encode_padded(prompt)
            if dropped:
                warnings.warn(
                    f"Prompt {index} is too long: {dropped} token(s) beyond CLIP's limit of {self.max_length - 2} "
                    f"were dropped ({prompt[:40]!r}...).",
                    UserWarning,
                    stacklevel=2,
                )
            rows.append(ids)
        return np.asarray(rows, dtype=np.int32).reshape(len(rows), self.max_length)

    def __repr__(self) -> str:
        return (f"CLIPTokenizer(vocab_size={len(self.vocab)}, max_length={self.max_length}, "
                f"pad_token={self.pad_token!r})")


def _read_vocab(folder: Path) -> tuple[dict[str, int], list[tuple[str, str]]]:
    vocab_file, merges_file, json_file = folder / "vocab.json", folder / "merges.txt", folder / "tokenizer.json"
    if vocab_file.exists() and merges_file.exists():
        vocab = json.loads(vocab_file.read_text(encoding="utf-8"))
        lines = merges_file.read_text(encoding="utf-8").split("\n")
        merges = [tuple(line.split(" ")) for line in lines if line and not line.startswith("#version")]
        return vocab, merges
    if json_file.exists():
        model = json.loads(json_file.read_text(encoding="utf-8"))["model"]
        merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
        return model["vocab"], merges
    raise FileNotFoundError(
        f"{folder} has neither vocab.json + merges.txt nor tokenizer.json. Point from_folder at a diffusers "
        "tokenizer/ folder, or use CLIPTokenizer.default()."
    )
