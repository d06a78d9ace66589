"""Terminal output for the CLI: committed text, plus a live view of the canvas being denoised.

On a terminal, each denoising step's argmax draft is shown on one status line (newlines as ⏎, cut to the
terminal width): positions whose token did not change since the previous step in normal text, positions
still changing dimmed. When the canvas commits, the status line is erased and the committed text is
printed in its place, so the screen ends up holding exactly the generated text. Piped output (or
`live=False`) gets the committed text only, with no control codes.

Rendering is cheap: one dict lookup per canvas position (token id -> display string, decoded once) and a
single write per step.
"""

from __future__ import annotations

import os
import shutil
import sys
import unicodedata
from collections.abc import Iterable, Sequence
from typing import TextIO

_DIM, _NORMAL = "\x1b[2m", "\x1b[22m"
_CLEAR_LINE = "\x1b[K"
_HIDE_CURSOR, _SHOW_CURSOR = "\x1b[?25l", "\x1b[?25h"
_NEWLINE_MARK = "⏎"
_ELLIPSIS = "…"


def _visible(ch: str) -> str:
    """A control character as a visible symbol (its Unicode control picture); other characters as-is."""
    o = ord(ch)
    if o < 0x20:
        return chr(0x2400 + o)
    if o == 0x7F:
        return "\u2421"
    if 0x80 <= o < 0xA0:
        return "\ufffd"
    return ch


def terminal_safe(text: str) -> str:
    """`text` with control characters other than newline and tab made visible.

    Model output goes to the terminal through this, so a generated escape sequence, carriage return or
    backspace cannot move the cursor, recolour or rewrite the screen.
    """
    if text.isprintable():
        return text
    return "".join(ch if ch in "\n\t" else _visible(ch) for ch in text)


def cell_width(text: str) -> int:
    """Terminal columns `text` takes on one line (wide East Asian characters 2, combining marks 0)."""
    if text.isascii():
        return len(text)
    width = 0
    for ch in text:
        if ord(ch) < 0x300:
            width += 1
        elif unicodedata.combining(ch):
            continue
        else:
            width += 2 if unicodedata.east_asian_width(ch) in "WF" else 1
    return width


class TerminalOutput:
    """Where the CLI writes a reply: `write(text)` for committed text, `draft(ids, ...)` for live previews.

    Args:
        tokenizer: decodes draft ids (one id at a time, cached).
        stream: the output stream (default stdout).
        live: show drafts; honoured only when `stream` is a terminal.
        eos_ids: a draft is shown up to its first EOS, as the commit will cut it.
        hidden_ids: tokens never shown (pad...; see `hidden`), as the commit drops them.
    """

    def __init__(self, tokenizer, stream: TextIO | None = None, *, live: bool = True, eos_ids: Iterable[int] = (),
                 hidden_ids: Iterable[int] = ()):
        self.stream = stream if stream is not None else sys.stdout
        self.tty = isatty(self.stream)
        self.live = live and self.tty and os.environ.get("TERM") != "dumb" and _can_encode(self.stream, "⏎…")
        self.tokenizer = tokenizer
        self.eos = frozenset(eos_ids)
        self.hidden = frozenset(hidden_ids)
        self._pieces: dict[int, str] = {}
        self._prev: Sequence[int] | None = None
        self._tail = 0  # columns of committed text after the last newline
        self._status: str | None = None  # how the status line was opened: "here" | "below" | "wrapped"

    # -- committed text -------------------------------------------------------------------------------
    def write(self, text: str) -> None:
        """Print committed text (erasing any draft first); control characters are made visible on a tty."""
        self.clear()
        self._prev = None
        if not text:
            return
        if self.tty:
            text = terminal_safe(text)
        self.stream.write(text)
        self.stream.flush()
        head, nl, tail = text.rpartition("\n")
        self._tail = (0 if nl else self._tail) + _columns(tail, 0 if nl else self._tail)

    def newline(self) -> None:
        """End the reply's line (erasing any draft)."""
        self.clear()
        self.stream.write("\n")
        self.stream.flush()
        self._tail = 0

    def end_line(self) -> None:
        """Erase any draft and start a new line unless the cursor is already at the start of one."""
        self.clear()
        if self._tail:
            self.newline()

    # -- live drafts ----------------------------------------------------------------------------------
    def draft(self, ids: Sequence[int], canvas: int = 0, step: int = 0, room: int | None = None) -> None:
        """Show the current argmax canvas on the status line (a no-op unless live on a terminal)."""
        if not self.live:
            return
        width = shutil.get_terminal_size((80, 24)).columns - 1  # never touch the last column (auto-wrap)
        label = f"[{canvas + 1}:{step}] "
        budget = width - len(label)
        if budget < 4:
            return
        n = len(ids) if room is None else max(0, min(room, len(ids)))
        prev = self._prev
        parts = [_DIM, label]
        dim, used = True, 0
        for i in range(n):
            t = ids[i]
            if t in self.eos:
                break
            if t in self.hidden:
                continue
            piece = self._pieces.get(t)
            if piece is None:
                piece = self._pieces[t] = self._display(t)
            w = cell_width(piece)
            if used + w > budget - 1:
                parts.append(_ELLIPSIS if dim else _DIM + _ELLIPSIS)
                dim = True
                break
            stable = prev is not None and i < len(prev) and prev[i] == t
            if stable == dim:  # style changes: stable is normal text, changing is dim
                parts.append(_NORMAL if stable else _DIM)
                dim = not stable
            parts.append(piece)
            used += w
        parts.append(_NORMAL)
        self._prev = list(ids)
        self.stream.write(self._open() + "".join(parts) + _CLEAR_LINE)
        self.stream.flush()

    def clear(self) -> None:
        """Erase the status line and put the cursor back where the committed text ends."""
        if self._status is None:
            return
        out = "\r" + _CLEAR_LINE
        if self._status == "below":
            width = shutil.get_terminal_size((80, 24)).columns
            out += f"\x1b[A\x1b[{self._tail % width + 1}G"
        # "wrapped": the text filled its last row exactly, so the next character goes to this row's start.
        self.stream.write(out + _SHOW_CURSOR)
        self.stream.flush()
        self._status = None

    def _open(self) -> str:
        """Control codes that move to the start of the status line, opening it below the text if needed."""
        if self._status is not None:
            return "\r"
        width = shutil.get_terminal_size((80, 24)).columns
        if self._tail == 0:
            self._status = "here"
        elif self._tail % width == 0:
            self._status = "wrapped"
        else:
            self._status = "below"
        return _HIDE_CURSOR + ("\r" if self._status == "here" else "\n\r")

    def _display(self, token: int) -> str:
        text = self.tokenizer.decode([token])
        return "".join(_NEWLINE_MARK if ch == "\n" else " " if ch == "\t" else _visible(ch) for ch in text)


def _columns(text: str, start: int) -> int:
    """Columns `text` advances the cursor from column `start` (tabs to the next multiple of 8)."""
    if "\t" not in text:
        return cell_width(text)
    col = start
    for part in text.split("\t")[:-1]:
        col += cell_width(part)
        col = (col // 8 + 1) * 8
    return col + cell_width(text.rsplit("\t", 1)[1]) - start


def isatty(stream) -> bool:
    """Whether `stream` is a terminal; False for a closed stream or one without `isatty`."""
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def _can_encode(stream, text: str) -> bool:
    try:
        text.encode(getattr(stream, "encoding", None) or "utf-8")
        return True
    except (UnicodeEncodeError, LookupError):
        return False
