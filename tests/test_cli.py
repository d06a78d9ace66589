"""The `mlx-diffusiongemma` command as users meet it: generate's flags, errors, help, chat and the live view.

Every CLI test runs the real command in a subprocess on a tiny random checkpoint. The chat REPL is also
driven in a real terminal (tmux), where the live canvas view and Ctrl-C are exercised.
"""

import io
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from checkpoints import build_checkpoint
from mlx_diffusiongemma.live import TerminalOutput, terminal_safe

ROOT = Path(__file__).resolve().parents[1]
STATS = ("Prompt:", "Generation:", "Peak memory:", "Diffusion:")


def _env(**extra):
    env = dict(os.environ, COLUMNS="200", **extra)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


# The installed console script, as users run it (the module form only when running from an uninstalled tree).
_SCRIPT = Path(sys.executable).with_name("mlx-diffusiongemma")
CLI = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "mlx_diffusiongemma"]


def _cli(*args, stdin=None, timeout=300):
    return subprocess.run(
        [*CLI, *map(str, args)], capture_output=True, text=True,
        input=stdin, timeout=timeout, env=_env(), cwd=ROOT,
    )


def _cli_many(*commands, stdin=None, timeout=300):
    """Run several CLI commands at once (each is a separate process; most of their time is start-up)."""
    procs = [
        subprocess.Popen(
            [*CLI, *map(str, args)], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(), cwd=ROOT,
        )
        for args in commands
    ]
    results = []
    for args, proc in zip(commands, procs):
        out, err = proc.communicate(stdin, timeout=timeout)
        results.append(subprocess.CompletedProcess(args, proc.returncode, out, err))
    return results


def _prompt_tokens(stderr: str) -> int:
    return int(re.search(r"^Prompt: (\d+) tokens", stderr, re.M).group(1))


@pytest.fixture(scope="module")
def short_ctx_ckpt(tmp_path_factory):
    """A checkpoint whose context is only 64 positions."""
    return build_checkpoint(tmp_path_factory.mktemp("short_ctx"), seed=0, num_layers=3, max_position_embeddings=64)


# --- generate --------------------------------------------------------------------------------------------


def test_generate_verbose_and_quiet(tiny_ckpt):
    base = ("generate", "--model", tiny_ckpt, "--prompt", "hello", "--max-tokens", 12, "--seed", 3)
    verbose, quiet = _cli_many((*base, "--verbose"), (*base, "--quiet"))
    assert verbose.returncode == 0, verbose.stderr
    assert verbose.stdout.strip()
    for label in STATS:
        assert re.search(rf"^{label} ", verbose.stderr, re.M), verbose.stderr
    diffusion = re.search(r"^Diffusion: 2 canvases, .* ([\d.]+) ms per step, .* seed 3, finish length$",
                          verbose.stderr, re.M)
    assert diffusion and float(diffusion.group(1)) > 0, verbose.stderr
    assert quiet.returncode == 0 and quiet.stdout == verbose.stdout
    assert quiet.stderr == "", quiet.stderr


def test_piped_output_is_plain_text(tiny_ckpt):
    args = ("generate", "--model", tiny_ckpt, "--prompt", "hello", "--max-tokens", 24, "--seed", 5)
    for result in _cli_many((*args, "--live"), (*args, "--no-live")):
        assert result.returncode == 0, result.stderr
        assert "\x1b" not in result.stdout and "\x1b" not in result.stderr
        assert "⏎" not in result.stdout and result.stdout.endswith("\n")


def test_prompt_from_stdin_matches_flag(tiny_ckpt):
    args = ("generate", "--model", tiny_ckpt, "--max-tokens", 8, "--seed", 1, "--quiet")
    piped, flag = _cli_many(
        (*args, "--prompt", "-"), (*args, "--prompt", "Write a short poem about the sea."),
        stdin="Write a short poem about the sea.",
    )
    assert piped.returncode == 0, piped.stderr
    assert piped.stdout == flag.stdout and piped.stdout.strip()


def test_generate_flags(tiny_ckpt):
    args = ("generate", "--model", tiny_ckpt, "--prompt", "hi", "--max-tokens", 8, "--seed", 2)
    plain, system, raw, think, fast = _cli_many(
        args,
        (*args, "--system-prompt", "You are terse."),
        (*args, "--ignore-chat-template"),
        (*args, "--chat-template-config", '{"enable_thinking": true}'),
        (*args, "--drafter", "fast", "--dtype", "bfloat16", "--no-live"),
    )
    for r in (plain, system, raw, think, fast):
        assert r.returncode == 0, r.stderr
        assert r.stdout.strip() and "Traceback" not in r.stderr
    n = _prompt_tokens(plain.stderr)
    assert _prompt_tokens(system.stderr) > n  # the system turn was rendered
    assert _prompt_tokens(raw.stderr) < n  # no chat markers at all
    assert _prompt_tokens(think.stderr) > n  # the template variable reached the template (thinking is opt-in)
    assert "drafter fast" in fast.stderr and re.search(r"steps per canvas (\d+) ", fast.stderr)
    assert int(re.search(r"steps per canvas (\d+) ", fast.stderr).group(1)) <= 16


def _assert_one_line_error(result, *words):
    assert result.returncode != 0, result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.stderr
    for word in words:
        assert word in lines[0], lines[0]


def test_error_unknown_drafter(tiny_ckpt):
    result = _cli("generate", "--model", tiny_ckpt, "--prompt", "hi", "--drafter", "no-such-preset")
    _assert_one_line_error(result, "no-such-preset")


@pytest.mark.parametrize("value, words", [("{enable_thinking: false", "not valid JSON"), ("[1, 2]", "JSON object")])
def test_error_bad_template_config(tiny_ckpt, value, words):
    # Checked before the model loads; chat checks it the same way.
    for command in (("generate", "--prompt", "hi"), ("chat",)):
        result = _cli(*command, "--model", tiny_ckpt, "--chat-template-config", value, stdin="")
        _assert_one_line_error(result, "--chat-template-config", words)


def test_error_prompt_too_long(short_ctx_ckpt):
    long_prompt = " ".join(["The quick brown fox jumps over the lazy dog."] * 8)
    args = ("generate", "--model", short_ctx_ckpt)
    too_long, too_many_canvases, fits = _cli_many(
        (*args, "--prompt", long_prompt, "--max-tokens", 8),
        (*args, "--prompt", "hi", "--max-tokens", 64),
        (*args, "--prompt", "hi", "--max-tokens", 16),
    )
    _assert_one_line_error(too_long, "context of 64")
    # The canvases count too: a short prompt with too many canvases is refused before generating.
    _assert_one_line_error(too_many_canvases, "context of 64", "--max-tokens")
    assert fits.returncode == 0, fits.stderr


def test_error_model_folders(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "unreadable" / "config.json").mkdir(parents=True)  # reading it fails with an OS error
    missing, empty, unreadable, chat = _cli_many(
        ("generate", "--model", tmp_path / "missing", "--prompt", "hi"),
        ("generate", "--model", tmp_path / "empty", "--prompt", "hi"),
        ("generate", "--model", tmp_path / "unreadable", "--prompt", "hi"),
        ("chat", "--model", tmp_path / "missing"),
        stdin="hi\n",
    )
    _assert_one_line_error(missing, "no such folder")
    _assert_one_line_error(empty, "config.json")
    _assert_one_line_error(unreadable, "config.json")
    _assert_one_line_error(chat, "no such folder")


def test_error_option_conflicts_and_usage(tiny_ckpt):
    args = ("generate", "--model", tiny_ckpt, "--prompt", "hi")
    conflict, zero, usage = _cli_many(
        (*args, "--ignore-chat-template", "--system-prompt", "x"), (*args, "--max-tokens", 0), (*args, "--no-such-flag")
    )
    _assert_one_line_error(conflict, "--system-prompt")
    _assert_one_line_error(zero, "--max-tokens")
    assert usage.returncode == 2 and "Traceback" not in usage.stderr and "--no-such-flag" in usage.stderr


def test_first_run_without_the_model_says_why_how_big_and_what_works_offline(tmp_path):
    """`chat` with an empty Hugging Face cache: offline, and with the Hub unreachable (a refused port)."""
    base = [*CLI, "chat"]
    runs = {
        "offline": dict(HF_HUB_OFFLINE="1"),
        "unreachable": dict(HF_HUB_OFFLINE="0", HF_ENDPOINT="http://127.0.0.1:9"),
    }
    procs = {
        name: subprocess.Popen(base, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, cwd=ROOT, env=_env(HF_HUB_CACHE=str(tmp_path / name), **extra))
        for name, extra in runs.items()
    }
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=300)
        result = subprocess.CompletedProcess(base, proc.returncode, out, err)
        _assert_one_line_error(result, "mlx-community/diffusiongemma-26B-A4B-it-4bit is not in the Hugging Face cache",
                               "about 16 GB", "24 GB of memory", "--model toy", "mlx-diffusiongemma demo",
                               "work offline")
        if name == "offline":
            assert "HF_HUB_OFFLINE=1 forbids downloading" in err and "check the network" not in err
        else:
            assert "Hub cannot be reached" in err and "HF_HUB_OFFLINE" not in err


def test_info_prints_plain_values_context_and_quantization(tmp_path):
    from mlx_diffusiongemma.convert import convert

    convert("toy", tmp_path / "toy-q", quantize=True)
    config = json.loads((ROOT / "mlx_diffusiongemma" / "toy_model" / "config.json").read_text())
    context, eos = config["text_config"]["max_position_embeddings"], config["eos_token_id"]
    plain, quantized = _cli_many(("info", "--model", "toy"), ("info", "--model", tmp_path / "toy-q"))
    for result in (plain, quantized):
        assert result.returncode == 0, result.stderr
        assert f"context {context}," in result.stdout and "dtype float32" in result.stdout
        assert f"eos {eos}" in result.stdout and "mlx.core" not in result.stdout
    assert "not quantized" in plain.stdout
    assert re.search(r"quantized 4-bit affine group 64 \(\d+ modules?\), 8-bit affine group 64 \(\d+ modules?\)",
                     quantized.stdout), quantized.stdout


# --- help ------------------------------------------------------------------------------------------------

FLAGS = {
    (): ["--version", "--debug", "--help"],
    ("generate",): [
        "--model", "--prompt", "--system-prompt", "--max-tokens", "--seed", "--drafter", "--ignore-chat-template",
        "--chat-template-config", "--dtype", "--no-live", "--verbose", "--quiet",
    ],
    ("chat",): [
        "--model", "--system-prompt", "--max-tokens", "--seed", "--drafter", "--chat-template-config", "--dtype",
        "--no-live", "--verbose", "--quiet",
    ],
    ("info",): ["--model", "--dtype"],
    ("demo",): ["--task", "--count", "--drafter", "--seed", "--no-live", "--pace"],
    ("bench",): ["--model", "--random", "--adapter-path", "--steps", "--canvases", "--json"],
    ("finetune",): [
        "--model", "--data", "--val-data", "--val-every", "--lora-rank", "--lora-experts", "--full", "--iters",
        "--batch-size", "--learning-rate", "--save-every", "--resume", "--adapter-path", "--save-path",
    ],
    ("fuse",): ["--model", "--adapter-path", "--save-path", "--dequantize"],
    ("serve",): [
        "--model", "--host", "--port", "--api-key", "--drafter", "--max-tokens", "--max-tokens-limit",
        "--decode-concurrency", "--max-queue", "--prompt-cache-bytes", "--chat-template-args", "--drain-timeout",
    ],
}


@pytest.mark.parametrize("command", list(FLAGS), ids=lambda c: " ".join(c) or "root")
def test_help_lists_flags_with_defaults_fast(command):
    args = [*CLI, *command, "--help"]
    best, result = float("inf"), None
    for _ in range(3):
        tic = time.perf_counter()
        result = subprocess.run(args, capture_output=True, text=True, env=_env(), cwd=ROOT, timeout=60)
        best = min(best, time.perf_counter() - tic)
    assert result.returncode == 0, result.stderr
    for flag in FLAGS[command]:
        assert flag in result.stdout, (flag, result.stdout)
    if command in (("generate",), ("chat",)):
        words = " ".join(result.stdout.split())  # help is wrapped to the terminal
        assert "max_new_tokens" in words and "[default: reference]" in words
        assert "default: none" in words and "[default: live]" in words
    assert best < 1.0, f"{' '.join(command)} --help took {best:.2f} s"
    assert "<bool>" not in result.stdout  # a flag takes no value
    assert not _kept_source_breaks(result.stdout, command)


def _kept_source_breaks(text: str, command: tuple) -> list[str]:
    """Line breaks of the command's docstring and option help strings that the help text kept although the
    next word fits on the line (help is re-wrapped to 100 columns here: COLUMNS=200, max_content_width)."""
    import typer.main

    from mlx_diffusiongemma.cli import app

    cmd = typer.main.get_command(app)
    cmd = cmd.commands[command[0]] if command else cmd
    sources = [cmd.help or ""] + [p.help or "" for p in cmd.params]
    lines = [line.rstrip() for line in text.splitlines()]
    kept = []
    for source in sources:
        for before, after in re.findall(r"(\S+)[ \t]*\n[ \t]*(\S+)", source):
            for line, following in zip(lines, lines[1:]):
                if line.endswith(before) and following.lstrip().startswith(after) and len(line) + len(after) < 100:
                    kept.append(f"{before} / {after}")
    return kept


def test_help_imports_no_heavy_modules():
    for command in ([], ["generate"], ["chat"]):
        result = subprocess.run(
            [sys.executable, "-X", "importtime", "-m", "mlx_diffusiongemma", *command, "--help"],
            capture_output=True, text=True, env=_env(), cwd=ROOT, timeout=60,
        )
        modules = {line.split("|")[-1].strip() for line in result.stderr.splitlines() if "|" in line}
        heavy = {m for m in modules if m.split(".")[0] in ("mlx", "mlx_lm", "transformers", "torch", "numpy")}
        assert not heavy, (command, sorted(heavy)[:10])


# --- chat (piped) -----------------------------------------------------------------------------------------


def _chat_turns(stderr: str) -> list[tuple[int, int, int]]:
    """(turn, tokens encoded this turn, tokens reused) for every reply's stats."""
    return [
        tuple(map(int, m))
        for m in re.findall(r"^Chat: turn (\d+), (\d+) tokens encoded this turn, (\d+) reused", stderr, re.M)
    ]


def test_chat_piped_reuses_cache_and_resets(tiny_ckpt):
    # One-canvas replies (--max-tokens = canvas length 8): the cache then holds exactly the previous prompt,
    # which the next render always extends, so reuse is guaranteed whatever the random model says.
    script = "hello\nhow are you\n/help\n/reset\nagain\n/unknown\n"
    result = _cli("chat", "--model", tiny_ckpt, "--max-tokens", 8, "--seed", 0, "--verbose", stdin=script)
    assert result.returncode == 0, result.stderr
    assert "\x1b" not in result.stdout and "Traceback" not in result.stderr
    assert len(result.stdout.splitlines()) >= 3  # three replies, nothing else on stdout
    turns = _chat_turns(result.stderr)
    assert [t[0] for t in turns] == [1, 2, 1], result.stderr
    prompts = [int(n) for n in re.findall(r"^Prompt: (\d+) tokens", result.stderr, re.M)]
    assert turns[0][1] == prompts[0] and turns[0][2] == 0
    assert turns[1][2] == prompts[0] and turns[1][1] == prompts[1] - prompts[0] < prompts[1]
    assert turns[2][2] == 0 and turns[2][1] == prompts[2]  # /reset cleared the cache
    assert "/reset" in result.stderr and "Conversation cleared." in result.stderr
    assert "unknown command /unknown" in result.stderr


def test_chat_same_seed_same_session(tiny_ckpt):
    args = ("chat", "--model", tiny_ckpt, "--max-tokens", 8, "--seed", 4, "--system-prompt", "Be brief.")
    first, second = _cli_many(args, args, stdin="hi\nand then?\n")
    assert first.returncode == 0, first.stderr
    assert first.stdout == second.stdout and first.stderr == second.stderr == ""


def test_chat_context_overflow_keeps_session(short_ctx_ckpt):
    # 64 positions: each turn adds ~10 prompt tokens and 16 for the canvases, so the history soon overflows.
    script = "".join(f"turn {i}\n" for i in range(6)) + "/reset\nfresh\n"
    result = _cli("chat", "--model", short_ctx_ckpt, "--max-tokens", 16, "--seed", 0, "--verbose", stdin=script)
    assert result.returncode == 0, result.stderr
    assert "context of 64" in result.stderr and "/reset starts a new conversation" in result.stderr
    assert _chat_turns(result.stderr)[-1][0] == 1  # after /reset the session works again


def test_chat_max_tokens_beyond_the_context_is_refused_when_set(short_ctx_ckpt):
    script = "/max-tokens 9999\n/max-tokens 0\n/max-tokens\nhi\n"
    session, flag = _cli_many(
        ("chat", "--model", short_ctx_ckpt, "--max-tokens", 16, "--seed", 0, "--verbose"),
        ("chat", "--model", short_ctx_ckpt, "--max-tokens", 9999),
        stdin=script,
    )
    assert session.returncode == 0, session.stderr
    assert re.search(r"^error: /max-tokens 9999 needs \d+ canvases of \d+ after the conversation's \d+ tokens, "
                     r"more than the model's context of 64; at most \d+ fits now$", session.stderr, re.M), session.stderr
    assert "error: /max-tokens takes a positive whole number (got '0')" in session.stderr
    assert "max tokens per reply: 9999" not in session.stderr and "max tokens per reply: 16" in session.stderr
    assert _chat_turns(session.stderr)[-1][0] == 1 and session.stdout.strip()  # the message was answered
    _assert_one_line_error(flag, "--max-tokens 9999", "context of 64")


def test_prompt_cache_checkpoint_restores_an_interrupted_turn(tiny_ckpt):
    import mlx.core as mx

    from mlx_diffusiongemma import load, stream_generate
    from mlx_diffusiongemma.cache import PromptCache
    from mlx_diffusiongemma.generate import prefill

    model, tokenizer = load(tiny_ckpt)
    C = model.args.canvas_length
    cache = PromptCache()
    ids1 = [2, 105, 30, 31, 32, 33, 34, 35, 36, 37, 38, 39, 40, 106, 105, 41]  # longer than the window (8)
    list(stream_generate(model, tokenizer, ids1, max_tokens=C, seed=1, prompt_cache=cache))
    assert cache.tokens == ids1
    restore = cache.checkpoint()
    # A turn stopped after its prompt was encoded and a canvas committed (as Ctrl-C would stop it).
    ids2 = ids1 + [106, 105, 50, 51, 52, 53, 54, 55, 56, 57, 58]
    stream = stream_generate(model, tokenizer, ids2, max_tokens=4 * C, seed=2, prompt_cache=cache, draft_preview=True)
    for r in stream:
        if r.canvas == 1:
            break
    stream.close()
    assert cache.layers is None  # what stream_generate leaves after an interrupted turn
    restore()
    assert cache.tokens == ids1
    ids3 = ids1 + [106, 105, 60, 61, 62]
    third = list(stream_generate(model, tokenizer, ids3, max_tokens=C, seed=3, prompt_cache=cache))
    assert third[-1].prompt_cached == len(ids1)
    fresh = model.make_cache()
    prefill(model, mx.array([ids3]), fresh)
    for a, b in zip(fresh, cache.layers):
        assert a.offset == b.offset == len(ids3) and a.length == b.length
        assert float(mx.abs(a.state[0] - b.state[0]).max()) < 1e-4
        assert float(mx.abs(a.state[1] - b.state[1]).max()) < 1e-4


# --- the live view (in-process, on a fake terminal) -------------------------------------------------------


class _Tty(io.StringIO):
    def isatty(self):
        return True


class _Tokenizer:
    pieces = {0: "<eos>", 1: " a", 2: " b", 3: "\n", 4: "\x1b[31m", 5: "é", 6: "<pad>"}

    def decode(self, ids):
        return "".join(self.pieces[i] for i in ids)


def test_live_view_marks_stable_tokens_and_erases_drafts(monkeypatch):
    monkeypatch.setenv("TERM", "xterm")
    out = _Tty()
    view = TerminalOutput(_Tokenizer(), out, eos_ids=[0])
    view.draft([1, 2, 3, 4, 0, 1], canvas=0, step=1)
    first = out.getvalue()
    assert "[1:1]" in first and " a b⏎␛[31m" in first and first.count(" a") == 1  # cut at EOS
    assert "\x1b[31m" not in first  # generated control codes never reach the terminal
    view.draft([1, 5, 3, 4, 0, 1], canvas=0, step=2)
    second = out.getvalue()[len(first):]
    # " a" is unchanged (normal text), "é" changed (dim), "⏎" unchanged (normal again).
    assert second.startswith("\r") and "\x1b[22m a\x1b[2mé\x1b[22m⏎" in second
    out.seek(0), out.truncate()
    view.write(" a b\nc\x1b[2J")
    committed = out.getvalue()
    assert committed.startswith("\r\x1b[K") and committed.endswith(" a b\nc␛[2J")  # draft erased, text safe
    assert view._tail == len("c␛[2J")


def test_live_view_never_shows_hidden_tokens(monkeypatch):
    monkeypatch.setenv("TERM", "xterm")
    out = _Tty()
    view = TerminalOutput(_Tokenizer(), out, eos_ids=[0], hidden_ids=[6])
    view.draft([6, 1, 6, 6, 2, 0, 6], canvas=0, step=1)
    assert re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", out.getvalue()).strip() == "[1:1]  a b"


def test_toy_generate_prints_no_pad_and_builds_no_sudoku_grids():
    """The issue's command: the toy pads this answer, and pad is no text. The toy's sudoku grids (seconds
    to build) are made only when a sudoku needs them, not at every command's start."""
    result = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "mlx_diffusiongemma", "generate", "--model", "toy",
         "--prompt", "What is 17 * 23?", "--seed", "0"],
        capture_output=True, text=True, env=_env(), cwd=ROOT, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    imports = {line.split("|")[-1].strip(): int(line.split("|")[0].split(":")[1])
               for line in result.stderr.splitlines() if line.startswith("import time:") and "|" in line
               and line.split("|")[0].split(":")[1].strip().isdigit()}
    assert imports.get("mlx_diffusiongemma.tasks", 0) < 200_000, imports.get("mlx_diffusiongemma.tasks")  # µs
    assert "<pad>" not in result.stdout and result.stdout.strip().isdigit(), result.stdout  # toy v2: digits, pads dropped
    assert re.search(r"^Generation: \d+ tokens", result.stderr, re.M), result.stderr[-500:]


def test_live_view_status_line_below_text_returns_cursor(monkeypatch):
    monkeypatch.setenv("TERM", "xterm")
    monkeypatch.setattr(shutil, "get_terminal_size", lambda fallback=None: os.terminal_size((40, 10)))
    out = _Tty()
    view = TerminalOutput(_Tokenizer(), out)
    view.write("hello")
    view.draft([1] * 100)
    drafted = out.getvalue()[len("hello"):]
    assert drafted.startswith("\x1b[?25l\n\r")  # status line opened below the committed text
    line = drafted.split("\n\r", 1)[1]
    visible = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", line)
    assert len(visible) <= 39 and visible.endswith("…")  # cut to the width, never the last column
    out.seek(0), out.truncate()
    view.write(" world")
    assert out.getvalue() == "\r\x1b[K\x1b[A\x1b[6G\x1b[?25h world"  # back to column 6 of the text's row


def test_no_control_codes_when_piped_or_disabled():
    for stream, live in ((io.StringIO(), True), (_Tty(), False)):
        view = TerminalOutput(_Tokenizer(), stream, live=live)
        view.draft([1, 2, 3])
        view.write(" a b")
        view.newline()
        assert "\x1b" not in stream.getvalue()
    assert terminal_safe("ok\tfine\n") == "ok\tfine\n" and terminal_safe("a\rb\x08") == "a␍b␈"


# --- chat in a real terminal ------------------------------------------------------------------------------


class _Tmux:
    def __init__(self, name: str, command: str, width: int = 160, height: int = 50):
        self.base = ["tmux", "-L", name]
        subprocess.run([*self.base, "kill-server"], capture_output=True)
        subprocess.run(
            [*self.base, "-f", "/dev/null", "new-session", "-d", "-s", "t", "-x", str(width), "-y", str(height),
             command],
            check=True, env=_env(TERM="xterm-256color"), cwd=ROOT,
        )
        subprocess.run([*self.base, "set-option", "-t", "t", "history-limit", "5000"], capture_output=True)

    def send(self, *keys: str) -> None:
        subprocess.run([*self.base, "send-keys", "-t", "t", *keys], check=True)

    def screen(self) -> str:
        return subprocess.run(
            [*self.base, "capture-pane", "-p", "-J", "-t", "t", "-S", "-"], capture_output=True, text=True
        ).stdout

    def wait(self, predicate, timeout: float = 30.0, what: str = "") -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.screen()
            if predicate(text):
                return text
            time.sleep(0.05)
        raise AssertionError(f"timed out waiting for {what}:\n{self.screen()}")

    def close(self) -> None:
        subprocess.run([*self.base, "kill-server"], capture_output=True)


@pytest.mark.skipif(shutil.which("tmux") is None, reason="needs tmux (apt-get install tmux)")
def test_chat_in_a_terminal(tiny_ckpt):
    chat = shlex.join([*CLI, "chat", "--model", str(tiny_ckpt),
                       "--max-tokens", "8", "--seed", "0", "--verbose"])
    term = _Tmux(f"mlxdg-{os.getpid()}", f"{chat}; echo EXITED $?; sleep 600")
    count = lambda s: lambda text: text.count(s)  # noqa: E731
    try:
        term.wait(lambda t: "Type a message" in t and t.rstrip().endswith(">"), 60, "the prompt")
        term.send("hello", "Enter")
        term.wait(lambda t: count("Chat: turn")(t) == 1, 30, "the first reply")
        term.send("how are you", "Enter")
        screen = term.wait(lambda t: count("Chat: turn")(t) == 2, 30, "the second reply")
        turns = _chat_turns(screen)
        prompts = [int(n) for n in re.findall(r"^Prompt: (\d+) tokens", screen, re.M)]
        assert turns[1][1] < prompts[1] and turns[1][2] == prompts[0], screen  # only the new turn encoded
        assert not re.search(r"^\[\d+:\d+\] ", screen, re.M), screen  # drafts were erased on commit

        # A long reply (50 canvases), stopped with Ctrl-C as soon as the live view shows a draft.
        term.send("/max-tokens 400", "Enter")
        term.wait(lambda t: "max tokens per reply: 400" in t, 10, "/max-tokens")
        term.send("count to ten", "Enter")
        term.wait(lambda t: re.search(r"^\[\d+:\d+\] ", t.split("count to ten")[-1], re.M), 30, "a live draft")
        term.send("C-c")
        screen = term.wait(lambda t: "[stopped" in t, 15, "the reply to stop")
        assert count("Chat: turn")(screen) == 2  # the stopped reply printed no stats

        # The stopped turn was dropped and the cache put back: the next turn is turn 3 and extends turn 2.
        term.send("/max-tokens 8", "Enter")
        term.send("again", "Enter")
        screen = term.wait(lambda t: count("Chat: turn")(t) == 3, 30, "a reply after Ctrl-C")
        turns = _chat_turns(screen)
        prompts = [int(n) for n in re.findall(r"^Prompt: (\d+) tokens", screen, re.M)]
        assert turns[2][0] == 3 and turns[2][2] == prompts[1] and turns[2][1] == prompts[2] - prompts[1], screen

        term.send("/reset", "Enter")
        term.wait(lambda t: "Conversation cleared." in t, 10, "/reset")
        term.send("fresh start", "Enter")
        screen = term.wait(lambda t: count("Chat: turn")(t) == 4, 30, "a reply after /reset")
        assert _chat_turns(screen)[3] == (1, int(re.findall(r"^Prompt: (\d+) tokens", screen, re.M)[3]), 0)
        assert "Traceback" not in screen

        term.send("/quit", "Enter")
        screen = term.wait(lambda t: "EXITED" in t, 15, "the session to end")
        assert "EXITED 0" in screen
    finally:
        term.close()


@pytest.mark.skipif(shutil.which("tmux") is None, reason="needs tmux (apt-get install tmux)")
def test_chat_ctrl_c_and_ctrl_d_at_prompt_exit_cleanly(tiny_ckpt):
    chat = shlex.join([*CLI, "chat", "--model", str(tiny_ckpt)])
    for key in ("C-c", "C-d"):
        term = _Tmux(f"mlxdg-{os.getpid()}-{key}", f"{chat}; echo EXITED $?; sleep 600")
        try:
            term.wait(lambda t: "Type a message" in t and t.rstrip().endswith(">"), 60, "the prompt")
            term.send(key)
            screen = term.wait(lambda t: "EXITED" in t, 15, "the session to end")
            assert "EXITED 0" in screen and "Traceback" not in screen and "Aborted" not in screen
        finally:
            term.close()
