"""CLIP tokenizer: prompts -> ``int32 [B, 77]`` ids through transformers' ``CLIPTokenizerFast``.

The ids are what Stable Diffusion pipelines feed their text encoder,
``tokenizer(prompts, padding="max_length", max_length=77, truncation=True)``, computed by the same transformers
tokenizer (backed by the *tokenizers* library). It is built from a diffusers/transformers ``tokenizer/`` folder:
a model folder's own (:meth:`CLIPTokenizer.from_folder`), or the one that ships with jaxt2i
(``assets/clip_tokenizer``: OpenAI CLIP's 49408-token vocabulary, :meth:`CLIPTokenizer.default`).
SD1 (OpenAI CLIP) pads with ``<|endoftext|>`` (49407), SD2 (OpenCLIP) with ``!`` (id 0).
:class:`SubsetTokenizer` restricts one to the ids a model was trained on (its captions' words).
"""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import threading
import warnings
from importlib import resources
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import transformers

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
MAX_LENGTH = 77
PAD_TOKENS = {"eos": EOS_TOKEN, "zero": "!"}  # pad="eos": SD1; pad="zero": SD2 / OpenCLIP ("!" has id 0)
_VOCAB_FILES = ("vocab.json", "merges.txt")
_SETTINGS_FILES = ("special_tokens_map.json", "tokenizer_config.json")
# A transformers tokenizer stores its truncation and padding settings on its backend at every call, so calls from
# two threads (a data-prefetch thread and the main one) must not interleave.
_CALL_LOCK = threading.Lock()


def packaged_folder() -> Path:
    """The ``tokenizer/`` folder that ships with jaxt2i (OpenAI CLIP's vocabulary, SD1 settings)."""
    return Path(str(resources.files("jaxt2i") / "assets" / "clip_tokenizer"))


def _pad_token(pad: str) -> str:
    if pad not in PAD_TOKENS:
        raise ValueError(
            f"pad must be 'eos' (SD1: pad with <|endoftext|>) or 'zero' (SD2/OpenCLIP: pad with '!', id 0); got {pad!r}.")
    return PAD_TOKENS[pad]


def write_vocab_files(folder: str | os.PathLike, *, pad: str = "eos") -> None:
    """Writes the packaged vocabulary as a diffusers/transformers ``tokenizer/`` folder.

    Files: ``vocab.json``, ``merges.txt``, ``special_tokens_map.json`` and ``tokenizer_config.json`` with the pad
    token ``<|endoftext|>`` for ``pad="eos"`` (SD1) or ``!`` for ``pad="zero"`` (SD2); model_max_length 77.
    """
    pad_token = _pad_token(pad)
    source, folder = packaged_folder(), Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for name in _VOCAB_FILES:
        shutil.copyfile(source / name, folder / name)
    for name in _SETTINGS_FILES:
        settings = json.loads((source / name).read_text(encoding="utf-8"))
        settings["pad_token"] = pad_token
        (folder / name).write_text(json.dumps(settings, indent=2) + "\n", encoding="utf-8")


def _load(folder: Path, **overrides) -> transformers.PreTrainedTokenizerBase:
    if not folder.is_dir():
        raise FileNotFoundError(f"Tokenizer folder {folder} does not exist.")
    if not ((folder / "tokenizer.json").exists() or all((folder / n).exists() for n in _VOCAB_FILES)):
        raise FileNotFoundError(
            f"{folder} has neither vocab.json + merges.txt nor tokenizer.json. Point from_folder at a diffusers "
            "tokenizer/ folder, or use CLIPTokenizer.default().")
    return transformers.CLIPTokenizerFast.from_pretrained(str(folder), **overrides)


@functools.lru_cache(maxsize=None)
def _packaged(pad_token: str) -> transformers.PreTrainedTokenizerBase:
    return _load(packaged_folder(), pad_token=pad_token)


_SURROGATE = re.compile("[\ud800-\udfff]")


def valid_unicode(text: str) -> str:
    """``text`` with each lone surrogate (what an undecodable byte of a command line becomes) replaced by U+FFFD;
    the tokenizer library, and files, accept only valid Unicode."""
    return _SURROGATE.sub("\ufffd", text)


class CLIPTokenizer:
    """Prompts -> ``int32 [B, max_length]`` ids, as Stable Diffusion pipelines tokenize them.

    Build it with :meth:`default` (the packaged vocabulary) or :meth:`from_folder` (a diffusers ``tokenizer/``);
    ``backend`` is the transformers tokenizer underneath.
    """

    def __init__(self, backend: transformers.PreTrainedTokenizerBase, max_length: int | None = None):
        if max_length is None:  # transformers stores a huge number when the folder sets no limit
            max_length = backend.model_max_length if backend.model_max_length <= 10_000 else MAX_LENGTH
        if max_length < 2:
            raise ValueError(f"max_length must leave room for BOS and EOS; got {max_length}.")
        self.backend = backend
        self.max_length = max_length
        self.pad_token = backend.pad_token
        self.pad_token_id = backend.pad_token_id
        self.bos_token_id = backend.bos_token_id
        self.eos_token_id = backend.eos_token_id

    @classmethod
    def default(cls, pad: str = "eos", max_length: int = MAX_LENGTH) -> "CLIPTokenizer":
        """The packaged CLIP vocabulary. ``pad="eos"``: SD1 (OpenAI CLIP) pads with ``<|endoftext|>`` (49407);
        ``pad="zero"``: SD2 (OpenCLIP) pads with ``!`` (id 0)."""
        return cls(_packaged(_pad_token(pad)), max_length)

    @classmethod
    def from_folder(cls, path: str | os.PathLike) -> "CLIPTokenizer":
        """Reads a diffusers/transformers tokenizer folder (``vocab.json`` + ``merges.txt``, or ``tokenizer.json``;
        special tokens and ``model_max_length`` from its ``special_tokens_map.json`` / ``tokenizer_config.json``)."""
        return cls(_load(Path(path)))

    @property
    def vocab_size(self) -> int:
        """Number of ids the tokenizer can return."""
        return len(self.backend)

    @functools.cached_property
    def vocab(self) -> dict[str, int]:
        """Token -> id."""
        return self.backend.get_vocab()

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` without BOS/EOS, truncation or padding."""
        with _CALL_LOCK:
            return self.backend(valid_unicode(text), add_special_tokens=False, verbose=False)["input_ids"]

    def __call__(self, prompts: str | Sequence[str]) -> np.ndarray:
        """Tokenises one prompt or a list of prompts.

        Returns:
          ``int32 [B, max_length]`` ids (``B = 1`` for a single string): BOS, the tokens, EOS, then pad tokens.
          Prompts longer than ``max_length - 2`` tokens are truncated (EOS kept) with a ``UserWarning`` each.
        """
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        for index, prompt in enumerate(prompts):
            if not isinstance(prompt, str):
                raise TypeError(f"Prompt {index} is a {type(prompt).__name__}; prompts must be strings.")
        if not prompts:
            return np.zeros((0, self.max_length), np.int32)
        prompts = [valid_unicode(p) for p in prompts]
        with _CALL_LOCK:
            lengths = [len(ids) for ids in self.backend(prompts, add_special_tokens=False, verbose=False)["input_ids"]]
            ids = self.backend(prompts, padding="max_length", max_length=self.max_length, truncation=True,
                               return_tensors="np")["input_ids"]
        room = self.max_length - self.backend.num_special_tokens_to_add()
        for index, (prompt, length) in enumerate(zip(prompts, lengths)):
            if length > room:
                warnings.warn(
                    f"Prompt {index} is too long: {length - room} token(s) beyond CLIP's limit of {room} "
                    f"were dropped ({prompt[:40]!r}...).",
                    UserWarning,
                    stacklevel=2,
                )
        return ids.astype(np.int32)

    def __repr__(self) -> str:
        return (f"CLIPTokenizer(vocab_size={len(self.backend)}, max_length={self.max_length}, "
                f"pad_token={self.pad_token!r})")


def vocabulary_from_captions(tokenizer: CLIPTokenizer, captions: Iterable[str]) -> list[int]:
    """The sorted ids ``tokenizer`` gives ``captions``, with its BOS, EOS and pad ids: a :class:`SubsetTokenizer`'s
    ``kept`` list for a model that only ever reads such captions."""
    kept = {tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id}
    for caption in captions:
        kept.update(tokenizer.encode(caption))
    return sorted(int(i) for i in kept)


class SubsetTokenizer:
    """A tokenizer restricted to part of another's vocabulary: prompts -> ``int32 [B, max_length]`` ids in
    ``[0, len(kept)]``.

    Base id ``kept[j]`` becomes ``j``; every other base id becomes ``unk_token_id = len(kept)`` (with a warning
    naming the unknown tokens). A model whose text table covers only the words of its training captions (a
    compact text embedding: a few dozen rows instead of CLIP's 49,408) reads prompts through this.
    ``kept`` must hold the base's BOS, EOS and pad ids.
    """

    def __init__(self, base: CLIPTokenizer, kept: Sequence[int]):
        kept_ids = np.asarray(kept, dtype=np.int64)
        if kept_ids.ndim != 1 or kept_ids.size == 0:
            raise ValueError("kept must be a non-empty list of token ids.")
        if np.any(np.diff(kept_ids) <= 0) or kept_ids[0] < 0 or kept_ids[-1] >= base.vocab_size:
            raise ValueError(f"kept must be strictly increasing ids in [0, {base.vocab_size}) of the base tokenizer; "
                             f"got {kept_ids[:8].tolist()}{'...' if kept_ids.size > 8 else ''}.")
        missing = [name for name, i in (("BOS", base.bos_token_id), ("EOS", base.eos_token_id),
                                        ("pad", base.pad_token_id)) if i not in set(kept_ids.tolist())]
        if missing:
            raise ValueError(f"kept lacks the base tokenizer's {' and '.join(missing)} id(s); build it with "
                             "vocabulary_from_captions.")
        self.base, self.kept = base, kept_ids
        self.unk_token_id = int(kept_ids.size)
        self.lookup = np.full(base.vocab_size, self.unk_token_id, np.int32)
        self.lookup[kept_ids] = np.arange(kept_ids.size, dtype=np.int32)
        self.max_length = base.max_length
        self.bos_token_id, self.eos_token_id, self.pad_token_id = (
            int(self.lookup[i]) for i in (base.bos_token_id, base.eos_token_id, base.pad_token_id))

    @property
    def vocab_size(self) -> int:
        """Number of ids the tokenizer can return: the kept ones and the unknown id."""
        return self.unk_token_id + 1

    def __call__(self, prompts: str | Sequence[str]) -> np.ndarray:
        """Tokenises as the base tokenizer does, then maps to subset ids: ``int32 [B, max_length]``."""
        base_ids = self.base(prompts)
        ids = self.lookup[base_ids]
        unknown = sorted(set(base_ids[ids == self.unk_token_id].tolist()))
        if unknown:
            words = self.base.backend.convert_ids_to_tokens(unknown[:10])
            warnings.warn(f"{len(unknown)} token(s) of the prompt(s) are outside this model's vocabulary and read "
                          f"as unknown: {', '.join(map(repr, words))}{' ...' if len(unknown) > 10 else ''}.",
                          UserWarning, stacklevel=2)
        return ids

    def __repr__(self) -> str:
        return f"SubsetTokenizer(vocab_size={self.vocab_size}, max_length={self.max_length}, base={self.base!r})"
