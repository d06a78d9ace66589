"""Reading a Gemma 4 reply as it streams: thoughts, tool calls, text and stop sequences.

The text arrives a committed canvas at a time, and a marker (`<|channel>`, `<tool_call|>`) or a stop string can
be cut between two pieces anywhere, so both readers hold back a tail that could still become one and decide
when the next piece (or the end) shows what it is. Pure string code: no MLX, no model.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

CHANNEL_OPEN, CHANNEL_CLOSE = "<|channel>", "<channel|>"
CALL_OPEN, CALL_CLOSE = "<|tool_call>", "<tool_call|>"
# A channel opens with its name on the first line (`<|channel>thought\n`); longer is not a name.
_NAME_LIMIT = 32


def _held(text: str, markers: tuple[str, ...]) -> int:
    """Length of the longest tail of `text` that is a proper prefix of one of `markers` (it may complete)."""
    best = 0
    for marker in markers:
        for n in range(min(len(marker) - 1, len(text)), best, -1):
            if marker.startswith(text[-n:]):
                best = n
                break
    return best


@dataclass
class Delta:
    """What one piece of text added: thought text, visible text, and tool calls completed in it."""

    reasoning: str = ""
    content: str = ""
    tool_calls: list[dict[str, Any]] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.reasoning or self.content or self.tool_calls)


def parse_call(body: str) -> dict[str, Any] | None:
    """`{"name", "arguments"}` of one call body (`call:NAME{...}`, Gemma 4 syntax), or None if malformed."""
    from mlx_lm.tool_parsers.gemma4 import parse_tool_call

    try:
        call = parse_tool_call(body)
    except (ValueError, json.JSONDecodeError):
        return None
    if not isinstance(call, dict) or not isinstance(call.get("arguments"), dict):
        return None
    return call


class ReplyParser:
    """Splits a streamed reply into `reasoning` (the thought channel), `content` and `tool_calls`.

    `feed(text)` returns the `Delta` that text makes certain; `finish()` flushes what is held back. With
    `tools=False` tool-call markers are ordinary text. A call that does not parse stays in `content`, markers
    included, so nothing the model wrote is lost.
    """

    def __init__(self, tools: bool = True):
        self.tools = tools
        self.state = "content"  # "content" | "name" (a channel's name line) | "thought" | "call"
        self.buffer = ""
        self.call = ""
        self.calls = 0

    def _markers(self) -> tuple[str, ...]:
        if self.state == "thought":
            return (CHANNEL_CLOSE,)
        if self.state == "call":
            return (CALL_CLOSE,)
        return (CHANNEL_OPEN, CALL_OPEN) if self.tools else (CHANNEL_OPEN,)

    def feed(self, text: str) -> Delta:
        delta = Delta()
        self.buffer += text
        while self._advance(delta):
            pass
        return delta

    def _advance(self, delta: Delta) -> bool:
        """Consume the buffer up to the next marker (True) or up to what must be held back (False)."""
        if self.state == "name":
            end = self.buffer.find("\n")
            if end < 0 and len(self.buffer) <= _NAME_LIMIT:
                return False
            self.buffer = self.buffer[end + 1 :] if end >= 0 else self.buffer
            self.state = "thought"
            return True
        found = [(self.buffer.find(m), m) for m in self._markers()]
        found = [(i, m) for i, m in found if i >= 0]
        if not found:
            keep = _held(self.buffer, self._markers())
            self._emit(delta, self.buffer[: len(self.buffer) - keep])
            self.buffer = self.buffer[len(self.buffer) - keep :]
            return False
        i, marker = min(found)
        self._emit(delta, self.buffer[:i])
        self.buffer = self.buffer[i + len(marker) :]
        if marker == CHANNEL_OPEN:
            self.state = "name"
        elif marker == CALL_OPEN:
            self.state, self.call = "call", ""
        elif marker == CHANNEL_CLOSE:
            self.state = "content"
        else:  # the call is complete
            self.state = "content"
            self._close_call(delta)
        return True

    def _emit(self, delta: Delta, text: str) -> None:
        if self.state == "thought":
            delta.reasoning += text
        elif self.state == "call":
            self.call += text
        else:
            delta.content += text

    def _close_call(self, delta: Delta) -> None:
        call = parse_call(self.call)
        if call is None:
            delta.content += CALL_OPEN + self.call + CALL_CLOSE
        else:
            delta.tool_calls.append(call)
            self.calls += 1
        self.call = ""

    def finish(self) -> Delta:
        """The end of the reply: what was held back, and an unfinished call as text."""
        delta = Delta()
        if self.state == "call":
            delta.content += CALL_OPEN + self.call + self.buffer
        elif self.state == "thought":
            delta.reasoning += self.buffer
        elif self.state == "content":
            delta.content += self.buffer
        self.buffer, self.call, self.state = "", "", "content"
        return delta


class StopMatcher:
    """Cuts streamed text at the first of the `stop` strings, holding back a tail that could start one.

    `feed(text)` returns `(text that is certain, stopped)`; after a stop the rest is discarded.
    """

    def __init__(self, stop: list[str]):
        self.stop = tuple(s for s in stop if s)
        self.buffer = ""
        self.stopped = False

    def feed(self, text: str) -> tuple[str, bool]:
        if self.stopped:
            return "", True
        self.buffer += text
        hits = [i for i in (self.buffer.find(s) for s in self.stop) if i >= 0]
        if hits:
            out, self.buffer, self.stopped = self.buffer[: min(hits)], "", True
            return out, True
        keep = _held(self.buffer, self.stop)
        out, self.buffer = self.buffer[: len(self.buffer) - keep], self.buffer[len(self.buffer) - keep :]
        return out, False

    def finish(self) -> str:
        out, self.buffer = ("" if self.stopped else self.buffer), ""
        return out
