"""jaxt2i.diffusion."""
