"""CogVideoX text-to-video inference in plain torch."""

import logging

# torchao 0.18 (optional: --quantize int8), imported by transformers whenever it is installed, logs a warning for
# each CUDA-only extension a CPU build of torch cannot load, and makes torch 2.13's pytree warn that two of its
# enums need no registration: noise on every run, none of it ours to act on.
logging.getLogger("torchao").setLevel(logging.ERROR)
logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)

__version__ = "0.1.0"
__all__ = ["CogVideoXPipeline", "GenerationCancelled", "GenerationResult", "__version__"]


def __getattr__(name: str):
    # Lazy, so `import cogvideox.config` (or the app's first paint) does not pay for torch + transformers.
    if name in __all__:
        from . import pipeline

        return getattr(pipeline, name)
    raise AttributeError(f"module 'cogvideox' has no attribute {name!r}")
