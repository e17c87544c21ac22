"""jaxt2i.convert."""
