"""Component kinds: what a run trains, chosen by the config's ``kind``.

A kind is one module with one :class:`jaxt2i.train.kinds.base.Kind` subclass: its ``model`` and ``loss`` config
sections, its components and their init, its loss, its batches and its export; ``jaxt2i.train.loop`` does the rest
(mesh, step forms, checkpoints, resume, metrics, samples) for every kind. A new kind is a new module named here
(or, from outside the package, a ``kind: package.module:Class`` path in the config).
"""

from __future__ import annotations

from jaxt2i.data.sources import load_object

KINDS: dict[str, str] = {
    "unet": "jaxt2i.train.kinds.unet:UNetKind",
    "vae": "jaxt2i.train.kinds.vae:VAEKind",
    "clip": "jaxt2i.train.kinds.clip:CLIPKind",
    "dit": "jaxt2i.train.kinds.dit:DiTKind",
    "dit_class": "jaxt2i.train.kinds.dit_class:ClassDiTKind",
    "dvae": "jaxt2i.train.kinds.dvae:DVAEKind",
    "dalle": "jaxt2i.train.kinds.dalle:DalleKind",
}


def kind_class(name: str) -> type:
    """The ``Kind`` subclass ``name`` stands for: a key of ``KINDS`` or a ``"package.module:Class"`` path."""
    return load_object(KINDS.get(name, name), f"kind={name!r}", KINDS)
