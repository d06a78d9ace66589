"""Every code block of README.md runs as written (issue #11), so a README change cannot silently break.

README.md is parsed when the tests are collected. Each fenced block is classified by its language:
```bash / ```sh / ```shell blocks are commands and ```python blocks are programs, and both run; plain ```
and ```text blocks are transcripts or output samples (a chat session, statistics, the compare.py table)
and do not. A block in any other language, or a command-like block labelled as output, fails
`test_every_block_is_classified` until it is labelled.

Each block runs offline (HF_HUB_OFFLINE=1) in its own temporary folder, each command of a shell block in
`bash` with standard input closed, as typed, except for what this table substitutes (the README names
things this machine does not have) and for the listed EXCEPTIONS:

    README                                        here
    a Hub repo id (`org/diffusiongemma-*`), and   the toy model, from a temporary Hugging Face cache under
    the default model of `chat`/`generate`        that id; its context raised to the released 262144, so
                                                  the README's lengths fit (its canvas stays 24 tokens)
    ./checkpoint, PATH (your checkpoint)          the same stand-in, in the block's folder
    train.jsonl, valid.jsonl (your data)          a few toy-task examples, in the block's folder
    /tmp/...                                      the same path inside the block's folder
    python, pip, pytest, mlx-diffusiongemma       this interpreter's environment (its bin folder first)
    localhost:8080 (the `serve` example's port)    127.0.0.1 and a free port

The `mlx-diffusiongemma serve` command runs for as long as it is let, so it is not run inside its block: the
`readme_server` fixture starts it as typed (with the free port), in the background, before the blocks that
need it; its block passes when that server answers `/health`, the blocks that call it (curl, `openai`) run
against it, and it must exit 0 on SIGTERM at the end.

Blocks run two at a time, but `mlx.launch` commands one at a time: local launches share the ring backend's
default ports.

A command passes when it exits 0 with no traceback and no `error:` line on stderr.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest

from figures import record

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: pytest's own dependency
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
SHELL, PYTHON, OUTPUT = ("bash", "sh", "shell"), ("python", "py"), ("", "text", "output")
HUB_ID = re.compile(r"(?<![\w./-])([\w.-]+/diffusiongemma-[\w.-]+)")
COMMAND_WORDS = ("mlx-diffusiongemma", "python", "pip", "pytest", "from ", "import ")
RELEASED_CONTEXT = 262144
SERVE = re.compile(r"^mlx-diffusiongemma serve\b")
SERVE_ADDRESS = "localhost:8080"
# Two local `mlx.launch -n 2` runs both take the ring backend's default ports (32323 on), so blocks that run
# side by side take turns for their launches, as a user typing them one after another would.
LAUNCH_TURN = threading.Lock()


@dataclass(frozen=True)
class Block:
    language: str
    line: int  # of the opening fence in README.md
    text: str

    @property
    def id(self) -> str:
        return f"line{self.line}-{self.language or 'plain'}"


def readme_blocks(text: str) -> list[Block]:
    blocks, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        fence = re.match(r"^(`{3,})\s*([\w+-]*)", lines[i])
        if not fence:
            i += 1
            continue
        end = next((j for j in range(i + 1, len(lines)) if lines[j].startswith(fence.group(1))), None)
        assert end is not None, f"README.md:{i + 1}: unclosed code fence"
        blocks.append(Block(fence.group(2).lower(), i + 1, "\n".join(lines[i + 1 : end]) + "\n"))
        i = end + 1
    return blocks


BLOCKS = readme_blocks(README.read_text(encoding="utf-8"))
RUNNABLE = [b for b in BLOCKS if b.language in SHELL + PYTHON]


def commands(block: Block) -> list[str]:
    """The logical command lines of a shell block: continuations joined, blank and comment lines dropped."""
    joined = re.sub(r"\\\n", " ", block.text)
    return [line.strip() for line in joined.splitlines() if line.strip() and not line.lstrip().startswith("#")]


# --- exceptions: commands not run exactly as typed, each with the reason ----------------------------------


@dataclass(frozen=True)
class Exception_:
    pattern: str  # a regex searched in the command line
    edit: Callable[[list[str]], list[str]]  # the command's words -> the words run
    reason: str


def _append(*extra: str, unless: str | None = None):
    return lambda words: words + ([] if unless and unless in words else list(extra))


def _geometry(typed: str, run: str):
    return lambda words: [(run if a == typed and words[i - 1] == "--random" else a) for i, a in enumerate(words)]


EXCEPTIONS = [
    Exception_(r"^mlx-diffusiongemma bench .*--random full\b",
               _geometry("full", "tiny"),
               "the 26B geometry builds ~15 GB of random weights for minutes: the same flags on `--random tiny`"),
    Exception_(r"^mlx-diffusiongemma bench .*--random medium\b",
               _geometry("medium", "small"),
               "4 rows of the medium geometry take 5.5 CPU minutes here at 2 steps, past 600 s beside the training "
               "block: the same flags on `--random small`"),
    Exception_(r"^mlx-diffusiongemma bench\b", _append("--steps", "2", "--repeat", "1"),
               "timing runs (`--random small --steps 16` took 105 s here): one run of 2 steps checks the command"),
    Exception_(r"^mlx-diffusiongemma finetune\b", _append("--iters", "4"),
               "training: 4 iterations check the command, its validation, and that the adapters it saves load"),
    Exception_(r"^(python|.*mlx\.launch .*) scripts/train_toy\.py\b", _append("--iters", "2", "--batch-size", "2"),
               "training the toy took over 2 hours: 2 iterations of 2 examples check each stage's command"),
    Exception_(r"^(python|.*mlx\.launch .*) scripts/train_toy\.py\b",
               _append("--eval-prompts", "2", unless="--eval-prompts"),
               "the held-out evaluation of 500 prompts per task: 2 per task"),
    Exception_(r"^(python|.*mlx\.launch .*) scripts/train_toy\.py\b.*--conversation-prompts\b",
               _append("--conversation-prompts", "2"),
               "the 200 held-out conversations per task and kind (9 minutes on 2 processes here): 2 (the last "
               "flag wins)"),
]
# `pip install SPEC && ...` (installing needs the network and would change this environment) and `pytest`
# (the suite cannot run itself) are checked, not run: see `_check_pip_install` and `_check_pytest`.


def _check_pip_install(spec: list[str]) -> None:
    """`pip install -e .[extras]`: the project is installed (its console script too) with every extra's
    requirements, and each extra exists in pyproject.toml."""
    assert len(spec) == 2 and spec[0] == "-e", f"unexpected pip install {shlex.join(spec)}"
    target = re.fullmatch(r"\.(?:\[([\w,-]+)\])?", spec[1])
    assert target, f"pip install -e {spec[1]}: only the project itself is checked"
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    importlib.metadata.distribution(project["name"])
    for script in project["scripts"]:
        assert shutil.which(script, path=_env()["PATH"]), f"{script} is not installed"
    for extra in filter(None, (target.group(1) or "").split(",")):
        assert extra in project["optional-dependencies"], f"no [{extra}] extra in pyproject.toml"
        for requirement in project["optional-dependencies"][extra]:
            importlib.metadata.distribution(re.match(r"[\w.-]+", requirement).group(0))


def _check_pytest() -> None:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]
    assert [ROOT / p for p in config["testpaths"]] == [Path(__file__).parent], config


# --- the stand-ins --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def stand_ins(tmp_path_factory) -> dict[str, Path]:
    """The stand-in checkpoint, a Hugging Face cache holding it under every repo id the README runs, and data."""
    from mlx_diffusiongemma.cli import DEFAULT_MODEL
    from mlx_diffusiongemma.tasks import examples
    from mlx_diffusiongemma.toy import TOY_PATH

    root = tmp_path_factory.mktemp("readme")
    model = root / "stand-in"
    shutil.copytree(TOY_PATH, model)
    config = json.loads((model / "config.json").read_text())
    config["text_config"]["max_position_embeddings"] = RELEASED_CONTEXT
    (model / "config.json").write_text(json.dumps(config, indent=2))
    cache = root / "hub"
    for repo in {DEFAULT_MODEL, *(m for b in RUNNABLE for m in HUB_ID.findall(b.text))}:
        folder = cache / ("models--" + repo.replace("/", "--"))
        shutil.copytree(model, folder / "snapshots" / ("0" * 40))
        (folder / "refs").mkdir()
        (folder / "refs" / "main").write_text("0" * 40)
    data = root / "data"
    data.mkdir()
    for name, seed, n in (("train.jsonl", 11, 16), ("valid.jsonl", 12, 4)):
        rows = [{"prompt": p, "completion": a} for task in ("sort", "add") for p, a in examples(task, n // 2, seed)]
        (data / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {"model": model, "cache": cache, "data": data}


def _env(stand_ins: dict[str, Path] | None = None) -> dict[str, str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    if stand_ins:
        env["HF_HUB_CACHE"] = str(stand_ins["cache"])
    return env


def _workdir(block: Block, stand_ins: dict[str, Path]) -> Path:
    """The block's folder: the repository's files (scripts/, benchmarks/ ...) linked in, and the stand-ins."""
    work = stand_ins["model"].parent / block.id
    work.mkdir()
    for entry in ROOT.iterdir():
        if not entry.name.startswith("."):
            (work / entry.name).symlink_to(entry)
    for name in ("checkpoint", "PATH"):
        (work / name).symlink_to(stand_ins["model"])
    for data in stand_ins["data"].iterdir():
        shutil.copy(data, work / data.name)
    (work / "tmp").mkdir()
    return work


# --- running a block ------------------------------------------------------------------------------------


def _as_run(command: str, work: Path, server: str | None = None) -> tuple[str | None, list[str]]:
    """(the bash command line to run, or None when it is only checked; the exceptions applied)."""
    command = re.sub(r"(?<![\w./-])/tmp/", f"{work}/tmp/", command)
    if server is not None:
        command = command.replace(SERVE_ADDRESS, server)
    if SERVE.match(command):
        assert server is not None and httpx_get(f"http://{server}/health").status_code == 200
        return None, ["serve: started by the readme_server fixture as typed (a free port), answering /health"]
    words = shlex.split(command, comments=True)
    if words[:2] == ["pip", "install"]:
        spec, _, rest = command.partition("&&")
        _check_pip_install(shlex.split(spec)[2:])
        return _as_run(rest.strip(), work) if rest.strip() else (None, ["pip install: checked"])
    if words == ["pytest"]:
        _check_pytest()
        return None, ["pytest: checked"]
    applied = [e for e in EXCEPTIONS if re.search(e.pattern, shlex.join(words))]
    if not applied:
        return command, []
    assert not set("|<>;&") & set(shlex.join(words)), f"an exception cannot edit a compound command: {command}"
    for exception in applied:
        words = exception.edit(words)
    return shlex.join(words), [e.pattern for e in applied]


def _failure(result: subprocess.CompletedProcess) -> str | None:
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    if result.returncode != 0 or "Traceback" in result.stderr or errors:
        return f"exit {result.returncode}\n--- stdout\n{result.stdout[-2000:]}\n--- stderr\n{result.stderr[-3000:]}"
    return None


def _run(argv: list[str], work: Path, env: dict[str, str], limit: float = 600) -> subprocess.CompletedProcess:
    """Run a command in its own process group: one past `limit` seconds is killed with everything it started
    (training's ranks and scoring workers would otherwise keep both cores busy for the blocks after it)."""
    proc = subprocess.Popen(argv, cwd=work, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=limit)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        stderr += f"\n(killed after {limit:.0f} s)"
    return subprocess.CompletedProcess(argv, proc.returncode, stdout, stderr)


def run_block(block: Block, stand_ins: dict[str, Path], server: str | None = None
              ) -> list[tuple[str, float, str | None]]:
    """Run a block: [(what ran, seconds, failure or None)] per command (the Python block is one command)."""
    work, env = _workdir(block, stand_ins), _env(stand_ins)
    if block.language in PYTHON:
        script = work / "readme_block.py"
        text = block.text if server is None else block.text.replace(SERVE_ADDRESS, server)
        script.write_text(re.sub(r"(?<![\w./-])/tmp/", f"{work}/tmp/", text))
        runs = [([sys.executable, str(script)], block.text.splitlines()[0])]
    else:
        runs = []
        for command in commands(block):
            line, applied = _as_run(command, work, server)
            label = command + (f"  [{'; '.join(applied)}]" if applied else "")
            runs.append((None if line is None else ["bash", "-o", "pipefail", "-c", line], label))
    out = []
    for argv, label in runs:
        if argv is None:
            out.append((label, 0.0, None))
            continue
        with LAUNCH_TURN if "mlx.launch" in label else contextlib.nullcontext():
            tic = time.perf_counter()
            result = _run(argv, work, env)
        out.append((label, time.perf_counter() - tic, _failure(result)))
        if out[-1][2]:
            break
    return out


def httpx_get(url: str):
    import httpx

    return httpx.get(url, timeout=5)


def _needs_server(block: Block) -> bool:
    return SERVE_ADDRESS in block.text or any(SERVE.match(c) for c in commands(block))


@pytest.fixture(scope="module")
def readme_server(stand_ins):
    """The README's `serve` command, as typed but on a free port, running in the background: `host:port`."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    line = next(c for b in RUNNABLE if b.language in SHELL for c in commands(b) if SERVE.match(c))
    line = line.replace("--port 8080", f"--port {port}")
    assert f"--port {port}" in line, f"the README's serve command should name --port 8080: {line}"
    work = stand_ins["model"].parent / "serve"
    work.mkdir()
    log = work / "serve.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(["bash", "-c", f"exec {line}"], cwd=work, env=_env(stand_ins), stdout=out,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    address = f"127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while proc.poll() is None and time.monotonic() < deadline:
        try:
            if httpx_get(f"http://{address}/health").status_code == 200:
                break
        except Exception:  # noqa: BLE001 - not up yet
            time.sleep(0.2)
    yield address if proc.poll() is None else None
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(60) == 0, log.read_text()[-2000:]


@pytest.fixture(scope="module")
def block_runs(request, stand_ins):
    """Runs of the selected blocks, two at a time (most of a command's time is its interpreter's start-up)."""
    selected = [item.callspec.params["block"] for item in request.session.items
                if getattr(item, "originalname", "") == "test_readme_block" and hasattr(item, "callspec")]
    server = request.getfixturevalue("readme_server") if any(map(_needs_server, selected)) else None
    pool = ThreadPoolExecutor(max_workers=2)
    futures = {block: pool.submit(run_block, block, stand_ins, server if _needs_server(block) else None)
               for block in selected}
    yield futures
    pool.shutdown(cancel_futures=True)


# --- the tests ------------------------------------------------------------------------------------------


def test_every_block_is_classified():
    unknown = [b.id for b in BLOCKS if b.language not in SHELL + PYTHON + OUTPUT]
    assert not unknown, f"README blocks in an unhandled language (label them ```bash, ```python or ```text): {unknown}"
    mislabelled = [b.id for b in BLOCKS if b.language in OUTPUT
                   and any(line.startswith(COMMAND_WORDS) for line in b.text.splitlines())]
    assert not mislabelled, f"output blocks that read like commands (label them ```bash or ```python): {mislabelled}"
    transcripts = [b.id for b in BLOCKS if b.language in SHELL + PYTHON
                   and any(line.startswith(("$ ", ">>> ")) for line in b.text.splitlines())]
    assert not transcripts, f"runnable blocks holding a transcript (label them ```text): {transcripts}"
    assert RUNNABLE and any(b.language in OUTPUT for b in BLOCKS)


def test_every_exception_is_still_needed():
    lines = [" ".join(shlex.split(c, comments=True)) for b in RUNNABLE if b.language in SHELL for c in commands(b)]
    unused = [e.pattern for e in EXCEPTIONS if not any(re.search(e.pattern, line) for line in lines)]
    assert not unused, f"exceptions no README command needs any more (remove them): {unused}"
    assert any(line.startswith("pip install") for line in lines) and "pytest" in " ".join(lines)


@pytest.mark.parametrize("block", RUNNABLE, ids=lambda b: b.id)
def test_readme_block(block, block_runs):
    runs = block_runs[block].result()
    for label, seconds, failure in runs:
        record(f"README {block.id}: {label}", f"{seconds:.1f} s")
        assert failure is None, f"README.md:{block.line}: `{label}` failed: {failure}"
