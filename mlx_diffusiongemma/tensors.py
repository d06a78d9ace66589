"""What a checkpoint's safetensors headers hold against what its config.json implies, checked before any model
is built: an untrusted config (a million layers, a huge vocabulary) is refused by comparing shapes, so nothing
beyond what the files hold is ever allocated.
"""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten

from .errors import CheckpointError
from .model import FULL, SLIDING, Model, ModelArgs

FLOAT_CODES = ("F32", "BF16", "F16")  # what an unquantized weight may be stored as
_LAYER = re.compile(r"^model\.(decoder|encoder\.language_model)\.layers\.(\d+)\.(.*)$")


def stored_shapes(headers: dict[Path, dict]) -> tuple[dict[str, tuple[int, ...]], dict[str, Path], dict[str, str]]:
    """(shape, file, dtype code) of every text tensor the headers list, under the model's names
    (`Model.sanitize`)."""
    shapes: dict[str, tuple[int, ...]] = {}
    origin: dict[str, Path] = {}
    dtypes: dict[str, str] = {}
    for file, header in headers.items():
        names = Model.sanitize({k: k for k in header if k != "__metadata__"})
        for key, name in names.items():
            if key in shapes:
                raise CheckpointError(f"tensor {key} appears twice in the checkpoint (in {origin[key]} and {file})")
            shapes[key], origin[key], dtypes[key] = tuple(header[name]["shape"]), file, header[name]["dtype"]
    return shapes, origin, dtypes


def check_layer_count(args: ModelArgs, keys, path: Path) -> None:
    """Refuse a config whose layer count differs from the layers the weights hold (before building any)."""
    found = {int(m.group(2)) for m in map(_LAYER.match, keys) if m}
    held = max(found) + 1 if found else 0
    if held != args.num_hidden_layers:
        raise CheckpointError(
            f"config.json in {path} says num_hidden_layers {args.num_hidden_layers} but the weights hold {held} "
            "layers; the config and weights do not match"
        )


def _prototype_shapes(args: ModelArgs) -> tuple[dict[str, dict[str, tuple]], dict[str, tuple], set[str]]:
    """Shapes of one lazily built layer per layer type (its random weights are never evaluated), of the
    tensors outside the layers, and the names of the modules that quantize."""
    types = [t for t in (SLIDING, FULL) if t in args.layer_types]
    try:
        skeleton = Model(replace(args, num_hidden_layers=len(types), layer_types=types))
    except (OverflowError, ValueError) as e:
        raise CheckpointError(f"config.json implies a tensor too large to build ({e})") from None
    per_type: dict[str, dict[str, tuple]] = {t: {} for t in types}
    rest: dict[str, tuple] = {}
    for key, value in tree_flatten(skeleton.parameters()):
        m = _LAYER.match(key)
        if m:
            per_type[types[int(m.group(2))]][f"{m.group(1)}|{m.group(3)}"] = tuple(value.shape)
        else:
            rest[key] = tuple(value.shape)
    quantizable = {
        _LAYER.sub(lambda m: f"{m.group(1)}|{m.group(3)}", name)
        for name, module in skeleton.named_modules() if hasattr(module, "to_quantized")
    }
    return per_type, rest, quantizable


def quant_setting(qcfg: dict, module: str) -> dict:
    """The {group_size, bits, mode} of a quantized module: its own entry in the quantization config (mlx-vlm
    omits "mode" for affine ones), else the global setting."""
    default = {"group_size": qcfg.get("group_size", 64), "bits": qcfg.get("bits", 4),
               "mode": qcfg.get("mode", "affine")}
    entry = qcfg.get(module)
    if isinstance(entry, dict):
        return {"group_size": entry.get("group_size", 64), "bits": entry.get("bits", default["bits"]),
                "mode": entry.get("mode", "affine")}
    return default


def _quantized(shape: tuple, setting: dict, module: str) -> dict[str, tuple]:
    """Shapes `mx.quantize` gives a weight of `shape` (a lazy one-row call: no work is done)."""
    try:
        q = mx.quantize(mx.zeros((1, shape[-1])), setting["group_size"], setting["bits"], mode=setting["mode"])
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"the quantization of {module} in config.json is unusable ({e})") from None
    names = ("weight", "scales", "biases")
    return {f"{module}.{n}": shape[:-1] + (a.shape[-1],) for n, a in zip(names, q) if a is not None}


def expected_shapes(args: ModelArgs, qcfg: dict | None, stored: dict[str, tuple]) -> dict[str, tuple]:
    """Every tensor shape config.json implies, quantized where the files hold `.scales` for a module."""
    per_type, rest, quantizable = _prototype_shapes(args)
    expected: dict[str, tuple] = {}

    def add(key: str, shape: tuple, generic: str) -> None:
        module = key[: -len(".weight")] if key.endswith(".weight") else None
        if qcfg and module is not None and generic[: -len(".weight")] in quantizable and f"{module}.scales" in stored:
            expected.update(_quantized(shape, quant_setting(qcfg, module), module))
        else:
            expected[key] = shape

    for key, shape in rest.items():
        add(key, shape, key)
    for i, layer_type in enumerate(args.layer_types):
        for generic, shape in per_type[layer_type].items():
            stack, name = generic.split("|")
            add(f"model.{stack}.layers.{i}.{name}", shape, generic)
    return expected


def check_shapes(args: ModelArgs, qcfg: dict | None, headers: dict[Path, dict], path: Path) -> None:
    """Refuse, in one line naming the tensor, weights that do not match what config.json implies."""
    if qcfg is not None and not isinstance(qcfg, dict):
        raise CheckpointError(f"config.json in {path}: quantization must be an object (got {qcfg!r})")
    stored, origin, dtypes = stored_shapes(headers)
    check_layer_count(args, stored, path)
    expected = expected_shapes(args, qcfg, stored)
    for key in stored:
        if key not in expected:
            raise CheckpointError(f"unexpected tensor {key} in {origin[key]}: not a DiffusionGemma text weight")
    for key, shape in expected.items():
        if key not in stored:
            raise CheckpointError(f"tensor {key} is missing from the checkpoint in {path}")
        if stored[key] != shape:
            raise CheckpointError(
                f"tensor {key} in {origin[key]} has shape {stored[key]} but config.json implies {shape}; "
                "the config and weights do not match"
            )
        packed = key.endswith(".weight") and f"{key[: -len('.weight')]}.scales" in expected
        quantized = packed or key.endswith((".scales", ".biases"))
        if not quantized and dtypes[key] not in FLOAT_CODES:
            raise CheckpointError(
                f"tensor {key} in {origin[key]} is {dtypes[key]}, not a float type (F32, BF16 or F16); "
                "re-download or reconvert the checkpoint"
            )
