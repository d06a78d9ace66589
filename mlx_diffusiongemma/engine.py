"""The server's engine: one thread owns the model, the running batches and the prompt cache.

Requests come in from the HTTP layer's threads (`submit`, `cancel`) and leave as a stream of
`GenerationResponse`s handed to each job's `emit`. Requests that share a drafter config share one continuous
batch (`BatchGenerator`: rows join and leave at any decoder pass and each row has its own random stream, so a
request's text does not depend on its neighbours); a `verify: "ar"` drafter runs one request at a time through
`stream_generate`. The engine runs one step of each busy lane in turn (a decoder pass of a batch, a canvas of
the one-at-a-time lane).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx
from mlx_lm.generate import wired_limit

from .batch import TIMING, BatchGenerator
from .drafter import DrafterConfig
from .generate import GenerationResponse, stream_generate
from .cache import PromptCache
from .prefix_cache import PrefixCache

log = logging.getLogger("mlx_diffusiongemma.serve")


class EngineBusy(Exception):
    """Every row and queue slot is taken (the server answers 429)."""


class EngineStopped(Exception):
    """The server shut down before the job was done (what `abort_all` hands each job)."""


@dataclass(eq=False)
class Job:
    """One request as the engine sees it. `emit` is called on the engine's thread with each response, then
    None when the job is over, or an exception if it failed."""

    ids: list[int]
    max_tokens: int
    seed: int
    drafter: DrafterConfig
    emit: Callable[[GenerationResponse | BaseException | None], None]
    drafts: bool = False
    cancelled: bool = False
    lane: Any = None
    request: int | None = None
    done: bool = field(default=False, repr=False)


class _BatchLane:
    """Every job whose drafter is `drafter` (verify "none"), denoised together."""

    def __init__(self, engine: Engine, drafter: DrafterConfig):
        self.engine = engine
        self.batch = BatchGenerator(engine.model, engine.tokenizer, drafter=drafter, max_batch=engine.max_batch)
        self.batch.engine.prefilled = self._prefilled
        self.batch.engine.finished = self._finished
        self.jobs: dict[int, Job] = {}

    def add(self, job: Job) -> None:
        prefix = self.engine.prefix.lookup(job.ids)
        job.request = self.batch.submit(job.ids, max_tokens=job.max_tokens, seed=job.seed, prefix=prefix,
                                        draft_preview=job.drafts)
        self.jobs[job.request] = job

    def _prefilled(self, request: int, cache: list) -> None:
        job = self.jobs.get(request)
        if job is not None:
            self.engine.prefix.store(job.ids, cache)

    def _finished(self, request: int, cache: list, ids: list[int]) -> None:
        # The whole conversation so far: the next turn, when its render extends these ids, encodes only its own.
        job = self.jobs.get(request)
        if job is not None and not job.cancelled:
            self.engine.prefix.store(ids, cache)

    def cancel(self, job: Job) -> None:
        self.batch.cancel(job.request)  # thread-safe: the row leaves at the next decoder pass

    @property
    def idle(self) -> bool:
        return self.batch.idle

    def step(self) -> None:
        for request, response in self.batch.step():
            job = self.jobs.get(request)
            if job is None or job.cancelled:
                continue
            job.emit(response)
            if response.finish_reason is not None:
                self.engine.release(job)
        for request in [r for r, j in self.jobs.items() if j.done or j.cancelled]:
            del self.jobs[request]


class _SoloLane:
    """Jobs whose drafter verifies with the encoder (`verify: "ar"`): one at a time, a canvas per turn."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self.waiting: deque[Job] = deque()
        self.current: tuple[Job, Iterator[GenerationResponse], PromptCache] | None = None

    def add(self, job: Job) -> None:
        self.waiting.append(job)

    def cancel(self, job: Job) -> None:
        job.cancelled = True  # read between decoder passes (drafts are always generated internally)

    @property
    def idle(self) -> bool:
        return self.current is None and not self.waiting

    def _start(self) -> None:
        while self.waiting and self.current is None:
            job = self.waiting.popleft()
            if job.cancelled:
                continue
            # At least one prompt token is left to encode: the verifier needs its logits.
            found = self.engine.prefix.lookup(job.ids, limit=len(job.ids) - 1)
            cache = PromptCache() if found is None else PromptCache(found[0], job.ids[: found[1]])
            stream = stream_generate(self.engine.model, self.engine.tokenizer, job.ids, max_tokens=job.max_tokens,
                                     drafter=job.drafter, seed=job.seed, draft_preview=True, prompt_cache=cache)
            self.current = (job, stream, cache)

    def step(self) -> None:
        """Run the current job until its next commit (or its end, or a cancel between two passes)."""
        self._start()
        if self.current is None:
            return
        job, stream, cache = self.current
        for response in stream:
            if job.cancelled:
                break
            if response.draft is not None and not job.drafts:
                continue
            job.emit(response)
            if response.draft is None:
                if response.finish_reason is None:
                    return
                if cache.layers is not None:
                    self.engine.prefix.store(cache.tokens, cache.layers)
                break
        stream.close()
        self.current = None
        self.engine.release(job)


class Engine:
    """The model's owner: `submit` jobs, `cancel` them, `close` to stop (see the module docstring).

    `max_batch` bounds the rows denoised together per drafter; `max_queue` the jobs waiting beyond them;
    past both, `submit` raises `EngineBusy`.
    """

    def __init__(self, loader: Callable[[], tuple[Any, Any]], *, max_batch: int = 4, max_queue: int = 16,
                 prefix_cache_bytes: int = 1 << 30):
        self.loader = loader
        self.model = self.tokenizer = None
        self._ready = threading.Event()
        self._failed: BaseException | None = None
        self.max_batch, self.max_queue = max_batch, max_queue
        self.prefix = PrefixCache(prefix_cache_bytes)
        self.lanes: dict[DrafterConfig, _BatchLane] = {}
        self._retired: Counter[str] = Counter(dict.fromkeys(TIMING, 0))  # what dropped lanes ran (their `timing`)
        self.solo = _SoloLane(self)
        self.active: set[Job] = set()
        self._lock = threading.Lock()
        self._inbox: deque[Job] = deque()
        self._wake = threading.Event()
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="mlx-diffusiongemma-engine", daemon=True)

    def start(self) -> tuple[Any, Any]:
        """Start the thread and load the model on it (MLX arrays belong to the thread that made them);
        returns `(model, tokenizer)`, or raises what loading raised."""
        self._thread.start()
        self._ready.wait()
        if self._failed is not None:
            raise self._failed
        return self.model, self.tokenizer

    def close(self, timeout: float = 10.0) -> None:
        """Cancel what is left and stop the thread (it ends at the next decoder pass)."""
        with self._lock:
            jobs = list(self.active)
        for job in jobs:
            self.cancel(job)
        self._stop = True
        self._wake.set()
        self._thread.join(timeout)
        if self._thread.is_alive():
            import sys
            import traceback

            frame = sys._current_frames().get(self._thread.ident)
            log.warning("the engine thread did not stop within %s s:\n%s", timeout,
                        "".join(traceback.format_stack(frame)) if frame else "")

    def abort_all(self) -> int:
        """Cancel every job and tell each it was stopped (the end of a drain); returns how many."""
        with self._lock:
            jobs = list(self.active)
        for job in jobs:
            self.cancel(job)
            job.emit(EngineStopped("the server shut down before the reply was complete"))
        return len(jobs)

    def stats(self) -> dict[str, int | float]:
        """Requests in progress (`running`: in a batch or the solo lane), `waiting`, the prompt cache, what the
        batches ran so far with its seconds (decoder passes, commits, prefills, hand-overs: their cost tells a
        slower machine from a server that queues more) and the process's CPU seconds."""
        with self._lock:
            active = len(self.active)
        engines = [lane.batch.engine for lane in list(self.lanes.values())]
        running = sum(len(engine.rows) for engine in engines) + (self.solo.current is not None)
        timing = sum((e.timing for e in engines), Counter(self._retired))
        return {"running": running, "waiting": max(active - running, 0),
                "prefix_cache_entries": len(self.prefix.entries), "prefix_cache_bytes": self.prefix.bytes,
                "prefix_cache_hits": self.prefix.hits,
                **{k: round(timing[k], 4) for k in TIMING}, "cpu_seconds": round(time.process_time(), 3)}

    def submit(self, job: Job) -> None:
        with self._lock:
            if len(self.active) >= self.max_batch + self.max_queue:
                raise EngineBusy(f"{len(self.active)} requests in progress or queued")
            self.active.add(job)
            self._inbox.append(job)
        self._wake.set()

    def cancel(self, job: Job) -> None:
        """Stop a job (a client went away): it emits nothing more and its row leaves at the next pass."""
        with self._lock:
            if job.done or job.cancelled:
                return
            job.cancelled = True
            if job.lane is not None:
                job.lane.cancel(job)
            self.active.discard(job)
        self._wake.set()

    def release(self, job: Job) -> None:
        """The job is over (engine thread): tell its stream, free its slot."""
        with self._lock:
            self.active.discard(job)
            if job.done:
                return
            job.done = True
        if not job.cancelled:
            job.emit(None)

    def _take_inbox(self) -> None:
        while self._inbox:
            job = self._inbox.popleft()
            with self._lock:
                if job.cancelled:
                    continue
                if job.drafter.verify != "none":
                    job.lane = self.solo
                else:
                    job.lane = self.lanes.get(job.drafter) or self.lanes.setdefault(job.drafter,
                                                                                    _BatchLane(self, job.drafter))
                try:
                    job.lane.add(job)
                except Exception as e:  # e.g. a request over the batch's memory budget
                    self.active.discard(job)
                    job.done = True
                    job.emit(e)

    def _run(self) -> None:
        # MLX streams belong to the thread that made them: the engine's thread has its own.
        stream = mx.new_stream(mx.default_device())
        with mx.stream(stream):
            try:
                self.model, self.tokenizer = self.loader()
            except BaseException as e:  # handed to `start`, on the main thread
                self._failed = e
                return
            finally:
                self._ready.set()
            with wired_limit(self.model, [stream]):  # Metal: keep the weights resident
                self._loop()
            self._wind_down(stream)

    def _wind_down(self, stream) -> None:
        """Before the thread ends: finish the work queued on its stream and drop the arrays only it used
        (batch caches, prompt cache), so none is left to the interpreter's teardown."""
        mx.synchronize(stream)
        self.lanes, self.solo = {}, _SoloLane(self)
        self.prefix = PrefixCache(self.prefix.max_bytes)
        mx.clear_cache()

    def _loop(self) -> None:
        while not self._stop:
            self._take_inbox()
            busy = [lane for lane in [*self.lanes.values(), self.solo] if not lane.idle]
            if not busy:
                # Idle for half a second: let go of the lanes and MLX's buffer cache. Not at every moment the
                # batch happens to be empty: under steady load that freed the buffers the next pass needs.
                if not self._wake.wait(0.5):
                    self._retire(list(self.lanes.values()))
                    self.lanes = {}
                    mx.clear_cache()
                self._wake.clear()
                continue
            for lane in busy:
                try:
                    lane.step()
                except Exception as e:  # noqa: BLE001 - reported to the lane's jobs, the engine goes on
                    log.exception("engine step failed")
                    self._fail(lane, e)

    def _fail(self, lane, error: Exception) -> None:
        jobs = [j for j in list(self.active) if j.lane is lane]
        for job in jobs:
            with self._lock:
                self.active.discard(job)
                job.done = True
            job.emit(error)
        if lane is self.solo:
            self.solo = _SoloLane(self)
        else:
            self._retire([lane])
            self.lanes = {k: v for k, v in self.lanes.items() if v is not lane}

    def _retire(self, lanes: list[_BatchLane]) -> None:
        """Keep the timing of lanes about to be dropped (`stats` reports the server's whole run)."""
        for lane in lanes:
            self._retired.update(lane.batch.engine.timing)
