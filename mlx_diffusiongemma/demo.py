"""The `demo` command: the bundled toy model solving held-out puzzles, canvas by canvas, offline."""

from __future__ import annotations

import random
import sys
import time

from .errors import UsageError
from .tasks import TASKS


def _paced(out, pace: float):
    """Pause after each drawn draft so the denoising can be watched (a tiny model takes milliseconds)."""
    draw = out.draft

    def draft(*args, **kwargs):
        draw(*args, **kwargs)
        time.sleep(pace)

    out.draft = draft
    return out


def run_demo(*, task: str | None, count: int, drafter: str, seed: int | None, live: bool, pace: float,
             model: str = "toy") -> int:
    """Solve `count` held-out prompts of each task (or of `task`); returns how many were solved."""
    if task is not None and task not in TASKS:
        raise UsageError(f"unknown --task {task!r}; choose one of {', '.join(sorted(TASKS))}")
    if count < 1:
        raise UsageError(f"--count must be at least 1 (got {count})")
    if pace < 0:
        raise UsageError(f"--pace must not be negative (got {pace})")

    from .console import make_output, stream_reply
    from .drafter import drafter_for
    from .generate import prompt_to_ids
    from .loader import load
    from .toy import held_out

    m, tokenizer = load(model)
    config = drafter_for(m, drafter)
    rng = random.Random(seed)
    solved = total = steps = 0
    for name in [task] if task else sorted(TASKS):
        for prompt, _ in rng.sample(held_out(name), count):
            print(f"> {prompt}", flush=True)
            out = make_output(m, tokenizer, live)
            out = _paced(out, pace) if out.live and pace else out
            last, reply = stream_reply(m, tokenizer, prompt_to_ids(tokenizer, prompt), out,
                                       max_tokens=config.canvas_length, drafter=config, seed=rng.randrange(2**31))
            out.newline()
            ok = TASKS[name].check(prompt, reply)
            used = sum(last.steps_per_canvas) if last else 0
            print(f"  {'solved' if ok else 'WRONG'} in {used} denoising steps\n", flush=True)
            solved, total, steps = solved + ok, total + 1, steps + used
    print(f"solved {solved}/{total}, {steps / total:.1f} denoising steps per answer on average "
          f"(drafter {config.name})", file=sys.stderr)
    return solved
