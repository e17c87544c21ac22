"""jaxt2i.models."""
