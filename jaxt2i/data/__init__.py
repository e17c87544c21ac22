"""jaxt2i.data."""
