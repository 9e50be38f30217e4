"""Pure-PyTorch Stable Diffusion XL."""
