"""Fine-tuning DiffusionGemma in MLX: the block-diffusion SFT objective.

The objective follows NeMo AutoModel's DiffusionGemma SFT recipe as it was described to us (we did not have
its source; where the description is silent, the choice below is ours and says so):

* Encoder. The clean `prompt + response` sequence runs through the causal encoder -- the full stack, every
  layer's FFN included, unlike inference's `Model.encode`, which skips the last layer's output. Its final
  norm, the tied LM head and the softcap give next-token logits, trained with ordinary cross-entropy on the
  response tokens (weight `encoder_weight`, 1.0 by default). Its K/V are what the decoder attends to.
* Blocks. The response is cut into canvas-length blocks. The last, partial block is filled up with the pad
  id and those positions are trained like any other (our choice: inference always denoises whole canvases
  and cuts after the first EOS, so a target for the tail is needed; the response ends in an end-of-turn).
* Corruption. One `t ~ U(eps, 1)` per block (eps = 1e-3); every position of the block is independently
  replaced, with probability `t`, by a token id drawn uniformly from the whole vocabulary. There is no mask
  token. A drawn id may equal the clean one; the position still counts as corrupted.
* Decoder. The bidirectional decoder predicts the clean block from the corrupted one while attending to the
  encoder K/V of everything before the block (block-causal). This is the inference read path itself: each
  block calls `Model.decode` on `ArrayCache.prefix`, the prefix K/V as the decoder would see them after
  encoding only the prefix (the last `window - 1` positions on sliding layers), positions continuing after
  it. The encoder is `Model.encode` itself, run once over the whole sequence into an `ArrayCache`.
* Loss. Cross-entropy on the corrupted positions only, averaged over them across all blocks (no 1/t
  weighting; our choice). Total = diffusion loss + `encoder_weight` * encoder loss.
* Self-conditioning. Per block with probability 0.5: a first decoder pass without it, its logits passed
  through `mx.stop_gradient`, then a second pass conditioned on them; the loss is on the second pass. Both
  passes are always built and `mx.where` picks per block, so the coin is never read on the host (no sync).
  (Inference self-conditions on temperature-scaled logits; training uses temperature 1.)
* MoE routing. The top-k expert choice carries no gradient (MLX cannot differentiate a gather with respect
  to its indices: `Router` stops it); the router still learns through the routing weights.
"""

from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn as nn

from ..cache import ArrayCache
from ..errors import UsageError
from ..model import SLIDING, Model

EPS = 1e-3


def encoder_forward(model: Model, ids: mx.array, left: mx.array | None = None) -> tuple[mx.array, list[ArrayCache]]:
    """The causal encoder over `[B, L]` ids from position 0, every layer run in full: (`[B, L, V]` softcapped
    next-token logits, each layer's K/V as an `ArrayCache`). `left` (`[B]`): pad tokens in front of each row."""
    if not model.args.encoder_causal:
        raise UsageError("fine-tuning needs a causal encoder (use_bidirectional_attention 'all' is not supported)")
    cache = [ArrayCache() if left is None else ArrayCache.padded(left) for _ in model.layers]
    return model.encode(ids, cache, logits="all"), cache


def prefix_cache(model: Model, kvs: list[ArrayCache], prefix: int) -> list[ArrayCache]:
    """The cache the decoder would see after encoding the first `prefix` tokens."""
    w = model.args.sliding_window
    return [c.prefix(prefix, w if t == SLIDING else None) for c, t in zip(kvs, model.args.layer_types)]


def _encoder_loss(logits: mx.array, tokens: mx.array, prompt_len: int, encoder_mask) -> mx.array:
    B, n = tokens.shape
    if encoder_mask is None:
        return nn.losses.cross_entropy(logits[:, prompt_len - 1 : n - 1], tokens[:, prompt_len:], reduction="mean")
    weight = mx.array(encoder_mask, dtype=mx.float32).reshape(B, n)[:, 1:]
    ce = nn.losses.cross_entropy(logits[:, :-1], tokens[:, 1:], reduction="none")
    return (ce * weight).sum() / mx.maximum(weight.sum(), 1)


def diffusion_loss(
    model: Model,
    tokens,
    prompt_len: int,
    key: mx.array,
    *,
    canvas_length: int | None = None,
    eps: float = EPS,
    self_conditioning_prob: float = 0.5,
    encoder_weight: float = 1.0,
    pad_id: int | None = None,
    encoder_mask=None,
    prompt_pad=None,
) -> tuple[mx.array, dict[str, mx.array]]:
    """The SFT loss of `prompt + response` sequences (see the module docstring); `(loss, metrics)`.

    `tokens` is one sequence `[L]` or a batch `[B, L]` of equally long ones sharing `prompt_len`; a batch
    draws its corruption per sequence and its self-conditioning coin per block (shared by the batch).
    `encoder_mask` (`[B, L]`, 1 where a token is the model's own) widens the encoder's next-token loss from
    the response to every such token, e.g. the earlier replies of a conversation. `prompt_pad` (`[B]`) lets
    prompts of different lengths share a batch: row r starts with that many pad tokens, which no position sees.
    """
    tokens = mx.array(tokens, dtype=mx.int32)
    tokens = tokens[None] if tokens.ndim == 1 else tokens
    B, n = tokens.shape
    if not 1 <= prompt_len < n:
        raise ValueError(f"need a non-empty prompt and response (prompt_len {prompt_len}, length {n})")
    C = canvas_length or model.args.canvas_length
    V = model.args.vocab_size
    pad = model.args.pad_token_id if pad_id is None else pad_id
    blocks = math.ceil((n - prompt_len) / C)
    tail = mx.full((B, blocks * C - (n - prompt_len)), pad, mx.int32)
    clean = mx.concatenate([tokens[:, prompt_len:], tail], axis=1).reshape(B, blocks, C)

    k_t, k_pos, k_ids, k_sc = mx.random.split(key, 4)
    t = mx.random.uniform(eps, 1.0, (B, blocks, 1), key=k_t)
    corrupt = mx.random.uniform(shape=(B, blocks, C), key=k_pos) < t
    noisy = mx.where(corrupt, mx.random.randint(0, V, (B, blocks, C), key=k_ids), clean)
    use_sc = mx.random.uniform(shape=(blocks,), key=k_sc) < self_conditioning_prob

    left = None if prompt_pad is None else mx.array(prompt_pad, dtype=mx.int32)
    enc_logits, kvs = encoder_forward(model, tokens, left)
    enc_ce = _encoder_loss(enc_logits, tokens, prompt_len, encoder_mask)

    total = mx.array(0.0)
    for j in range(blocks):
        cache = prefix_cache(model, kvs, prompt_len + j * C)
        canvas = noisy[:, j]
        logits = model.decode(canvas, cache)
        if self_conditioning_prob > 0:
            conditioned = model.decode(canvas, cache, self_conditioning_logits=mx.stop_gradient(logits))
            logits = mx.where(use_sc[j], conditioned, logits)
        ce = nn.losses.cross_entropy(logits, clean[:, j], reduction="none")
        total = total + (ce * corrupt[:, j]).sum()
    count = corrupt.sum()
    diff = total / mx.maximum(count, 1)
    loss = diff + encoder_weight * enc_ce
    return loss, {"diffusion_loss": diff, "encoder_loss": enc_ce, "corrupted": count}
