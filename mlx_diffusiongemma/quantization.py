"""The quantization settings we write and accept, declared once: `convert` validates and applies them, `bench`
builds random weights with the same "mixed" recipe, the CLI validates its flags with the same check."""

from __future__ import annotations

from .errors import ConversionOptionError

RECIPES = ("mixed", "uniform")
MODES = ("affine", "mxfp4")
AFFINE_BITS = (4, 6, 8)
AFFINE_GROUPS = (32, 64, 128)
# The "mixed" recipe keeps these modules at 8 bits whatever was asked (what mlx-vlm's converter does).
HIGH_PRECISION = {"group_size": 64, "bits": 8, "mode": "affine"}


def check_quantization(bits: int, group_size: int, mode: str = "affine", recipe: str = "mixed") -> None:
    """Raise `ConversionOptionError` (one line) unless the setting is one we write."""
    if recipe not in RECIPES:
        raise ConversionOptionError(f"unknown quantization recipe {recipe!r}; use mixed or uniform")
    if mode == "mxfp4":
        if bits != 4 or group_size != 32:
            raise ConversionOptionError(
                f"mxfp4 needs 4 bits and group size 32 (got {bits} bits, group size {group_size})"
            )
    elif mode == "affine":
        if bits not in AFFINE_BITS:
            raise ConversionOptionError(f"unsupported bits {bits}; affine quantization takes 4, 6 or 8")
        if group_size not in AFFINE_GROUPS:
            raise ConversionOptionError(f"unsupported group size {group_size}; use 32, 64 or 128")
    else:
        raise ConversionOptionError(f"unknown quantization mode {mode!r}; use affine or mxfp4")


def _high_precision(module: str) -> bool:
    return (
        module.endswith("embed_tokens")
        or ".self_attn." in module
        or ".mlp." in module
        or module.endswith("router.proj")
    )


def recipe_setting(module: str, recipe: str, requested: dict) -> dict:
    """The {group_size, bits, mode} a quantizable module gets under a recipe."""
    if recipe == "mixed" and _high_precision(module):
        return dict(HIGH_PRECISION)
    return dict(requested)
