"""Data sources by name: a config's ``data.source`` -> a source object, resolved when the config asks for it.

A source has ``len(source)`` and ``source.example(index) -> Example`` (``jaxt2i.data.example``) and is built by
``from_config(data_config)``. It may also put fields of its own in every batch (``batch_fields``, see
``jaxt2i.data.pipeline``), e.g. per-token labels its captions carry.

``SOURCES`` maps a name to ``"package.module:Class"``; the module is imported only when a config names it, so
``jaxt2i.data`` depends on no source it does not read (the shapes world lives in ``jaxt2i.shapes``). A config may
also give such a dotted path itself (``data.source: mypackage.data:MySource``), as a plugin.
"""

from __future__ import annotations

import importlib
from typing import Any

from jaxt2i.data.cache import CachedSource

SOURCES: dict[str, str] = {
    "shapes": "jaxt2i.shapes.data:ShapesSource",
    "folder": "jaxt2i.data.folder:ImageCaptionFolder",
    "tfds": "jaxt2i.data.tfds:TFDSSource",
}


def load_object(path: str, setting: str, known=()) -> Any:
    """The object a ``"package.module:Attribute"`` path names (a registry entry or a plugin given in a config);
    errors name ``setting`` (e.g. ``"data.source='x'"``) and the ``known`` registry names."""
    module_name, sep, attribute = path.partition(":")
    if not sep or not module_name or not attribute:
        raise ValueError(f"{setting}: use one of {sorted(known)} or a 'package.module:Class' path.")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(f"{setting}: cannot import {module_name} ({e}).") from e
    try:
        return getattr(module, attribute)
    except AttributeError:
        raise ValueError(f"{setting}: {module_name} has no {attribute!r}.") from None


def resolve(name: str) -> Any:
    """The source class ``name`` stands for: a key of ``SOURCES`` or a ``"package.module:Class"`` path."""
    return load_object(SOURCES.get(name, name), f"data.source={name!r}", SOURCES)


def make_source(cfg) -> Any:
    """The source a ``DataConfig`` (``jaxt2i.train.config``) describes; the latent cache when ``use_cache``."""
    if cfg.cache_dir and cfg.use_cache:
        return CachedSource(cfg.cache_dir)
    return resolve(cfg.source).from_config(cfg)
