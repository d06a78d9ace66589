"""DiffusionGemma over an `mx.distributed` group of N processes (several Macs): tensor-, expert- and
vocabulary-parallel, each rank holding about 1/N of the sharded weights.

- Attention: each rank keeps a contiguous block of query heads and the KV heads they read (KV heads that do not
  split, e.g. a single global one, are kept by every rank); `o_proj` sums the ranks' parts (`all_sum`).
- Dense MLPs (the layer's and self-conditioning's): `gate`/`up` split by rows, `down` by columns, then `all_sum`.
- Experts: each rank keeps a contiguous range of experts; the router stays whole, so every rank routes alike,
  computes only the choices routed to its own experts (the others weigh zero), and the ranks' partial
  mixtures (float32) are summed.
- Embedding = LM head: split by vocabulary rows. A lookup is masked to the local rows and summed; the LM head
  returns this rank's slice of the logits, and the sampler's passes over the vocabulary reduce across ranks
  (`vocab_stats`, `argmax`, `categorical`) instead of gathering logits. The causal encoder's logits (read only
  by the speculative commit's verify pass) are gathered.

Quantized modules split at quantization-group boundaries (shards may be uneven); a module that cannot split
(too few heads, groups or experts for N) is kept whole by every rank. `shard` sets the process's active split,
which `backend.select` turns into the distributed `Backend`: the denoising loop itself is unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import mlx.core as mx
import mlx.nn as nn
from mlx.nn.layers.distributed import (
    AllToShardedLinear, QuantizedAllToShardedLinear, QuantizedShardedToAllLinear, ShardedToAllLinear,
)
from mlx.utils import tree_flatten, tree_unflatten

from . import sampler
from .model import MLP, Attention, Experts, Model, SelfConditioning

Group = mx.distributed.Group
Cut = tuple[int, int, int]  # (axis, start, stop) of a stored tensor that this rank keeps


@dataclass(frozen=True)
class VocabSplit:
    """This rank's rows of the vocabulary: `[first, first + count)` of `size`, and every rank's `spans`."""

    group: Group
    first: int
    count: int
    size: int
    spans: tuple[tuple[int, int], ...]


_active: VocabSplit | None = None


def active() -> VocabSplit | None:
    """The vocabulary split of the model this process shards (None: one process, nothing split)."""
    return _active


def spans(total: int, parts: int, unit: int = 1) -> list[tuple[int, int]]:
    """`range(total)` in `parts` contiguous spans as even as whole `unit`s allow (a span may be empty)."""
    units = total // unit
    edges = [unit * (units * i // parts) for i in range(parts)] + [total]
    return list(zip(edges, edges[1:]))


# --- which slice of each tensor a rank keeps ---------------------------------------------------------------


def _quant(module: nn.Module) -> tuple[int, int] | None:
    """(bits, group size) of a quantized module, None for a float one."""
    return (module.bits, module.group_size) if hasattr(module, "scales") else None


def _cuts(prefix: str, module: nn.Module, axis: int, start: int, stop: int) -> dict[str, Cut]:
    """Cuts of a linear (or switch) module's own tensors for logical indices `[start, stop)` along `axis`
    (0: output rows or experts; -1: input columns, which quantization packs and groups)."""
    q = _quant(module)
    out = {}
    for name, value in module.items():
        if not isinstance(value, mx.array):
            continue
        if axis == 0:
            out[f"{prefix}.{name}"] = (0, start, stop)
        elif name != "bias":
            scale = (1, 1) if q is None else ((q[0], 32) if name == "weight" else (1, q[1]))
            out[f"{prefix}.{name}"] = (value.ndim - 1, start * scale[0] // scale[1], stop * scale[0] // scale[1])
    return out


_TO_SHARDED = {nn.Linear: AllToShardedLinear, nn.QuantizedLinear: QuantizedAllToShardedLinear}
_TO_ALL = {nn.Linear: ShardedToAllLinear, nn.QuantizedLinear: QuantizedShardedToAllLinear}


def _swap(module: nn.Module, kinds: dict, group: Group) -> None:
    # MLX's distributed linears (their __call__ reads only the linear's own fields and `group`).
    module.__class__ = kinds[type(module)]
    module.group = group


def _attention(prefix: str, attn: Attention, group: Group) -> dict[str, Cut]:
    n, r = group.size(), group.rank()
    heads, kv, d = attn.n_heads, attn.n_kv, attn.head_dim
    if heads % n:
        return {}
    per, shared = heads // n, heads // kv  # local query heads; query heads per KV head
    q = _quant(attn.o_proj)
    if (per % shared and shared % per) or (q is not None and per * d % q[1]):
        return {}  # the local heads would not group evenly, or o_proj would split inside a quantization group
    q0, q1 = r * per, (r + 1) * per
    k0, k1 = q0 // shared, (q1 - 1) // shared + 1
    cuts = _cuts(f"{prefix}.q_proj", attn.q_proj, 0, q0 * d, q1 * d)
    for name in ("k_proj", "v_proj"):
        if name in attn:
            cuts.update(_cuts(f"{prefix}.{name}", attn[name], 0, k0 * d, k1 * d))
            _swap(attn[name], _TO_SHARDED, group)
    cuts.update(_cuts(f"{prefix}.o_proj", attn.o_proj, -1, q0 * d, q1 * d))
    _swap(attn.q_proj, _TO_SHARDED, group)
    _swap(attn.o_proj, _TO_ALL, group)
    attn.n_heads, attn.n_kv = per, k1 - k0
    return cuts


def _mlp(prefix: str, mlp: MLP | SelfConditioning, group: Group) -> dict[str, Cut]:
    q = _quant(mlp.down_proj)
    parts = spans(mlp.gate_proj.weight.shape[0], group.size(), 1 if q is None else q[1])
    if any(a == b for a, b in parts):
        return {}
    start, stop = parts[group.rank()]
    cuts = {**_cuts(f"{prefix}.gate_proj", mlp.gate_proj, 0, start, stop),
            **_cuts(f"{prefix}.up_proj", mlp.up_proj, 0, start, stop),
            **_cuts(f"{prefix}.down_proj", mlp.down_proj, -1, start, stop)}
    _swap(mlp.gate_proj, _TO_SHARDED, group)
    _swap(mlp.up_proj, _TO_SHARDED, group)
    _swap(mlp.down_proj, _TO_ALL, group)
    return cuts


class ShardedExperts(Experts):
    """This rank's range of experts. Only the (token, choice) pairs routed to them are computed (their count is
    read back: one sync per layer, which on a canvas saves the other ranks' share of the expert matmuls); the
    other choices weigh zero, and the ranks' mixtures are summed."""

    def __call__(self, x: mx.array, idx: mx.array, weights: mx.array) -> mx.array:
        N, k = idx.shape
        local = (idx - self.first).flatten()
        mine = (local >= 0) & (local < self.count)
        n = mine.sum().item()
        y = mx.zeros((N * k, x.shape[-1]), dtype=mx.float32)
        if n:
            pairs = mx.argsort((~mine).astype(mx.int32))[:n]  # the local pairs first
            # Each pair as a token with one choice of weight 1: its expert's output, widened, as `Experts` has it.
            y[pairs] = super().__call__(x[pairs // k], local[pairs][:, None], mx.ones((n, 1), dtype=mx.float32))
        y = (y.reshape(N, k, -1) * mx.where(mine.reshape(N, k), weights, 0.0)[..., None]).sum(axis=1)
        return mx.distributed.all_sum(y, group=self.group)


def _experts(prefix: str, experts: Experts, group: Group) -> dict[str, Cut]:
    total = experts.gate_up_proj.weight.shape[0]
    parts = spans(total, group.size())
    if any(a == b for a, b in parts):
        return {}
    start, stop = parts[group.rank()]
    experts.__class__ = ShardedExperts
    experts.first, experts.count, experts.group = start, stop - start, group
    return {**_cuts(f"{prefix}.gate_up_proj", experts.gate_up_proj, 0, start, stop),
            **_cuts(f"{prefix}.down_proj", experts.down_proj, 0, start, stop)}


class _VocabRows:
    """An embedding holding this rank's vocabulary rows: a lookup outside them gives zero, the ranks' are summed."""

    def __call__(self, ids: mx.array) -> mx.array:
        split = self.vocab
        local = ids - split.first
        mine = (local >= 0) & (local < split.count)
        e = super().__call__(mx.where(mine, local, 0))
        return mx.distributed.all_sum(mx.where(mine[..., None], e, 0), group=split.group)


class VocabEmbedding(_VocabRows, nn.Embedding):
    pass


class VocabQuantizedEmbedding(_VocabRows, nn.QuantizedEmbedding):
    pass


class ShardedModel(Model):
    """The model with its vocabulary split: the decoder's logits are this rank's slice (the sampler reduces
    across ranks); self-conditioning sums the ranks' parts; the encoder's logits are gathered whole."""

    def soft_embedding(self, probs: mx.array, dtype) -> mx.array:
        return mx.distributed.all_sum(super().soft_embedding(probs, dtype), group=self.vocab.group)

    def encode(self, input_ids: mx.array, cache, *, logits: str | None = None) -> mx.array | None:
        out = super().encode(input_ids, cache, logits=logits)
        return None if out is None else gather_vocab(out, self.vocab)


def gather_vocab(local: mx.array, split: VocabSplit) -> mx.array:
    """Every rank's slice of `[..., V_local]` logits joined into `[..., V]` (slices padded to one width)."""
    width = max(b - a for a, b in split.spans)
    x = mx.moveaxis(local, -1, 0)
    x = mx.pad(x, [(0, width - x.shape[0])] + [(0, 0)] * (x.ndim - 1))
    x = mx.distributed.all_gather(x, group=split.group)
    keep = mx.concatenate([mx.arange(r * width, r * width + b - a) for r, (a, b) in enumerate(split.spans)])
    return mx.moveaxis(x[keep], 0, -1)


def restructure(model: Model, group: Group) -> tuple[dict[str, Cut], VocabSplit]:
    """Turn `model`'s modules into their sharded forms for this rank (in place) and return the cut of every
    stored tensor this rank keeps a slice of (tensors not named are kept whole) and the vocabulary split.
    Parameters keep their full shapes: `slice_parameters` (or the loader) fits them."""
    cuts: dict[str, Cut] = {}
    dec = model.model.decoder
    for i, layer in enumerate(dec.layers):
        prefix = f"model.decoder.layers.{i}"
        cuts.update(_attention(f"{prefix}.self_attn", layer.self_attn, group))
        cuts.update(_mlp(f"{prefix}.mlp", layer.mlp, group))
        cuts.update(_experts(f"{prefix}.experts", layer.experts, group))
    cuts.update(_mlp("model.decoder.self_conditioning", dec.self_conditioning, group))
    rows = tuple(spans(model.args.vocab_size, group.size()))
    if any(a == b for a, b in rows):
        raise ValueError(f"a vocabulary of {model.args.vocab_size} cannot split over {group.size()} processes")
    first, stop = rows[group.rank()]
    split = VocabSplit(group, first, stop - first, model.args.vocab_size, rows)
    emb = dec.embed_tokens
    cuts.update(_cuts("model.decoder.embed_tokens", emb, 0, first, stop))
    emb.__class__ = VocabQuantizedEmbedding if isinstance(emb, nn.QuantizedEmbedding) else VocabEmbedding
    emb.vocab = split
    model.__class__ = ShardedModel
    model.vocab = split
    return cuts, split


def cut(value, c: Cut):
    """The slice `c` of an array (MLX or NumPy)."""
    axis, start, stop = c
    index = [slice(None)] * value.ndim
    index[axis] = slice(start, stop)
    return value[tuple(index)]


def slice_parameters(model: Model, cuts: dict[str, Cut]) -> None:
    """Replace each cut parameter by a copy of its slice (so the whole tensor can be freed)."""
    sliced = [(k, mx.contiguous(cut(v, cuts[k]))) for k, v in tree_flatten(model.parameters()) if k in cuts]
    model.update(tree_unflatten(sliced))


def activate(split: VocabSplit | None) -> None:
    """Make `split` the process's vocabulary split (`backend.select` then returns the distributed backend)."""
    global _active
    _active = split


def shard(model: Model, group: Group) -> Model:
    """Shard a loaded model over `group` in place (this process is `group.rank()`); returns it. To load only
    this rank's part of each tensor from the files instead, use `cluster.load_sharded`."""
    if group.size() == 1:
        return model
    cuts, split = restructure(model, group)
    slice_parameters(model, cuts)
    mx.eval(model.parameters())
    activate(split)
    return model


# --- the sampler's passes over the vocabulary, reduced across ranks ---------------------------------------


@partial(mx.compile, shapeless=True)
def _local_sums(x: mx.array, top: mx.array) -> tuple[mx.array, mx.array, mx.array]:
    y = x - top
    e = mx.exp(y)
    return e, e.sum(axis=-1), (e * y).sum(axis=-1)


def _top(split: VocabSplit, scaled: mx.array) -> tuple[mx.array, mx.array]:
    """(global max [B, C, 1], global argmax [B, C] int32): the lowest index among equal maxima, as mx.argmax."""
    best = mx.argmax(scaled, axis=-1, keepdims=True)
    top = mx.take_along_axis(scaled, best, axis=-1)
    g = mx.distributed.all_max(top, group=split.group)
    candidate = mx.where(top == g, best.astype(mx.int32) + split.first, split.size)
    return g, mx.distributed.all_min(candidate, group=split.group).squeeze(-1)


def _rank_sum(split: VocabSplit, parts: mx.array) -> mx.array:
    # all_gather, then a sum in rank order: every rank gets bit-identical totals, so all decide alike.
    return mx.distributed.all_gather(parts[None], group=split.group).sum(axis=0)


def vocab_stats(split: VocabSplit, logits: mx.array, temp: float, sc_dtype) -> tuple[mx.array, ...]:
    """`sampler.vocab_stats` over this rank's slice of the logits: entropy, total and argmax are global (the
    same on every rank); the probabilities and self-conditioning probabilities are this rank's slice."""
    scaled = sampler.scaled_logits(logits, temp)
    top, argmax = _top(split, scaled)
    e, s, t = _local_sums(scaled, top)
    parts = [s, t]
    if sc_dtype != mx.float32:  # softmax of the logits rounded to the weight dtype (rounding keeps the max)
        rounded = scaled.astype(sc_dtype).astype(mx.float32)
        ez, sz, _ = _local_sums(rounded, top.astype(sc_dtype).astype(mx.float32))
        parts.append(sz)
    sums = _rank_sum(split, mx.stack(parts))
    total = sums[0]
    ent = mx.log(total) - sums[1] / total
    probs = e / total[..., None]
    sc = probs if sc_dtype == mx.float32 else ez / sums[2][..., None]
    return ent, total, argmax, probs, sc


def argmax(split: VocabSplit, logits: mx.array, temp: float) -> mx.array:
    """`sampler.scaled_argmax` over the ranks' slices: [B, C] int32 global ids."""
    return _top(split, sampler.scaled_logits(logits, temp))[1]


def categorical(split: VocabSplit, probs: mx.array, u: mx.array) -> mx.array:
    """`sampler.inverse_cdf_sample` over the ranks' slices of `probs`: the local running sums start at the lower
    ranks' mass, each rank counts the entries at or below `u`, and the counts are summed (the global index)."""
    mass = mx.distributed.all_gather(probs.sum(axis=-1)[None], group=split.group)
    offset = mass[: split.group.rank()].sum(axis=0)
    below = (mx.cumsum(probs, axis=-1) + offset[..., None]) <= u[..., None]
    count = mx.distributed.all_sum(below.sum(axis=-1).astype(mx.int32), group=split.group)
    return mx.minimum(count, split.size - 1).astype(mx.int32)


__all__ = ["VocabSplit", "shard", "restructure", "slice_parameters", "activate", "active", "spans",
           "vocab_stats", "argmax", "categorical", "gather_vocab"]
