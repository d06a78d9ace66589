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


class _Session:
    """One conversation: the loaded model, the messages so far and their prompt cache, the reply settings."""

    def __init__(self, m, tokenizer, config, opening: list[dict], template_kwargs: dict, max_tokens: int,
                 out, seed: int | None, verbose: bool):
        from .cache import PromptCache
        from .noise import MLXNoise

        self.m, self.tokenizer, self.config, self.out = m, tokenizer, config, out
        self.opening, self.template_kwargs, self.max_tokens = opening, template_kwargs, max_tokens
        self.seed, self.verbose = seed, verbose
        self.history, self.turn, self.cache = list(opening), 0, PromptCache()
        self.noise = None if seed is None else MLXNoise(seed)  # one random stream for the session: reproducible

    def _ids(self, messages: list[dict]) -> list[int]:
        from .generate import prompt_to_ids

        return prompt_to_ids(self.tokenizer, messages, True, self.template_kwargs)

    def command(self, text: str) -> bool:
        """Run a /command; False when it ends the session."""
        command, _, arg = text.partition(" ")
        if command in ("/quit", "/exit"):
            return False
        if command == "/help":
            _note(HELP)
        elif command == "/reset":
            self.history, self.turn = list(self.opening), 0
            self.cache.reset()
            _note("Conversation cleared.")
        elif command == "/max-tokens":
            if arg.strip():
                try:
                    prompt = self._ids([*self.history, {"role": "user", "content": ""}])
                    self.max_tokens = _reply_length(arg.strip(), len(prompt), self.m.args.max_position_embeddings,
                                                    self.config.canvas_length)
                except UsageError as e:
                    _note(f"error: {e}")
                    return True
            _note(f"max tokens per reply: {self.max_tokens}")
        else:
            _note(f"unknown command {command}; /help lists the commands")
        return True

    def reply(self, line: str) -> None:
        """Answer one message; a message that cannot be answered, or Ctrl-C, leaves the session as it was."""
        before, restore_cache = len(self.history), self.cache.checkpoint()
        try:
            self.history.append({"role": "user", "content": line.rstrip("\r\n")})
            ids = self._ids(self.history)
            check_context(self.m, len(ids), self.max_tokens, self.config.canvas_length,
                          hint="/reset starts a new conversation, or lower /max-tokens")
            last, reply = stream_reply(
                self.m, self.tokenizer, ids, self.out, max_tokens=self.max_tokens, drafter=self.config,
                seed=self.seed, noise=self.noise, prompt_cache=self.cache,
            )
        except (ContextLengthError, ChatTemplateError) as e:  # this message cannot be answered; the session goes on
            del self.history[before:]
            _note(f"error: {e}")
            return
        except KeyboardInterrupt:
            self.out.end_line()
            del self.history[before:]
            restore_cache()  # the conversation and its cache are as before this message
            _note("[stopped: the reply and its message were dropped]")
            return
        self.out.newline()
        self.turn += 1
        self.history.append({"role": "assistant", "content": reply})
        if self.verbose and last is not None:
            print_stats(last, chat_turn=self.turn)


def _open_session(model: str, *, system_prompt, max_tokens, seed, drafter, template_kwargs, dtype, live, verbose,
                  adapter_path) -> _Session:
    from .drafter import drafter_for
    from .generate import prompt_to_ids
    from .loader import load

    m, tokenizer = load(model, dtype=dtype, adapter_path=adapter_path)
    config = drafter_for(m, drafter)
    opening = [{"role": "system", "content": system_prompt}] if system_prompt else []
    if max_tokens is not None:  # refused now, not at every message
        first = prompt_to_ids(tokenizer, [*opening, {"role": "user", "content": ""}], True, template_kwargs)
        _reply_length(str(max_tokens), len(first), m.args.max_position_embeddings, config.canvas_length, "--max-tokens")
    return _Session(m, tokenizer, config, opening, template_kwargs, reply_length(m, max_tokens),
                    make_output(m, tokenizer, live), seed, verbose)


def run_chat(
    model: str, *, system_prompt: str | None = None, max_tokens: int | None = None, seed: int | None = None,
    drafter: str = "reference", chat_template_config: str | None = None, dtype: str | None = None,
    live: bool = True, verbose: bool = False, adapter_path: str | None = None,
) -> None:
    from .cluster import refuse_split

    refuse_split("chat")
    template_kwargs = parse_template_config(chat_template_config)
    if system_prompt is not None:
        check_text(system_prompt, "--system-prompt")
    lenient_stdin()
    check_max_tokens(max_tokens)
    interactive = isatty(sys.stdin)
    if interactive:
        _enable_readline()
        _note(f"Loading {model} ...")
    session = _open_session(model, system_prompt=system_prompt, max_tokens=max_tokens, seed=seed, drafter=drafter,
                            template_kwargs=template_kwargs, dtype=dtype, live=live, verbose=verbose,
                            adapter_path=adapter_path)
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
            if not session.command(text):
                return
            continue
        session.reply(line)


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
