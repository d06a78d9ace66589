"""Run Google's DiffusionGemma block-diffusion language model with MLX."""

from ._version import __version__

__all__ = ["__version__", "load", "generate", "stream_generate", "batch_generate", "stream_batch", "BatchGenerator",
           "GenerationResponse", "DiffusionGemmaError"]

# Heavy modules (mlx, mlx-lm, transformers' tokenizers) load on first use so the CLI starts fast.
_LAZY = {
    "load": ".loader",
    "generate": ".generate",
    "stream_generate": ".generate",
    "GenerationResponse": ".generate",
    "batch_generate": ".batch",
    "stream_batch": ".batch",
    "BatchGenerator": ".batch",
    "DiffusionGemmaError": ".errors",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module 'mlx_diffusiongemma' has no attribute {name!r}")
