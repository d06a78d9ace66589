"""Run Google's DiffusionGemma block-diffusion language model with MLX."""

import sys
import types

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


class _Package(types.ModuleType):
    """The package module. Loading a submodule makes the import system set it as a package attribute of the
    same name, which for `generate` (module and function) would replace the public function with the module;
    a public name keeps its public object instead (the module stays in `sys.modules` for `from .generate`)."""

    def __setattr__(self, name: str, value) -> None:
        if name in _LAZY and isinstance(value, types.ModuleType) and value.__name__ == f"{__name__}.{name}":
            value = getattr(value, name)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
