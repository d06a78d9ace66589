"""The streamed-reply reader (`replies.py`): thoughts, tool calls and stop strings cut at every position."""

from __future__ import annotations

import itertools

import pytest

from mlx_diffusiongemma.replies import Delta, ReplyParser, StopMatcher

THINK_CALL = "<|channel>thought\nuse the calculator<channel|><|tool_call>call:calculator{a:482,b:37}<tool_call|>"
THINK_ANSWER = "<|channel>thought\n2+7=9 8+3=11 4+0+1=5<channel|>0519"
STRING_ARG = '<|tool_call>call:get_weather{city:<|"|>Paris, {France}<|"|>}<tool_call|>'


def _run(text: str, cuts: tuple[int, ...], tools: bool = True) -> Delta:
    parser, whole = ReplyParser(tools=tools), Delta()
    pieces = [text[a:b] for a, b in zip((0, *cuts), (*cuts, len(text)))]
    for piece in pieces:
        delta = parser.feed(piece)
        whole.reasoning += delta.reasoning
        whole.content += delta.content
        whole.tool_calls += delta.tool_calls
    tail = parser.finish()
    whole.reasoning += tail.reasoning
    whole.content += tail.content
    return whole


def _splits(text: str):
    """Every split into two pieces, and into three at every pair of positions (markers cut anywhere)."""
    yield ()
    for i in range(1, len(text)):
        yield (i,)
    for i, j in itertools.combinations(range(1, len(text)), 2):
        if j - i <= 12:  # three pieces around every marker; longer gaps add nothing new
            yield (i, j)


@pytest.mark.parametrize("text, reasoning, content, calls", [
    (THINK_ANSWER, "2+7=9 8+3=11 4+0+1=5", "0519", []),
    (THINK_CALL, "use the calculator", "", [{"name": "calculator", "arguments": {"a": 482, "b": 37}}]),
    (STRING_ARG, "", "", [{"name": "get_weather", "arguments": {"city": "Paris, {France}"}}]),
    ("plain <|tool text <| and < alone", "", "plain <|tool text <| and < alone", []),
])
def test_every_split_reads_the_same(text, reasoning, content, calls):
    for cuts in _splits(text):
        got = _run(text, cuts)
        assert (got.reasoning, got.content, got.tool_calls) == (reasoning, content, calls), cuts


def test_text_is_released_as_soon_as_no_marker_can_start():
    parser = ReplyParser()
    assert parser.feed("0519 <").content == "0519 "  # "<" could open a marker: held back
    assert parser.feed("b>").content == "<b>"
    assert parser.feed("<|channel>thought\nab").reasoning == "ab"
    assert parser.feed("c<chan").reasoning == "c"


def test_malformed_or_unfinished_calls_stay_text():
    bad = "<|tool_call>call:calculator{a:482,<tool_call|>"
    assert _run(bad, ()).content == bad and not _run(bad, ()).tool_calls
    cut = "<|tool_call>call:calculator{a:4"
    assert _run(cut, (5,)).content == cut


def test_without_tools_calls_are_text_but_thoughts_still_split():
    got = _run(THINK_CALL, (20,), tools=False)
    assert got.reasoning == "use the calculator"
    assert got.content == "<|tool_call>call:calculator{a:482,b:37}<tool_call|>" and not got.tool_calls


@pytest.mark.parametrize("text, stop, expected, stopped", [
    ("01379", ["3"], "01", True),
    ("abcdef", ["cde", "xyz"], "ab", True),
    ("abcdef", ["efg"], "abcdef", False),
    ("a\n\nb", ["\n\n"], "a", True),
])
def test_stop_strings_cut_at_every_split(text, stop, expected, stopped):
    for cuts in _splits(text):
        matcher, out, hit = StopMatcher(stop), "", False
        for a, b in zip((0, *cuts), (*cuts, len(text))):
            piece, hit = matcher.feed(text[a:b])
            out += piece
            if hit:
                break
        out += matcher.finish()
        assert (out, hit) == (expected, stopped), cuts
