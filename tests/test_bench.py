"""`mlx-diffusiongemma bench`: runs on random weights, reports every figure, refuses what cannot fit."""

import json
import subprocess
import sys

import pytest

import mlx_diffusiongemma.bench as bench_module
from mlx_diffusiongemma.bench import PRESETS, available_memory, estimated_bytes
from mlx_diffusiongemma.errors import ContextLengthError, DiffusionGemmaError
from mlx_diffusiongemma.model import ModelArgs
import mlx.core as mx

GiB = 2**30


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "mlx_diffusiongemma", "bench", *args], capture_output=True,
                          text=True, timeout=600)


def test_bench_random_tiny_json():
    result = _cli("--random", "tiny", "--steps", "3", "--canvases", "2", "--repeat", "2", "--json",
                  "--dtype", "float32", "--prompt-tokens", "40")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    for name in ("prefill_tps", "ms_per_step", "ms_per_commit", "ms_per_canvas", "decode_tps"):
        assert report[name]["min"] <= report[name]["median"] <= report[name]["max"]
        assert report[name]["median"] > 0
    # 2 canvases x 3 fixed steps (adaptive stop is off), each figure named for what it counts.
    assert "steps" not in report and report["canvases_per_run"] == 2 and report["prompt_tokens"] == 40
    assert report["steps_per_canvas"] == {"median": 3, "min": 3, "max": 3}
    assert report["decoder_passes"]["median"] == 6 and "2 canvases x 3 steps" in report["label"]
    assert "building random tiny weights" in result.stderr  # progress while the weights are built


def test_bench_batch_json():
    result = _cli("--random", "tiny", "--steps", "2", "--canvases", "2", "--repeat", "1", "--json",
                  "--dtype", "float32", "--prompt-tokens", "20", "--batch", "3")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["batch"] == 3 and "3 prompts" in report["label"]
    for name in ("aggregate_tps", "latency_s", "max_latency_s", "ms_per_step", "ms_per_commit"):
        assert report[name]["median"] > 0
    assert report["latency_s"]["median"] <= report["max_latency_s"]["median"]
    args = PRESETS["tiny"]
    assert report["rows_per_expert"]["median"] == 3 * args["canvas_length"] * args["top_k_experts"] / args["num_experts"]


def test_bench_batch_refuses_the_speculative_commit_in_one_line():
    result = _cli("--random", "tiny", "--dtype", "float32", "--batch", "2", "--drafter", "speculative")
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and 'verify "none"' in result.stderr and "Traceback" not in result.stderr


def test_full_geometry_estimate_and_refusal():
    args = ModelArgs(**PRESETS["full"])
    bf16 = estimated_bytes(args, mx.bfloat16, None)
    assert 48e9 < bf16 < 54e9  # the released checkpoint's text weights are ~50.5 GB in bf16
    assert 14e9 < estimated_bytes(args, mx.bfloat16, 4) < 16e9  # the community 4-bit mix is ~15 GB
    if available_memory() > 64 * 2**30:
        pytest.skip("this machine could hold the full bf16 geometry")
    result = _cli("--random", "full", "--dtype", "bfloat16")
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and "GiB" in result.stderr and "--q-bits 4" in result.stderr


class _Built(Exception):
    """Raised instead of evaluating the random weights: the memory checks let the geometry through."""


def _bench_random(monkeypatch, preset, available, **kw):
    def evaluate(model, label):
        raise _Built(label)

    monkeypatch.setattr(bench_module, "available_memory", lambda: available)
    monkeypatch.setattr(bench_module, "_evaluate", evaluate)  # never build a real geometry here
    options = dict(dtype=None, q_bits=4, prompt_tokens=128, canvases=2, steps=16, drafter="reference", repeat=1,
                   as_json=False)
    options.update(kw)
    return bench_module.bench(None, preset, **options)


def test_memory_estimate_refuses_full_4bit_on_a_24gb_mac_and_takes_it_on_32gb(monkeypatch):
    """A 24 GB Mac's Metal working set is ~16 GiB: the 26B geometry at 4 bits (15 GB of weights, the logits of
    a 256 x 262144 canvas, a build step in fp32) does not fit with the margin; ~21 GiB (32 GB) does."""
    with pytest.raises(DiffusionGemmaError) as refused:
        _bench_random(monkeypatch, "full", 16 * GiB)
    message = str(refused.value)
    assert "\n" not in message and "--random full (bfloat16, 4-bit)" in message and "16.0 GiB available" in message
    assert "GiB of weights" in message
    with pytest.raises(_Built):
        _bench_random(monkeypatch, "full", 21.3 * GiB)
    with pytest.raises(_Built):
        _bench_random(monkeypatch, "medium", 16 * GiB)


def test_memory_estimate_counts_activations(monkeypatch):
    """The weights of `small` take 0.02 GiB; a 100 000-token prompt's attention scores do not fit in 4 GiB."""
    args = ModelArgs(**PRESETS["small"])
    assert bench_module.activation_bytes(args, mx.bfloat16, 100_000, 2) > 4 * GiB
    with pytest.raises(DiffusionGemmaError, match="for the KV cache, logits and activations"):
        _bench_random(monkeypatch, "small", 4 * GiB, prompt_tokens=100_000)
    with pytest.raises(_Built):
        _bench_random(monkeypatch, "small", 4 * GiB, prompt_tokens=1000)


def test_prompt_beyond_the_context_is_refused(monkeypatch):
    with pytest.raises(ContextLengthError, match="context of 131072"):
        _bench_random(monkeypatch, "tiny", 64 * GiB, prompt_tokens=200_000)
    result = _cli("--model", "toy", "--prompt-tokens", "250", "--canvases", "2")  # the toy's context is 256
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "298 positions" in lines[0] and "context of 256" in lines[0], result.stderr
