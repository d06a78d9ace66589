"""Inputs that used to end in a traceback: each is now one line on stderr and exit status 1 (in a chat, one
line and the session goes on). Commands run on the bundled toy model; several run at once, since most of a
command's time is start-up."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mlx_diffusiongemma.generate import generate, stream_generate
from mlx_diffusiongemma.loader import load
from mlx_diffusiongemma.bench import bench
from mlx_diffusiongemma.console import parse_template_config
from mlx_diffusiongemma.errors import CheckpointError, DiffusionGemmaError, UsageError
from mlx_diffusiongemma.fuse import fuse
from mlx_diffusiongemma.lora import CONFIG_FILE, load_adapters
from mlx_diffusiongemma.noise import MLXNoise
from mlx_diffusiongemma.train import read_jsonl, run_finetune

ROOT = Path(__file__).resolve().parents[1]
BAD = b"sort 3\xff2"  # 0xff never occurs in UTF-8


def _start(*args, stdin: bytes | None = None, env=None, **kw) -> subprocess.Popen:
    env = dict(os.environ, **(env or {}))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    proc = subprocess.Popen([sys.executable, "-m", "mlx_diffusiongemma", *args], stdin=subprocess.PIPE,
                            stdout=kw.pop("stdout", subprocess.PIPE), stderr=subprocess.PIPE, env=env, cwd=ROOT, **kw)
    proc.stdin_bytes = stdin or b""
    return proc


def _finish(proc: subprocess.Popen) -> tuple[int, str, str]:
    out, err = proc.communicate(proc.stdin_bytes, timeout=300)
    return proc.returncode, (out or b"").decode(errors="replace"), err.decode(errors="replace")


def test_bad_command_line_values_are_one_line():
    gen = ["generate", "--model", "toy", "--max-tokens", "24"]
    cases = {
        "--seed -1": (_start(*gen, "--prompt", "sort 21", "--seed", "-1"), "--seed must be a whole number"),
        "--seed 2**64": (_start(*gen, "--prompt", "sort 21", "--seed", str(2**64)), "--seed must be a whole number"),
        "chat --seed -1": (_start("chat", "--model", "toy", "--seed", "-1"), "--seed must be a whole number"),
        "argv": (_start(*gen, "--prompt", BAD), "the prompt is not valid UTF-8 (byte 0xff at character 7)"),
        # strict decoding, as under a UTF-8 locale: the bytes used to raise UnicodeDecodeError while reading
        "stdin": (_start(*gen, "--prompt", "-", stdin=BAD, env={"PYTHONIOENCODING": "utf-8:strict"}),
                  "the prompt is not valid UTF-8 (byte 0xff at character 7)"),
    }
    for name, (proc, message) in cases.items():
        code, out, err = _finish(proc)
        assert code == 1 and err == f"error: {err[7:]}" and err.count("\n") == 1, (name, err)
        assert message in err, (name, err)


def test_chat_line_that_is_not_utf8_is_refused_and_the_session_goes_on():
    proc = _start("chat", "--model", "toy", "--max-tokens", "24", "--seed", "0", stdin=BAD + b"\nsort 21\n",
                  env={"PYTHONIOENCODING": "utf-8:strict"})
    code, out, err = _finish(proc)
    assert code == 0, err
    assert err == "error: this message is not valid UTF-8 (byte 0xff at character 7); pass UTF-8 text\n", err
    assert out.strip()  # the next message got its reply


def test_closed_stdout_exits_quietly():
    closed = _start("generate", "--model", "toy", "--prompt", "sort 21", "--max-tokens", "24", "--quiet",
                    preexec_fn=lambda: os.close(1), stdout=None)  # `>&-`
    broken = _start("generate", "--model", "toy", "--prompt", "sort 21", "--max-tokens", "24", "--quiet")
    broken.stdout.close()  # a reader that went away (`| head -c 0`)
    for proc in (closed, broken):
        code, _, err = proc.wait(timeout=300), None, proc.stderr.read().decode()
        assert code in (0, 1) and err == "", err


def test_python_seed_out_of_range():
    model, tokenizer = load("toy")
    for seed in (-5, 2**64, 1.5):
        with pytest.raises(DiffusionGemmaError, match="seed must be a whole number from 0 to"):
            generate(model, tokenizer, "sort 21", seed=seed)
        with pytest.raises(DiffusionGemmaError, match="seed must be"):
            next(stream_generate(model, tokenizer, "sort 21", seed=seed))
    with pytest.raises(DiffusionGemmaError, match="seed must be"):
        MLXNoise(-1)
    assert generate(model, tokenizer, "sort 21", seed=2**64 - 1, max_tokens=24) is not None
    with pytest.raises(UsageError, match="--seed must be"):  # checked before the data is read
        run_finetune("toy", "no-such-file.jsonl", seed=-1)


def test_jsonl_line_that_is_not_utf8_is_named(tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_bytes(b'{"prompt": "sort 21", "completion": "12"}\n{"prompt": "' + BAD + b'", "completion": "x"}\n')
    with pytest.raises(UsageError, match=r"train.jsonl, line 2: not valid UTF-8 \(byte 0xff at byte 19\)"):
        read_jsonl(data)


@pytest.mark.parametrize("key", ["tokenize", "messages", "add_generation_prompt"])
def test_reserved_chat_template_keys(key):
    with pytest.raises(UsageError, match=f"'{key}' is set by the runner"):
        parse_template_config(json.dumps({"enable_thinking": False, key: True}))
    assert parse_template_config('{"enable_thinking": false}') == {"enable_thinking": False}


@pytest.mark.parametrize("config, message", [
    ({"scale": 20.0}, "has no 'rank'"),
    ({"rank": "8", "scale": 20.0}, "'rank' must be a whole number >= 1 \\(got '8'\\)"),
    ({"rank": 0, "scale": 20.0}, "'rank' must be"),
    ({"rank": 2.5, "scale": 20.0}, "'rank' must be"),
    ({"rank": 4, "scale": "x"}, "'scale' must be a finite number"),
    ({"rank": 4, "scale": 20.0, "modules": ["self_attn.q_proj", "vision.proj"]}, "unknown module 'vision.proj'"),
    ({"rank": 4, "scale": 20.0, "modules": ["mlp"]}, "unknown module 'mlp'"),
    ([4], "must hold a JSON object"),
    # mlx-lm's schema, which finetune writes
    ({"fine_tune_type": "dora", "lora_parameters": {"rank": 4, "scale": 20.0}}, "fine_tune_type 'dora'"),
    ({"fine_tune_type": "lora", "lora_parameters": {"scale": 20.0}}, "has no 'rank'"),
    ({"fine_tune_type": "lora", "lora_parameters": [4]}, "'lora_parameters' must be a JSON object"),
    ({"fine_tune_type": "lora", "lora_parameters": {"rank": 4, "scale": 20.0, "keys": ["mlp"]}},
     "unknown module 'mlp'"),
])
def test_odd_adapter_config(config, message, tmp_path):
    folder = tmp_path / "ad"
    folder.mkdir()
    (folder / CONFIG_FILE).write_text(json.dumps(config))
    (folder / "adapters.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointError, match=message):
        load_adapters(load("toy")[0], folder)
    with pytest.raises(CheckpointError, match=message):
        fuse("toy", folder, tmp_path / "fused")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ad"]


@pytest.mark.parametrize("flag", ["canvases", "repeat"])
def test_bench_zero_counts(flag):
    counts = {"canvases": 2, "repeat": 1, flag: 0}
    with pytest.raises(UsageError, match=f"--{flag} must be at least 1 \\(got 0\\)"):
        bench(None, "tiny", None, None, 8, counts["canvases"], 2, "reference", counts["repeat"], False)


def test_training_data_that_is_a_folder_or_missing_is_named(tmp_path):
    from mlx_diffusiongemma.errors import UsageError
    from mlx_diffusiongemma.train import read_jsonl

    with pytest.raises(UsageError, match="is a folder; pass a JSONL file"):
        read_jsonl(tmp_path)
    with pytest.raises(UsageError, match="is missing; pass a JSONL file"):
        read_jsonl(tmp_path / "absent.jsonl")
