"""LoRA adapters for DiffusionGemma, built on mlx-lm's `LoRALinear` and `LoRASwitchLinear`.

Which layers: the attention projections (`q_proj`, `k_proj`, `v_proj` where the layer has one -- full
layers reuse K as V -- and `o_proj`) and the dense MLP (`gate_proj`, `up_proj`, `down_proj`) of every layer;
optionally also the MoE experts (`experts.gate_up_proj`, `experts.down_proj`: one low-rank pair per expert).
The router and the self-conditioning MLP stay as they are. The encoder and the decoder share these weights,
so one adapter changes both passes. The base model is frozen (quantized or not: QLoRA); only `lora_a` /
`lora_b` train.

Files (mlx-lm's names and schema): `adapters.safetensors` holds the trainable tensors under their module
paths, and `adapter_config.json` holds `fine_tune_type` ("lora"), `num_layers` (every layer) and
`lora_parameters` (`rank`, `scale`, `dropout`, `keys`: the targets above). Files written before with `rank`,
`scale`, `dropout` and `modules` at the top level are still read.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten
from mlx_lm.tuner.lora import LoRALinear, LoRASwitchLinear
from mlx_lm.tuner.utils import linear_to_lora_layers

from .errors import CheckpointError

TARGETS = (
    "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
    "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj",
)
EXPERT_TARGETS = ("experts.gate_up_proj", "experts.down_proj")
ADAPTER_FILE = "adapters.safetensors"
CONFIG_FILE = "adapter_config.json"
DEFAULT_RANK = 8
DEFAULT_SCALE = 20.0  # mlx-lm's default LoRA scale


def _targets(model, modules):
    """(parent module, attribute name) of every present target linear."""
    for layer in model.layers:
        for name in modules:
            parent_name, attr = name.split(".")
            parent = getattr(layer, parent_name)
            if attr in parent:
                yield parent, attr


def apply_lora(
    model, rank: int = DEFAULT_RANK, scale: float = DEFAULT_SCALE, dropout: float = 0.0, modules=TARGETS
) -> dict:
    """Freeze `model` and wrap the target linears (`TARGETS`, plus `EXPERT_TARGETS` if listed) in LoRA layers;
    returns the adapter config."""
    if rank < 1:
        raise ValueError(f"LoRA rank must be at least 1 (got {rank})")
    model.freeze()
    # mlx-lm's set-up: each layer's modules at these paths become LoRALinear / LoRASwitchLinear (the experts).
    lora_config = {"rank": rank, "scale": scale, "dropout": dropout, "keys": list(modules)}
    linear_to_lora_layers(model, len(model.layers), lora_config)
    return {"rank": rank, "scale": scale, "dropout": dropout, "modules": list(modules)}


def adapter_weights(model) -> dict[str, mx.array]:
    return dict(tree_flatten(model.trainable_parameters()))


def save_adapters(model, path: str | Path, config: dict, name: str = ADAPTER_FILE) -> Path:
    """Write the adapter tensors (as `name`) and `adapter_config.json` into the folder `path` (created if
    needed). Both go to temporary files (named with our pid) renamed into place, so an interrupted save
    (Ctrl-C, SIGTERM) keeps the last one and leaves nothing else; a killed save's files go at the next save."""
    from .folders import remove_stale_files, replace_files, terminate_as_interrupt, write_error

    path = Path(path)
    with terminate_as_interrupt():
        created = not path.exists()
        path.mkdir(parents=True, exist_ok=True)
        remove_stale_files(path, ".partial-")
        tensors = path / f".{name}.partial-{os.getpid()}.safetensors"  # MLX adds .safetensors if it is missing
        settings = path / f".{CONFIG_FILE}.partial-{os.getpid()}.json"
        try:
            mx.save_safetensors(str(tensors), adapter_weights(model))
            settings.write_text(json.dumps(_file_config(config, len(model.layers)), indent=2) + "\n")
            replace_files({tensors: path / name, settings: path / CONFIG_FILE})
        except BaseException as e:
            tensors.unlink(missing_ok=True)
            settings.unlink(missing_ok=True)
            if created:
                with contextlib.suppress(OSError):
                    path.rmdir()  # only if empty: the folder this failed save made
            if isinstance(e, (OSError, RuntimeError)):  # MLX reports a failed write as a RuntimeError
                raise write_error(path / name, e) from None
            raise
    return path


def _file_config(config: dict, num_layers: int) -> dict:
    """`apply_lora`'s config in mlx-lm's `adapter_config.json` schema."""
    params = {"rank": config["rank"], "scale": config["scale"], "dropout": config.get("dropout", 0.0),
              "keys": list(config.get("modules", TARGETS))}
    return {"fine_tune_type": "lora", "num_layers": num_layers, "lora_parameters": params}


def _flat_config(config, file: Path) -> dict:
    """mlx-lm's schema (or the flat one written before it) as `{rank, scale, dropout, modules, num_layers}`."""
    if not isinstance(config, dict):
        raise CheckpointError(f"{file} must hold a JSON object; re-create the adapters with finetune")
    if "lora_parameters" not in config:
        return config  # the flat layout: rank, scale, dropout, modules
    kind, params = config.get("fine_tune_type", "lora"), config["lora_parameters"]
    if kind != "lora":
        raise CheckpointError(f"{file}: fine_tune_type {kind!r} is not supported (only 'lora')")
    if not isinstance(params, dict):
        raise CheckpointError(f"{file}: 'lora_parameters' must be a JSON object; re-create the adapters")
    flat = {k: params[k] for k in ("rank", "scale", "dropout") if k in params}
    if "keys" in params:
        flat["modules"] = params["keys"]
    return {**flat, "num_layers": config.get("num_layers")}


def _check_adapter_config(config, file: Path) -> dict:
    """The adapter config, if every field `load_adapters` uses is valid; else one line naming the field."""
    config = _flat_config(config, file)
    missing = [key for key in ("rank", "scale") if key not in config]
    if missing:
        raise CheckpointError(f"{file} has no {missing[0]!r}; re-create the adapters with finetune")
    rank, scale, modules = config["rank"], config["scale"], config.get("modules", TARGETS)
    if type(rank) is not int or rank < 1:
        raise CheckpointError(f"{file}: 'rank' must be a whole number >= 1 (got {rank!r}); fix it or re-train")
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise CheckpointError(f"{file}: 'scale' must be a finite number (got {scale!r}); fix it or re-train")
    known = TARGETS + EXPERT_TARGETS
    if not isinstance(modules, (list, tuple)) or not modules:
        raise CheckpointError(f"{file}: 'modules' must be a non-empty list of {', '.join(known)}")
    unknown = [m for m in modules if m not in known]
    if unknown:
        raise CheckpointError(f"{file}: unknown module {unknown[0]!r} in 'modules'; known: {', '.join(known)}")
    return config


def read_adapter_config(path: str | Path) -> dict:
    path = Path(path)
    try:
        config = json.loads((path / CONFIG_FILE).read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot read the adapters in {path} ({e})") from None
    return _check_adapter_config(config, path / CONFIG_FILE)


def load_adapters(model, path: str | Path) -> dict:
    """Wrap `model` as its adapter config says and load the saved adapter tensors (strictly)."""
    path = Path(path)
    config = read_adapter_config(path)
    try:
        weights = mx.load(str(path / ADAPTER_FILE))
    except (OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"cannot read the adapters in {path} ({e})") from None
    if config.get("num_layers") not in (None, -1, len(model.layers)):
        raise CheckpointError(f"adapters in {path} cover {config['num_layers']} layers; this model has "
                              f"{len(model.layers)} and only adapters on every layer are supported")
    apply_lora(model, config["rank"], config["scale"], 0.0, config.get("modules", TARGETS))
    expected = adapter_weights(model)
    if set(weights) != set(expected):
        missing = sorted(set(expected) - set(weights))[:3]
        extra = sorted(set(weights) - set(expected))[:3]
        raise CheckpointError(f"adapters in {path} do not match the model (missing {missing}, unexpected {extra})")
    for key, value in weights.items():
        if value.shape != expected[key].shape:
            raise CheckpointError(f"adapter tensor {key} in {path} has shape {value.shape}, the model needs "
                                  f"{expected[key].shape}; these adapters are for another model")
    model.load_weights(list(weights.items()), strict=False)
    mx.eval(model.parameters())
    return config


def fuse_lora(model, dequantize: bool = False) -> None:
    """Fold every LoRA layer back into a plain linear, in place. A quantized base linear is re-quantized with
    its own bits, group size and mode, unless `dequantize`."""
    for parent, attr in _targets(model, TARGETS + EXPERT_TARGETS):
        if isinstance(parent[attr], (LoRALinear, LoRASwitchLinear)):
            setattr(parent, attr, parent[attr].fuse(dequantize=dequantize))
    mx.eval(model.parameters())
