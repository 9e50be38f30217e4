"""Pure-PyTorch Stable Diffusion XL: models, weights, samplers, pipeline, LoRA, training.

`import sdxl` stays light (no torch import) so that `sdxl.devices` can claim a GPU before
torch initialises CUDA; the public API is loaded on first use.
"""

__all__ = ["SDXLPipeline", "load_pipeline"]


def __getattr__(name: str):
    if name in __all__:
        from sdxl import pipeline

        return getattr(pipeline, name)
    raise AttributeError(f"module 'sdxl' has no attribute {name!r}")
