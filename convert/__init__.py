"""`mlx_diffusiongemma.convert`: turn a DiffusionGemma checkpoint into a text-only MLX folder."""

from .convert import ConversionOptionError, convert

__all__ = ["convert", "ConversionOptionError"]
