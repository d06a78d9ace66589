"""DiffusionGemma text model in MLX: one layer stack run as a causal encoder and a bidirectional decoder.

Module names mirror the Hugging Face checkpoint keys, so loading is drop/rename-free except for what
`Model.sanitize` does. The math follows transformers' `DiffusionGemmaForBlockDiffusion` (see
`reference-spec.md`, sections 3, 4 and 8).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import partial
from collections.abc import Callable
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.switch_layers import SwitchLinear, _gather_sort, _scatter_unsort

from .cache import LayerCache, cache_offset
from .config_checks import FULL, SLIDING, check_args, check_rope

SOFTCAP = 30.0  # a class attribute in the reference, so never configurable in practice
_DEFAULT_ROPE = {
    SLIDING: {"rope_type": "default", "rope_theta": 10000.0},
    FULL: {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1000000.0},
}
# Tensors of the multimodal encoder: a text-only runner never loads them.
_VISION_PREFIXES = ("model.encoder.vision_tower.", "model.encoder.embed_vision.")


@dataclass
class ModelArgs:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    num_experts: int
    top_k_experts: int
    moe_intermediate_size: int
    global_head_dim: int = 512
    num_global_key_value_heads: int | None = None
    sliding_window: int = 512
    layer_types: list[str] | None = None
    rope_parameters: dict[str, Any] | None = None
    rms_norm_eps: float = 1e-6
    hidden_activation: str = "gelu_pytorch_tanh"
    use_bidirectional_attention: str | None = None
    max_position_embeddings: int = 131072
    pad_token_id: int = 0
    eos_token_id: int | list[int] = 1
    bos_token_id: int = 2
    canvas_length: int = 256
    encoder_causal: bool = field(default=True, init=False)

    def __post_init__(self):
        if self.num_global_key_value_heads is None:
            self.num_global_key_value_heads = self.num_key_value_heads
        check_args(self)
        if self.use_bidirectional_attention == "all":
            # The reference halves the window in memory for a bidirectional encoder.
            self.encoder_causal = False
            self.sliding_window = self.sliding_window // 2 + 1
        if self.layer_types is None:
            n = self.num_hidden_layers
            self.layer_types = [FULL if (i + 1) % 6 == 0 else SLIDING for i in range(n)]
        self.layer_types = list(self.layer_types)
        self.layer_types[-1] = FULL  # the reference forces the last layer to full attention
        rope = dict(_DEFAULT_ROPE)
        rope.update(self.rope_parameters or {})
        self.rope_parameters = rope
        check_rope(self.rope_parameters)

    @classmethod
    def from_config(cls, config: dict) -> "ModelArgs":
        """From a checkpoint `config.json` (either layout); ValueError/TypeError name the field at fault."""
        if not isinstance(config, dict):
            raise TypeError(f"the top level must be a JSON object (got {type(config).__name__})")
        text = config.get("text_config", config)
        if not isinstance(text, dict):
            raise TypeError(f"text_config must be an object (got {type(text).__name__})")
        text = dict(text)
        per_layer = text.pop("per_layer_config", None)
        if per_layer is not None and not isinstance(per_layer, dict):
            raise TypeError(f"per_layer_config must be an object (got {type(per_layer).__name__})")
        overrides = [v for v in (per_layer or {}).values() if isinstance(v, dict)]
        if overrides:
            if any(o != overrides[0] for o in overrides):
                raise ValueError("per_layer_config entries differ between full-attention layers")
            if "head_dim" in overrides[0]:  # transformers reads per_layer_config, not global_head_dim
                text["global_head_dim"] = overrides[0]["head_dim"]
            text["num_global_key_value_heads"] = overrides[0].get("num_key_value_heads")
        if per_layer is not None or ("global_head_dim" in text and text["global_head_dim"] is None):
            # transformers >= 5.23: full layers without an override keep the sliding geometry.
            for key, base in (("global_head_dim", "head_dim"), ("num_global_key_value_heads", "num_key_value_heads")):
                if text.get(key) is None:
                    text[key] = text.get(base)
        for key in ("pad_token_id", "bos_token_id", "eos_token_id"):
            if key in text and text[key] is None:
                del text[key]  # null: the default
        if "canvas_length" in config:
            text["canvas_length"] = config["canvas_length"]
        known = cls.__dataclass_fields__
        return cls(**{k: v for k, v in text.items() if k in known and known[k].init})

    def geometry(self, layer: int) -> tuple[int, int]:
        """(head_dim, kv_heads) of a layer."""
        if self.layer_types[layer] == FULL:
            return self.global_head_dim, self.num_global_key_value_heads
        return self.head_dim, self.num_key_value_heads

    def kv_bytes(self, positions: int, itemsize: int, spare: int = 0) -> int:
        """Bytes of an encoder cache after `positions` (sliding layers keep `window - 1`), with room for a canvas
        and `spare` more slots per layer: the one estimate `bench` and the batch engine budget with."""
        total = 0
        for i, kind in enumerate(self.layer_types):
            d, heads = self.geometry(i)
            kept = min(positions, self.sliding_window - 1) if kind == SLIDING else positions
            total += 2 * heads * d * (kept + self.canvas_length + spare) * itemsize
        return total


HALF = (mx.bfloat16, mx.float16)


def _wide(x: mx.array) -> mx.array:
    """At least fp32: half precision is widened, wider types kept."""
    return x.astype(mx.float32) if x.dtype in HALF else x


def rms_norm(x: mx.array, weight: mx.array | None, eps: float) -> mx.array:
    # The reference normalises in fp32 (weight too), whatever the model dtype, and rounds back once.
    w = None if weight is None else weight.astype(mx.float32)
    return mx.fast.rms_norm(x.astype(mx.float32), w, eps).astype(x.dtype)


class RMSNorm(nn.Module):
    def __init__(self, dims: int, eps: float):
        super().__init__()
        self.weight = mx.ones((dims,))
        self.eps = eps

    def __call__(self, x: mx.array) -> mx.array:
        return rms_norm(x, self.weight, self.eps)


def gelu(x: mx.array) -> mx.array:
    # Computed in fp32 and rounded once, as torch does for half-precision inputs.
    return nn.gelu_approx(_wide(x)).astype(x.dtype)


def inv_frequencies(args: ModelArgs, layer_type: str) -> mx.array:
    """Per-layer-type RoPE inverse frequencies (`proportional` keeps the full head dim as denominator)."""
    params = args.rope_parameters[layer_type]
    dim = args.global_head_dim if layer_type == FULL else args.head_dim
    theta = params.get("rope_theta", 10000.0)
    factor = params.get("partial_rotary_factor", 1.0)
    j = mx.arange(0, dim // 2, dtype=mx.float32)
    if params.get("rope_type", "default") == "proportional":
        rotated = int(factor * dim // 2)
        inv = (1.0 / params.get("factor", 1.0)) / theta ** (2 * j / dim)
        return mx.where(j < rotated, inv, 0.0)
    rot_dim = int(dim * factor)
    inv = 1.0 / theta ** (2 * j / rot_dim)
    return mx.where(j < rot_dim // 2, inv, 0.0)


def rope(periods: mx.array, offset: int | mx.array) -> Callable[[mx.array], mx.array]:
    """RoPE over `[B, heads, L, head_dim]` from position `offset` (one, or one per row `[B]`), rotating pair
    (j, j + d/2) by position / `periods[j]`: `mx.fast.rope`, fused on Metal. Its `freqs` are periods; a
    pair that does not rotate has an infinite one."""
    return partial(mx.fast.rope, dims=2 * periods.shape[0], traditional=False, base=None, scale=1.0,
                   offset=offset, freqs=periods)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, layer: int):
        super().__init__()
        self.head_dim, self.n_kv = args.geometry(layer)
        self.n_heads = args.num_attention_heads
        h, d = args.hidden_size, self.head_dim
        self.q_proj = nn.Linear(h, self.n_heads * d, bias=False)
        self.k_proj = nn.Linear(h, self.n_kv * d, bias=False)
        if args.layer_types[layer] == SLIDING:
            self.v_proj = nn.Linear(h, self.n_kv * d, bias=False)  # full layers reuse K as V
        self.o_proj = nn.Linear(self.n_heads * d, h, bias=False)
        self.q_norm = RMSNorm(d, args.rms_norm_eps)
        self.k_norm = RMSNorm(d, args.rms_norm_eps)
        self.eps = args.rms_norm_eps

    def kv(self, x: mx.array, rope) -> tuple[mx.array, mx.array]:
        """This layer's K (normed, roped) and V (value-normed) for `x`, as `[B, kv_heads, L, head_dim]`."""
        B, L, _ = x.shape
        raw_k = self.k_proj(x).reshape(B, L, self.n_kv, -1)
        raw_v = self.v_proj(x).reshape(B, L, self.n_kv, -1) if "v_proj" in self else raw_k
        k = rope(self.k_norm(raw_k).transpose(0, 2, 1, 3))
        v = rms_norm(raw_v, None, self.eps)
        return k, v.transpose(0, 2, 1, 3)

    def __call__(self, x, rope, kv_context, mask=None):
        B, L, _ = x.shape
        q = rope(self.q_norm(self.q_proj(x).reshape(B, L, self.n_heads, -1)).transpose(0, 2, 1, 3))
        keys, values = kv_context(*self.kv(x, rope))
        out = mx.fast.scaled_dot_product_attention(q, keys, values, scale=1.0, mask=mask)
        return self.o_proj(out.transpose(0, 2, 1, 3).reshape(B, L, -1))


class MLP(nn.Module):
    def __init__(self, dims: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(dims, hidden, bias=False)
        self.up_proj = nn.Linear(dims, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dims, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        return self.down_proj(gelu(self.gate_proj(x)) * self.up_proj(x))


class Router(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.proj = nn.Linear(args.hidden_size, args.num_experts, bias=False)
        self.scale = mx.ones((args.hidden_size,))
        self.per_expert_scale = mx.ones((args.num_experts,))
        self.k = args.top_k_experts
        self.eps = args.rms_norm_eps
        self.root = args.hidden_size**-0.5

    def __call__(self, r: mx.array) -> tuple[mx.array, mx.array]:
        z = rms_norm(r, None, self.eps) * self.scale * self.root
        probs = mx.softmax(self.proj(z).astype(mx.float32), axis=-1)
        # The expert choice carries no gradient (a gather is not differentiable in its indices); training
        # still reaches the router through the routing weights.
        idx = mx.stop_gradient(mx.argpartition(-probs, kth=self.k - 1, axis=-1)[..., : self.k])
        w = mx.take_along_axis(probs, idx, axis=-1)
        w = w / w.sum(axis=-1, keepdims=True)
        return idx, w * self.per_expert_scale[idx]  # fp32 weights, as in the reference


class Experts(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        h, m, e = args.hidden_size, args.moe_intermediate_size, args.num_experts
        self.gate_up_proj = SwitchLinear(h, 2 * m, e, bias=False)  # gate rows, then up rows
        self.down_proj = SwitchLinear(m, h, e, bias=False)

    def __call__(self, x: mx.array, idx: mx.array, weights: mx.array) -> mx.array:
        N, k = idx.shape
        sort = idx.size >= 64  # grouping rows by expert pays off once there are many of them
        # Expand before gathering: gather_mm is ~4x slower on CPU when its input is a strided view.
        x = mx.expand_dims(x, (-2, -3))
        # Sorted: mlx-lm's SwitchGLU helpers, [N*k, 1, H] rows grouped by expert and put back in order.
        xs, ids, back = _gather_sort(x, idx) if sort else (x, idx, None)
        gate, up = mx.split(self.gate_up_proj(xs, ids, sorted_indices=sort), 2, axis=-1)
        y = self.down_proj(gelu(gate) * up, ids, sorted_indices=sort)
        y = _scatter_unsort(y, back, idx.shape) if sort else y
        y = _wide(y.reshape(N, k, -1))
        return (y * weights[..., None]).sum(axis=1)  # fp32 accumulation over the top-k experts


class DecoderLayer(nn.Module):
    def __init__(self, args: ModelArgs, layer: int):
        super().__init__()
        h, eps = args.hidden_size, args.rms_norm_eps
        self.self_attn = Attention(args, layer)
        self.mlp = MLP(h, args.intermediate_size)
        self.router = Router(args)
        self.experts = Experts(args)
        for name in (
            "input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
            "post_feedforward_layernorm", "post_feedforward_layernorm_1",
            "pre_feedforward_layernorm_2", "post_feedforward_layernorm_2",
        ):
            setattr(self, name, RMSNorm(h, eps))
        self.layer_scalar = mx.ones((1,))

    def __call__(self, x, rope, kv_context, mask, scalar):
        x = x + self.post_attention_layernorm(
            self.self_attn(self.input_layernorm(x), rope, kv_context, mask)
        )
        dense = self.post_feedforward_layernorm_1(self.mlp(self.pre_feedforward_layernorm(x)))
        flat = x.reshape(-1, x.shape[-1])
        idx, w = self.router(flat)
        moe = self.experts(self.pre_feedforward_layernorm_2(flat), idx, w)
        moe = self.post_feedforward_layernorm_2(moe.astype(x.dtype).reshape(x.shape))
        x = x + self.post_feedforward_layernorm(dense + moe)
        return x * scalar  # the scalar scales the whole residual stream


class SelfConditioning(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.pre_norm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.gate_proj = nn.Linear(args.hidden_size, args.intermediate_size, bias=False)
        self.up_proj = nn.Linear(args.hidden_size, args.intermediate_size, bias=False)
        self.down_proj = nn.Linear(args.intermediate_size, args.hidden_size, bias=False)

    def __call__(self, soft: mx.array) -> mx.array:
        n = self.pre_norm(soft)
        return self.down_proj(gelu(self.gate_proj(n)) * self.up_proj(n))


class TextDecoder(nn.Module):
    """`model.decoder`: owns every shared weight (embedding = LM head, layers, final norm)."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = [DecoderLayer(args, i) for i in range(args.num_hidden_layers)]
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.self_conditioning = SelfConditioning(args)


class _ScalarOnly(nn.Module):
    def __init__(self):
        super().__init__()
        self.layer_scalar = mx.ones((1,))


class _EncoderText(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.layers = [_ScalarOnly() for _ in range(args.num_hidden_layers)]


class _Encoder(nn.Module):
    """`model.encoder`: its text weights are the decoder's; only the per-layer scalars are its own."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.language_model = _EncoderText(args)


class _Stacks(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.decoder = TextDecoder(args)
        self.encoder = _Encoder(args)


@partial(mx.compile, shapeless=True)
def softcap(logits: mx.array) -> mx.array:
    """The final logit softcap, in fp32: `30 * tanh(logits / 30)` as one fused pass over the vocabulary."""
    return SOFTCAP * mx.tanh(logits / SOFTCAP)


class Model(nn.Module):
    """`DiffusionGemmaForBlockDiffusion`, text only. The model computes logits; it never samples."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.model = _Stacks(args)
        self._periods = {t: 1.0 / inv_frequencies(args, t) for t in (SLIDING, FULL)}
        # The checkpoint's generation_config.json (the loader fills it): EOS and pad ids, drafter defaults.
        self.generation_config: dict[str, Any] = {}

    @property
    def dtype(self):
        """The activation dtype (that of the norm weights, also for quantized checkpoints)."""
        return self.model.decoder.norm.weight.dtype

    @property
    def layers(self) -> list[DecoderLayer]:
        return self.model.decoder.layers

    def make_cache(self) -> list[LayerCache]:
        """A fresh encoder KV cache, one entry per layer."""
        w = self.args.sliding_window
        return [LayerCache(w if t == SLIDING else None) for t in self.args.layer_types]

    def _embed(self, ids: mx.array) -> mx.array:
        e = self.model.decoder.embed_tokens(ids)
        # The reference casts sqrt(H) to the weight dtype first (53.0, not 53.07, in bf16).
        return e * mx.array(math.sqrt(self.args.hidden_size), dtype=e.dtype)

    def _ropes(self, start: int | mx.array) -> dict[str, Callable[[mx.array], mx.array]]:
        # `start` is one offset, or one per row ([B]) for a batch whose rows have encoded different lengths.
        return {t: rope(p, start) for t, p in self._periods.items()}

    def _encoder_mask(self, c: LayerCache, n: int, layer_type: str) -> mx.array:
        # Positions relative to the first new token: the same for every row of a batch.
        q = mx.arange(n)[:, None]
        k = mx.arange(-c.length, n)[None, :]
        mask = k <= q if self.args.encoder_causal else mx.ones((n, c.length + n), dtype=mx.bool_)
        if layer_type == SLIDING:
            mask = mask & (k > q - self.args.sliding_window)
        padding = c.padding_mask(n)  # [B, 1, 1, length + n] for a batch of rows of different lengths
        return mask if padding is None else mask & padding

    def encode(self, input_ids: mx.array, cache: list[LayerCache], *, logits: str | None = None) -> mx.array | None:
        """Causal encoder over `[B, L]` new tokens: appends their K/V to `cache`, positions continuing. Its only
        product in the reference is the cache; `logits="all"` (`"last"`) also returns the causal LM's fp32
        softcapped next-token logits `[B, L, V]` (`[B, 1, V]`): position i predicts token i + 1."""
        x = self._embed(input_ids)  # the encoder input is not normalised, unlike the decoder's
        n = input_ids.shape[1]
        ropes = self._ropes(cache_offset(cache))
        scalars = self.model.encoder.language_model.layers
        masks: dict[str, mx.array] = {}
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            t = self.args.layer_types[i]
            if i == last and logits is None:  # nothing reads the output, only the K/V: skip the rest
                cache[i].append(*layer.self_attn.kv(layer.input_layernorm(x), ropes[t]))
                return None
            if t not in masks:
                masks[t] = self._encoder_mask(cache[i], n, t)
            x = layer(x, ropes[t], cache[i].append, masks[t], scalars[i].layer_scalar)
        return softcap(self.lm_head(x[:, -1:] if logits == "last" else x))

    def lm_head(self, x: mx.array) -> mx.array:
        """Final norm and the tied LM head: fp32 logits before the softcap."""
        dec = self.model.decoder
        return dec.embed_tokens.as_linear(dec.norm(x)).astype(mx.float32)

    def soft_embedding(self, probs: mx.array, dtype) -> mx.array:
        """Expected input embedding under `probs` (rounded to the weight dtype first, as the reference does)."""
        probs = probs.astype(dtype)
        emb = self.model.decoder.embed_tokens
        if isinstance(emb, nn.QuantizedEmbedding):
            soft = mx.quantized_matmul(
                probs, emb.weight, emb.scales, emb.get("biases"), transpose=False,
                group_size=emb.group_size, bits=emb.bits, mode=emb.mode,
            )
        else:
            soft = probs @ emb.weight
        return soft * mx.array(math.sqrt(self.args.hidden_size), dtype=dtype)

    def decode(
        self,
        canvas_ids: mx.array,
        cache: list[LayerCache],
        self_conditioning_logits: mx.array | None = None,
        *,
        self_conditioning_probs: mx.array | None = None,
        softcap_kernel: Callable[[mx.array], mx.array] = softcap,
    ) -> mx.array:
        """Bidirectional canvas pass over `[cache ; canvas]` (the cache is read, never advanced); returns `[B, C,
        V]` fp32 softcapped logits. `softcap_kernel` computes `softcap` (the denoising loop passes its
        backend's: `backend.select`).
        `self_conditioning_logits` are the previous step's temperature-scaled logits (None on a canvas's first
        step), or the loop passes their softmax, computed with its statistics, as `self_conditioning_probs`."""
        dec = self.model.decoder
        e = self._embed(canvas_ids)
        if self_conditioning_logits is not None:
            self_conditioning_probs = mx.softmax(self_conditioning_logits.astype(mx.float32), axis=-1)
        if self_conditioning_probs is not None:
            e = e + dec.self_conditioning(self.soft_embedding(self_conditioning_probs, e.dtype))
        # With no self-conditioning the signal is exactly zero, so only the no-scale norm remains.
        x = rms_norm(e, None, self.args.rms_norm_eps)
        ropes = self._ropes(cache_offset(cache))
        # Bidirectional: the only mask is a batch's padding (None for one row or rows of equal lengths).
        masks = {t: c.padding_mask(canvas_ids.shape[1]) for t, c in zip(self.args.layer_types, cache)}
        for i, layer in enumerate(self.layers):
            t = self.args.layer_types[i]
            x = layer(x, ropes[t], cache[i].with_canvas, masks[t], layer.layer_scalar)
        return softcap_kernel(self.lm_head(x))

    @staticmethod
    def sanitize(weights: dict[str, mx.array]) -> dict[str, mx.array]:
        """Map checkpoint tensors onto this module tree: drop vision and tied copies, name expert weights."""
        out = {}
        for key, value in weights.items():
            if key.startswith(_VISION_PREFIXES) or key == "lm_head.weight" or "rotary_emb" in key:
                continue
            if key.startswith("model.encoder.language_model.") and not key.endswith("layer_scalar"):
                continue  # tied to model.decoder.*, present only in un-deduplicated saves
            if key.endswith(("experts.gate_up_proj", "experts.down_proj")):
                key += ".weight"
            out[key] = value
        return out


__all__ = ["ModelArgs", "Model", "LayerCache"]
