"""The Stable Diffusion x2 latent upscaler, a drop-in for diffusers' pipeline on its own model code."""

__version__ = "0.1.0"

__all__ = ["StableDiffusionLatentUpscalePipeline", "StableDiffusionPipelineOutput", "__version__"]


def __getattr__(name):
    # keep `import latent_upscaler` light: torch and transformers load on first use
    if name in ("StableDiffusionLatentUpscalePipeline", "StableDiffusionPipelineOutput"):
        from . import pipeline

        return getattr(pipeline, name)
    raise AttributeError(f"module 'latent_upscaler' has no attribute {name!r}")
