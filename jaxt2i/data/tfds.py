"""TensorFlow Datasets by name, as a random-access source (optional: ``pip install 'jaxt2i[data]'``).

Reads through ``tfds.data_source``, which gives random access -- needed for our deterministic,
host-sharded order. That requires the dataset to be prepared in the ArrayRecord format
(``tfds build NAME --file_format=array_record``, or ``download_and_prepare`` with
``file_format="array_record"``).

Captions: ``caption_key`` names the feature, with ``/`` for nested features (``captions/text`` for
``coco_captions``). A string or a list of strings is used as is; an integer class label becomes its
class name (``"a photo of a {name}"``), so image classification sets work as tiny benchmarks.
"""

from __future__ import annotations

import numpy as np

from jaxt2i.data.example import Example, UnreadableExample

_AUTO_CAPTION_KEYS = ("caption", "captions/text", "captions", "text", "label")


def _label_caption(name: str) -> str:
    return f"a photo of a {name}"


def import_tfds():
    """``tensorflow_datasets``, or an ImportError telling the user how to install it."""
    try:
        import tensorflow_datasets as tfds
    except ImportError as e:
        raise ImportError(
            "data.source='tfds' needs tensorflow-datasets, which is an optional extra: "
            "pip install 'jaxt2i[data]' (or pip install tensorflow-datasets tensorflow-cpu)."
        ) from e
    return tfds


def _lookup(example, key: str):
    value = example
    for part in key.split("/"):
        if not isinstance(value, dict) or part not in value:
            raise KeyError(key)
        value = value[part]
    return value


def _has_key(features, key: str) -> bool:
    node = features
    for part in key.split("/"):
        try:
            node = node[part]
        except (KeyError, TypeError, IndexError):
            return False
    return True


def _as_text(value) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if isinstance(value, np.ndarray) and value.dtype.kind in "SO" and value.ndim == 0:
        return _as_text(value.item())
    return str(value)


class TFDSSource:
    """A TFDS split: ``len(src)`` examples, ``src.example(i)`` -> image + captions.

    Args:
      name: dataset name (``"coco_captions"``, ``"mnist"``, ...), optionally with a version.
      split: split or slice (``"train"``, ``"train[:90%]"``).
      data_dir: where prepared datasets live (default: TFDS's).
      image_key: the image feature.
      caption_key: the caption feature (``/`` for nested); default: the first of
        ``caption``, ``captions/text``, ``captions``, ``text``, ``label`` present.
    """

    def __init__(
        self,
        name: str,
        split: str = "train",
        data_dir: str | None = None,
        image_key: str = "image",
        caption_key: str | None = None,
    ):
        tfds = import_tfds()
        self.name, self.split = name, split
        builder = tfds.builder(name, data_dir=data_dir)
        self.features = builder.info.features
        try:
            self.source = tfds.data_source(name, split=split, data_dir=data_dir)
        except Exception as e:  # noqa: BLE001 -- tfds raises several types; all mean the same to the user
            raise RuntimeError(
                f"cannot open TFDS dataset {name!r} split {split!r} for random access ({type(e).__name__}: {e}). "
                f"Prepare it as ArrayRecord: `tfds build {name} --file_format=array_record`"
                + (f" --data_dir={data_dir}" if data_dir else "")
            ) from e
        if not _has_key(self.features, image_key):
            raise KeyError(f"TFDS dataset {name!r} has no feature {image_key!r}; features: {list(self.features.keys())}")
        self.image_key = image_key
        if caption_key is None:
            caption_key = next((k for k in _AUTO_CAPTION_KEYS if _has_key(self.features, k)), None)
            if caption_key is None:
                raise KeyError(
                    f"TFDS dataset {name!r} has none of the caption features {_AUTO_CAPTION_KEYS}; "
                    f"set data.caption_key (features: {list(self.features.keys())})"
                )
        elif not _has_key(self.features, caption_key):
            raise KeyError(f"TFDS dataset {name!r} has no feature {caption_key!r}; features: {list(self.features.keys())}")
        self.caption_key = caption_key
        self._label_names = self._class_names(caption_key)

    @classmethod
    def from_config(cls, cfg) -> "TFDSSource":
        """From a ``DataConfig``: ``name``, ``split``, ``path`` (the data_dir), ``image_key``, ``caption_key``."""
        if not cfg.name:
            raise ValueError("data.source='tfds' needs data.name (a TFDS dataset name)")
        return cls(cfg.name, split=cfg.split or "train", data_dir=cfg.path, image_key=cfg.image_key,
                   caption_key=cfg.caption_key)

    def _class_names(self, key: str):
        node = self.features
        for part in key.split("/"):
            node = node[part]
        names = getattr(node, "names", None)
        return list(names) if names else None

    def __len__(self) -> int:
        return len(self.source)

    @property
    def class_captions(self) -> list[str] | None:
        """The caption of each class id when the caption feature is a class label (None otherwise): what a
        class-conditional run maps captions back to ids with."""
        return None if self._label_names is None else [_label_caption(name) for name in self._label_names]

    @property
    def label_names(self) -> list[str] | None:
        """The class names of a class-label caption feature, in id order (None otherwise)."""
        return None if self._label_names is None else list(self._label_names)

    def _captions(self, value) -> tuple[str, ...]:
        if self._label_names is not None and np.ndim(value) == 0 and not isinstance(value, (str, bytes)):
            return (_label_caption(self._label_names[int(value)]),)
        if isinstance(value, (list, tuple)) or (isinstance(value, np.ndarray) and value.ndim == 1):
            return tuple(_as_text(v) for v in value)
        return (_as_text(value),)

    def example(self, index: int) -> Example:
        try:
            record = self.source[int(index)]
            image = np.asarray(_lookup(record, self.image_key))
        except Exception as e:  # noqa: BLE001 -- a record that fails to decode is skipped, not fatal
            raise UnreadableExample(f"{self.name}[{self.split}] example {index}: {type(e).__name__}: {e}") from e
        captions = self._captions(_lookup(record, self.caption_key))
        return Example(image=image, captions=captions, index=int(index))
