"""The Python API and CLI on tiny checkpoints: determinism, finish reasons, drafter stats, loader errors."""

import json
import subprocess
import sys

import mlx.core as mx
import numpy as np
import pytest

from checkpoints import build_checkpoint
from figures import record
from mlx_diffusiongemma import load, stream_generate
from mlx_diffusiongemma.drafter import resolve_drafter
from mlx_diffusiongemma.errors import CheckpointError
from mlx_diffusiongemma.generate import denoise
from mlx_diffusiongemma.noise import MLXNoise


def _cli(*args, stdin=None):
    return subprocess.run(
        [sys.executable, "-m", "mlx_diffusiongemma", *args], capture_output=True, text=True, input=stdin,
        timeout=300,
    )


@pytest.fixture(scope="module")
def tiny(tiny_ckpt):
    return load(tiny_ckpt)


def test_same_seed_same_text_across_processes(tiny_ckpt):
    args = ("generate", "--model", str(tiny_ckpt), "--prompt", "hello", "--max-tokens", "12", "--seed", "7", "--quiet")
    first, second = _cli(*args), _cli(*args)
    assert first.returncode == 0, first.stderr
    assert first.stdout == second.stdout and first.stdout.strip()
    other = _cli(*args[:-3], "8", "--quiet")
    assert other.stdout != first.stdout


def test_different_seeds_draw_different_canvases(tiny):
    model, _ = tiny
    drafter = resolve_drafter("reference", model.generation_config, model.args.canvas_length)
    prompt = mx.array([[2, 105, 20, 30, 40]])

    def first_draft(seed):
        events = denoise(model, prompt, drafter, MLXNoise(seed), 1, [1], 0)
        return next(e for e in events if e.kind == "draft").tokens.tolist()

    assert first_draft(1) == first_draft(1)
    assert first_draft(1) != first_draft(2)


def test_max_tokens_reports_length(tiny):
    model, tokenizer = tiny
    responses = list(stream_generate(model, tokenizer, "count to ten", max_tokens=5, seed=0))
    last = responses[-1]
    assert last.finish_reason == "length" and last.generation_tokens == 5
    assert sum(len(r.tokens) for r in responses) == 5
    assert last.drafter == "reference" and last.canvases == 1 and last.steps_per_canvas == [last.total_steps]


def test_eos_reports_stop_and_no_text_after_it(tmp_path):
    # A wide EOS set makes an EOS land inside the first canvas for this seed.
    path = build_checkpoint(tmp_path, seed=2)
    config = json.loads((path / "generation_config.json").read_text())
    config["eos_token_id"] = [1, 106, 50] + list(range(200, 400))
    config["max_denoising_steps"] = 4
    (path / "generation_config.json").write_text(json.dumps(config))
    model, tokenizer = load(path)
    eos = set(config["eos_token_id"])
    for seed in range(5):
        responses = list(stream_generate(model, tokenizer, "hi", max_tokens=64, seed=seed))
        tokens = [t for r in responses for t in r.tokens]
        assert not eos & set(tokens)
        if responses[-1].finish_reason == "stop":
            assert len(tokens) < 64
            assert responses[-1].text == tokenizer.decode(tokens)[len("".join(r.text for r in responses[:-1])):]
            return
    pytest.fail("no seed emitted EOS: the stop case was not exercised")


def test_draft_preview_and_fast_preset(tiny):
    model, tokenizer = tiny
    steps = {}
    for preset in ("reference", "fast"):
        responses = list(
            stream_generate(model, tokenizer, "hi", max_tokens=16, seed=3, drafter=preset, draft_preview=True)
        )
        drafts = [r for r in responses if r.draft is not None]
        assert drafts and all(len(r.draft) == model.args.canvas_length for r in drafts)
        final = responses[-1]
        assert final.drafter == preset and len(drafts) == final.total_steps
        steps[preset] = final.total_steps / final.canvases
    record("mean steps per canvas on a random tiny model (reference, fast)", f"{steps['reference']}, {steps['fast']}")
    assert steps["fast"] <= 16


def _corrupt(path, kind):
    shard = next(path.glob("*.safetensors"))
    if kind == "truncated":
        data = shard.read_bytes()
        shard.write_bytes(data[: len(data) // 2])
    elif kind == "missing shard":
        index = {"weight_map": {"model.decoder.norm.weight": "model-00002-of-00002.safetensors"}}
        (path / "model.safetensors.index.json").write_text(json.dumps(index))
    elif kind == "pickle only":
        shard.unlink()
        (path / "pytorch_model.bin").write_bytes(b"not loaded")
    elif kind == "wrong shape":
        from safetensors.numpy import load_file, save_file

        tensors = load_file(shard)
        tensors["model.decoder.norm.weight"] = np.ones(7, dtype=np.float32)
        save_file(tensors, shard)
    elif kind == "config mismatch":
        config = json.loads((path / "config.json").read_text())
        config["text_config"]["moe_intermediate_size"] = 16
        (path / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize(
    "kind, words",
    [
        ("truncated", "truncated"),
        ("missing shard", "missing"),
        ("pickle only", "pickle"),
        ("wrong shape", "model.decoder.norm.weight"),
        ("config mismatch", "experts"),
    ],
)
def test_loader_errors_are_one_line(tmp_path, kind, words):
    path = build_checkpoint(tmp_path / "ckpt", seed=0, num_layers=3, tokenizer=False)
    _corrupt(path, kind)
    with pytest.raises(CheckpointError, match=words):
        load(path)
    result = _cli("info", "--model", str(path))
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and words in lines[0], result.stderr
    assert "Traceback" not in result.stderr


def test_version_and_help():
    assert _cli("--version").stdout.startswith("mlx-diffusiongemma ")
    assert "generate" in _cli("--help").stdout


def test_prompt_cache_encodes_only_new_tokens(tiny):
    from mlx_diffusiongemma.cache import PromptCache
    from mlx_diffusiongemma.generate import prefill

    model, tokenizer = tiny
    C = model.args.canvas_length
    cache = PromptCache()
    ids1 = [2, 105, 30, 31, 32, 33, 34, 35, 36, 37, 38, 39, 40, 106, 105, 41]
    first = list(stream_generate(model, tokenizer, ids1, max_tokens=2 * C, seed=1, prompt_cache=cache))
    assert first[-1].prompt_cached == 0
    # All canvases but the last were encoded; the last never is (as in the reference).
    assert cache.tokens[: len(ids1)] == ids1 and len(cache.tokens) == len(ids1) + C * (first[-1].canvases - 1)

    ids2 = cache.tokens + [106, 105, 50, 51, 52]
    second = list(stream_generate(model, tokenizer, ids2, max_tokens=C, seed=2, prompt_cache=cache))
    assert second[-1].prompt_cached == len(ids2) - 5  # only the 5 new tokens were encoded
    fresh = model.make_cache()
    prefill(model, mx.array([ids2]), fresh)
    assert cache.tokens == ids2
    for a, b in zip(fresh, cache.layers):
        assert a.offset == b.offset == len(ids2)
        assert float(mx.abs(a.state[0] - b.state[0]).max()) < 1e-4
        assert float(mx.abs(a.state[1] - b.state[1]).max()) < 1e-4

    rewritten = [2, 105, 99] + ids2[3:]  # history changed: the cache must not be reused
    third = list(stream_generate(model, tokenizer, rewritten, max_tokens=C, seed=3, prompt_cache=cache))
    assert third[-1].prompt_cached == 0 and cache.tokens == rewritten


def test_hub_repo_id_resolves_from_the_cache_offline(tiny_ckpt, tmp_path, monkeypatch):
    """A repo id is looked up in the Hugging Face cache; offline and uncached is one actionable line."""
    import shutil

    snapshot = tmp_path / "hub" / "models--acme--tiny-dg" / "snapshots" / ("a" * 40)
    shutil.copytree(tiny_ckpt, snapshot)
    (tmp_path / "hub" / "models--acme--tiny-dg" / "refs").mkdir()
    (tmp_path / "hub" / "models--acme--tiny-dg" / "refs" / "main").write_text("a" * 40)
    env = {"HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    code = "from mlx_diffusiongemma import load; m, t = load('acme/tiny-dg'); print(sorted(t.eos_token_ids))"
    import os

    found = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                           env={**os.environ, **env})
    assert found.returncode == 0, found.stderr
    assert found.stdout.strip() == "[1, 50, 106]"  # EOS completed from generation_config.json
    missing = subprocess.run([sys.executable, "-m", "mlx_diffusiongemma", "info", "--model", "acme/absent"],
                             capture_output=True, text=True, timeout=300, env={**os.environ, **env})
    assert missing.returncode == 1 and missing.stderr.count("\n") == 1
    assert "acme/absent" in missing.stderr and "local folder" in missing.stderr


@pytest.mark.parametrize("code", [
    # The README's snippet, then the submodule imported after and before the public name.
    "from mlx_diffusiongemma import load, generate, stream_generate\nimport mlx_diffusiongemma.generate",
    "import mlx_diffusiongemma.generate\nfrom mlx_diffusiongemma import load, generate, stream_generate",
    "import mlx_diffusiongemma.toy, mlx_diffusiongemma.console\nfrom mlx_diffusiongemma import generate",
])
def test_public_names_stay_the_functions_however_imported(code):
    # A fresh interpreter each time: the bug depended on which import ran first.
    check = (
        "\nimport mlx_diffusiongemma as p, mlx_diffusiongemma.generate as _\nimport sys, types"
        "\nm = sys.modules['mlx_diffusiongemma.generate']"
        "\nassert generate is p.generate is m.generate and not isinstance(generate, types.ModuleType), generate"
        "\nassert p.stream_generate is m.stream_generate and p.GenerationResponse is m.GenerationResponse"
        "\nfrom mlx_diffusiongemma.loader import load as real_load\nassert p.load is real_load"
        "\nfrom mlx_diffusiongemma.generate import stream_generate, denoise  # the module stays importable"
        "\nmodel, tokenizer = p.load('toy')"
        "\nprint(repr(generate(model, tokenizer, 'sort 321', max_tokens=24, seed=0)))"
    )
    result = subprocess.run([sys.executable, "-c", code + check], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "'123'"


def test_pad_and_control_tokens_are_never_text(tiny):
    """The toy pads its canvas for an out-of-task prompt (a bare "sudoku" has no grid, and the shipped toy
    writes pads between digits); pads are no text and no generated tokens."""
    model, tokenizer = load("toy")
    inner = tokenizer._tokenizer
    never = {inner.pad_token_id, inner.bos_token_id, inner.unk_token_id, inner.mask_token_id}
    responses = list(stream_generate(model, tokenizer, "sudoku", max_tokens=24, seed=0,
                                     draft_preview=True))
    committed = [r.draft for r in responses if r.draft is not None][-1]
    eos = set(tokenizer.eos_token_ids)
    before_eos = committed[: next((i for i, t in enumerate(committed) if t in eos), len(committed))]
    assert inner.pad_token_id in before_eos  # the case the issue met: pads before EOS
    text = "".join(r.text for r in responses if r.draft is None)
    tokens = [t for r in responses if r.draft is None for t in r.tokens]
    assert "<pad>" not in text and not never & set(tokens)
    assert responses[-1].generation_tokens == len(tokens) == len([t for t in before_eos if t not in never])

    # Gemma 4's special tokens (the tiny checkpoint's tokenizer has them): pad, bos, unk, mask are hidden;
    # thinking and tool-call markers stay text, since parsers of the reply read them.
    from mlx_diffusiongemma.hidden import hidden_token_ids

    inner = tiny[1]._tokenizer
    roles = {inner.pad_token_id, inner.bos_token_id, inner.unk_token_id, inner.mask_token_id}
    markers = inner.convert_tokens_to_ids(["<|channel>", "<channel|>", "<|tool_call>", "<tool_call|>"])
    assert hidden_token_ids(*tiny) == roles and not set(markers) & roles and inner.unk_token_id not in markers
