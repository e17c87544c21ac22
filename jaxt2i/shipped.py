"""The models that ship inside the package, by name: ``load_pipeline("dit-shapes")``, ``--model dit-shapes``."""

from __future__ import annotations

import os

ASSETS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets")

# name -> model folder inside the package; "shapes" is the default model (jaxt2i generate without --model).
SHIPPED_MODELS: dict[str, str] = {
    "shapes": os.path.join(ASSETS, "shapes_model"),
    "dit-shapes": os.path.join(ASSETS, "dit_shapes_model"),
}
DEFAULT_MODEL = "shapes"


def model_path(name_or_path: str | os.PathLike) -> str:
    """A shipped model's folder for its name; anything else (a path) unchanged. A file or folder of the same name
    in the working directory wins over the shipped model."""
    text = os.fspath(name_or_path)
    if text in SHIPPED_MODELS and not os.path.exists(text):
        return SHIPPED_MODELS[text]
    return text
