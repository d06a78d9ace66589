"""Procedural tasks with checkable answers: what the bundled toy model was trained on, and what `demo` asks.

Each task makes `(prompt, answer)` pairs from a `random.Random`, and `check` says whether a model's reply
solves the prompt (exact answer for sort and add; any valid completion that keeps the clues for sudoku).
The prompts are short chat turns in plain characters, since the toy tokenizer is character-level.
"""

from __future__ import annotations

import functools
import itertools
import random
from typing import Callable, NamedTuple


class Task(NamedTuple):
    name: str
    make: Callable[[random.Random], tuple[str, str]]
    check: Callable[[str, str], bool]  # (prompt, reply) -> solved


def _sort(rng: random.Random) -> tuple[str, str]:
    digits = [rng.randrange(10) for _ in range(rng.randint(3, 8))]
    return "sort " + "".join(map(str, digits)), "".join(map(str, sorted(digits)))


def _add(rng: random.Random) -> tuple[str, str]:
    # Fixed widths line the digits up by position (units under units), which a 4-layer model needs.
    a, b = rng.randrange(1000), rng.randrange(1000)
    return f"add {a:03d}+{b:03d}", f"{a + b:04d}"


def _check_exact(prompt: str, reply: str) -> bool:
    return reply.strip() == _solve(prompt)


def _solve(prompt: str) -> str:
    """The one right answer of a sort or add prompt."""
    verb, arg = prompt.split(" ", 1)
    if verb == "sort":
        return "".join(sorted(arg))
    a, b = arg.split("+")
    return f"{int(a) + int(b):04d}"


# --- 4x4 sudoku: rows, columns and 2x2 boxes each hold 1-4 ---------------------------------------------------

_BOXES = [[(r, c) for r in rows for c in cols] for rows in ((0, 1), (2, 3)) for cols in ((0, 1), (2, 3))]


def _valid(grid: list[list[int]]) -> bool:
    groups = grid + [list(col) for col in zip(*grid)] + [[grid[r][c] for r, c in box] for box in _BOXES]
    return all(sorted(g) == [1, 2, 3, 4] for g in groups)


@functools.cache
def grids() -> list[list[list[int]]]:
    """All 288 solved 4x4 sudokus, built on first use (only sudoku needs them), in the order of the product
    of row permutations: rows that clash with the rows above are pruned instead of tried 24^4 times."""
    rows = list(itertools.permutations((1, 2, 3, 4)))
    out: list[list[list[int]]] = []

    def extend(above: list[tuple[int, ...]]) -> None:
        if len(above) == 4:
            if _valid([list(r) for r in above]):
                out.append([list(r) for r in above])
            return
        for row in rows:
            if all(row[c] != r[c] for r in above for c in range(4)):
                extend([*above, row])

    extend([])
    return out


@functools.cache
def _grid_array():
    import numpy as np

    return np.array(grids()).reshape(len(grids()), 16)


def __getattr__(name: str):
    if name == "GRIDS":  # the old module constant, now lazy
        return grids()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _render(grid) -> str:
    return "/".join("".join(str(v) if v else "." for v in row) for row in grid)


def _parse(text: str) -> list[list[int]] | None:
    rows = text.strip().split("/")
    if len(rows) != 4 or any(len(r) != 4 for r in rows):
        return None
    try:
        return [[0 if ch == "." else int(ch) for ch in r] for r in rows]
    except ValueError:
        return None


def _solutions(puzzle) -> list:
    """The solved grids that keep the puzzle's clues, in `grids()` order (one vectorised pass)."""
    import numpy as np

    flat = np.array(puzzle).reshape(16)
    clues = np.nonzero(flat)[0]
    keep = (_grid_array()[:, clues] == flat[clues]).all(axis=1)
    return [grids()[i] for i in np.nonzero(keep)[0]]


def _sudoku(rng: random.Random) -> tuple[str, str]:
    """A puzzle with 4-10 blanks and exactly one solution."""
    grid = rng.choice(grids())
    target = rng.randint(4, 10)
    puzzle = [row[:] for row in grid]
    cells = [(r, c) for r in range(4) for c in range(4)]
    rng.shuffle(cells)
    blanks = 0
    for r, c in cells:
        if blanks == target:
            break
        value, puzzle[r][c] = puzzle[r][c], 0
        if len(_solutions(puzzle)) == 1:
            blanks += 1
        else:
            puzzle[r][c] = value
    return "sudoku " + _render(puzzle), _render(grid)


def _check_sudoku(prompt: str, reply: str) -> bool:
    puzzle, grid = _parse(prompt.split(" ", 1)[1]), _parse(reply)
    if grid is None or not _valid(grid):
        return False
    return all(v in (0, grid[r][c]) for r, row in enumerate(puzzle) for c, v in enumerate(row))


TASKS = {
    "sort": Task("sort", _sort, _check_exact),
    "add": Task("add", _add, _check_exact),
    "sudoku": Task("sudoku", _sudoku, _check_sudoku),
}


def examples(task: str, n: int, seed: int, exclude: set[str] = frozenset()) -> list[tuple[str, str]]:
    """`n` distinct `(prompt, answer)` pairs of `task`, none of whose prompts is in `exclude`."""
    rng = random.Random(f"{task}-{seed}")
    out, seen = [], set(exclude)
    while len(out) < n:
        prompt, answer = TASKS[task].make(rng)
        if prompt not in seen:
            seen.add(prompt)
            out.append((prompt, answer))
    return out
