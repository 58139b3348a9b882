"""CogVideoX text-to-video inference in plain torch."""

__version__ = "0.1.0"
__all__ = ["CogVideoXPipeline", "GenerationCancelled", "GenerationResult", "__version__"]


def __getattr__(name: str):
    # Lazy, so `import cogvideox.config` (or the app's first paint) does not pay for torch + transformers.
    if name in __all__:
        from . import pipeline

        return getattr(pipeline, name)
    raise AttributeError(f"module 'cogvideox' has no attribute {name!r}")
