"""`mlx-diffusiongemma serve`: an OpenAI-compatible HTTP server (FastAPI on uvicorn) over the engine.

The HTTP layer only parses, checks, queues and streams: the model, the batches and the prompt cache belong to
the engine's thread (`engine.py`). Every response is a committed canvas of text at the earliest (one SSE chunk
each), read through `replies.py` so the thought channel lands in `reasoning_content` and Gemma 4 tool calls in
`tool_calls`. `temperature` scales the drafter's temperature schedule (both ends; 1 keeps it, 0 is refused:
there is no greedy mode); `top_p` other than 1 is refused.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import json
import logging
import secrets
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from .console import RESERVED_TEMPLATE_KEYS
from .drafter import DrafterConfig, drafter_for, list_presets
from .engine import Engine, EngineBusy, EngineStopped, Job
from .errors import ChatTemplateError
from .generate import GenerationResponse
from .hidden import hidden_token_ids, visible
from .loader import apply_chat_template
from .openai_api import APIError, ChatRequest, CompletionRequest, chat_messages, parse, stops, tools
from .replies import Delta, ReplyParser, StopMatcher

log = logging.getLogger("mlx_diffusiongemma.serve")


@dataclass
class ServeOptions:
    """What the `serve` flags set, the model aside."""

    model_id: str
    drafter: str = "reference"
    api_key: str | None = None
    max_tokens: int = 256  # when a request does not say
    max_tokens_limit: int = 8192
    max_body_bytes: int = 4 << 20
    template_args: dict[str, Any] = field(default_factory=dict)
    retry_after: int = 1


class State:
    """The app's shared, read-mostly state: model, tokenizer, engine, options, resolved drafters."""

    def __init__(self, model, tokenizer, engine: Engine, options: ServeOptions):
        self.model, self.tokenizer, self.engine, self.options = model, tokenizer, engine, options
        self.drafters: dict[tuple[str, float], DrafterConfig] = {}
        self.hidden = hidden_token_ids(model, tokenizer)
        self.created = int(time.time())
        self.closing = False

    def drafter(self, name: str | None, temperature: float | None) -> DrafterConfig:
        """A preset by name (a request never names a file), its temperature schedule scaled by `temperature`."""
        name = self.options.drafter if name is None else name
        if name not in list_presets() and name != self.options.drafter:
            raise APIError(400, f"drafter: unknown preset {name!r}; presets: {', '.join(list_presets())}",
                           param="drafter")
        scale = 1.0 if temperature is None else float(temperature)
        key = (name, scale)
        if key not in self.drafters:
            base = drafter_for(self.model, name)
            self.drafters[key] = base if scale == 1.0 else dataclasses.replace(
                base, t_min=base.t_min * scale, t_max=base.t_max * scale)
        return self.drafters[key]


def _error_response(error: APIError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers)


async def _body(request: Request, limit: int) -> bytes:
    length = request.headers.get("content-length")
    too_big = APIError(413, f"the request body is over {limit} bytes", code="request_too_large")
    if length is not None and (not length.isdigit() or int(length) > limit):
        raise too_big
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_big
        chunks.append(chunk)
    return b"".join(chunks)


def _check_auth(state: State, request: Request) -> None:
    key = state.options.api_key
    if key is None:
        return
    given = request.headers.get("authorization", "")
    if not (given.startswith("Bearer ") and hmac.compare_digest(given[7:].encode(), key.encode())):
        raise APIError(401, "missing or wrong API key (send Authorization: Bearer KEY)", code="invalid_api_key",
                       headers={"WWW-Authenticate": "Bearer"})


def _check_text(value: Any, param: str) -> None:
    try:
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise APIError(400, f"{param}: not valid Unicode (a lone surrogate)", param=param) from None


def _budget(state: State, request, prompt_tokens: int) -> int:
    """`max_tokens` for a request, checked against the server's limit and the model's context."""
    asked = getattr(request, "max_completion_tokens", None) or request.max_tokens
    max_tokens = state.options.max_tokens if asked is None else asked
    param = "max_completion_tokens" if getattr(request, "max_completion_tokens", None) else "max_tokens"
    if max_tokens > state.options.max_tokens_limit:
        raise APIError(400, f"{param}: at most {state.options.max_tokens_limit} (got {max_tokens})", param=param)
    canvas, context = state.model.args.canvas_length, state.model.args.max_position_embeddings
    need = prompt_tokens + -(-max_tokens // canvas) * canvas
    if need > context:
        raise APIError(400, f"the prompt is {prompt_tokens} tokens and {param} {max_tokens} takes canvases of "
                       f"{canvas}: {need} positions, over the model's context of {context}; shorten the "
                       f"conversation or lower {param}", param=param, code="context_length_exceeded")
    return max_tokens


def _chat_ids(state: State, request: ChatRequest) -> list[int]:
    messages = chat_messages(request)
    _check_text(messages, "messages")
    kwargs = {**state.options.template_args, **(request.chat_template_kwargs or {})}
    reserved = [k for k in kwargs if k in (*RESERVED_TEMPLATE_KEYS, "tools")]
    if reserved:
        raise APIError(400, f"chat_template_kwargs: {reserved[0]!r} is set by the server", param="chat_template_kwargs")
    _check_text(kwargs, "chat_template_kwargs")
    try:
        return apply_chat_template(state.tokenizer, messages, add_generation_prompt=True, tools=tools(request),
                                   **kwargs)
    except ChatTemplateError as e:
        raise APIError(400, str(e), param="messages") from None


def _completion_ids(state: State, request: CompletionRequest) -> list[int]:
    prompt = request.prompt
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
        if len(prompt) != 1:
            raise APIError(400, "prompt: one prompt per request", param="prompt")
        prompt = prompt[0]
    if isinstance(prompt, str):
        _check_text(prompt, "prompt")
        return list(state.tokenizer.encode(prompt))
    vocab = state.model.args.vocab_size
    if not prompt or any(not 0 <= t < vocab for t in prompt):
        raise APIError(400, f"prompt: token ids must be in [0, {vocab})", param="prompt")
    return list(prompt)


class _ClientGone(Exception):
    """The client of a non-streaming request disconnected before its reply was ready."""


class _Stream:
    """One job's responses, handed from the engine thread to the event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop, self.queue = loop, asyncio.Queue()

    def emit(self, item) -> None:  # engine thread
        self.loop.call_soon_threadsafe(self.queue.put_nowait, item)

    async def next(self, request: Request | None = None) -> GenerationResponse | None:
        """The next response, None at the end; a failure raises; a client gone away (when watched) too."""
        while True:
            try:
                item = await asyncio.wait_for(self.queue.get(), 0.5 if request is not None else None)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    raise _ClientGone()
                continue
            if isinstance(item, EngineStopped):
                raise APIError(503, str(item), kind="server_error", code="shutting_down")
            if isinstance(item, BaseException):
                log.error("generation failed: %s", item)
                raise APIError(500, f"generation failed ({type(item).__name__})", kind="server_error")
            return item


def _start(state: State, request, ids: list[int], max_tokens: int) -> tuple[Job, _Stream]:
    drafter = state.drafter(request.drafter, request.temperature)
    stream = _Stream(asyncio.get_running_loop())
    seed = secrets.randbits(63) if request.seed is None else request.seed
    job = Job(ids, max_tokens, seed, drafter, stream.emit, drafts=request.stream_drafts)
    if state.closing:
        raise APIError(503, "the server is shutting down", kind="server_error", code="shutting_down")
    try:
        state.engine.submit(job)
    except EngineBusy as e:
        raise APIError(429, f"the server is busy ({e}); retry shortly", kind="rate_limit_error",
                       code="server_busy", headers={"Retry-After": str(state.options.retry_after)}) from None
    return job, stream


def _usage(last: GenerationResponse | None, prompt_tokens: int, completion: int) -> dict[str, Any]:
    cached = last.prompt_cached if last else 0
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
            "total_tokens": prompt_tokens + completion, "prompt_tokens_details": {"cached_tokens": cached}}


class _Reply:
    """Raw committed text -> stop strings -> thoughts / content / tool calls, and the finish reason."""

    def __init__(self, request, parse_reply: bool, has_tools: bool):
        self.stop = StopMatcher(stops(request))
        self.parser = ReplyParser(tools=has_tools) if parse_reply else None
        self.finish: str | None = None
        self.stopped = False
        self.tokens: list[int] = []  # every generated token so far
        self.kept = 0  # characters of generated text let through the stop strings

    def feed(self, response: GenerationResponse) -> Delta:
        self.tokens += response.tokens
        text, self.stopped = self.stop.feed(response.text)
        self.kept += len(text)
        if self.stopped:
            self.finish = "stop"
        elif response.finish_reason is not None:
            self.finish = response.finish_reason
        return self._parse(text)

    def close(self) -> Delta:
        tail = self.stop.finish()
        self.kept += len(tail)
        delta = self._parse(tail)
        if self.parser is not None:
            tail = self.parser.finish()
            delta.reasoning += tail.reasoning
            delta.content += tail.content
            if self.parser.calls and self.finish == "stop":
                self.finish = "tool_calls"
        return delta

    def completion_tokens(self, last: GenerationResponse | None, decode) -> int:
        """`usage.completion_tokens`: the generated tokens, or after a stop string only those the returned
        text is made of (the token the cut falls in counts; the ones after it, though generated, do not)."""
        if not self.stopped:
            return last.generation_tokens if last else 0
        low, high = 0, len(self.tokens)  # the fewest tokens whose text covers what was kept
        while low < high:
            mid = (low + high) // 2
            if len(decode(self.tokens[:mid])) >= self.kept:
                high = mid
            else:
                low = mid + 1
        return low

    def _parse(self, text: str) -> Delta:
        return self.parser.feed(text) if self.parser is not None else Delta(content=text)


def _tool_calls(calls: list[dict[str, Any]], first: int, stream: bool) -> list[dict[str, Any]]:
    out = []
    for i, call in enumerate(calls):
        entry = {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                 "function": {"name": call["name"], "arguments": json.dumps(call["arguments"])}}
        out.append({"index": first + i, **entry} if stream else entry)
    return out


def _draft_chunk(state: State, response: GenerationResponse) -> dict[str, Any]:
    text = state.tokenizer.decode(visible(response.draft, state.hidden))
    return {"canvas": response.canvas, "step": response.step, "text": text}


async def _collect(state: State, http: Request, job: Job, stream: _Stream, reply: _Reply) -> tuple:
    """Run a non-streaming request to its end: (delta of the whole reply, last response)."""
    whole, last = Delta(), None
    try:
        while (response := await stream.next(http)) is not None:
            if response.draft is not None:
                continue
            last = response
            _merge(whole, reply.feed(response))
            if reply.stopped:
                break
    finally:
        state.engine.cancel(job)  # a no-op for a finished job; frees the row otherwise
    _merge(whole, reply.close())
    return whole, last


def _merge(into: Delta, delta: Delta) -> None:
    into.reasoning += delta.reasoning
    into.content += delta.content
    into.tool_calls += delta.tool_calls


def _sse(payload: dict[str, Any] | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"


async def _events(state: State, job: Job, stream: _Stream, reply: _Reply, head: dict[str, Any], chat: bool,
                  usage: bool, prompt_tokens: int) -> AsyncIterator[str]:
    """The SSE stream of one request: a chunk per committed canvas (drafts too when asked), then the end."""
    def chunk(delta: Delta | None, finish: str | None = None, calls: int = 0) -> dict[str, Any]:
        if chat:
            body: dict[str, Any] = {}
            if delta is not None:
                if delta.reasoning:
                    body["reasoning_content"] = delta.reasoning
                if delta.content:
                    body["content"] = delta.content
                if delta.tool_calls:
                    body["tool_calls"] = _tool_calls(delta.tool_calls, calls, stream=True)
            choice = {"index": 0, "delta": body, "finish_reason": finish}
        else:
            choice = {"index": 0, "text": delta.content if delta else "", "logprobs": None, "finish_reason": finish}
        return {**head, "choices": [choice]}

    last, calls = None, 0
    try:
        if chat:
            yield _sse({**head, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                             "finish_reason": None}]})
        while (response := await stream.next()) is not None:
            if response.draft is not None:
                yield _sse({**head, "choices": [], "draft": _draft_chunk(state, response)})
                continue
            last = response
            delta = reply.feed(response)
            if delta:
                yield _sse(chunk(delta, calls=calls))
                calls += len(delta.tool_calls)
            if reply.stopped:
                break
        delta = reply.close()
        if delta:
            yield _sse(chunk(delta, calls=calls))
        yield _sse(chunk(None, reply.finish or "stop"))
        if usage:
            completion = reply.completion_tokens(last, state.tokenizer.decode)
            yield _sse({**head, "choices": [], "usage": _usage(last, prompt_tokens, completion)})
    except APIError as e:
        yield _sse(e.body())
    finally:
        state.engine.cancel(job)
    yield _sse("[DONE]")


async def _respond(state: State, http: Request, request, ids: list[int], chat: bool):
    max_tokens = _budget(state, request, len(ids))
    has_tools = chat and tools(request) is not None
    job, stream = _start(state, request, ids, max_tokens)
    reply = _Reply(request, parse_reply=chat, has_tools=has_tools)
    kind = "chat.completion" if chat else "text_completion"
    head = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}", "created": int(time.time()),
            "model": state.options.model_id, "seed": job.seed}
    if request.stream:
        usage = request.stream_options is not None and request.stream_options.include_usage
        events = _events(state, job, stream, reply, {**head, "object": kind + ".chunk" if chat else kind}, chat,
                         usage, len(ids))
        return StreamingResponse(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
    try:
        whole, last = await _collect(state, http, job, stream, reply)
    except _ClientGone:
        return Response(status_code=499)  # nginx's "client closed request": nobody reads it
    if chat:
        message: dict[str, Any] = {"role": "assistant", "content": whole.content or None}
        if whole.reasoning:
            message["reasoning_content"] = whole.reasoning
        if whole.tool_calls:
            message["tool_calls"] = _tool_calls(whole.tool_calls, 0, stream=False)
        choice = {"index": 0, "message": message, "finish_reason": reply.finish or "stop", "logprobs": None}
    else:
        choice = {"index": 0, "text": whole.content, "logprobs": None, "finish_reason": reply.finish or "stop"}
    usage = _usage(last, len(ids), reply.completion_tokens(last, state.tokenizer.decode))
    return JSONResponse({**head, "object": kind, "choices": [choice], "usage": usage})


def create_app(state: State) -> FastAPI:
    """The FastAPI app: `/health`, `/v1/models`, `/v1/chat/completions`, `/v1/completions`."""
    app = FastAPI(title="mlx-diffusiongemma", docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(APIError)
    async def _api_error(_: Request, error: APIError):
        return _error_response(error)

    @app.exception_handler(HTTPException)
    async def _http_error(_: Request, error: HTTPException):
        kind = "not_found_error" if error.status_code == 404 else "invalid_request_error"
        return _error_response(APIError(error.status_code, str(error.detail), kind=kind))

    @app.exception_handler(Exception)
    async def _internal(_: Request, error: Exception):
        log.exception("request failed")
        return _error_response(APIError(500, "internal server error", kind="server_error"))

    @app.get("/health")
    async def health():
        return {"status": "closing" if state.closing else "ok", **state.engine.stats()}

    @app.get("/v1/models")
    async def models(http: Request):
        _check_auth(state, http)
        return {"object": "list", "data": [{"id": state.options.model_id, "object": "model",
                                            "created": state.created, "owned_by": "mlx-diffusiongemma"}]}

    async def handle(http: Request, schema, chat: bool):
        _check_auth(state, http)
        request = parse(await _body(http, state.options.max_body_bytes), schema)
        if request.model != state.options.model_id:
            raise APIError(404, f"model {request.model!r} is not served here; GET /v1/models lists "
                           f"{state.options.model_id!r}", param="model", code="model_not_found")
        ids = _chat_ids(state, request) if chat else _completion_ids(state, request)
        return await _respond(state, http, request, ids, chat)

    @app.post("/v1/chat/completions")
    async def chat_completions(http: Request):
        return await handle(http, ChatRequest, chat=True)

    @app.post("/v1/completions")
    async def completions(http: Request):
        return await handle(http, CompletionRequest, chat=False)

    return app
