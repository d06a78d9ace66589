"""LoRA adapters for DiffusionGemma, built on mlx-lm's `LoRALinear`.

Which layers: the attention projections (`q_proj`, `k_proj`, `v_proj` where the layer has one -- full
layers reuse K as V -- and `o_proj`) and the dense MLP (`gate_proj`, `up_proj`, `down_proj`) of every layer.
The MoE experts, the router and the self-conditioning MLP stay as they are. The encoder and the decoder share
these weights, so one adapter changes both passes. The base model is frozen; only `lora_a` / `lora_b` train.

Files (mlx-lm's names): `adapters.safetensors` holds the trainable tensors under their module paths, and
`adapter_config.json` holds `rank`, `scale`, `dropout` and `modules` (the targets above).
"""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten
from mlx_lm.tuner.lora import LoRALinear

from .errors import CheckpointError

TARGETS = (
    "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
    "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj",
)
ADAPTER_FILE = "adapters.safetensors"
CONFIG_FILE = "adapter_config.json"
DEFAULT_SCALE = 20.0  # mlx-lm's default LoRA scale


def _targets(model, modules):
    """(parent module, attribute name) of every present target linear."""
    for layer in model.layers:
        for name in modules:
            parent_name, attr = name.split(".")
            parent = getattr(layer, parent_name)
            if attr in parent:
                yield parent, attr


def apply_lora(model, rank: int = 8, scale: float = DEFAULT_SCALE, dropout: float = 0.0, modules=TARGETS) -> dict:
    """Freeze `model` and wrap the target linears in `LoRALinear`; returns the adapter config."""
    if rank < 1:
        raise ValueError(f"LoRA rank must be at least 1 (got {rank})")
    model.freeze()
    for parent, attr in _targets(model, modules):
        setattr(parent, attr, LoRALinear.from_base(parent[attr], r=rank, scale=scale, dropout=dropout))
    return {"rank": rank, "scale": scale, "dropout": dropout, "modules": list(modules)}


def adapter_weights(model) -> dict[str, mx.array]:
    return dict(tree_flatten(model.trainable_parameters()))


def save_adapters(model, path: str | Path, config: dict) -> Path:
    """Write `adapters.safetensors` and `adapter_config.json` into the folder `path` (created if needed)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(str(path / ADAPTER_FILE), adapter_weights(model))
    (path / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    return path


def load_adapters(model, path: str | Path) -> dict:
    """Wrap `model` as its adapter config says and load the saved adapter tensors (strictly)."""
    path = Path(path)
    try:
        config = json.loads((path / CONFIG_FILE).read_text())
        weights = mx.load(str(path / ADAPTER_FILE))
    except (OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"cannot read the adapters in {path} ({e})") from None
    apply_lora(model, config["rank"], config["scale"], 0.0, config.get("modules", TARGETS))
    expected = adapter_weights(model)
    if set(weights) != set(expected):
        missing = sorted(set(expected) - set(weights))[:3]
        extra = sorted(set(weights) - set(expected))[:3]
        raise CheckpointError(f"adapters in {path} do not match the model (missing {missing}, unexpected {extra})")
    model.load_weights(list(weights.items()), strict=False)
    mx.eval(model.parameters())
    return config


def fuse_lora(model) -> None:
    """Fold every `LoRALinear` back into a plain (or quantized) linear, in place."""
    for parent, attr in _targets(model, TARGETS):
        if isinstance(parent[attr], LoRALinear):
            setattr(parent, attr, parent[attr].fuse())
    mx.eval(model.parameters())
