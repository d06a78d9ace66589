"""The loop's fast paths change nothing: compiled kernels and per-core stream splitting are bit-identical,
and the host (NumPy) vocabulary pass gives the same tokens as MLX's, both token-exact with transformers."""

import json

import importlib

import mlx.core as mx
import numpy as np
import pytest

import mlx_diffusiongemma.parallel as parallel
from mlx_diffusiongemma import backend, load
from mlx_diffusiongemma.drafter import resolve_drafter
from mlx_diffusiongemma.generate import denoise
from mlx_diffusiongemma.noise import MLXNoise

generate = importlib.import_module("mlx_diffusiongemma.generate")  # the module (the package's `generate` is the function)


@pytest.fixture(scope="module")
def model(tiny_ckpt):
    return load(tiny_ckpt)[0]


def _run(model):
    drafter = resolve_drafter("reference", model.generation_config, model.args.canvas_length,
                              {"max_denoising_steps": 6, "adaptive_stop": False})
    prompt = mx.array([[2, 105, 30, 31, 32, 33, 34, 35, 36, 37, 106, 105, 40]])
    drafts = [e.tokens for e in denoise(model, prompt, drafter, MLXNoise(5), 2, [1], 0) if e.kind != "encode"]
    return mx.concatenate(drafts, axis=0)


def test_compiled_equals_uncompiled(model):
    fast = _run(model)
    mx.disable_compile()
    try:
        plain = _run(model)
    finally:
        mx.enable_compile()
    assert mx.array_equal(fast, plain).item()


def test_stream_split_equals_one_stream(model, monkeypatch):
    if len(parallel.cpu_streams()) < 2:
        pytest.skip("a single CPU core (or not the CPU backend): nothing is split")
    split = _run(model)
    monkeypatch.setattr(parallel, "_streams", [])  # one stream, as on Metal
    single = _run(model)
    assert mx.array_equal(split, single).item()


def _metal_passes(monkeypatch):
    """The loop's vocabulary passes as on Metal (MLX's own, unsplit), run here on the CPU."""
    monkeypatch.setattr(generate, "select", lambda: backend.select(mx.gpu))


def test_host_vocab_pass_equals_mlx_pass(model, monkeypatch):
    if backend.select().name != "cpu-host":
        pytest.skip("not the CPU backend: the loop uses MLX's vocabulary pass")
    on_host = _run(model)
    _metal_passes(monkeypatch)
    assert mx.array_equal(on_host, _run(model)).item()


def test_mlx_vocab_pass_token_exact_with_transformers(tmp_path, monkeypatch):
    """The generation parity test runs the host pass on the CPU backend; this runs MLX's (Metal's) pass."""
    from checkpoints import build_checkpoint, load_reference
    from test_generation_parity import CONFIGS, _ours, _reference

    from mlx_diffusiongemma.loader import load_model

    build, gen = CONFIGS["3-layer, hub config, stop fires"]
    path = build_checkpoint(tmp_path, tokenizer=False, vocab_size=256, **build)
    config_file = path / "generation_config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), **gen}))
    ref, ours = load_reference(path), load_model(path)
    for seed in range(3):
        prompt = np.random.default_rng(1000 + seed).integers(0, 256, (1, 3 * ours.args.sliding_window + 2))
        expected = _reference(ref, prompt, np.random.default_rng(seed), monkeypatch)
        _metal_passes(monkeypatch)
        assert _ours(ours, prompt, np.random.default_rng(seed)) == expected, f"seed {seed}"
        monkeypatch.undo()
