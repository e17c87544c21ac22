"""The shapes world: the synthetic benchmark every model family is trained and scored on.

``world`` (scenes, renders, captions, held-out split), ``detector`` (objects found in an image, shapes decided by
geometry), ``adherence`` (did an image show what its prompt asked for?), ``report`` (the evaluation of any model with
``text_to_image``), ``cli`` (``jaxt2i eval``), ``distortions`` (renders with known answers that validate the
detector), ``clip_probes`` (what a CLIP knows about the world), ``data`` (the world as a training data source).
"""

import os

SHIPPED_MODEL = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets", "shapes_model")
