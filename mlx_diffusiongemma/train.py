"""Fine-tuning DiffusionGemma in MLX: the block-diffusion SFT objective, a JSONL loader and a LoRA loop.

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
  block calls `Model.decode` on a read-only view of the prefix K/V (`_PrefixKV`, retaining the last
  `window - 1` positions on sliding layers as `LayerCache` does), positions continuing after the prefix.
  Computing all encoder K/V in one causal pass equals encoding each prefix separately, since a causal
  position's K/V depend only on what precedes it.
* Loss. Cross-entropy on the corrupted positions only, averaged over them across all blocks (no 1/t
  weighting; our choice). Total = diffusion loss + `encoder_weight` * encoder loss.
* Self-conditioning. Per block with probability 0.5: a first decoder pass without it, its logits passed
  through `mx.stop_gradient`, then a second pass conditioned on them; the loss is on the second pass.
  (Inference self-conditions on temperature-scaled logits; training uses temperature 1.)
* MoE routing. The top-k expert choice carries no gradient (MLX cannot differentiate a gather with respect
  to its indices: `Router` stops it); the router still learns through the routing weights.
"""

from __future__ import annotations

import json
import math
import random
import sys
import time
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim

from .errors import UsageError
from .model import SLIDING, Model, softcap

EPS = 1e-3


class _PrefixKV:
    """A read-only stand-in for `LayerCache` holding one layer's prefix K/V (differentiable, no buffers)."""

    def __init__(self, keys: mx.array, values: mx.array, offset: int, length: int):
        self.keys, self.values, self.offset, self.length = keys, values, offset, length

    def append(self, k: mx.array, v: mx.array) -> tuple[mx.array, mx.array]:
        self.keys, self.values = k, v
        return k, v

    def with_canvas(self, k: mx.array, v: mx.array) -> tuple[mx.array, mx.array]:
        return mx.concatenate([self.keys, k], axis=2), mx.concatenate([self.values, v], axis=2)


def encoder_forward(model: Model, ids: mx.array) -> tuple[mx.array, list[tuple[mx.array, mx.array]]]:
    """Full causal encoder over `[B, L]` ids from position 0: (`[B, L, V]` softcapped logits, per-layer K/V)."""
    if not model.args.encoder_causal:
        raise UsageError("fine-tuning needs a causal encoder (use_bidirectional_attention 'all' is not supported)")
    x = model._embed(ids)
    n = ids.shape[1]
    ropes = model._ropes(0, n, x.dtype)
    scalars = model.model.encoder.language_model.layers
    kvs = []
    for i, layer in enumerate(model.layers):
        t = model.args.layer_types[i]
        view = _PrefixKV(None, None, 0, 0)
        x = layer(x, ropes[t], view.append, model._encoder_mask(view, n, t), scalars[i].layer_scalar)
        kvs.append((view.keys, view.values))
    dec = model.model.decoder
    return softcap(dec.embed_tokens.as_linear(dec.norm(x)).astype(mx.float32)), kvs


def prefix_cache(model: Model, kvs, prefix: int) -> list[_PrefixKV]:
    """The cache the decoder would see after encoding the first `prefix` tokens."""
    out = []
    for (k, v), t in zip(kvs, model.args.layer_types):
        start = max(0, prefix - (model.args.sliding_window - 1)) if t == SLIDING else 0
        out.append(_PrefixKV(k[:, :, start:prefix], v[:, :, start:prefix], prefix, prefix - start))
    return out


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
) -> tuple[mx.array, dict[str, mx.array]]:
    """The SFT loss of `prompt + response` sequences (see the module docstring); `(loss, metrics)`.

    `tokens` is one sequence `[L]` or a batch `[B, L]` of equally long ones sharing `prompt_len`; a batch
    draws its corruption per sequence and its self-conditioning coin per block (shared by the batch).
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
    use_sc = (mx.random.uniform(shape=(blocks,), key=k_sc) < self_conditioning_prob).tolist()

    enc_logits, kvs = encoder_forward(model, tokens)
    enc_ce = nn.losses.cross_entropy(enc_logits[:, prompt_len - 1 : n - 1], tokens[:, prompt_len:], reduction="mean")

    total = mx.array(0.0)
    for j in range(blocks):
        cache = prefix_cache(model, kvs, prompt_len + j * C)
        canvas = noisy[:, j]
        logits = model.decode(canvas, cache)
        if use_sc[j]:
            logits = model.decode(canvas, cache, self_conditioning_logits=mx.stop_gradient(logits))
        ce = nn.losses.cross_entropy(logits, clean[:, j], reduction="none")
        total = total + (ce * corrupt[:, j]).sum()
    count = corrupt.sum()
    diff = total / mx.maximum(count, 1)
    loss = diff + encoder_weight * enc_ce
    return loss, {"diffusion_loss": diff, "encoder_loss": enc_ce, "corrupted": count}


# --- data ---------------------------------------------------------------------------------------------------


def _check_record(record) -> list[dict]:
    """Chat messages of one JSONL record; raises ValueError with the reason."""
    if not isinstance(record, dict):
        raise ValueError("expected a JSON object")
    if "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list) or not messages:
            raise ValueError("'messages' must be a non-empty list")
        for m in messages:
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or "content" not in m:
                raise ValueError("each message needs a 'role' string and a 'content'")
        if messages[-1]["role"] not in ("assistant", "model"):
            raise ValueError("the last message must be the assistant's (the response to train on)")
        return messages
    if "prompt" in record and "completion" in record:
        if not isinstance(record["prompt"], str) or not isinstance(record["completion"], str):
            raise ValueError("'prompt' and 'completion' must be strings")
        return [{"role": "user", "content": record["prompt"]}, {"role": "assistant", "content": record["completion"]}]
    raise ValueError("expected {\"messages\": [...]} or {\"prompt\": ..., \"completion\": ...}")


def read_jsonl(path: str | Path) -> list[tuple[int, list[dict]]]:
    """`(line number, chat messages)` of every record of a JSONL file (blank lines skipped); errors name the line."""
    path = Path(path)
    records = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                records.append((lineno, _check_record(json.loads(line))))
            except ValueError as e:  # json.JSONDecodeError is a ValueError
                reason = f"invalid JSON ({e.msg})" if isinstance(e, json.JSONDecodeError) else str(e)
                raise UsageError(f"{path}, line {lineno}: {reason}") from None
    if not records:
        raise UsageError(f"{path} has no training records")
    return records


def _ids(x) -> list[int]:
    if isinstance(x, dict):  # a BatchEncoding
        x = x["input_ids"]
    return list(x)


def tokenize(tokenizer, messages: list[dict]) -> tuple[list[int], int]:
    """(ids of the whole conversation, length of the prompt: everything before the last assistant turn)."""
    prompt = _ids(tokenizer.apply_chat_template(messages[:-1], add_generation_prompt=True, tokenize=True))
    full = _ids(tokenizer.apply_chat_template(messages, add_generation_prompt=False, tokenize=True))
    if full[: len(prompt)] != prompt or len(full) <= len(prompt):
        raise UsageError("the chat template does not render the prompt as a prefix of the conversation")
    return full, len(prompt)


# --- training loop ------------------------------------------------------------------------------------------


def train(
    model: Model,
    examples: list[tuple[list[int], int]],
    *,
    iters: int,
    batch_size: int = 1,
    learning_rate: float = 1e-4,
    seed: int = 0,
    report_every: int = 10,
    save_every: int = 0,
    save=None,
    log=print,
    **loss_kwargs,
) -> list[float]:
    """Adam on the model's trainable parameters; returns the loss of every iteration."""
    optimizer = optim.Adam(learning_rate=learning_rate)
    rng = random.Random(seed)
    key = mx.random.key(seed)

    def batch_loss(batch, keys):
        losses = [diffusion_loss(model, ids, p, k, **loss_kwargs)[0] for (ids, p), k in zip(batch, keys)]
        return sum(losses) / len(losses)

    loss_and_grad = nn.value_and_grad(model, batch_loss)
    order: list[int] = []
    history, tokens, tic = [], 0, time.perf_counter()
    for it in range(1, iters + 1):
        batch = []
        for _ in range(batch_size):
            if not order:
                order = list(range(len(examples)))
                rng.shuffle(order)
            batch.append(examples[order.pop()])
        key, sub = mx.random.split(key)
        loss, grads = loss_and_grad(batch, mx.random.split(sub, batch_size))
        optimizer.update(model, grads)
        mx.eval(loss, model.trainable_parameters(), optimizer.state)
        history.append(loss.item())
        tokens += sum(len(ids) for ids, _ in batch)
        if it % report_every == 0 or it == iters:
            elapsed = time.perf_counter() - tic
            log(f"iter {it}: loss {history[-1]:.4f}, {tokens / max(elapsed, 1e-9):.1f} tokens/s")
            tokens, tic = 0, time.perf_counter()
        if save is not None and save_every and it % save_every == 0:
            save()
    return history


def run_finetune(
    model_path: str, data: str, *, lora_rank: int = 8, lora_scale: float = 20.0, iters: int = 100,
    batch_size: int = 1, learning_rate: float = 1e-4, save_every: int = 100, adapter_path: str = "adapters",
    seed: int = 0, report_every: int = 10,
) -> Path:
    """The `finetune` command: read the data, load the model, train LoRA adapters and save them."""
    from .loader import load
    from .lora import apply_lora, save_adapters

    checks = (("--iters", iters), ("--batch-size", batch_size), ("--lora-rank", lora_rank),
              ("--steps-per-report", report_every))
    for name, value in checks:
        if value < 1:
            raise UsageError(f"{name} must be at least 1 (got {value})")
    records = read_jsonl(data)
    model, tokenizer = load(model_path)
    examples = []
    for lineno, messages in records:
        try:
            examples.append(tokenize(tokenizer, messages))
        except Exception as e:  # the template rejected the messages, or renders them oddly
            raise UsageError(f"{data}, line {lineno}: cannot tokenize the conversation ({e})") from None
    mx.random.seed(seed)  # the LoRA A matrices' initialisation
    config = apply_lora(model, rank=lora_rank, scale=lora_scale)
    out = Path(adapter_path)

    def save():
        save_adapters(model, out, config)

    log = lambda line: print(line, file=sys.stderr, flush=True)  # noqa: E731
    n_tok = sum(len(ids) for ids, _ in examples)
    log(f"{len(examples)} examples, {n_tok} tokens; LoRA rank {lora_rank} on {len(config['modules'])} module kinds")
    train(model, examples, iters=iters, batch_size=batch_size, learning_rate=learning_rate, seed=seed,
          report_every=report_every, save_every=save_every, save=save, log=log)
    save()
    log(f"saved adapters to {out}")
    return out
