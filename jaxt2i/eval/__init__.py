"""Metrics for any text-to-image model: Frechet distance (``frechet``), CLIP score and CLIP encoders
(``clip_metrics``), best-of-N reranking by CLIP score (``rerank``). The shapes-world benchmark is ``jaxt2i.shapes``."""
