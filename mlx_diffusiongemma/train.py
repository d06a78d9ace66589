"""Fine-tuning DiffusionGemma in MLX: the block-diffusion SFT objective, a JSONL loader and the training
loop (LoRA, QLoRA or every weight).

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

import functools
import json
import math
import os
import random
import sys
import time
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_flatten

from .errors import UsageError
from .model import SLIDING, Model, softcap
from .noise import check_seed

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
    encoder_mask=None,
) -> tuple[mx.array, dict[str, mx.array]]:
    """The SFT loss of `prompt + response` sequences (see the module docstring); `(loss, metrics)`.

    `tokens` is one sequence `[L]` or a batch `[B, L]` of equally long ones sharing `prompt_len`; a batch
    draws its corruption per sequence and its self-conditioning coin per block (shared by the batch).
    `encoder_mask` (`[B, L]`, 1 where a token is the model's own) widens the encoder's next-token loss from
    the response to every such token, e.g. the earlier replies of a conversation.
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
    if encoder_mask is None:
        enc_ce = nn.losses.cross_entropy(enc_logits[:, prompt_len - 1 : n - 1], tokens[:, prompt_len:], reduction="mean")
    else:
        weight = mx.array(encoder_mask, dtype=mx.float32).reshape(B, n)[:, 1:]
        ce = nn.losses.cross_entropy(enc_logits[:, :-1], tokens[:, 1:], reduction="none")
        enc_ce = (ce * weight).sum() / mx.maximum(weight.sum(), 1)

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
    if not path.is_file():
        raise UsageError(f"{path} is {'a folder' if path.is_dir() else 'missing'}; pass a JSONL file of records")
    records = []
    with open(path, "rb") as f:  # bytes, decoded per line, so an invalid UTF-8 line is named by its number
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
                if not line.strip():
                    continue
                records.append((lineno, _check_record(json.loads(line))))
            except ValueError as e:  # json.JSONDecodeError and UnicodeDecodeError are ValueErrors
                reason = f"invalid JSON ({e.msg})" if isinstance(e, json.JSONDecodeError) else str(e)
                if isinstance(e, UnicodeDecodeError):
                    reason = f"not valid UTF-8 (byte 0x{raw[e.start]:02x} at byte {e.start + 1}); save it as UTF-8"
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

VAL_SEED = 1_000_003  # validation noise: the i-th validation example always draws key VAL_SEED + i


def validation_loss(model: Model, examples: list[tuple[list[int], int]], **loss_kwargs) -> float:
    """Mean loss over `examples`, each under a fixed noise key, so values compare across reports and runs."""
    total = 0.0
    for i, (ids, prompt_len) in enumerate(examples):
        total += diffusion_loss(model, ids, prompt_len, mx.random.key(VAL_SEED + i), **loss_kwargs)[0].item()
    return total / len(examples)


def _draw(examples, order: list[int], rng: random.Random, n: int):
    """`n` examples, reshuffling each time every example has been used once."""
    batch = []
    for _ in range(n):
        if not order:
            order.extend(range(len(examples)))
            rng.shuffle(order)
        batch.append(examples[order.pop()])
    return batch


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
    val_examples: list[tuple[list[int], int]] | None = None,
    val_every: int = 50,
    log=print,
    **loss_kwargs,
) -> list[float]:
    """Adam on the model's trainable parameters; returns the loss of every iteration.

    Logs `iter N: loss L, T tokens/s` every `report_every` iterations and, given `val_examples`,
    `iter N: val loss L` before training, every `val_every` iterations and at the end. Calls `save(N)` every
    `save_every` iterations before the last (the caller saves the final state).
    """
    optimizer = optim.Adam(learning_rate=learning_rate)
    rng = random.Random(seed)
    key = mx.random.key(seed)

    def batch_loss(batch, keys):
        losses = [diffusion_loss(model, ids, p, k, **loss_kwargs)[0] for (ids, p), k in zip(batch, keys)]
        return sum(losses) / len(losses)

    def validate(it):
        if val_examples:
            log(f"iter {it}: val loss {validation_loss(model, val_examples, **loss_kwargs):.4f}")

    loss_and_grad = nn.value_and_grad(model, batch_loss)
    order: list[int] = []
    history, tokens, elapsed = [], 0, 0.0  # elapsed: training steps only, not validation or saving
    validate(0)
    for it in range(1, iters + 1):
        tic = time.perf_counter()
        batch = _draw(examples, order, rng, batch_size)
        key, sub = mx.random.split(key)
        loss, grads = loss_and_grad(batch, mx.random.split(sub, batch_size))
        optimizer.update(model, grads)
        mx.eval(loss, model.trainable_parameters(), optimizer.state)
        history.append(loss.item())
        if not math.isfinite(history[-1]):  # the weights are already ruined: stop before any save
            raise UsageError(f"training stopped at iteration {it}: the loss is {history[-1]} (lower "
                             "--learning-rate); these weights were not saved")
        elapsed += time.perf_counter() - tic
        tokens += sum(len(ids) for ids, _ in batch)
        if it % report_every == 0 or it == iters:
            log(f"iter {it}: loss {history[-1]:.4f}, {tokens / max(elapsed, 1e-9):.1f} tokens/s")
            tokens, elapsed = 0, 0.0
        if (val_every and it % val_every == 0) or it == iters:
            validate(it)
        if save is not None and save_every and it % save_every == 0 and it < iters:
            _check_finite(model, it)
            save(it)
    _check_finite(model, iters)
    return history


def _check_finite(model: Model, it: int) -> None:
    """A finite loss can still come with an update that made weights NaN or infinite: never save those."""
    if not all(mx.isfinite(v).all().item() for _, v in tree_flatten(model.trainable_parameters())):
        raise UsageError(f"training stopped at iteration {it}: the weights became NaN or infinite (lower "
                         "--learning-rate); they were not saved")


# --- the finetune command -----------------------------------------------------------------------------------


def _check_options(full, resume, adapter_path, save_path, lora_rank, lora_scale, lora_experts, counts,
                   learning_rate, seed) -> None:
    for name, value in counts.items():
        if value is not None and value < 1:
            raise UsageError(f"{name} must be at least 1 (got {value})")
    check_seed(seed, "--seed")
    if not math.isfinite(learning_rate) or learning_rate <= 0:
        raise UsageError(f"--learning-rate must be a positive number (got {learning_rate})")
    if full:
        given = [("--resume", resume), ("--adapter-path", adapter_path), ("--lora-rank", lora_rank),
                 ("--lora-scale", lora_scale), ("--lora-experts", lora_experts)]
        conflict = next((name for name, value in given if value not in (None, False)), None)
        if conflict:
            raise UsageError(f"--full trains every weight and takes no {conflict} (to continue a full fine-tune, "
                             "pass its folder as --model)")
        if save_path is None:
            raise UsageError("--full needs --save-path DIR, the folder for the fine-tuned checkpoint")
        if Path(save_path).expanduser().exists():
            raise UsageError(f"{save_path} already exists; choose a new --save-path")
    elif save_path is not None:
        raise UsageError("--save-path is for --full; LoRA adapters go to --adapter-path (`fuse` merges them)")
    target, flag = (save_path, "--save-path") if full else (adapter_path or "adapters", "--adapter-path")
    _check_writable(Path(target).expanduser().absolute(), flag)


def _check_writable(path: Path, flag: str) -> None:
    """Refuse before loading and training, not after, an output folder that cannot be made or written."""
    probe = path
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise UsageError(f"{flag} {path} cannot be written: {probe} is a file; choose another folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise UsageError(f"{flag} {path} cannot be written: {probe} is not writable; choose another folder")


def _resume_config(path: Path, rank: int | None, scale: float | None, experts: bool) -> dict:
    """The saved adapter config, after checking the LoRA flags given agree with it."""
    from .lora import CONFIG_FILE, EXPERT_TARGETS, read_adapter_config

    if not (path / CONFIG_FILE).exists():
        raise UsageError(f"--resume needs adapters in {path}, which has no {CONFIG_FILE}; train without --resume")
    saved = read_adapter_config(path)
    for flag, value, field in (("--lora-rank", rank, "rank"), ("--lora-scale", scale, "scale")):
        if value is not None and value != saved.get(field):
            raise UsageError(f"{flag} {value} differs from the {field} {saved.get(field)} of the adapters in "
                             f"{path}; drop {flag} to resume")
    if experts and not set(EXPERT_TARGETS) <= set(saved.get("modules", ())):
        raise UsageError(f"the adapters in {path} have no expert LoRA; drop --lora-experts to resume them")
    return saved


def _tokenized(tokenizer, records, path, args) -> list[tuple[list[int], int]]:
    """Tokenize every record, refusing (naming the line) one the template rejects or the context cannot hold."""
    examples, C = [], args.canvas_length
    for lineno, messages in records:
        try:
            ids, prompt_len = tokenize(tokenizer, messages)
        except Exception as e:  # the template rejected the messages, or renders them oddly
            raise UsageError(f"{path}, line {lineno}: cannot tokenize the conversation ({e})") from None
        blocks = math.ceil((len(ids) - prompt_len) / C)  # the response is trained as whole canvases
        if prompt_len + blocks * C > args.max_position_embeddings:
            raise UsageError(
                f"{path}, line {lineno}: the conversation needs {prompt_len + blocks * C} positions (a {prompt_len}"
                f"-token prompt and {blocks} canvases of {C}), more than the model's context of "
                f"{args.max_position_embeddings}; shorten or drop it"
            )
        examples.append((ids, prompt_len))
    return examples


def _trainer(model, source: Path, *, full, resume, adapter_path, save_path, lora_rank, lora_scale, lora_experts):
    """Make the model trainable (all of it, or LoRA); returns (what is trained, save(name), output folder)."""
    from .loader import load_config, save_checkpoint
    from .lora import ADAPTER_FILE, DEFAULT_RANK, DEFAULT_SCALE, EXPERT_TARGETS, TARGETS, apply_lora, \
        load_adapters, save_adapters

    if full:
        if any(k.endswith(".scales") for k, _ in tree_flatten(model.parameters())):
            raise UsageError(f"--full cannot train the quantized weights of {source}; use LoRA (the default) "
                             "or an unquantized checkpoint")
        model.unfreeze()
        config, out = load_config(source)[0], Path(save_path).expanduser()
        saved = []  # the first save makes the folder (refused if it appeared meanwhile), later ones replace it
        return "every weight", lambda it=None: saved.append(save_checkpoint(model, source, out, config,
                                                                            replace=bool(saved))), out
    out = Path(adapter_path or "adapters")
    if resume:
        config = load_adapters(model, out)
        what = f"LoRA rank {config['rank']} resumed from {out}"
    else:
        modules = TARGETS + (EXPERT_TARGETS if lora_experts else ())
        config = apply_lora(model, lora_rank or DEFAULT_RANK, DEFAULT_SCALE if lora_scale is None else lora_scale,
                            modules=modules)
        what = f"LoRA rank {config['rank']}{' with experts' if lora_experts else ''}"

    def save(it=None):
        if it is not None:  # a numbered copy too, so an earlier state can be picked by its validation loss
            save_adapters(model, out, config, name=f"{it:07d}_{ADAPTER_FILE}")
        save_adapters(model, out, config)

    return what, save, out


def _holding_save_path(run):
    """With --full, hold the --save-path lock for the whole run, so a concurrent run to it refuses at once and
    not after training; SIGTERM then ends the run as Ctrl-C does, and nothing of it is left behind."""

    @functools.wraps(run)
    def wrapper(*args, full: bool = False, save_path: str | None = None, **kwargs):
        if not (full and save_path):
            return run(*args, full=full, save_path=save_path, **kwargs)
        from .folders import target_lock, terminate_as_interrupt

        path = Path(save_path).expanduser().absolute()
        _check_writable(path, "--save-path")  # before the lock makes its parent folders
        with terminate_as_interrupt(), target_lock(path):
            return run(*args, full=full, save_path=save_path, **kwargs)

    return wrapper


@_holding_save_path
def run_finetune(
    model_path: str, data: str, *, lora_rank: int | None = None, lora_scale: float | None = None,
    lora_experts: bool = False, full: bool = False, iters: int = 100, batch_size: int = 1,
    learning_rate: float = 1e-4, save_every: int = 100, adapter_path: str | None = None,
    save_path: str | None = None, resume: bool = False, val_data: str | None = None, val_every: int = 50,
    seed: int = 0, report_every: int = 10,
) -> Path:
    """The `finetune` command: read the data, load the model, train (LoRA or `full`) and save; returns the
    output folder (adapters, or with `full` a checkpoint folder at `save_path`)."""
    from .loader import load, resolve_path

    counts = {"--iters": iters, "--batch-size": batch_size, "--lora-rank": lora_rank, "--val-every": val_every,
              "--steps-per-report": report_every}
    _check_options(full, resume, adapter_path, save_path, lora_rank, lora_scale, lora_experts, counts,
                   learning_rate, seed)
    if resume:
        _resume_config(Path(adapter_path or "adapters"), lora_rank, lora_scale, lora_experts)
    records = read_jsonl(data)
    val_records = read_jsonl(val_data) if val_data is not None else None
    source = resolve_path(model_path)
    model, tokenizer = load(source)
    examples = _tokenized(tokenizer, records, data, model.args)
    val_examples = _tokenized(tokenizer, val_records, val_data, model.args) if val_records else None
    mx.random.seed(seed)  # the LoRA A matrices' initialisation
    what, save, out = _trainer(model, source, full=full, resume=resume, adapter_path=adapter_path,
                               save_path=save_path, lora_rank=lora_rank, lora_scale=lora_scale,
                               lora_experts=lora_experts)

    log = lambda line: print(line, file=sys.stderr, flush=True)  # noqa: E731
    n_tok = sum(len(ids) for ids, _ in examples)
    n_par = sum(v.size for _, v in tree_flatten(model.trainable_parameters()))
    val = f", {len(val_examples)} validation examples" if val_examples else ""
    log(f"{len(examples)} examples, {n_tok} tokens{val}; training {what}: {n_par:,} parameters")

    def periodic_save(it):
        save(it)
        log(f"iter {it}: saved to {out}")

    train(model, examples, iters=iters, batch_size=batch_size, learning_rate=learning_rate, seed=seed,
          report_every=report_every, save_every=save_every, save=periodic_save, val_examples=val_examples,
          val_every=val_every, log=log)
    save()
    log(f"saved {'the checkpoint' if full else 'adapters'} to {out}")
    return out
