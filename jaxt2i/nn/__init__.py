"""jaxt2i.nn."""
