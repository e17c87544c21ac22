"""Metrics for any text-to-image model: Frechet distance from streaming feature statistics (``frechet``), CLIP score
and CLIP encoders (``clip_metrics``), best-of-N reranking by CLIP score (``rerank``); spreading an evaluation over
devices and processes and merging its statistics (``distribute``); ``.npz`` files written and read a batch at a time
(``npz_stream``). The shapes-world benchmark is ``jaxt2i.shapes``."""
