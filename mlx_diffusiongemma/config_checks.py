"""Checks of a model geometry (`ModelArgs`), run before anything is built: an untrusted config.json must not
crash the loader or make it allocate, so each value is checked and the one at fault named (ValueError).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .model import ModelArgs

SLIDING, FULL = "sliding_attention", "full_attention"  # the layer types (model.py imports them from here)

_MAX_DIM = 2**31 - 1  # MLX array dimensions are int32
_POSITIVE = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "num_experts", "top_k_experts", "moe_intermediate_size", "global_head_dim",
    "num_global_key_value_heads", "sliding_window", "max_position_embeddings", "canvas_length",
)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_args(a: ModelArgs) -> None:
    """Reject a geometry the model cannot be built from, naming the field (before anything is allocated)."""
    for name in _POSITIVE:
        value = getattr(a, name)
        if not _is_int(value) or not 1 <= value <= _MAX_DIM:
            raise ValueError(f"{name} must be an integer from 1 to {_MAX_DIM} (got {value!r})")
    for name in ("pad_token_id", "bos_token_id"):
        value = getattr(a, name)
        if not _is_int(value) or not 0 <= value < a.vocab_size:
            raise ValueError(f"{name} must be a token id below vocab_size {a.vocab_size} (got {value!r})")
    if a.top_k_experts > a.num_experts:
        raise ValueError(f"top_k_experts {a.top_k_experts} exceeds num_experts {a.num_experts}")
    for kv in ("num_key_value_heads", "num_global_key_value_heads"):
        if a.num_attention_heads % getattr(a, kv):
            raise ValueError(f"num_attention_heads {a.num_attention_heads} is not a multiple of {kv} {getattr(a, kv)}")
    for name in ("head_dim", "global_head_dim"):
        if getattr(a, name) % 2:
            raise ValueError(f"{name} must be even for rotary embeddings (got {getattr(a, name)})")
    if a.layer_types is not None:
        if not isinstance(a.layer_types, (list, tuple)) or len(a.layer_types) != a.num_hidden_layers:
            n = len(a.layer_types) if isinstance(a.layer_types, (list, tuple)) else repr(a.layer_types)
            raise ValueError(f"layer_types must list one type per layer: {a.num_hidden_layers} (got {n})")
        bad = next((t for t in a.layer_types if t not in (SLIDING, FULL)), None)
        if bad is not None:
            raise ValueError(f"layer_types holds {bad!r}; each must be {SLIDING!r} or {FULL!r}")
    if isinstance(a.rms_norm_eps, bool) or not isinstance(a.rms_norm_eps, (int, float)) or not a.rms_norm_eps > 0:
        raise ValueError(f"rms_norm_eps must be a positive number (got {a.rms_norm_eps!r})")
    if a.hidden_activation not in ("gelu_pytorch_tanh", "gelu_tanh"):
        raise ValueError(f"unsupported hidden_activation {a.hidden_activation!r}")
    if a.use_bidirectional_attention not in (None, "vision", "all"):
        raise ValueError(f"use_bidirectional_attention must be null, 'vision' or 'all' "
                         f"(got {a.use_bidirectional_attention!r})")
    if a.rope_parameters is not None and not isinstance(a.rope_parameters, dict):
        raise ValueError("rope_parameters must be an object of per-layer-type settings")


def check_rope(rope: dict) -> None:
    for layer_type in (SLIDING, FULL):
        params = rope[layer_type]
        if not isinstance(params, dict):
            raise ValueError(f"rope_parameters.{layer_type} must be an object (got {params!r})")
        if params.get("rope_type", "default") not in ("default", "proportional"):
            raise ValueError(f"rope_parameters.{layer_type}.rope_type {params['rope_type']!r} is not supported "
                             "(default or proportional)")
        for key in ("rope_theta", "partial_rotary_factor", "factor"):
            value = params.get(key, 1.0)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < float("inf"):
                raise ValueError(f"rope_parameters.{layer_type}.{key} must be a positive number (got {value!r})")
