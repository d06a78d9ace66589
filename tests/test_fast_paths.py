"""The loop's fast paths change nothing: compiled kernels and per-core stream splitting are bit-identical."""

import mlx.core as mx
import pytest

import mlx_diffusiongemma.parallel as parallel
from mlx_diffusiongemma import load
from mlx_diffusiongemma.drafter import resolve_drafter
from mlx_diffusiongemma.generate import denoise
from mlx_diffusiongemma.noise import MLXNoise


@pytest.fixture(scope="module")
def model(tiny_ckpt):
    return load(tiny_ckpt)[0]


def _run(model):
    drafter = resolve_drafter("reference", model.generation_config, model.args.canvas_length,
                              {"max_denoising_steps": 6, "adaptive_stop": False})
    prompt = mx.array([[2, 105, 30, 31, 32, 33, 34, 35, 36, 37, 106, 105, 40]])
    drafts = [e.tokens for e in denoise(model, prompt, drafter, MLXNoise(5), 2, [1], 0)]
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
