"""LoRA training on cached latents and text embeddings: loop, optimizer, checkpoints, DDP."""
