"""Batched denoising: several requests share every decoder pass (continuous, iteration-level batching).

Each request is prefilled alone (exactly the unbatched math) and joins the batch at the next decoder pass;
every row runs its own canvas schedule (step count, temperature, adaptive stop), so rows join and leave at
any pass instead of waiting for the slowest row's canvas. A row whose canvas is done commits at once and
encodes the canvas alone (`BatchLayerCache.row_view`) while the others go on drafting. Every row draws from
its own random stream in the order a lone run would, so a request's text never depends on what else is in
the batch. Only `verify: "none"`: the speculative commit is one sequence at a time.
"""

from __future__ import annotations

import math
import secrets
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
from mlx_lm.generate import wired_limit

from . import sampler
from .backend import select
from .batch_cache import BatchLayerCache
from .drafter import DrafterConfig, drafter_for
from .errors import DiffusionGemmaError, DrafterConfigError
from .hidden import hidden_token_ids
from .generate import (
    PREFILL_STEP, DenoiseEvent, GenerationResponse, Progress, _new_tokens, _pad_id, _snapshot, check_max_tokens,
    draft_pass, prefill, prompt_to_ids,
)
from .generate import eos_ids as model_eos_ids  # (BatchDenoiser takes an `eos_ids` list)
from .model import SLIDING, Model, ModelArgs
from .noise import MLXNoise, NoiseSource


# What a `BatchDenoiser` counts, with their seconds: decoder passes (the decoder and every row's sampler),
# commits (a canvas encoded, one row each), prefills (a prompt, alone), hand-overs (a finished row's cache).
TIMING = ("decoder_passes", "decoder_seconds", "commits", "commit_seconds", "prefills", "prefill_seconds",
          "handovers", "handover_seconds")


class MemoryBudgetError(DiffusionGemmaError):
    """A request needs more memory than the whole batch budget allows."""


def request_bytes(args: ModelArgs, dtype: mx.Dtype, prompt_tokens: int, max_tokens: int) -> tuple[int, int]:
    """Estimated bytes of one row: (its KV cache at its longest, one canvas pass's activations and logits).

    The cache holds the prompt and every committed canvas but the last (full layers; sliding layers at most
    `window - 1`), plus the canvas's own slots while drafting. Activations: the raw logits, probabilities and
    self-conditioning probabilities (fp32, C x V each), the hidden states and the attention scores.
    """
    C = args.canvas_length
    encoded = prompt_tokens + (math.ceil(max_tokens / C) - 1) * C
    kv = args.kv_bytes(encoded, dtype.size)
    hidden = 4 * args.hidden_size + 3 * args.intermediate_size + 3 * args.top_k_experts * args.moe_intermediate_size
    scores = 4 * args.num_attention_heads * (encoded + C)
    return kv, C * (3 * 4 * args.vocab_size + dtype.size * hidden + scores)


@dataclass
class _Row:
    id: int
    ids: list[int]
    noise: NoiseSource
    max_tokens: int
    kv_bytes: int
    activation_bytes: int
    generated: int = 0  # tokens committed that count against `max_tokens`
    canvases: int = 0
    encoded: list[int] | None = None  # the committed canvases written to the cache after the prompt
    start: list | None = None  # a cache already holding the first `cached` ids (a reused prefix)
    cached: int = 0
    drafts: bool = False  # yield a "draft" event after every decoder pass
    # The canvas being drafted: passes left (the schedule's step, counting down), the next pass's input, its
    # self-conditioning, the latest argmax, the stop test's history, passes run, and whether it stopped.
    n: int = 0
    x: mx.array | None = None
    sc: mx.array | None = None
    argmax: mx.array | None = None
    history: tuple = ()
    steps: int = 0
    stop: mx.array | None = None


def check_batch_drafter(name: str, verify: str) -> None:
    """Refuse a drafter that batches cannot run, in one line."""
    if verify != "none":
        raise DrafterConfigError(
            f'drafter {name!r} has verify "{verify}": batches run verify "none" only '
            '(the speculative commit is one sequence at a time); run it alone or pick a verify "none" drafter'
        )


class BatchDenoiser:
    """The engine, on token ids: `submit` requests at any time; each `step` runs one decoder pass for the batch.

    `step` yields `(request id, DenoiseEvent)` as things happen: "admit" (a request leaves the queue; its
    prefill starts), "encode" (its prompt, later each committed canvas), "draft" (rows submitted with
    `drafts`), "commit" (a row's canvas is done; `finished`: it was its last). A request leaves after the
    commit that reaches EOS or its `max_tokens`. `memory_budget` (bytes, see `request_bytes`; weights not
    included) and `max_batch` bound the batch; a request that does not fit
    waits in the queue until rows leave. `cancel` lets a request go at the next decoder pass. `prefilled(id,
    cache)`, when set, is handed each request's own cache right after its prefill (before it joins the batch);
    `finished(id, cache, ids)`, when set, each request that ends by a commit (not a cancel): a cache of its
    own holding `ids`, the prompt and the whole reply as written (its last canvas up to EOS encoded for it).
    """

    def __init__(self, model: Model, drafter: DrafterConfig, eos_ids: Sequence[int], pad_id: int | None, *,
                 memory_budget: int | None = None, max_batch: int | None = None, prefill_step: int = PREFILL_STEP):
        check_batch_drafter(drafter.name, drafter.verify)
        if max_batch is not None and max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        self.model, self.drafter, self.eos_ids, self.pad_id = model, drafter, list(eos_ids), pad_id
        self.memory_budget, self.max_batch, self.prefill_step = memory_budget, max_batch, prefill_step
        w = model.args.sliding_window
        self.cache = [BatchLayerCache(w if t == SLIDING else None) for t in model.args.layer_types]
        self.rows: list[_Row] = []
        self.queue: deque[_Row] = deque()
        self._next_id = 0
        self.backend = select()
        self.prefilled: Callable[[int, list], None] | None = None
        self.finished: Callable[[int, list, list[int]], None] | None = None
        self.cancelled: set[int] = set()  # asked to stop, not yet removed
        self.dropped: list[int] = []  # removed after a cancel (the caller clears it)
        # Every key from the start: another thread may read it while this one counts.
        self.timing: Counter[str] = Counter(dict.fromkeys(TIMING, 0))

    def submit(self, ids: Sequence[int], noise: NoiseSource, max_tokens: int, *, start: list | None = None,
               cached: int = 0, drafts: bool = False) -> int:
        """Queue a request; returns its id. Raises `MemoryBudgetError` if it could never fit the budget.

        `start`: a cache that already holds `ids[:cached]` (exactly what prefilling them would write); only
        the rest is prefilled. `drafts`: the step yields this request's argmax canvas after every pass.
        """
        check_max_tokens(max_tokens)
        kv, act = request_bytes(self.model.args, self.model.dtype, len(ids), max_tokens)
        if self.memory_budget is not None and kv + act > self.memory_budget:
            raise MemoryBudgetError(
                f"a {len(ids)}-token prompt with max_tokens {max_tokens} needs about {(kv + act) / 1e6:.1f} MB, "
                f"over the batch memory budget of {self.memory_budget / 1e6:.1f} MB; raise the budget or "
                "shorten the request"
            )
        row = _Row(self._next_id, list(ids), noise, max_tokens, kv, act, start=start, cached=cached, drafts=drafts)
        self._next_id += 1
        self.queue.append(row)
        return row.id

    @property
    def idle(self) -> bool:
        return not self.rows and not self.queue

    def cancel(self, request: int) -> None:
        """Let a request go at the next decoder pass, with its memory (safe to call from another thread)."""
        self.cancelled.add(request)  # one atomic set insertion: the engine's thread does the rest

    def _drop_cancelled(self) -> None:
        """Remove cancelled requests, queued or running."""
        if not self.cancelled:
            return
        gone = set(self.cancelled)
        self.cancelled -= gone
        self.dropped += [row.id for row in [*self.queue, *self.rows] if row.id in gone]
        self.queue = deque(row for row in self.queue if row.id not in gone)
        self._keep([r for r, row in enumerate(self.rows) if row.id not in gone])

    def _keep(self, keep: list[int]) -> None:
        if len(keep) < len(self.rows):
            for layer in self.cache:
                layer.keep_rows(keep)
            self.rows = [self.rows[r] for r in keep]

    def batch_bytes(self, rows: Sequence[_Row] | None = None) -> int:
        """Estimated memory of a batch: aligned rows each span about the longest row's cache."""
        rows = self.rows if rows is None else rows
        return len(rows) * max((r.kv_bytes for r in rows), default=0) + sum(r.activation_bytes for r in rows)

    def _fits(self, row: _Row) -> bool:
        if self.max_batch is not None and len(self.rows) >= self.max_batch:
            return False
        return self.memory_budget is None or self.batch_bytes([*self.rows, row]) <= self.memory_budget

    def _new_canvas(self, row: _Row) -> None:
        C, V = self.drafter.canvas_length, self.model.args.vocab_size
        row.n, row.x, row.sc, row.argmax = self.drafter.max_denoising_steps, row.noise.randint((1, C), V), None, None
        row.history, row.steps, row.stop = (), 0, None

    # The state is consistent at every yield, so a caller may stop iterating a step at any event.
    def _admit(self) -> Iterator[tuple[int, DenoiseEvent]]:
        while self.queue and self._fits(self.queue[0]):
            row = self.queue[0]
            ids = mx.array([row.ids])
            yield row.id, DenoiseEvent("admit", ids, 0, 0)
            cache = row.start if row.start is not None else self.model.make_cache()
            # alone: exactly the unbatched prefill (a reused prefix holds what prefilling it would write)
            tic = time.perf_counter()
            prefill(self.model, ids[:, row.cached :], cache, self.prefill_step)
            self._count("prefills", "prefill_seconds", tic)
            row.start = None
            if self.prefilled is not None:
                self.prefilled(row.id, cache)
            for batch_layer, layer in zip(self.cache, cache):
                batch_layer.join(layer)
            self._new_canvas(row)
            self.rows.append(self.queue.popleft())
            yield row.id, DenoiseEvent("encode", ids, 0, 0)

    def _self_conditioning(self) -> mx.array | None:
        """The rows' self-conditioning probabilities; a row on its canvas's first pass has none, and zeros
        add exactly nothing (the self-conditioning MLP has no biases and maps 0 to 0)."""
        if all(row.sc is None for row in self.rows):
            return None
        if len(self.rows) == 1:
            return self.rows[0].sc
        some = next(row.sc for row in self.rows if row.sc is not None)  # (on split ranks, this rank's share of V)
        return mx.concatenate([mx.zeros(some.shape, some.dtype) if row.sc is None else row.sc for row in self.rows])

    def step(self) -> Iterator[tuple[int, DenoiseEvent]]:
        """Admit what fits, run one decoder pass for every row, commit the rows whose canvas is done."""
        left = self._done()  # a caller that stopped at a draft event left these uncommitted
        if left:
            yield from self._commit(left)
        self._drop_cancelled()
        yield from self._admit()
        self._drop_cancelled()
        if not self.rows:
            return
        tic = time.perf_counter()
        x = mx.concatenate([row.x for row in self.rows])
        logits = self.model.decode(x, self.cache, self_conditioning_probs=self._self_conditioning(),
                                   softcap_kernel=self.backend.softcap)
        d = self.drafter
        for r, row in enumerate(self.rows):  # each row's own step of its own schedule, as a lone run takes it
            row.x, row.argmax, row.sc, ent = draft_pass(self.model, logits[r : r + 1], row.n, d, row.noise,
                                                        self.backend)
            if d.adaptive_stop and row.n > 1:
                row.stop, row.history = sampler.stop_test(row.argmax, row.history, ent, d.stability_threshold,
                                                          d.confidence_threshold)
            row.n, row.steps = row.n - 1, row.steps + 1
        mx.eval([a for row in self.rows for a in (row.x, row.argmax, row.sc, row.stop) if a is not None])
        self._count("decoder_passes", "decoder_seconds", tic)
        for row in self.rows:
            if row.drafts:
                yield row.id, DenoiseEvent("draft", row.argmax, row.canvases, row.steps)
        done = self._done()
        if done:
            yield from self._commit(done)

    def _done(self) -> list[int]:
        """Rows whose canvas is drafted: its last step ran, or its adaptive stop fired."""
        return [r for r, row in enumerate(self.rows) if row.n == 0 or (row.stop is not None and row.stop.item())]

    def _commit(self, done: list[int]) -> Iterator[tuple[int, DenoiseEvent]]:
        """Commit these rows' canvases: a row that reached EOS or its budget leaves, the others encode theirs
        (alone, at the positions it was drafted at) and start their next canvas."""
        events, leave = [], set()
        for r in done:
            row = self.rows[r]
            committed, _ = sampler.finalize_eos(row.argmax, self.eos_ids, self.pad_id)
            canvas = committed[0].tolist()
            room = row.max_tokens - row.generated
            new, hit_eos = _new_tokens(canvas, self.eos_ids, room)
            row.generated += len(new)
            leaves = hit_eos or row.generated >= row.max_tokens
            if leaves and self.finished is not None:
                end = next((i + 1 for i, t in enumerate(canvas) if t in self.eos_ids), None) if hit_eos else room
                self._hand_over(r, row, canvas[:end])
            events.append((row.id, DenoiseEvent("commit", committed, row.canvases, row.steps, mx.array([leaves]))))
            row.canvases += 1
            if leaves:
                leave.add(r)
                continue
            self._encode_row(r, canvas)
            row.encoded = [*(row.encoded or []), *canvas]
            self._new_canvas(row)
            events.append((row.id, DenoiseEvent("encode", committed, row.canvases, 0)))
        self._keep([r for r in range(len(self.rows)) if r not in leave])
        yield from events

    def _encode_row(self, r: int, tokens: list[int]) -> None:
        tic = time.perf_counter()
        views = [layer.row_view(r) for layer in self.cache]
        self.model.encode(mx.array([tokens]), views)
        for layer, view in zip(self.cache, views):
            layer.put_row(r, view)
        mx.eval([c.keys for c in self.cache] + [c.values for c in self.cache])
        self._count("commits", "commit_seconds", tic)

    def _count(self, what: str, seconds: str, tic: float) -> None:
        self.timing[what] += 1
        self.timing[seconds] += time.perf_counter() - tic

    def _hand_over(self, r: int, row: _Row, tail: list[int]) -> None:
        """Hand `finished` a cache of row r's own, with the reply's `tail` (its last canvas, never encoded in
        the batch) encoded into it, and the ids it holds."""
        tic = time.perf_counter()
        cache = [layer.row_view(r) for layer in self.cache]
        if tail:
            self.model.encode(mx.array([tail]), cache)
            mx.eval([c.keys for c in cache] + [c.values for c in cache])
        self._count("handovers", "handover_seconds", tic)
        self.finished(row.id, cache, [*row.ids, *(row.encoded or []), *tail])


class BatchGenerator:
    """Continuous batching over prompts: `submit` at any time; each `step` runs one decoder pass for the batch
    and yields the responses of the canvases it completed.

    Responses carry the same text and statistics `stream_generate` gives the same prompt and seed (timings
    are the request's own, while it shared the passes). Used by `stream_batch` and `batch_generate`.
    """

    def __init__(self, model: Model, tokenizer, *, drafter: DrafterConfig | str | Path | None = None,
                 memory_budget: int | None = None, max_batch: int | None = None, prefill_step: int = PREFILL_STEP):
        drafter = drafter_for(model, drafter)
        self.model, self.tokenizer, self.drafter = model, tokenizer, drafter
        self.eos = model_eos_ids(model, tokenizer)
        self.hidden = hidden_token_ids(model, tokenizer)
        self.engine = BatchDenoiser(model, drafter, self.eos, _pad_id(model), memory_budget=memory_budget,
                                    max_batch=max_batch, prefill_step=prefill_step)
        self.progress: dict[int, Progress] = {}
        self._unread: deque[tuple[int, GenerationResponse]] = deque()  # committed, not handed out yet

    def submit(self, prompt: str | list[dict[str, Any]] | list[int] | mx.array, *, max_tokens: int = 256,
               seed: int | None = None, chat_template: bool = True,
               chat_template_kwargs: dict[str, Any] | None = None, prefix: tuple[list, int] | None = None,
               draft_preview: bool = False) -> int:
        """Queue a prompt (as for `stream_generate`); returns its request id. It joins at the next step (decoder
        pass) that has room for it. `prefix`: `(cache, n)`, a cache holding the first n prompt tokens (reused, not
        encoded again); `draft_preview`: also yield a response with `draft` set after every decoder pass."""
        seed = secrets.randbits(31) if seed is None else seed
        ids = prompt_to_ids(self.tokenizer, prompt, chat_template, chat_template_kwargs)
        start, cached = prefix if prefix is not None else (None, 0)
        request = self.engine.submit(ids, MLXNoise(seed), max_tokens, start=start, cached=cached,
                                     drafts=draft_preview)
        stats = GenerationResponse(prompt_tokens=len(ids), prompt_cached=cached, drafter=self.drafter.name,
                                   seed=seed)
        self.progress[request] = Progress(stats, time.perf_counter(), self.tokenizer.detokenizer, self.eos, max_tokens,
                                           self.hidden)
        return request

    @property
    def idle(self) -> bool:
        """Nothing running, nothing waiting and nothing left unread."""
        return self.engine.idle and not self._unread

    def cancel(self, request: int) -> None:
        """Stop a request: it leaves the batch at the next decoder pass (safe to call from another thread)."""
        self.engine.cancel(request)

    def step(self) -> Iterator[tuple[int, GenerationResponse]]:
        """One decoder pass for the batch: yields `(request id, response)` per row that commits a canvas; a
        response with `finish_reason` set is the request's last. Draft previews come as they happen. A caller
        may stop iterating anywhere: what it left unread (a pass's commits after a preview, responses after the
        one it stopped at) comes from the next step."""
        for request, event in self.engine.step():
            progress = self.progress[request]
            progress.stats.canvas, progress.stats.step = event.canvas, event.steps
            if event.kind == "draft":  # yielded at once, for live views
                yield request, _snapshot(progress.stats, draft=event.tokens[0].tolist())
            elif event.kind == "admit":  # its prefill starts: the prompt's tokens/s count from here
                progress.tic = time.perf_counter()
            elif event.kind == "encode":
                progress.encode(event.tokens[0].tolist())
            elif event.kind == "commit":
                self._unread.append((request, progress.commit(event.tokens[0].tolist(), event.steps)))
                if event.finished.item() and progress.stats.finish_reason is None:
                    self._unread.append((request, progress.end()))  # its canvases ran out, as alone
                if progress.stats.finish_reason is not None:
                    del self.progress[request]
        for request in self.engine.dropped:
            self.progress.pop(request, None)
        self.engine.dropped.clear()
        while self._unread:  # taken off as handed out: what a caller leaves unread comes first next step
            yield self._unread.popleft()


def _per_prompt(value, count: int, name: str) -> list:
    values = list(value) if isinstance(value, Sequence) and not isinstance(value, str) else [value] * count
    if len(values) != count:
        raise ValueError(f"{name}: {len(values)} values for {count} prompts")
    return values


def stream_batch(model: Model, tokenizer, prompts: Sequence, *, seeds: Sequence[int | None] | None = None,
                 max_tokens: int | Sequence[int] = 256, drafter: DrafterConfig | str | Path | None = None,
                 memory_budget: int | None = None, max_batch: int | None = None,
                 **prompt_options) -> Iterator[tuple[int, GenerationResponse]]:
    """Generate for several prompts at once, yielding `(prompt index, response)` per committed canvas.

    `seeds` and `max_tokens` are one per prompt (or one `max_tokens` for all); `prompt_options` are
    `chat_template` and `chat_template_kwargs`, as for `stream_generate`. Each prompt's responses are exactly
    what `stream_generate` yields for it with the same seed (draft previews aside).
    """
    batch = BatchGenerator(model, tokenizer, drafter=drafter, memory_budget=memory_budget, max_batch=max_batch)
    seeds = _per_prompt(seeds, len(prompts), "seeds")
    budgets = _per_prompt(max_tokens, len(prompts), "max_tokens")
    index = {batch.submit(p, seed=s, max_tokens=m, **prompt_options): i
             for i, (p, s, m) in enumerate(zip(prompts, seeds, budgets))}
    mx.reset_peak_memory()
    with wired_limit(model):  # Metal: keep the weights resident; a no-op elsewhere
        while not batch.idle:
            for request, response in batch.step():
                yield index[request], response


def batch_generate(model: Model, tokenizer, prompts: Sequence, **kwargs) -> list[GenerationResponse]:
    """One final response per prompt, in order, with the whole text and tokens (arguments as for
    `stream_batch`)."""
    texts: list[list[str]] = [[] for _ in prompts]
    tokens: list[list[int]] = [[] for _ in prompts]
    final: list[GenerationResponse | None] = [None] * len(prompts)
    for i, response in stream_batch(model, tokenizer, prompts, **kwargs):
        texts[i].append(response.text)
        tokens[i] += response.tokens
        if response.finish_reason is not None:
            response.text, response.tokens, final[i] = "".join(texts[i]), tokens[i], response
    return final
