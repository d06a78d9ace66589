"""The `chat` command: a multi-turn conversation that keeps one prompt cache across turns.

Each turn renders the whole history with the chat template (assistant replies under role "assistant",
which Gemma 4's template writes as `model`) and encodes only the tokens the render adds to what the
`PromptCache` holds. With a terminal on stdin it is a readline REPL; otherwise it reads one user message
per line (for scripts and tests) and writes only the replies to stdout.

Ctrl-C while a reply is generating stops it: the partial reply and the message that asked for it are
dropped from the history and the prompt cache is put back as it was, so the conversation is exactly as
before that message, and the prompt returns.
Ctrl-C or Ctrl-D at the prompt ends the session (exit status 0).
"""

from __future__ import annotations

import math
import sys

from .console import (
    check_context, check_max_tokens, check_text, lenient_stdin, make_output, parse_template_config, print_stats, reply_length,
    stream_reply,
)
from .errors import ChatTemplateError, ContextLengthError, UsageError
from .live import isatty

HELP = """\
Commands:
  /help            show this list
  /reset           forget the conversation (the system prompt stays) and clear the prompt cache
  /max-tokens [N]  show or set the most tokens per reply
  /quit            leave (so do Ctrl-D and Ctrl-C at the prompt)
Ctrl-C while a reply is generating stops it; that reply and the message that asked for it are dropped."""

PROMPT = "> "


def run_chat(
    model: str, *, system_prompt: str | None = None, max_tokens: int | None = None, seed: int | None = None,
    drafter: str = "reference", chat_template_config: str | None = None, dtype: str | None = None,
    live: bool = True, verbose: bool = False, adapter_path: str | None = None,
) -> None:
    template_kwargs = parse_template_config(chat_template_config)
    if system_prompt is not None:
        check_text(system_prompt, "--system-prompt")
    lenient_stdin()
    check_max_tokens(max_tokens)
    interactive = isatty(sys.stdin)
    if interactive:
        _enable_readline()
        _note(f"Loading {model} ...")

    from .cache import PromptCache
    from .drafter import drafter_for
    from .generate import prompt_to_ids
    from .loader import load
    from .noise import MLXNoise

    m, tokenizer = load(model, dtype=dtype, adapter_path=adapter_path)
    config = drafter_for(m, drafter)
    opening = [{"role": "system", "content": system_prompt}] if system_prompt else []
    if max_tokens is not None:  # refused now, not at every message
        first = prompt_to_ids(tokenizer, [*opening, {"role": "user", "content": ""}], True, template_kwargs)
        _reply_length(str(max_tokens), len(first), m.args.max_position_embeddings, config.canvas_length, "--max-tokens")
    max_tokens = reply_length(m, max_tokens)
    out = make_output(m, tokenizer, live)
    history = list(opening)
    cache = PromptCache()
    noise = None if seed is None else MLXNoise(seed)  # one random stream for the session: reproducible
    turn = 0
    if interactive:
        _note("Type a message; /help lists commands, Ctrl-D leaves.")

    while True:
        try:
            line = input(PROMPT) if interactive else _read_line()
        except (EOFError, KeyboardInterrupt):
            if interactive:
                sys.stdout.write("\n")
            return
        if line is None:
            return
        try:
            check_text(line, "this message")
        except UsageError as e:  # the session goes on
            _note(f"error: {e}")
            continue
        text = line.strip()
        if not text:
            continue
        if text.startswith("/"):
            command, _, arg = text.partition(" ")
            if command in ("/quit", "/exit"):
                return
            if command == "/help":
                _note(HELP)
            elif command == "/reset":
                history, turn = list(opening), 0
                cache.reset()
                _note("Conversation cleared.")
            elif command == "/max-tokens":
                if arg.strip():
                    try:
                        prompt = prompt_to_ids(tokenizer, [*history, {"role": "user", "content": ""}], True,
                                               template_kwargs)
                        max_tokens = _reply_length(arg.strip(), len(prompt), m.args.max_position_embeddings,
                                                   config.canvas_length)
                    except UsageError as e:
                        _note(f"error: {e}")
                        continue
                _note(f"max tokens per reply: {max_tokens}")
            else:
                _note(f"unknown command {command}; /help lists the commands")
            continue

        before, restore_cache = len(history), cache.checkpoint()
        try:
            history.append({"role": "user", "content": line.rstrip("\r\n")})
            ids = prompt_to_ids(tokenizer, history, True, template_kwargs)
            check_context(m, len(ids), max_tokens, config.canvas_length,
                          hint="/reset starts a new conversation, or lower /max-tokens")
            last, reply = stream_reply(
                m, tokenizer, ids, out, max_tokens=max_tokens, drafter=config, seed=seed, noise=noise,
                prompt_cache=cache,
            )
        except (ContextLengthError, ChatTemplateError) as e:  # this message cannot be answered; the session goes on
            del history[before:]
            _note(f"error: {e}")
            continue
        except KeyboardInterrupt:
            out.end_line()
            del history[before:]
            restore_cache()  # the conversation and its cache are as before this message
            _note("[stopped: the reply and its message were dropped]")
            continue
        out.newline()
        turn += 1
        history.append({"role": "assistant", "content": reply})
        if verbose and last is not None:
            print_stats(last, chat_turn=turn)


def _reply_length(arg: str, prompt_tokens: int, context: int, canvas: int, name: str = "/max-tokens") -> int:
    """`/max-tokens ARG`, checked now rather than refused at every message: a positive whole number whose
    canvases fit in the context after the conversation so far (`prompt_tokens`, an empty next message included)."""
    try:
        value = int(arg)
    except ValueError:
        value = 0
    if value < 1:
        raise UsageError(f"{name} takes a positive whole number (got {arg!r})")
    fits = (context - prompt_tokens) // canvas * canvas
    if math.ceil(value / canvas) * canvas > fits:
        room = f"at most {fits} fits now" if fits > 0 else "/reset starts a new conversation"
        raise UsageError(
            f"{name} {value} needs {math.ceil(value / canvas)} canvases of {canvas} after the conversation's "
            f"{prompt_tokens} tokens, more than the model's context of {context}; {room}"
        )
    return value


def _read_line() -> str | None:
    line = sys.stdin.readline()
    return line if line else None


def _note(text: str) -> None:
    """Session messages go to stderr, so piped stdout carries only the replies."""
    sys.stderr.write(text + "\n")
    sys.stderr.flush()


def _enable_readline() -> None:
    try:
        import readline  # noqa: F401  (line editing and history for input())
    except ImportError:
        pass
