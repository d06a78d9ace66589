"""`mlx-diffusiongemma bench`: runs on random weights, reports every figure, refuses what cannot fit."""

import json
import subprocess
import sys

import pytest

from mlx_diffusiongemma.bench import PRESETS, _system_memory, estimated_bytes
from mlx_diffusiongemma.model import ModelArgs
import mlx.core as mx


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
    assert report["steps"]["median"] == 6  # 2 canvases x 3 fixed steps: adaptive stop is off


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
    assert estimated_bytes(args, mx.bfloat16, 4) < 16e9
    if _system_memory() > 64 * 2**30:
        pytest.skip("this machine could hold the full bf16 geometry")
    result = _cli("--random", "full", "--dtype", "bfloat16")
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and "GiB" in result.stderr and "--q-bits 4" in result.stderr
