"""jaxt2i.eval."""
