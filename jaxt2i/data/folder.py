"""Local image-caption folders.

Two layouts are read:

* ``metadata.jsonl`` (the Hugging Face "imagefolder" layout): one JSON object per line with
  ``file_name`` (relative to the folder) and ``text`` -- a string or a list of strings
  (``caption``/``captions`` are accepted as well).
* a captions CSV in Flickr30k's layout, several rows per image:
  - ``results.csv`` style: header ``image_name| comment_number| comment``, ``|``-separated;
  - the newer ``captions.txt``/``captions.csv`` style: header ``image,caption``, comma-separated,
    captions quoted when they contain commas.

An image with several captions yields all of them; the data pipeline draws one each time the
image is used. Images are opened lazily; an image that cannot be read raises
``UnreadableExample`` (the pipeline skips it, warns and counts it).
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import warnings
from pathlib import Path

from PIL import Image

from jaxt2i.data.example import Example, UnreadableExample

CAPTION_FILES = ("metadata.jsonl", "results.csv", "captions.csv", "captions.txt")
_TEXT_KEYS = ("text", "caption", "captions")


def read_metadata_jsonl(path: str | os.PathLike) -> list[tuple[str, tuple[str, ...]]]:
    """``metadata.jsonl`` -> ``[(file_name, captions), ...]`` in file order (repeated names are merged)."""
    merged: dict[str, list[str]] = {}
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({e.msg}); each line must be one JSON object") from e
            if "file_name" not in row:
                raise ValueError(f"{path}:{lineno}: missing 'file_name' (keys present: {sorted(row)})")
            key = next((k for k in _TEXT_KEYS if k in row), None)
            if key is None:
                raise ValueError(f"{path}:{lineno}: no caption; expected one of {_TEXT_KEYS} (keys present: {sorted(row)})")
            texts = row[key] if isinstance(row[key], list) else [row[key]]
            merged.setdefault(str(row["file_name"]), []).extend(str(t).strip() for t in texts)
    return [(name, tuple(texts)) for name, texts in merged.items()]


def _pipe_rows(text: str, path) -> list[tuple[str, str]]:
    """Rows of a ``image_name| comment_number| comment`` file -> ``[(image, caption)]``."""
    rows = []
    for lineno, line in enumerate(text.splitlines()[1:], 2):
        if not line.strip():
            continue
        parts = [p.strip() for p in line.split("|", 2)]
        if len(parts) == 3:
            name, caption = parts[0], parts[2]
        elif len(parts) == 2 and re.match(r"^\d+\s+\S", parts[1]):
            # the real results.csv has a row whose second separator is missing: "x.jpg| 4 A dog ..."
            name, caption = parts[0], parts[1].split(None, 1)[1]
        else:
            warnings.warn(f"{path}:{lineno}: cannot split into image|number|caption; row skipped")
            continue
        if caption:
            rows.append((name, caption))
    return rows


def _comma_rows(text: str, path) -> list[tuple[str, str]]:
    """Rows of an ``image,caption`` csv -> ``[(image, caption)]``."""
    reader = csv.reader(io.StringIO(text))
    header = [h.strip().lower() for h in next(reader)]
    try:
        i_img = next(i for i, h in enumerate(header) if h in ("image", "image_name", "file_name", "filename"))
        i_cap = next(i for i, h in enumerate(header) if h in ("caption", "comment", "text"))
    except StopIteration:
        raise ValueError(
            f"{path}: header {header} names no image and caption columns; expected e.g. 'image,caption'"
        ) from None
    rows = []
    for lineno, row in enumerate(reader, 2):
        if not row:
            continue
        if len(row) <= max(i_img, i_cap):
            warnings.warn(f"{path}:{lineno}: expected {len(header)} columns, got {len(row)}; row skipped")
            continue
        if row[i_cap].strip():
            rows.append((row[i_img].strip(), row[i_cap].strip()))
    return rows


def read_captions_csv(path: str | os.PathLike) -> list[tuple[str, tuple[str, ...]]]:
    """A Flickr30k-layout captions file -> ``[(image_name, captions), ...]`` in first-appearance order.

    The separator is taken from the header: ``|`` (``results.csv``) or ``,`` (``image,caption``).
    """
    text = Path(path).read_text(encoding="utf-8")
    header = text.splitlines()[0] if text else ""
    rows = _pipe_rows(text, path) if "|" in header else _comma_rows(text, path)
    merged: dict[str, list[str]] = {}
    for name, caption in rows:
        merged.setdefault(name, []).append(caption)
    return [(name, tuple(caps)) for name, caps in merged.items()]


def find_captions_file(root: str | os.PathLike) -> Path:
    """The captions file of ``root``: the first of ``CAPTION_FILES`` present."""
    for name in CAPTION_FILES:
        if (Path(root) / name).is_file():
            return Path(root) / name
    raise FileNotFoundError(
        f"no captions file in {root}: expected one of {CAPTION_FILES}, or set data.captions_file to its path"
    )


def read_captions(path: str | os.PathLike) -> list[tuple[str, tuple[str, ...]]]:
    """``metadata.jsonl`` or a captions CSV, chosen by the file name's extension."""
    return read_metadata_jsonl(path) if str(path).endswith(".jsonl") else read_captions_csv(path)


def _default_images_dir(captions_file: Path) -> Path:
    """Where image files live: next to the captions file, or in Kaggle's Flickr30k nested folder."""
    root = captions_file.parent
    for nested in ("flickr30k_images/flickr30k_images", "flickr30k_images", "images", "Images"):
        if (root / nested).is_dir():
            return root / nested
    return root


class ImageCaptionFolder:
    """A folder of images with captions: ``len(folder)`` examples, ``folder.example(i)`` loads one.

    Args:
      root: the folder.
      captions_file: path of the captions file (default: the first of ``CAPTION_FILES`` in ``root``).
      images_dir: where the image files are (default: ``root``, or Flickr30k's nested
        ``flickr30k_images/`` folder when present; ``metadata.jsonl`` names are relative to ``root``).
    """

    def __init__(self, root: str | os.PathLike, captions_file: str | None = None, images_dir: str | None = None):
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"image folder {self.root} does not exist")
        cap_path = Path(captions_file) if captions_file else find_captions_file(self.root)
        if not cap_path.is_absolute() and not cap_path.exists():
            cap_path = self.root / cap_path
        self.captions_file = cap_path
        self.entries = read_captions(cap_path)
        if not self.entries:
            raise ValueError(f"{cap_path} lists no captioned images")
        if images_dir:
            self.images_dir = Path(images_dir) if Path(images_dir).is_absolute() else self.root / images_dir
        elif cap_path.name == "metadata.jsonl":
            self.images_dir = cap_path.parent
        else:
            self.images_dir = _default_images_dir(cap_path)

    @classmethod
    def from_config(cls, cfg) -> "ImageCaptionFolder":
        """From a ``DataConfig``: ``path``, ``captions_file``, ``images_dir``."""
        if not cfg.path:
            raise ValueError("data.source='folder' needs data.path (the image folder)")
        return cls(cfg.path, captions_file=cfg.captions_file, images_dir=cfg.images_dir)

    def __len__(self) -> int:
        return len(self.entries)

    def example(self, index: int) -> Example:
        """Example ``index``: the decoded RGB image and all its captions; ``UnreadableExample`` if it cannot be read."""
        name, captions = self.entries[index]
        path = self.images_dir / name
        try:
            with Image.open(path) as im:
                im.load()
                image = im.convert("RGB")
        except (OSError, ValueError, Image.DecompressionBombError, SyntaxError) as e:
            raise UnreadableExample(f"{path}: {type(e).__name__}: {e}") from e
        return Example(image=image, captions=captions, index=index)
