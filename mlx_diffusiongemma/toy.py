"""The bundled toy DiffusionGemma: where it lives, its held-out prompts, and how it is scored.

`scripts/train_toy.py` trains it from scratch on the tasks of `tasks.py`; `demo` and the README table use
`evaluate` on prompts that training never saw (`held_out`).
"""

from __future__ import annotations

import functools

from .checkpoint import TOY_PATH  # noqa: F401  (where the toy model lives: the checkpoint layer says)
from .dialogues import CALCULATOR, call_message, operands, parse_call, split_thought, tool_result
from .generate import stream_generate
from .tasks import TASKS, examples

HELD_OUT_SEED = 1  # training draws with other seeds and skips every held-out prompt
HELD_OUT_SIZE = 2000  # the most held-out prompts any evaluation may use, per task


def held_out(task: str, n: int = 500) -> list[tuple[str, str]]:
    if n > HELD_OUT_SIZE:
        raise ValueError(f"at most {HELD_OUT_SIZE} held-out prompts per task (asked for {n})")
    return _held_out(task)[:n]


@functools.cache
def _held_out(task: str) -> list[tuple[str, str]]:
    return examples(task, HELD_OUT_SIZE, HELD_OUT_SEED)


def held_out_prompts() -> set[str]:
    return {p for task in TASKS for p, _ in held_out(task, HELD_OUT_SIZE)}


NO_THINKING = {"enable_thinking": False}


def solve(model, tokenizer, prompt, drafter="reference", seed: int = 0, *, template=NO_THINKING,
          max_tokens: int | None = None, noise=None, prompt_cache=None):
    """(the model's reply, the last `GenerationResponse` with its statistics) for a task prompt or a list of
    chat messages; `template`: the chat template's switches (thinking, tools)."""
    last, pieces = None, []
    for last in stream_generate(model, tokenizer, prompt, max_tokens=max_tokens or model.args.canvas_length,
                                drafter=drafter, seed=None if noise else seed, noise=noise,
                                chat_template_kwargs=template, prompt_cache=prompt_cache):
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


def evaluate_turns(model, tokenizer, task: str, n: int = 500, drafter="reference", seed: int = 0) -> dict:
    """Accuracy on the 3rd turn of `n` conversations: two earlier held-out prompts of the other tasks answered
    by the model itself, then a held-out prompt of `task`, through one `PromptCache` (as `chat` runs)."""
    from .cache import PromptCache
    from .noise import MLXNoise

    others = [t for t in sorted(TASKS) if t != task]
    solved = reused = 0
    for i, (prompt, _) in enumerate(held_out(task, n)):
        history, cache, noise = [], PromptCache(), MLXNoise(seed + i)
        for p in [held_out(others[(i + k) % 2], n)[i][0] for k in range(2)] + [prompt]:
            history.append({"role": "user", "content": p})
            reply, last = solve(model, tokenizer, history, drafter, noise=noise, prompt_cache=cache)
            history.append({"role": "assistant", "content": reply})
        solved += TASKS[task].check(prompt, reply)
        reused += last.prompt_cached
    return {"task": task, "prompts": n, "turn": 3, "accuracy": solved / n, "mean_cached_tokens": reused / n}


def evaluate_thinking(model, tokenizer, task: str, n: int = 500, drafter="reference", seed: int = 0) -> dict:
    """Share of `n` held-out prompts answered, with thinking on, by a well-formed thought and the right answer."""
    ok = 0
    for i, (prompt, _) in enumerate(held_out(task, n)):
        reply, _ = solve(model, tokenizer, prompt, drafter, seed + i, template={"enable_thinking": True},
                         max_tokens=3 * model.args.canvas_length)
        note, answer = split_thought(reply)
        ok += note is not None and TASKS[task].check(prompt, answer)
    return {"task": task, "prompts": n, "thinking": True, "accuracy": ok / n}


def evaluate_tools(model, tokenizer, n: int = 500, drafter="reference", seed: int = 0) -> dict:
    """With the calculator declared, over `n` held-out additions: the share of replies that are a well-formed
    call with the right arguments, and of final answers (after the tool's response) that are right."""
    calls = answers = 0
    template = {"enable_thinking": False, "tools": [CALCULATOR]}
    for i, (prompt, _) in enumerate(held_out("add", n)):
        messages = [{"role": "user", "content": prompt}]
        reply, _ = solve(model, tokenizer, messages, drafter, seed + i, template=template,
                         max_tokens=2 * model.args.canvas_length)
        call = parse_call(reply)
        calls += call == {"name": "calculator", "arguments": operands(prompt)}
        messages += [call_message(prompt), {"role": "tool", "content": tool_result(prompt, as_json=False)}]
        final, _ = solve(model, tokenizer, messages, drafter, seed + i, template=template)
        answers += TASKS["add"].check(prompt, final)
    return {"task": "add", "prompts": n, "tool_calls": calls / n, "final_answers": answers / n}
