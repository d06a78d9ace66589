"""The bundled toy DiffusionGemma: where it lives, its held-out prompts, and how it is scored.

`scripts/train_toy.py` trains it from scratch on the tasks of `tasks.py`; `demo` and the README table use
`evaluate` on prompts that training never saw (`held_out`).
"""

from __future__ import annotations

from pathlib import Path

from .generate import stream_generate
from .tasks import TASKS, examples

TOY_PATH = Path(__file__).resolve().parent / "toy_model"
HELD_OUT_SEED = 1  # training draws with other seeds and skips every held-out prompt
HELD_OUT_SIZE = 2000  # the most held-out prompts any evaluation may use, per task


def held_out(task: str, n: int = 500) -> list[tuple[str, str]]:
    if n > HELD_OUT_SIZE:
        raise ValueError(f"at most {HELD_OUT_SIZE} held-out prompts per task (asked for {n})")
    return examples(task, HELD_OUT_SIZE, HELD_OUT_SEED)[:n]


def held_out_prompts() -> set[str]:
    return {p for task in TASKS for p, _ in held_out(task, HELD_OUT_SIZE)}


def solve(model, tokenizer, prompt: str, drafter="reference", seed: int = 0) -> tuple[str, int]:
    """(the model's reply, decoder passes it took) for one task prompt."""
    last = None
    for last in stream_generate(model, tokenizer, prompt, max_tokens=model.args.canvas_length, drafter=drafter,
                                seed=seed):
        pass
    text = "" if last is None else last.text
    return text, sum(last.steps_per_canvas) if last else 0


def evaluate(model, tokenizer, task: str, n: int = 500, drafter="reference", seed: int = 0) -> dict:
    """Exact-answer accuracy and mean decoder passes per canvas over `n` held-out prompts of `task`."""
    solved, steps = 0, 0
    for i, (prompt, _) in enumerate(held_out(task, n)):
        reply, used = solve(model, tokenizer, prompt, drafter, seed + i)
        solved += TASKS[task].check(prompt, reply)
        steps += used
    return {"task": task, "prompts": n, "accuracy": solved / n, "mean_steps": steps / n}
