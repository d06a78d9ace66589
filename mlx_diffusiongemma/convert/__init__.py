"""`mlx_diffusiongemma.convert`: turn a DiffusionGemma checkpoint into a text-only MLX folder."""

from ..errors import ConversionOptionError
from .convert import convert

__all__ = ["convert", "ConversionOptionError"]
