"""jaxt2i.train."""
