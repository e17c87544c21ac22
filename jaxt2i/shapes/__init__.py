"""The shapes world: the synthetic benchmark every model family is trained and scored on.

``world`` (scenes, renders, captions, held-out split), ``detector`` (objects found in an image, shapes decided by
geometry), ``adherence`` (did an image show what its prompt asked for?), ``report`` (the evaluation of any model with
``text_to_image``), ``cli`` (``jaxt2i eval``), ``distortions`` (renders with known answers that validate the
detector), ``clip_probes`` (what a CLIP knows about the world), ``data`` (the world as a training data source).
"""

from jaxt2i.shipped import DEFAULT_MODEL, SHIPPED_MODELS

SHIPPED_MODEL = SHIPPED_MODELS[DEFAULT_MODEL]
