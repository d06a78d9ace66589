"""The bundled toy DiffusionGemma: where it lives, its held-out prompts, and how it is scored.

`scripts/train_toy.py` trains it from scratch on the tasks of `tasks.py`; `demo` and the README table use
`evaluate` on prompts that training never saw (`held_out`).
"""

from __future__ import annotations

from .checkpoint import TOY_PATH  # noqa: F401  (where the toy model lives: the checkpoint layer says)
from .generate import stream_generate
from .tasks import TASKS, examples

HELD_OUT_SEED = 1  # training draws with other seeds and skips every held-out prompt
HELD_OUT_SIZE = 2000  # the most held-out prompts any evaluation may use, per task


def held_out(task: str, n: int = 500) -> list[tuple[str, str]]:
    if n > HELD_OUT_SIZE:
        raise ValueError(f"at most {HELD_OUT_SIZE} held-out prompts per task (asked for {n})")
    return examples(task, HELD_OUT_SIZE, HELD_OUT_SEED)[:n]


def held_out_prompts() -> set[str]:
    return {p for task in TASKS for p, _ in held_out(task, HELD_OUT_SIZE)}


def solve(model, tokenizer, prompt: str, drafter="reference", seed: int = 0):
    """(the model's reply, the last `GenerationResponse` with its statistics) for one task prompt."""
    last, pieces = None, []
    for last in stream_generate(model, tokenizer, prompt, max_tokens=model.args.canvas_length, drafter=drafter,
                                seed=seed):
        pieces.append(last.text)
    return "".join(pieces), last


def evaluate(model, tokenizer, task: str, n: int = 500, drafter="reference", seed: int = 0) -> dict:
    """Exact-answer accuracy and the mean cost per prompt over `n` held-out prompts of `task`.

    `mean_steps` counts decoder passes; `mean_model_passes` adds the encoder's (prefill and commit or verify
    passes); `passes_per_solved` is every model pass of the run over the prompts it solved.
    """
    solved, steps, passes, accepted, verifies = 0, 0, 0, 0, 0
    for i, (prompt, _) in enumerate(held_out(task, n)):
        reply, last = solve(model, tokenizer, prompt, drafter, seed + i)
        solved += TASKS[task].check(prompt, reply)
        steps += last.total_steps
        passes += last.model_passes
        accepted += sum(last.accepted_per_canvas)
        verifies += len(last.accepted_per_canvas)
    return {
        "task": task, "prompts": n, "accuracy": solved / n, "mean_steps": steps / n,
        "mean_model_passes": passes / n, "passes_per_solved": passes / max(solved, 1),
        "accepted_per_verify": accepted / verifies if verifies else None,
    }
