"""What the `generate` and `chat` commands share: option checks, the context check, one streamed reply, stats.

Imported only when a command runs (it pulls in MLX), so `--help` stays fast.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
from typing import Any

from .errors import ContextLengthError, UsageError
from .live import TerminalOutput

DEFAULT_MAX_TOKENS = 256


# apply_chat_template's own arguments: the runner sets them (or they change what it returns), so a template
# variable of the same name would clash with them.
RESERVED_TEMPLATE_KEYS = (
    "messages", "conversation", "tokenize", "add_generation_prompt", "continue_final_message", "return_dict",
    "return_tensors", "return_assistant_tokens_mask", "tokenizer_kwargs", "padding", "truncation", "max_length",
)


def parse_template_config(value: str | None) -> dict[str, Any] | None:
    """`--chat-template-config`: a JSON object of extra chat template variables (None when not given)."""
    if value is None:
        return None
    example = """e.g. '{"enable_thinking": true}'"""
    try:
        config = json.loads(value)
    except json.JSONDecodeError as e:
        raise UsageError(f"--chat-template-config is not valid JSON ({e.msg} at column {e.colno}); {example}") from None
    if not isinstance(config, dict):
        raise UsageError(f"--chat-template-config must be a JSON object, {example}")
    reserved = [key for key in config if key in RESERVED_TEMPLATE_KEYS]
    if reserved:
        raise UsageError(f"--chat-template-config: {reserved[0]!r} is set by the runner, not a chat template "
                         f"variable; drop it ({example})")
    check_text(json.dumps(config, ensure_ascii=False), "--chat-template-config")  # raw bytes or "\\udcff"
    return config


def check_max_tokens(max_tokens: int | None) -> None:
    """`--max-tokens`, when given, is at least 1 (one line otherwise)."""
    if max_tokens is not None and max_tokens < 1:
        raise UsageError(f"--max-tokens must be at least 1 (got {max_tokens})")


def check_context(model, prompt_tokens: int, max_tokens: int, canvas_length: int, hint: str = "") -> None:
    """Raise `ContextLengthError` unless the prompt and every canvas `max_tokens` needs fit in the context.

    Canvases are drafted whole, so `max_tokens` takes `ceil(max_tokens / canvas_length)` full canvases of
    positions after the prompt.
    """
    check_max_tokens(max_tokens)
    limit = model.args.max_position_embeddings
    canvases = math.ceil(max_tokens / canvas_length)
    need = prompt_tokens + canvases * canvas_length
    if need > limit:
        plural = "canvas" if canvases == 1 else "canvases"
        raise ContextLengthError(
            f"the prompt is {prompt_tokens} tokens and --max-tokens {max_tokens} needs {canvases} {plural} of "
            f"{canvas_length}: {need} positions, more than the model's context of {limit}; "
            f"{hint or 'shorten the prompt or lower --max-tokens'}"
        )


def reply_length(model, max_tokens: int | None) -> int:
    """`--max-tokens` if given, else the checkpoint's `max_new_tokens` (the released one says 256), else 256."""
    if max_tokens is not None:
        return max_tokens
    configured = model.generation_config.get("max_new_tokens")
    return configured if isinstance(configured, int) and configured > 0 else DEFAULT_MAX_TOKENS


def make_output(model, tokenizer, live: bool, stream=None) -> TerminalOutput:
    from .generate import eos_ids
    from .hidden import hidden_token_ids

    return TerminalOutput(tokenizer, stream, live=live, eos_ids=eos_ids(model, tokenizer),
                          hidden_ids=hidden_token_ids(model, tokenizer))


def stream_reply(model, tokenizer, ids: list[int], out: TerminalOutput, *, max_tokens: int, drafter, seed=None,
                 noise=None, prompt_cache=None):
    """Generate one reply to `ids`, printing it through `out` (live drafts on a terminal).

    Returns `(last response, reply text)`. The status line is erased even when interrupted (Ctrl-C).
    """
    from .generate import stream_generate

    last, pieces = None, []
    try:
        for r in stream_generate(
            model, tokenizer, ids, max_tokens=max_tokens, drafter=drafter, seed=seed, noise=noise,
            draft_preview=out.live, prompt_cache=prompt_cache,
        ):
            if r.draft is not None:
                out.draft(r.draft, r.canvas, r.step, max_tokens - r.generation_tokens)
                continue
            out.write(r.text)
            pieces.append(r.text)
            last = r
    finally:
        out.clear()
    return last, "".join(pieces)


def stats_lines(r, chat_turn: int | None = None) -> list[str]:
    """The statistics printed after a reply (`--verbose`); chat adds what the prompt cache saved."""
    steps = "/".join(str(s) for s in r.steps_per_canvas)
    ms_per_step = r.generation_time / max(r.total_steps, 1) * 1000
    lines = [
        f"Prompt: {r.prompt_tokens} tokens, {r.prompt_tps:.3f} tokens-per-sec",
        f"Generation: {r.generation_tokens} tokens, {r.generation_tps:.3f} tokens-per-sec",
        f"Peak memory: {r.peak_memory:.3f} GB",
        f"Diffusion: {r.canvases} canvases, steps per canvas {steps} ({r.total_steps} decoder passes), "
        f"{ms_per_step:.1f} ms per step, {r.tokens_per_forward:.2f} tokens per forward, drafter {r.drafter}, "
        f"seed {r.seed}, finish {r.finish_reason}",
    ]
    if r.accepted_per_canvas:
        accepted = "/".join(str(a) for a in r.accepted_per_canvas)
        lines.append(
            f"Verify: tokens accepted per canvas {accepted} ({r.accepted_per_verify:.2f} per verify), "
            f"{r.model_passes} model passes ({r.total_steps} decoder, {r.encoder_passes} encoder)"
        )
    if chat_turn is not None:
        lines.append(
            f"Chat: turn {chat_turn}, {r.prompt_tokens - r.prompt_cached} tokens encoded this turn, "
            f"{r.prompt_cached} reused from the cache"
        )
    return lines


def print_stats(r, chat_turn: int | None = None, stream=None) -> None:
    stream = stream if stream is not None else sys.stderr
    stream.write("\n".join(["=" * 10, *stats_lines(r, chat_turn)]) + "\n")
    stream.flush()


def run_generate(
    model: str, prompt: str, *, system_prompt: str | None, max_tokens: int | None, seed: int | None, drafter: str,
    ignore_chat_template: bool, chat_template_config: str | None, dtype: str | None, live: bool, verbose: bool,
    adapter_path: str | None = None, debug: bool = False,
) -> None:
    """The `generate` command: checks every option before loading, then streams one reply to stdout.

    Under `mlx.launch` (a group of processes) each rank loads its part of the model; any rank's failure while
    checking or loading ends every rank, with one line from rank 0; only rank 0 prints."""
    from .cluster import join, shared_seed, together

    group = join()

    def prepare():
        return _prepare_generate(model, prompt, system_prompt, max_tokens, drafter, ignore_chat_template,
                                 chat_template_config, dtype, adapter_path, group)

    m, tokenizer, ids, config, max_tokens = prepare() if group is None else together(group, prepare, debug)
    lead = group is None or group.rank() == 0
    if group is not None:
        seed = shared_seed(group, seed)
    with contextlib.nullcontext() if lead else open(os.devnull, "w") as sink:  # other ranks print nothing
        out = make_output(m, tokenizer, live, sink)
        last, _ = stream_reply(m, tokenizer, ids, out, max_tokens=max_tokens, drafter=config, seed=seed)
        out.newline()
    if verbose and last is not None and lead:
        print_stats(last)
        if group is not None:
            sys.stderr.write(f"Processes: {group.size()} (the model split across them; figures are rank 0's)\n")


def _prepare_generate(model, prompt, system_prompt, max_tokens, drafter, ignore_chat_template, chat_template_config,
                      dtype, adapter_path, group):
    """Everything `generate` checks and loads before the first pass: (model, tokenizer, ids, drafter, length)."""
    template_kwargs = parse_template_config(chat_template_config)
    if ignore_chat_template and system_prompt:
        raise UsageError("--system-prompt needs the chat template (drop --ignore-chat-template)")
    if ignore_chat_template and template_kwargs:
        raise UsageError("--chat-template-config needs the chat template (drop --ignore-chat-template)")
    check_max_tokens(max_tokens)
    if group is not None and prompt == "-":
        raise UsageError("under mlx.launch standard input never ends; pass the prompt itself with --prompt")
    if group is not None and adapter_path is not None:
        raise UsageError("--adapter-path is not supported across processes; merge the adapters first "
                         "(mlx-diffusiongemma fuse) and pass the merged checkpoint")
    if prompt == "-":
        lenient_stdin()
    text = check_text(sys.stdin.read() if prompt == "-" else prompt, "the prompt")
    if system_prompt is not None:
        check_text(system_prompt, "--system-prompt")

    from .drafter import drafter_for
    from .generate import prompt_to_ids

    if group is None:
        from .loader import load

        m, tokenizer = load(model, dtype=dtype, adapter_path=adapter_path)
    else:
        from .cluster import load_sharded

        m, tokenizer = load_sharded(model, group, dtype=dtype)
    config = drafter_for(m, drafter)
    max_tokens = reply_length(m, max_tokens)
    if ignore_chat_template:
        request = text
    else:
        request = ([{"role": "system", "content": system_prompt}] if system_prompt else []) + [
            {"role": "user", "content": text}
        ]
    ids = prompt_to_ids(tokenizer, request, not ignore_chat_template, template_kwargs)
    check_context(m, len(ids), max_tokens, config.canvas_length)
    return m, tokenizer, ids, config, max_tokens


def lenient_stdin() -> None:
    """Decode standard input keeping undecodable bytes (as lone surrogates, as Python does for argv), so that
    `check_text` reports them in one line instead of a UnicodeDecodeError."""
    if hasattr(sys.stdin, "reconfigure"):
        sys.stdin.reconfigure(errors="surrogateescape")


def check_text(text: str, what: str) -> str:
    """`text` if it is valid UTF-8, else a `UsageError` naming the first undecodable byte."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        code = ord(text[e.start])
        bad = f"byte 0x{code - 0xDC00:02x}" if 0xDC80 <= code <= 0xDCFF else f"U+{code:04X}"
        raise UsageError(f"{what} is not valid UTF-8 ({bad} at character {e.start + 1}); pass UTF-8 text") from None
    return text
