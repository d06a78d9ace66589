"""The `demo` command: the bundled toy model solving held-out puzzles, canvas by canvas, offline."""

from __future__ import annotations

import random
import sys
import time

from .dialogues import CALCULATOR, parse_call, split_thought
from .errors import UsageError
from .tasks import TASKS

TURNS = 3  # turns per conversation


def _paced(out, pace: float):
    """Pause after each drawn draft so the denoising can be watched (a tiny model takes milliseconds)."""
    draw = out.draft

    def draft(*args, **kwargs):
        draw(*args, **kwargs)
        time.sleep(pace)

    out.draft = draft
    return out


def run_demo(*, task: str | None, count: int, drafter: str, seed: int | None, live: bool, pace: float,
             model: str = "toy", think: bool = False, tools: bool = False) -> int:
    """Solve `count` held-out prompts of each task (or of `task`) as the turns of one conversation (one
    prompt cache, as `chat` keeps); `think` switches the template's thinking on, `tools` declares the
    calculator and answers its calls. Returns how many were solved."""
    if task is not None and task not in TASKS:
        raise UsageError(f"unknown --task {task!r}; choose one of {', '.join(sorted(TASKS))}")
    if count < 1:
        raise UsageError(f"--count must be at least 1 (got {count})")
    if pace < 0:
        raise UsageError(f"--pace must not be negative (got {pace})")

    from .cache import PromptCache
    from .drafter import drafter_for
    from .loader import load
    from .noise import MLXNoise
    from .toy import held_out

    m, tokenizer = load(model)
    config = drafter_for(m, drafter)
    rng = random.Random(seed)
    prompts = [p for name in ([task] if task else sorted(TASKS)) for p, _ in rng.sample(held_out(name), count)]
    rng.shuffle(prompts)  # the tasks interleaved: each answer must hold whatever the earlier turns were
    turn = _Turn(m, tokenizer, config, {"enable_thinking": think, **({"tools": [CALCULATOR]} if tools else {})},
                 MLXNoise(rng.randrange(2**31)), live, pace)
    history: list[dict] = []
    solved = steps = 0
    for i, prompt in enumerate(prompts):
        if i % TURNS == 0:  # a new conversation: the toy was trained on up to 5 turns
            history, turn.cache = [], PromptCache()
            print(f"--- conversation {i // TURNS + 1} ---", flush=True)
        print(f"> {prompt}", flush=True)
        history.append({"role": "user", "content": prompt})
        reply, used = turn(history)
        call = parse_call(reply) if tools else None
        if call is not None and call["name"] == "calculator":  # play the tool: add, answer, let the model go on
            result = str(sum(int(v) for v in call["arguments"].values()))
            print(f"  [calculator -> {result}]", flush=True)
            history += [{"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": call}]},
                        {"role": "tool", "content": result}]
            reply, more = turn(history)
            used += more
        history.append({"role": "assistant", "content": reply})
        ok = TASKS[prompt.split(" ", 1)[0]].check(prompt, split_thought(reply)[1])
        print(f"  {'solved' if ok else 'WRONG'} in {used} denoising steps\n", flush=True)
        solved, steps = solved + ok, steps + used
    print(f"solved {solved}/{len(prompts)} in conversations of up to {TURNS} turns, {steps / len(prompts):.1f} "
          f"denoising steps per answer on average (drafter {config.name})", file=sys.stderr)
    return solved


class _Turn:
    """One model turn of the demo's conversation, drawn live: `(reply text, denoising steps)`."""

    def __init__(self, model, tokenizer, config, template, noise, live, pace):
        self.model, self.tokenizer, self.config, self.template = model, tokenizer, config, template
        self.cache, self.noise, self.live, self.pace = None, noise, live, pace

    def __call__(self, history: list[dict]) -> tuple[str, int]:
        from .console import make_output, stream_reply
        from .generate import prompt_to_ids

        out = make_output(self.model, self.tokenizer, self.live)
        out = _paced(out, self.pace) if out.live and self.pace else out
        ids = prompt_to_ids(self.tokenizer, history, True, self.template)
        last, reply = stream_reply(self.model, self.tokenizer, ids, out, max_tokens=3 * self.config.canvas_length,
                                   drafter=self.config, noise=self.noise, prompt_cache=self.cache)
        out.newline()
        return reply, sum(last.steps_per_canvas) if last else 0
