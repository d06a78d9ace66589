"""`mlx-diffusiongemma serve`: the real server (uvicorn on 127.0.0.1, a free port) driven by the official
`openai` client, and by httpx for what a client library would never send (bad bodies, disconnects, floods).

The toy model answers its tasks in one canvas; `endless_toy` (no end-of-sequence id) gives requests that run
as long as a test needs, for cancellation, the 429 path and SIGTERM.
"""

from __future__ import annotations

import json
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from mlx_diffusiongemma.checkpoint import TOY_PATH
from mlx_diffusiongemma.dialogues import CALCULATOR
from serving import Server, endless_toy

CHAT = "/v1/chat/completions"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = Server("toy", "--decode-concurrency", "4", log=tmp_path_factory.mktemp("serve") / "serve.log")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def slow(tmp_path_factory):
    """The endless toy, one request at a time and one waiting: the 429 and disconnect paths."""
    root = tmp_path_factory.mktemp("slow")
    s = Server(endless_toy(root / "model"), "--decode-concurrency", "1", "--max-queue", "1", log=root / "serve.log")
    yield s
    s.stop()


def _user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def _raw_reply(messages: list[dict], seed: int, max_tokens: int = 72, **template) -> str:
    """What the library writes for the same prompt and seed, with no cache: the text the server must return."""
    from mlx_diffusiongemma import generate, load

    model, tokenizer = load("toy")
    return generate(model, tokenizer, messages, max_tokens=max_tokens, seed=seed, chat_template_kwargs=template)


def test_models_and_health(server, client):
    assert [m.id for m in client.models.list().data] == ["toy"]
    before = server.health()
    assert before["status"] == "ok"
    client.chat.completions.create(model="toy", messages=_user("sort 70193"), seed=1)
    after = server.health()  # the work the reply took, and its time
    for what in ("decoder_passes", "decoder_seconds", "prefills", "prefill_seconds", "handovers", "cpu_seconds"):
        assert after[what] > before[what], what
    assert after["commits"] >= before["commits"] and after["commit_seconds"] >= before["commit_seconds"]


def test_chat_answers_with_usage_and_the_seed_reproduces_it(client):
    first = client.chat.completions.create(model="toy", messages=_user("add 178+102"), seed=3)
    assert first.choices[0].message.content == "0280" and first.choices[0].finish_reason == "stop"
    assert first.usage.completion_tokens == 4 and first.usage.prompt_tokens > 10
    again = client.chat.completions.create(model="toy", messages=_user("add 178+102"), seed=3)
    assert again.choices[0].message.content == "0280"
    # The same prompt again: its encoded prefix comes from the prompt cache.
    assert again.usage.prompt_tokens_details.cached_tokens == again.usage.prompt_tokens


def test_the_next_turn_reuses_the_encoded_conversation(client):
    messages = _user("sort 616")
    first = client.chat.completions.create(model="toy", messages=messages, seed=0)
    messages += [{"role": "assistant", "content": first.choices[0].message.content}, *_user("sort 027")]
    second = client.chat.completions.create(model="toy", messages=messages, seed=0)
    # The first reply was stored with its prompt, as the model wrote it: only the new turn is encoded...
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert first.usage.prompt_tokens + first.usage.completion_tokens < cached < second.usage.prompt_tokens
    # ...and the reply is what a run without any cache writes.
    assert second.choices[0].message.content == _raw_reply(messages, 0, max_tokens=24)


def test_streaming_chat_is_the_same_text_in_chunks(client):
    whole = client.chat.completions.create(model="toy", messages=_user("sort 213"), seed=1).choices[0].message
    chunks = list(client.chat.completions.create(model="toy", messages=_user("sort 213"), seed=1, stream=True,
                                                 stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.content == "123"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].usage.completion_tokens == 3 and not chunks[-1].choices


def test_completions_streaming_and_not(client):
    done = client.completions.create(model="toy", prompt="x", max_tokens=30, seed=5)
    streamed = client.completions.create(model="toy", prompt="x", max_tokens=30, seed=5, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == done.choices[0].text
    assert done.usage.completion_tokens <= 30


def test_stop_cuts_the_reply(client):
    whole = client.chat.completions.create(model="toy", messages=_user("sort 70193"), seed=0)
    assert (whole.choices[0].message.content, whole.usage.completion_tokens) == ("01379", 5)
    r = client.chat.completions.create(model="toy", messages=_user("sort 70193"), seed=0, stop=["3"])
    assert (r.choices[0].message.content, r.choices[0].finish_reason) == ("01", "stop")
    assert r.usage.completion_tokens == 2  # the returned text's tokens, not the five generated
    chunks = list(client.chat.completions.create(model="toy", messages=_user("sort 70193"), seed=0, stop="7",
                                                 stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "013"
    assert chunks[-1].usage.completion_tokens == 3


def test_concurrent_requests_equal_one_by_one(client):
    prompts = [("chat", "add 876+727"), ("chat", "sort 616"), ("completion", "y"), ("chat", "add 405+705"),
               ("completion", "sort 9"), ("chat", "sort 311")]

    def ask(i: int) -> str:
        kind, text = prompts[i]
        if kind == "chat":
            return client.chat.completions.create(model="toy", messages=_user(text), seed=i).choices[0].message.content
        return client.completions.create(model="toy", prompt=text, max_tokens=48, seed=i).choices[0].text

    alone = [ask(i) for i in range(len(prompts))]
    with ThreadPoolExecutor(len(prompts)) as pool:
        together = list(pool.map(ask, range(len(prompts))))
    assert together == alone
    assert alone[0] == "1603"


def test_drafter_presets_and_sampling_options(server, client):
    fast = client.chat.completions.create(model="toy", messages=_user("add 782+204"), seed=0,
                                          extra_body={"drafter": "fast"})
    spec = client.chat.completions.create(model="toy", messages=_user("add 782+204"), seed=0, stream=True,
                                          extra_body={"drafter": "speculative"})
    assert fast.choices[0].message.content == "0986"
    assert "".join(c.choices[0].delta.content or "" for c in spec if c.choices) == "0986"
    warm = client.chat.completions.create(model="toy", messages=_user("add 782+204"), seed=0, temperature=0.5)
    assert warm.choices[0].message.content
    for bad in ({"drafter": "../drafter_configs/fast.json"}, {"drafter": "/etc/passwd"}, {"drafter": "nope"},
                {"temperature": 0}, {"top_p": 0.5}, {"n": 2}, {"logprobs": True}, {"tool_choice": "required"}):
        r = httpx.post(server.url + CHAT, json={"model": "toy", "messages": _user("hi"), **bad}, timeout=30)
        assert r.status_code == 400, (bad, r.text)
        assert r.json()["error"]["param"] == next(iter(bad)), r.text


def test_live_drafts_are_an_opt_in_extension(server):
    body = {"model": "toy", "messages": _user("sort 027"), "seed": 0, "stream": True, "stream_drafts": True}
    with httpx.stream("POST", server.url + CHAT, json=body, timeout=60) as r:
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    drafts = [e["draft"] for e in events if "draft" in e]
    assert drafts and all({"canvas", "step", "text"} <= set(d) for d in drafts)
    assert "".join(e["choices"][0]["delta"].get("content", "") for e in events if e["choices"]) == "027"


BAD_BODIES = [
    (b"{not json", 400, None),
    (b"[1, 2]", 400, None),
    (json.dumps({"model": "toy"}).encode(), 400, "messages"),
    (json.dumps({"model": "toy", "messages": "hi"}).encode(), 400, "messages"),
    (json.dumps({"model": "toy", "messages": [{"role": "wizard", "content": "x"}]}).encode(), 400, None),
    (json.dumps({"model": "toy", "messages": _user("x"), "max_tokens": "ten"}).encode(), 400, "max_tokens"),
    (json.dumps({"model": "toy", "messages": _user("x"), "max_tokens": 0}).encode(), 400, "max_tokens"),
    (json.dumps({"model": "toy", "messages": _user("x"), "max_tokens": 10**6}).encode(), 400, "max_tokens"),
    (json.dumps({"model": "toy", "messages": _user("x"), "seed": -1}).encode(), 400, "seed"),
    (json.dumps({"model": "toy", "messages": _user("x"), "stream": "yes"}).encode(), 400, "stream"),
    (json.dumps({"model": "toy", "messages": _user("x"), "stop": ["a"] * 5}).encode(), 400, "stop"),
    (json.dumps({"model": "toy", "messages": _user("\ud800")}).encode(), 400, "messages"),
    (json.dumps({"model": "toy", "messages": _user("x"), "chat_template_kwargs": {"tokenize": False}}).encode(),
     400, "chat_template_kwargs"),
    (json.dumps({"model": "toy", "messages": [{"role": "assistant", "content": "", "tool_calls": [
        {"type": "function", "function": {"name": "f", "arguments": "{oops"}}]}]}).encode(), 400,
     "messages.0.tool_calls.0.function.arguments"),
    (json.dumps({"model": "gpt-4", "messages": _user("x")}).encode(), 404, "model"),
]


def test_bad_inputs_get_openai_errors(server):
    for body, status, param in BAD_BODIES:
        r = httpx.post(server.url + CHAT, content=body, headers={"content-type": "application/json"}, timeout=30)
        assert r.status_code == status, (body, r.text)
        error = r.json()["error"]
        assert error["message"] and error["type"] and "Traceback" not in r.text
        if param is not None:
            assert error["param"] == param, (body, error)
    # a prompt that fits the toy's context (a token per "x") but leaves no room for four 24-token canvases
    fits = json.loads((TOY_PATH / "config.json").read_text())["text_config"]["max_position_embeddings"] - 50
    context = {"model": "toy", "messages": _user("x" * fits), "max_tokens": 96}
    r = httpx.post(server.url + CHAT, json=context, timeout=30)
    assert (r.status_code, r.json()["error"]["code"]) == (400, "context_length_exceeded")
    huge = httpx.post(server.url + CHAT, content=b"{" + b" " * (5 << 20) + b"}", timeout=30)
    assert huge.status_code == 413 and huge.json()["error"]["code"] == "request_too_large"
    assert httpx.get(server.url + "/v1/nothing").json()["error"]["type"] == "not_found_error"
    assert httpx.get(server.url + CHAT).status_code == 405
    assert server.health()["running"] == 0


def _long(max_tokens: int = 2400) -> dict:
    return {"model": "model", "prompt": "x", "max_tokens": max_tokens, "seed": 0, "stream": True}


def _wait_idle(server: Server, within: float) -> float:
    tic = time.monotonic()
    while time.monotonic() - tic < within:
        h = server.health()
        if h["running"] == 0 and h["waiting"] == 0:
            return time.monotonic() - tic
        time.sleep(0.05)
    raise AssertionError(f"still busy after {within} s: {server.health()}")


def test_disconnect_mid_stream_frees_the_row(slow):
    body = {**_long(), "model": slow.model}
    with httpx.stream("POST", slow.url + "/v1/completions", json=body, timeout=60) as r:
        lines = r.iter_lines()
        assert next(line for line in lines if line.startswith("data: {"))
        assert slow.health()["running"] == 1
    # The connection is closed: the row leaves at the next decoder pass.
    assert _wait_idle(slow, 10) < 10
    with pytest.raises(httpx.ReadTimeout):  # a non-streaming client that gives up is noticed too
        httpx.post(slow.url + "/v1/completions", json={**body, "stream": False}, timeout=3)
    assert _wait_idle(slow, 10) < 10
    done = httpx.post(slow.url + "/v1/completions", json={**body, "stream": False, "max_tokens": 24}, timeout=60)
    assert done.status_code == 200


def test_a_full_queue_answers_429_with_retry_after(slow):
    model = slow.model
    body = {**_long(), "model": model}
    clients = [httpx.Client(timeout=60) for _ in range(2)]
    streams = [c.stream("POST", slow.url + "/v1/completions", json=body) for c in clients]
    try:
        for s in streams:  # one running, one waiting: both slots taken
            s.__enter__()
        r = httpx.post(slow.url + "/v1/completions", json={**body, "stream": False}, timeout=30)
        assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1
        assert r.json()["error"]["type"] == "rate_limit_error"
        sdk = openai.OpenAI(base_url=slow.url + "/v1", api_key="x", max_retries=0)
        with pytest.raises(openai.RateLimitError):
            sdk.completions.create(model=model, prompt="x", max_tokens=24)
    finally:
        for s, c in zip(streams, clients):
            s.__exit__(None, None, None)
            c.close()
    _wait_idle(slow, 10)


def test_api_key_and_the_warning_beyond_loopback(tmp_path):
    s = Server("toy", "--api-key", "sesame", log=tmp_path / "serve.log")
    try:
        assert httpx.get(s.url + "/v1/models").status_code == 401
        assert httpx.get(s.url + "/v1/models", headers={"Authorization": "Bearer nope"}).status_code == 401
        ok = openai.OpenAI(base_url=s.url + "/v1", api_key="sesame", max_retries=0)
        assert ok.chat.completions.create(model="toy", messages=_user("sort 213"), seed=1).choices[0].message.content
        assert httpx.get(s.url + "/health").status_code == 200
    finally:
        s.stop()
    import subprocess
    import sys

    # Never binds: the model does not exist, so it fails after the warning.
    r = subprocess.run([sys.executable, "-m", "mlx_diffusiongemma", "serve", "--host", "0.0.0.0", "--model",
                        str(tmp_path / "none")], capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "without --api-key" in r.stderr and "Traceback" not in r.stderr


def test_sigterm_cancels_in_flight_requests_and_exits_0(tmp_path):
    s = Server(endless_toy(tmp_path / "model"), "--drain-timeout", "1", log=tmp_path / "serve.log")
    body = {**_long(), "model": str(tmp_path / "model")}
    received: list[str] = []

    def read():
        try:
            with httpx.stream("POST", s.url + "/v1/completions", json=body, timeout=60) as r:
                received.extend(r.iter_lines())
        except httpx.HTTPError:
            received.append("<cut>")

    reader = threading.Thread(target=read)
    reader.start()
    while s.health()["running"] == 0:
        time.sleep(0.05)
    tic = time.monotonic()
    s.proc.send_signal(signal.SIGTERM)
    code = s.proc.wait(15)
    took = time.monotonic() - tic
    reader.join(15)
    assert code == 0 and took < 10, (code, took, s.log.read_text()[-2000:])
    lines = [line for line in received if line]
    assert any("shutting_down" in line for line in lines) and lines[-1] == "data: [DONE]", lines[-3:]
    assert "Traceback" not in s.log.read_text()


# --- toy v2: Gemma 4 thinking and tool calls ----------------------------------------------------------------


# Not skippable: they fail on a toy that never learned Gemma 4's markers (v1), by design.
THINK = {"chat_template_kwargs": {"enable_thinking": True}}
NO_THINK = {"chat_template_kwargs": {"enable_thinking": False}}
ROOM = 72  # three canvases: a thought and its answer, or a tool call (the toy's default is one canvas)




def test_thinking_lands_in_reasoning_content(client):
    from mlx_diffusiongemma.dialogues import split_thought, thought
    from mlx_diffusiongemma.toy import held_out

    cases = held_out("add", 4) + held_out("sort", 4)
    right = 0
    for i, (prompt, answer) in enumerate(cases):
        message = client.chat.completions.create(model="toy", messages=_user(prompt), seed=i, max_tokens=ROOM,
                                                 extra_body=THINK).choices[0].message
        fields = (getattr(message, "reasoning_content", None), message.content or "")
        assert "<|channel>" not in fields[1] and "<channel|>" not in fields[1], fields
        if i < 2:  # the server splits exactly what the model wrote
            assert fields == split_thought(_raw_reply(_user(prompt), i, enable_thinking=True)), fields
        right += fields == (thought(prompt), answer)
    assert right >= 6, f"{right}/8 replies with the right thought and answer"
    prompt, answer = cases[0]
    chunks = [c for c in client.chat.completions.create(model="toy", messages=_user(prompt), seed=0, stream=True,
                                                        max_tokens=ROOM, extra_body=THINK) if c.choices]
    streamed = "".join(getattr(c.choices[0].delta, "reasoning_content", None) or "" for c in chunks)
    whole = client.chat.completions.create(model="toy", messages=_user(prompt), seed=0, max_tokens=ROOM,
                                           extra_body=THINK).choices[0].message
    assert streamed == (getattr(whole, "reasoning_content", None) or "")
    # Thinking is off unless asked for: no thought, with or without saying so.
    plain = [client.chat.completions.create(model="toy", messages=_user(prompt), seed=0, max_tokens=ROOM,
                                            extra_body=body).choices[0].message for body in (NO_THINK, {})]
    raw = _raw_reply(_user(prompt), 0, enable_thinking=False)
    assert [(getattr(m, "reasoning_content", None), m.content) for m in plain] == [(None, raw)] * 2


def test_thinking_is_off_unless_asked():
    from mlx_diffusiongemma.loader import apply_chat_template, load

    _, tokenizer = load("toy")
    off = apply_chat_template(tokenizer, _user("sort 213"), add_generation_prompt=True, enable_thinking=False)
    on = apply_chat_template(tokenizer, _user("sort 213"), add_generation_prompt=True, enable_thinking=True)
    assert apply_chat_template(tokenizer, _user("sort 213"), add_generation_prompt=True) == off != on


def _call(client, messages: list[dict], seed: int, **options):
    return client.chat.completions.create(model="toy", messages=messages, tools=[CALCULATOR], seed=seed,
                                          max_tokens=ROOM, extra_body=NO_THINK, **options)


def test_a_declared_tool_is_called_and_its_result_answered(client):
    from mlx_diffusiongemma.dialogues import operands, parse_call
    from mlx_diffusiongemma.toy import held_out

    cases = held_out("add", 6)
    right = 0
    for i, (prompt, answer) in enumerate(cases):
        messages = _user(prompt)
        choice = _call(client, messages, i).choices[0]
        calls = choice.message.tool_calls or []
        if i == 0:  # the server parses exactly the call the model wrote (Gemma 4's form, as `call_text`)
            wrote = parse_call(_raw_reply(messages, i, enable_thinking=False, tools=[CALCULATOR]))
            if wrote is not None:
                got = [(c.function.name, json.loads(c.function.arguments)) for c in calls]
                assert got == [(wrote["name"], wrote["arguments"])], got
        if not (choice.finish_reason == "tool_calls" and len(calls) == 1 and calls[0].function.name == "calculator"
                and json.loads(calls[0].function.arguments) == operands(prompt)):
            continue
        assert not choice.message.content
        messages += [choice.message.model_dump(exclude_none=True),
                     {"role": "tool", "tool_call_id": calls[0].id, "content": str(sum(operands(prompt).values()))}]
        final = _call(client, messages, i).choices[0]
        right += (final.message.content, final.finish_reason, final.message.tool_calls) == (answer, "stop", None)
    assert right >= 5, f"{right}/6 tool round trips ended with the right answer"
    prompt = cases[0][0]
    chunks = [c for c in _call(client, _user(prompt), 0, stream=True) if c.choices]
    deltas = [call for c in chunks for call in c.choices[0].delta.tool_calls or []]
    assert chunks[-1].choices[0].finish_reason == "tool_calls" and len(deltas) == 1
    assert json.loads(deltas[0].function.arguments) == operands(prompt) and deltas[0].index == 0


def test_tool_round_trip_renders_through_the_chat_template():
    """OpenAI's JSON-string `arguments` become the dict the template renders; the tool's result its own turn."""
    from mlx_diffusiongemma.loader import load
    from mlx_diffusiongemma.openai_api import ChatRequest, chat_messages, tools

    request = ChatRequest.model_validate({"model": "toy", "tools": [CALCULATOR], "messages": [
        {"role": "user", "content": "add 482+037"},
        {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {
            "name": "calculator", "arguments": '{"b": 37, "a": 482}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "519"}]})
    _, tokenizer = load("toy")
    text = tokenizer.apply_chat_template(chat_messages(request), tools=tools(request), tokenize=False,
                                         add_generation_prompt=True)
    assert "<|tool>" in text and "<|tool_call>call:calculator{a:482,b:37}<tool_call|>" in text
    assert text.endswith("<|turn>tool\n<|tool_response>519<tool_response|><turn|>\n<|turn>model\n")


def test_prefix_cache_finds_the_longest_stored_prefix_within_its_bytes():
    import mlx.core as mx

    from mlx_diffusiongemma.cache import LayerCache
    from mlx_diffusiongemma.prefix_cache import PrefixCache

    def layers(n: int) -> list[LayerCache]:
        layer = LayerCache()
        layer.append(mx.full((1, 1, n, 4), float(n)), mx.ones((1, 1, n, 4)))
        return [layer]

    cache = PrefixCache(max_bytes=2 * 4 * 4 * 9)  # K and V, fp32, 9 positions in all
    cache.store([1, 2, 3], layers(3))
    cache.store([1, 2, 3, 4, 5], layers(5))
    found, n = cache.lookup([1, 2, 3, 4, 5, 6])
    assert n == 5 and found[0].offset == 5 and found[0].keys.shape[2] == 5
    assert cache.lookup([1, 2, 3, 7])[1] == 3 and cache.lookup([1, 2, 3, 4, 5], limit=4)[1] == 3
    assert cache.lookup([8]) is None
    found[0].append(mx.zeros((1, 1, 2, 4)), mx.zeros((1, 1, 2, 4)))  # a request extends its copy...
    assert cache.lookup([1, 2, 3, 4, 5])[0][0].keys.shape[2] == 5  # ...never the entry
    cache.store([7] * 4, layers(4))  # over the bound: the least recently used entry ([1, 2, 3]) goes
    assert cache.lookup([1, 2, 3, 7]) is None and cache.lookup([1, 2, 3, 4, 5])[1] == 5
    assert cache.bytes == cache.max_bytes and len(cache.entries) == 2


def test_a_row_cancelled_mid_canvas_leaves_its_neighbours_exact(tmp_path):
    """Cancelling (a client gone) drops the row between two decoder passes; the other rows go on token for
    token as they would alone."""
    from mlx_diffusiongemma import BatchGenerator, load, stream_generate

    model, tokenizer = load(endless_toy(tmp_path / "model"))
    prompts = ["sort 70193", "add 1+2", "x"]
    alone = ["".join(r.text for r in stream_generate(model, tokenizer, p, max_tokens=48, seed=i, drafter="fast"))
             for i, p in enumerate(prompts)]
    batch = BatchGenerator(model, tokenizer, max_batch=3, drafter="fast")
    ids = [batch.submit(p, max_tokens=48, seed=i, draft_preview=i == 1) for i, p in enumerate(prompts)]
    texts, drafts = {i: "" for i in ids}, 0
    while not batch.idle:
        for request, response in batch.step():
            if response.draft is not None:
                drafts += 1
                if drafts == 3:  # after its third decoder pass: mid-canvas
                    batch.cancel(ids[1])
                continue
            texts[request] += response.text
    assert drafts == 3 and not batch.engine.rows
    assert [texts[ids[0]], texts[ids[2]]] == [alone[0], alone[2]]


def test_thoughts_and_tool_calls_cut_across_canvases_become_openai_fields():
    """The server's assembly on a scripted reply (no model): markers cut between canvases, the stream's
    deltas and the whole message agree, and a parsed call ends the reply with `tool_calls`."""
    import asyncio
    from types import SimpleNamespace

    from mlx_diffusiongemma.generate import GenerationResponse
    from mlx_diffusiongemma.openai_api import ChatRequest
    from mlx_diffusiongemma.server import _collect, _events, _Reply

    canvases = ["<|chan", "nel>thought\nuse the calc", "ulator<channel|><|tool_", "call>call:calculator{a:4",
                "82,b:37}<tool_call|>"]

    class Script:
        def __init__(self):
            self.items = [GenerationResponse(text=t, generation_tokens=len(t)) for t in canvases]
            self.items[-1].finish_reason = "stop"

        async def next(self, _=None):
            return self.items.pop(0) if self.items else None

    state = SimpleNamespace(engine=SimpleNamespace(cancel=lambda job: None))
    request = ChatRequest.model_validate({"model": "toy", "messages": _user("add 482+037"), "tools": [
        {"type": "function", "function": {"name": "calculator"}}]})
    reply = _Reply(request, True, True)
    whole, _ = asyncio.run(_collect(state, None, None, Script(), reply))
    assert (whole.reasoning, whole.content, reply.finish) == ("use the calculator", "", "tool_calls")
    assert whole.tool_calls == [{"name": "calculator", "arguments": {"a": 482, "b": 37}}]

    async def stream():
        reply = _Reply(request, True, True)
        return [e async for e in _events(state, None, Script(), reply, {}, True, False, 10)], reply

    events, reply = asyncio.run(stream())
    chunks = [json.loads(e[6:]) for e in events if e.startswith("data: {")]
    deltas = [c["choices"][0]["delta"] for c in chunks]
    assert "".join(d.get("reasoning_content", "") for d in deltas) == "use the calculator"
    assert not "".join(d.get("content", "") for d in deltas)
    calls = [call for d in deltas for call in d.get("tool_calls", [])]
    assert [(c["index"], c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == [
        (0, "calculator", {"a": 482, "b": 37})]
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls" and events[-1] == "data: [DONE]\n\n"
