"""The denoising loop (canvas drafter + commit pass) and the Python generation API.

`denoise` is the one generator that drives the model; `stream_generate` adds the tokenizer, limits and
statistics; `generate` collects a string. Spec: reference-spec.md section 5.
"""

from __future__ import annotations

import math
import secrets
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlx.core as mx
from mlx_lm.generate import wired_limit

from . import sampler, speculative
from .backend import Backend, select
from .cache import LayerCache, PromptCache
from .drafter import DrafterConfig, drafter_for
from .hidden import hidden_token_ids, visible
from .model import Model
from .noise import MLXNoise, NoiseSource, check_seed

PREFILL_STEP = 2048


@dataclass
class DenoiseEvent:
    """What `denoise` yields: each encoder pass, a draft after every decoder pass, and each committed canvas."""

    kind: str  # "encode" | "draft" | "commit"
    # encode: the ids just written to the cache (the prompt, or a committed canvas); draft: the current argmax
    # canvas; commit: the committed tokens ("none": the whole canvas, pad after EOS; "ar": the accepted ones)
    tokens: mx.array
    canvas: int
    steps: int  # decoder passes so far in this canvas
    finished: mx.array | None = None  # commit: bool [B], rows that have emitted EOS
    drafted: int = 0  # commit under "ar": canvas positions the verify pass checked


def prefill(
    model: Model, ids: mx.array, cache: list[LayerCache], step: int = PREFILL_STEP, logits: bool = False
) -> mx.array | None:
    """Encode `ids` [B, L] into `cache` in chunks, so long prompts never build one L x L attention.

    With `logits` the causal LM's logits at the last position, `[B, 1, V]`, are returned.
    """
    out = None
    for start in range(0, ids.shape[1], step):
        last = start + step >= ids.shape[1]
        out = model.encode(ids[:, start : start + step], cache, logits="last" if logits and last else None)
        mx.eval([c.keys for c in cache] + [c.values for c in cache] + ([] if out is None else [out]))
    return out


def _accept(drafter: DrafterConfig, ent: mx.array, total: mx.array) -> mx.array:
    if drafter.acceptance == "confidence":
        return sampler.confidence_accept(1.0 / total, drafter.confidence_accept_threshold)
    return sampler.entropy_bound_accept(ent, drafter.entropy_bound)


def _pinned(canvas: mx.array, first: mx.array | None) -> mx.array:
    return canvas if first is None else mx.concatenate([first[:, None], canvas[:, 1:]], axis=1)


def draft_pass(model: Model, logits: mx.array, n: int, drafter: DrafterConfig, noise: NoiseSource,
               backend: Backend, first: mx.array | None = None):
    """The sampler's half of denoising step `n` (counting down to 1) over one decoder pass's logits.

    Returns `(next input, argmax, self-conditioning probs, entropy)`; on the last step only the argmax is
    computed (it is committed) and the others are None, though that step's draws are still consumed. The
    re-noise ids span the model's vocabulary: on split ranks the logits hold only this rank's share of it.
    """
    B, C, V = *logits.shape[:2], model.args.vocab_size
    temp = sampler.temperature(n, drafter.max_denoising_steps, drafter.t_min, drafter.t_max)
    if n == 1:
        noise.skip_categorical((B, C))
        noise.randint((B, C), V)
        return None, _pinned(backend.argmax(logits, temp), first), None, None
    ent, total, argmax, probs, sc = backend.vocab_stats(logits, temp, model.dtype)
    sample = noise.categorical(probs)
    x = _pinned(sampler.renoise(sample, _accept(drafter, ent, total), noise.randint((B, C), V)), first)
    return x, _pinned(argmax, first), sc, ent


def denoise_canvas(model: Model, cache, drafter: DrafterConfig, noise: NoiseSource, batch: int,
                   first: mx.array | None = None, backend: Backend | None = None):
    """Draft one canvas: yields `(argmax canvas, steps)` after every decoder pass; the last is committed.

    `first` ([B] ids), when given, is known to open the canvas (the verifier's choice): it is held fixed in
    every pass's input and output, like a position that is never noised. `backend` runs the passes over the
    vocabulary (default: `backend.select()` for the default device). Rows whose adaptive stop fires keep their
    canvas while the others go on (reference 1.c.iv); the batch engine instead runs each row's canvas on its
    own schedule (`batch.BatchDenoiser`).
    """
    N, V, C = drafter.max_denoising_steps, model.args.vocab_size, drafter.canvas_length
    backend = backend or select()
    x = _pinned(noise.randint((batch, C), V), first)
    sc, argmax, history = None, x, ()
    done = mx.zeros((batch,), dtype=mx.bool_)
    for n in range(N, 0, -1):
        logits = model.decode(x, cache, self_conditioning_probs=sc, softcap_kernel=backend.softcap)
        x_new, new_argmax, new_sc, ent = draft_pass(model, logits, n, drafter, noise, backend, first)
        if n == 1:
            argmax = mx.where(done[:, None], argmax, new_argmax) if drafter.adaptive_stop else new_argmax
            mx.eval(argmax)
            yield argmax, N
            return
        if drafter.adaptive_stop:
            if batch > 1 and n < N:
                # Rows that already stopped keep their canvas, argmax and self-conditioning (reference 1.c.iv).
                new_argmax = mx.where(done[:, None], argmax, new_argmax)
                x_new = mx.where(done[:, None], x, x_new)
                new_sc = mx.where(done[:, None, None], sc, new_sc)
            stop, history = sampler.stop_test(
                new_argmax, history, ent, drafter.stability_threshold, drafter.confidence_threshold
            )
            done = done | stop
        x, argmax, sc = x_new, new_argmax, new_sc
        # Not a sync: the sampling runs while the caller takes the draft and the next pass's graph is built.
        mx.async_eval(x, argmax, sc, done)
        yield argmax, N - n + 1
        # The stop test's sync; on the CPU backend the host vocabulary pass also waits for each pass's logits.
        if drafter.adaptive_stop and done.all().item():
            return


def denoise(
    model: Model,
    prompt_ids: mx.array,
    drafter: DrafterConfig,
    noise: NoiseSource,
    num_canvases: int,
    eos_ids: Sequence[int],
    pad_id: int | None,
    cache: list[LayerCache] | None = None,
    prefill_step: int = PREFILL_STEP,
    max_tokens: int | None = None,
) -> Iterator[DenoiseEvent]:
    """Prefill the prompt, then draft and commit canvases until EOS or the token budget.

    `verify: "none"` commits up to `num_canvases` whole argmax canvases; each is encoded at the start of the
    next one, at the positions it was drafted at, and the last is never encoded, as in the reference.
    `verify: "ar"` hands each draft to `speculative.verify` and commits what the causal encoder accepts, until
    `max_tokens` tokens are committed (without `max_tokens`: `num_canvases` drafts, or their length in tokens).
    """
    cache = model.make_cache() if cache is None else cache
    backend = select()
    if drafter.verify == "ar":
        # Without a token budget, `num_canvases` drafts are verified (bench); with one, as many as it takes.
        canvases = num_canvases if max_tokens is None else max_tokens
        budget = num_canvases * drafter.canvas_length if max_tokens is None else max_tokens
        yield from _denoise_verified(model, prompt_ids, drafter, noise, budget, canvases, eos_ids, cache,
                                     prefill_step, backend)
        return
    batch = prompt_ids.shape[0]
    prefill(model, prompt_ids, cache, prefill_step)
    yield DenoiseEvent("encode", prompt_ids, 0, 0)
    finished = mx.zeros((batch,), dtype=mx.bool_)
    committed = None
    for index in range(num_canvases):
        if committed is not None:
            model.encode(committed, cache)
            mx.eval([c.keys for c in cache])
            yield DenoiseEvent("encode", committed, index, 0)
        argmax, steps = None, 0
        for argmax, steps in denoise_canvas(model, cache, drafter, noise, batch, backend=backend):
            yield DenoiseEvent("draft", argmax, index, steps)
        committed, has_eos = sampler.finalize_eos(argmax, eos_ids, pad_id, finished)
        finished = finished | has_eos
        mx.eval(committed, finished)
        yield DenoiseEvent("commit", committed, index, steps, finished)
        if finished.all().item():
            return


def _denoise_verified(model, prompt_ids, drafter, noise, budget, canvases, eos_ids, cache, prefill_step, backend):
    """The speculative commit: draft a canvas opening with the encoder's next token, let the encoder verify it.

    Every committed token is the causal encoder's greedy choice after the tokens before it, so the text is
    the encoder's greedy decoding whatever the drafter does; a better draft only means more tokens per verify.
    """
    if prompt_ids.shape[0] != 1:
        raise ValueError('verify "ar" generates one sequence at a time (batch of 1)')
    logits = prefill(model, prompt_ids, cache, prefill_step, logits=True)
    yield DenoiseEvent("encode", prompt_ids, 0, 0)
    following = mx.argmax(logits[:, -1], axis=-1).astype(mx.int32)
    done, index = 0, 0
    while done < budget and index < canvases:
        argmax, steps = None, 0
        for argmax, steps in denoise_canvas(model, cache, drafter, noise, 1, first=following, backend=backend):
            yield DenoiseEvent("draft", argmax, index, steps)
        room = min(budget - done, drafter.canvas_length)
        result = speculative.verify(model, cache, argmax[:, :room], following, eos_ids, drafter.verify_min_prob)
        yield DenoiseEvent("encode", result.encoded, index, 0)
        tokens = result.tokens
        yield DenoiseEvent("commit", tokens, index, steps, mx.array([result.eos]), drafted=room)
        done += tokens.shape[1]
        if result.eos:
            return
        following, index = result.following, index + 1


@dataclass
class GenerationResponse:
    """One streamed update: newly committed text (or a draft preview) plus running statistics."""

    text: str = ""
    tokens: list[int] = field(default_factory=list)
    draft: list[int] | None = None
    canvas: int = 0
    step: int = 0
    prompt_tokens: int = 0
    prompt_cached: int = 0  # leading prompt tokens reused from a PromptCache (not encoded again)
    prompt_tps: float = 0.0
    generation_tokens: int = 0
    generation_tps: float = 0.0
    generation_time: float = 0.0  # seconds since the prefill ended (denoising and commit passes)
    canvases: int = 0
    steps_per_canvas: list[int] = field(default_factory=list)
    total_steps: int = 0  # decoder passes
    encoder_passes: int = 0  # the prompt's prefill, then one per canvas committed into the cache
    accepted_per_canvas: list[int] = field(default_factory=list)  # verify "ar": tokens each verify committed
    tokens_per_forward: float = 0.0
    peak_memory: float = 0.0
    finish_reason: str | None = None
    drafter: str = ""
    seed: int = 0

    @property
    def model_passes(self) -> int:
        """Decoder plus encoder passes: the cost of the generation in forward passes of the model."""
        return self.total_steps + self.encoder_passes

    @property
    def accepted_per_verify(self) -> float:
        return sum(self.accepted_per_canvas) / max(len(self.accepted_per_canvas), 1)


def prompt_to_ids(tokenizer, prompt, chat_template: bool = True, chat_template_kwargs=None) -> list[int]:
    """A string (chat template applied unless told not to), a list of chat messages, or token ids."""
    if isinstance(prompt, mx.array):
        return prompt.reshape(-1).tolist()
    if isinstance(prompt, (list, tuple)) and all(isinstance(t, int) for t in prompt):
        return list(prompt)
    if isinstance(prompt, str) and not chat_template:
        return tokenizer.encode(prompt)
    from .loader import apply_chat_template

    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    return apply_chat_template(tokenizer, messages, add_generation_prompt=True, **(chat_template_kwargs or {}))


def eos_ids(model: Model, tokenizer) -> list[int]:
    """The tokenizer's EOS ids, then any more the checkpoint's generation config names (each once)."""
    ids = list(getattr(tokenizer, "eos_token_ids", None) or [])
    gen = model.generation_config
    extra = gen.get("eos_token_id")
    for i in extra if isinstance(extra, list) else [extra]:
        if isinstance(i, int) and i not in ids:
            ids.append(i)
    return ids


_eos_ids = eos_ids  # the name batch.py and callers outside this module imported first


def _pad_id(model: Model) -> int:
    pad = model.generation_config.get("pad_token_id")
    return model.args.pad_token_id if pad is None else pad


def check_max_tokens(max_tokens: int) -> None:
    if max_tokens < 1:
        raise ValueError("max_tokens must be at least 1")


def stream_generate(
    model: Model,
    tokenizer,
    prompt: str | list[dict[str, Any]] | list[int] | mx.array,
    *,
    max_tokens: int = 256,
    drafter: DrafterConfig | str | Path | None = None,
    seed: int | None = None,
    noise: NoiseSource | None = None,
    chat_template: bool = True,
    chat_template_kwargs: dict[str, Any] | None = None,
    draft_preview: bool = False,
    prefill_step: int = PREFILL_STEP,
    prompt_cache: PromptCache | None = None,
) -> Iterator[GenerationResponse]:
    """Generate text canvas by canvas, yielding each newly committed piece with running statistics.

    Args:
        model, tokenizer: from `mlx_diffusiongemma.load`.
        prompt: a string (the chat template is applied unless `chat_template=False`), a list of chat
            messages, or token ids.
        max_tokens: the most tokens returned; canvases are drafted whole, as in the reference, and the
            text is cut at this length (`finish_reason == "length"`).
        drafter: a `DrafterConfig`, a preset name (`reference`, `fast`) or a JSON path; default `reference`.
        seed: seeds the default random source; None picks one (reported in `response.seed`).
        noise: an explicit random source (overrides `seed`), e.g. `NumpyNoise` for replay.
        draft_preview: also yield a response after every denoising step, with `draft` set to the
            current argmax canvas (for live views).
        prompt_cache: a conversation's `PromptCache`; only the prompt tokens after what it holds are
            encoded, and it is updated to hold this turn (all canvases but the last, never encoded).

    Yields:
        `GenerationResponse`; the last one has `finish_reason` "stop" (EOS) or "length".
    """
    drafter = drafter_for(model, drafter)
    seed = secrets.randbits(31) if seed is None else check_seed(seed)
    noise = MLXNoise(seed) if noise is None else noise
    ids = prompt_to_ids(tokenizer, prompt, chat_template, chat_template_kwargs)
    check_max_tokens(max_tokens)
    detok = tokenizer.detokenizer
    detok.reset()
    eos = eos_ids(model, tokenizer)
    prompt_cache = PromptCache() if prompt_cache is None else prompt_cache
    layers, reused = prompt_cache.take(ids, model.make_cache)
    stats = GenerationResponse(prompt_tokens=len(ids), prompt_cached=reused, drafter=drafter.name, seed=seed)
    mx.reset_peak_memory()
    tic = time.perf_counter()
    events = denoise(
        model, mx.array([ids[reused:]]), drafter, noise, math.ceil(max_tokens / drafter.canvas_length),
        eos, _pad_id(model), cache=layers, prefill_step=prefill_step, max_tokens=max_tokens,
    )

    def finished(encoded: list[int]) -> None:
        prompt_cache.layers, prompt_cache.tokens = layers, ids + encoded

    with wired_limit(model):  # Metal: keep the weights resident; a no-op elsewhere
        yield from _responses(events, stats, tic, detok, eos, max_tokens, draft_preview, finished,
                              hidden_token_ids(model, tokenizer))


class Progress:
    """One generation's text and running statistics, fed what the loop encodes and commits for it.

    Shared by `stream_generate` and the batch engine, so a batched request reports exactly what a lone one does.
    """

    def __init__(self, stats: GenerationResponse, tic: float, detok, eos: Sequence[int], max_tokens: int,
                 hidden: frozenset[int] = frozenset()):
        self.stats, self.tic, self.detok, self.eos, self.max_tokens = stats, tic, detok, eos, max_tokens
        self.hidden = hidden  # token ids that are never text (see `hidden.py`)
        self.gen_start: float | None = None
        self.encoded: list[int] = []  # committed tokens written to the cache after the prompt

    def encode(self, tokens: list[int]) -> None:
        """An encoder pass: the prompt's prefill first, then committed canvases."""
        stats = self.stats
        stats.encoder_passes += 1
        if self.gen_start is None:  # the prompt's prefill
            self.gen_start = time.perf_counter()
            stats.prompt_tps = (stats.prompt_tokens - stats.prompt_cached) / max(self.gen_start - self.tic, 1e-9)
        else:
            self.encoded += tokens

    def commit(self, committed: list[int], steps: int, drafted: int = 0) -> GenerationResponse:
        """A committed canvas: the new text, cut at EOS or `max_tokens` (then `finish_reason` is set)."""
        stats, detok = self.stats, self.detok
        stats.canvases += 1
        stats.steps_per_canvas.append(steps)
        stats.total_steps += steps
        if drafted:
            stats.accepted_per_canvas.append(len(committed))
        new, hit_eos = _new_tokens(committed, self.eos, self.max_tokens - stats.generation_tokens, self.hidden)
        for t in new:
            detok.add_token(t)
        stats.generation_tokens += len(new)
        stats.tokens_per_forward = stats.generation_tokens / max(stats.total_steps, 1)
        stats.generation_time = time.perf_counter() - self.gen_start
        stats.generation_tps = stats.generation_tokens / max(stats.generation_time, 1e-9)
        stats.peak_memory = mx.get_peak_memory() / 1e9
        if hit_eos or stats.generation_tokens >= self.max_tokens:
            detok.finalize()
            stats.finish_reason = "stop" if hit_eos else "length"
        return _snapshot(stats, text=detok.last_segment, tokens=new)

    def end(self) -> GenerationResponse:
        """The loop ended before the token budget (only when `max_tokens` exceeds what the canvases held)."""
        self.stats.finish_reason = "length"
        self.detok.finalize()
        return _snapshot(self.stats, text=self.detok.last_segment)


def _responses(events, stats, tic, detok, eos, max_tokens, draft_preview, finished, hidden=frozenset()):
    """Turn loop events into responses: detokenise, cut at EOS or `max_tokens`, keep the statistics."""
    progress = Progress(stats, tic, detok, eos, max_tokens, hidden)
    for event in events:
        stats.canvas, stats.step = event.canvas, event.steps
        if event.kind == "encode":
            progress.encode(event.tokens[0].tolist())
            continue
        if event.kind == "draft":
            if draft_preview:
                yield _snapshot(stats, draft=event.tokens[0].tolist())
            continue
        response = progress.commit(event.tokens[0].tolist(), event.steps, event.drafted)
        if stats.finish_reason is not None:
            finished(progress.encoded)
            yield response
            return
        yield response
    finished(progress.encoded)
    yield progress.end()


def _new_tokens(canvas: list[int], eos: Sequence[int], room: int, hidden=frozenset()) -> tuple[list[int], bool]:
    """The canvas's text tokens up to its first EOS, without hidden ones (pad...), at most `room` of them;
    and whether the EOS was reached within `room`."""
    for i, t in enumerate(canvas):
        if t in eos:
            new = visible(canvas[:i], hidden)
            return new[:room], len(new) <= room
    return visible(canvas, hidden)[:room], False


def _snapshot(stats: GenerationResponse, **changes) -> GenerationResponse:
    from dataclasses import replace

    lists = {"steps_per_canvas": list(stats.steps_per_canvas), "accepted_per_canvas": list(stats.accepted_per_canvas)}
    return replace(stats, **lists, **changes)


def generate(model: Model, tokenizer, prompt, **kwargs) -> str:
    """Generate and return the whole text (keyword arguments as for `stream_generate`)."""
    return "".join(r.text for r in stream_generate(model, tokenizer, prompt, **kwargs) if r.draft is None)
