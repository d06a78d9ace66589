"""Conversations around the toy tasks: earlier turns, Gemma 4's thinking channel and a calculator tool.

The toy model (v2) is trained on these and scored on them, so a conversation here is the ground truth of what
the toy should write: a plain answer, `<|channel>thought\\n…<channel|>` then the answer when the template's
thinking switch is on, and for an addition with the `calculator` tool declared, a Gemma 4 tool call
(`<|tool_call>call:calculator{a:482,b:37}<tool_call|>`) and, after the tool's response turn, the answer.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass, field

from .tasks import TASKS

THOUGHT_OPEN, THOUGHT_CLOSE = "<|channel>thought\n", "<channel|>"
CALL_OPEN, CALL_CLOSE = "<|tool_call>", "<tool_call|>"
MARKERS = ("<|think|>", "<|channel>", "<channel|>", "<|tool>", "<tool|>", "<|tool_call>", "<tool_call|>",
           "<|tool_response>", "<tool_response|>", '<|"|>')


def _tool(name: str, description: str, properties: dict[str, str]) -> dict:
    props = {key: {"type": kind} for key, kind in properties.items()}
    return {"type": "function", "function": {"name": name, "description": description, "parameters": {
        "type": "object", "properties": props, "required": list(properties)}}}


CALCULATOR = _tool("calculator", "Adds two numbers", {"a": "integer", "b": "integer"})
WEATHER = _tool("get_weather", "Weather in a city", {"city": "string"})


def thought(prompt: str) -> str:
    """A short working note for a task prompt: the operands of an addition, the digits of a sort, the blanks
    of a sudoku row by row. (Column sums with carries, v2's first note for additions, came out garbled; the
    operands are what the toy copies well, as in its tool calls. With the markers an addition's or a sudoku's
    thought is exactly one 24-token canvas, so the answer starts the next one: a grid split across two
    canvases, its first cells committed before the rest were drafted, was solved 86% of the time, not 96%.)"""
    verb, arg = prompt.split(" ", 1)
    if verb == "add":
        return f"adding {arg}"
    if verb == "sort":
        return f"{len(arg)} digits, lowest {min(arg)}, highest {max(arg)}"
    return "blanks " + ",".join(str(row.count(".")) for row in arg.split("/"))


def operands(prompt: str) -> dict[str, int]:
    a, b = prompt.split(" ", 1)[1].split("+")
    return {"a": int(a), "b": int(b)}


def call_text(prompt: str) -> str:
    """The tool call the toy writes for an addition, as Gemma 4's template renders one."""
    args = ",".join(f"{k}:{v}" for k, v in operands(prompt).items())
    return f"{CALL_OPEN}call:calculator{{{args}}}{CALL_CLOSE}"


def call_message(prompt: str) -> dict:
    """The assistant message (OpenAI shape) carrying that call."""
    return {"role": "assistant", "content": "",
            "tool_calls": [{"type": "function", "function": {"name": "calculator", "arguments": operands(prompt)}}]}


def tool_result(prompt: str, as_json: bool) -> str:
    total = sum(operands(prompt).values())
    return json.dumps({"result": total}) if as_json else str(total)


def _answer(task: str, prompt: str) -> str:
    """The reply a task prompt wants (a sudoku's unique solution)."""
    if task == "sudoku":
        from .tasks import _parse, _render, _solutions

        return _render(_solutions(_parse(prompt.split(" ", 1)[1]))[0])
    from .tasks import _solve

    return _solve(prompt)


def _with_zero_lead(fresh, prompt: str) -> str:
    """`prompt`, or fresh additions until one has an operand under 100 (written with a leading zero)."""
    while min(operands(prompt).values()) >= 100:
        prompt = fresh("add")
    return prompt


def think_wrap(note: str, reply: str) -> str:
    return f"{THOUGHT_OPEN}{note}{THOUGHT_CLOSE}{reply}"


@dataclass
class Dialogue:
    """Messages before the reply to train on or score, the template switches, and that reply's text."""

    messages: list[dict]
    target: str
    task: str
    prompt: str
    kind: str  # "answer", "call" (the tool call) or "after_tool" (the answer after the tool's response)
    template: dict = field(default_factory=dict)


def _turns(rng: random.Random, prompt: str, tools: bool) -> list[dict]:
    """A finished earlier exchange about `prompt`: the user turn and what the model said (with the tool's
    round trip for an addition when the calculator is declared)."""
    user = {"role": "user", "content": prompt}
    if tools and prompt.startswith("add "):
        return [user, call_message(prompt), {"role": "tool", "content": tool_result(prompt, rng.random() < 0.4)},
                {"role": "assistant", "content": _answer("add", prompt)}]
    return [user, {"role": "assistant", "content": _answer(prompt.split(" ", 1)[0], prompt)}]


def make_dialogue(rng: random.Random, skip: set[str] = frozenset(), *, earlier: int | None = None,
                  thinking: bool | None = None, tools: list[dict] | None = None, task: str | None = None,
                  thinking_share: float = 0.3, tools_share: float = 0.35, zero_calls: float = 0.0) -> Dialogue:
    """A random conversation ending where the model is to speak (each choice random unless given; the shares
    are how often thinking is on and tools are declared, and how often a tool call's addition is redrawn until
    an operand has a leading zero, the case the toy's calls got wrong: `a:19` from `019`)."""

    def fresh(name: str) -> str:
        while True:
            p, _ = TASKS[name].make(rng)
            if p not in skip:
                return p

    if earlier is None:
        earlier = 0 if rng.random() < 0.3 else rng.randint(1, 4)
    thinking = rng.random() < thinking_share if thinking is None else thinking
    if tools is None:  # when declared: the calculator alone 4 times in 7, else beside or without the weather
        roll = rng.random()
        tools = [] if roll < 1 - tools_share else [CALCULATOR] if roll < 1 - tools_share * 3 / 7 else rng.choice(
            [[CALCULATOR, WEATHER], [WEATHER, CALCULATOR], [WEATHER]])
    calc = CALCULATOR in tools
    messages: list[dict] = []
    for _ in range(earlier):
        messages += _turns(rng, fresh(rng.choice(sorted(TASKS))), calc)
    task = task or rng.choice(sorted(TASKS))
    prompt = fresh(task)
    messages.append({"role": "user", "content": prompt})
    reply, kind, note = _answer(task, prompt), "answer", thought(prompt)
    if task == "add" and calc:
        if rng.random() < 0.5:
            if rng.random() < zero_calls:
                prompt = _with_zero_lead(fresh, prompt)
                messages[-1]["content"] = prompt
            reply, kind, note = call_text(prompt), "call", "use the calculator"
        else:
            result = tool_result(prompt, rng.random() < 0.4)
            messages += [call_message(prompt), {"role": "tool", "content": result}]
            kind, note = "after_tool", f"the calculator says {sum(operands(prompt).values())}"
    template: dict = {"enable_thinking": thinking}  # explicit: mlx-lm's wrapper would default it on
    if tools:
        template["tools"] = tools
    return Dialogue(messages, think_wrap(note, reply) if thinking else reply, task, prompt, kind, template)


# --- scoring ------------------------------------------------------------------------------------------------

_THOUGHT = re.compile(re.escape(THOUGHT_OPEN) + r"([^<]+)" + re.escape(THOUGHT_CLOSE) + r"(.*)", re.DOTALL)


def split_thought(reply: str) -> tuple[str | None, str]:
    """`(thought, answer)` of a reply that opens with a well-formed thought block, else `(None, reply)`."""
    m = _THOUGHT.fullmatch(reply.strip())
    return (m.group(1), m.group(2)) if m else (None, reply)


def parse_call(reply: str) -> dict | None:
    """The one tool call a reply consists of, `{"name": ..., "arguments": {...}}`, or None if malformed."""
    from mlx_lm.tool_parsers.gemma4 import parse_tool_call

    text = reply.strip()
    if not (text.startswith(CALL_OPEN) and text.endswith(CALL_CLOSE)):
        return None
    try:
        call = parse_tool_call(text[len(CALL_OPEN):-len(CALL_CLOSE)])
    except (ValueError, json.JSONDecodeError):
        return None
    return call if isinstance(call, dict) else None
