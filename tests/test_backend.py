"""The backend seam: what runs on a non-CPU device (Metal) is plain MLX, with no NumPy and no CPU-only
branch, and it gives the CPU backend's tokens."""

import importlib

import mlx.core as mx
import numpy as np
from mlx_lm.models.switch_layers import SwitchLinear

import mlx_diffusiongemma.host as host
import mlx_diffusiongemma.parallel as parallel
from mlx_diffusiongemma import backend, sampler
from mlx_diffusiongemma.drafter import resolve_drafter
from mlx_diffusiongemma.loader import load_model
from mlx_diffusiongemma.model import Model, softcap
from mlx_diffusiongemma.noise import MLXNoise

generate = importlib.import_module("mlx_diffusiongemma.generate")  # the module (the package's `generate` is the function)


def test_the_choice_for_a_gpu_is_plain_mlx():
    choice = backend.select(mx.gpu)
    assert choice.name == "mlx"
    assert choice.softcap is softcap
    assert choice.vocab_stats is sampler.vocab_stats and choice.argmax is sampler.scaled_argmax
    assert backend.position_split(mx.gpu) is choice.per_position
    assert all(getattr(f, "__module__", "") not in (host.__name__, parallel.__name__)
               for f in (choice.softcap, choice.vocab_stats, choice.argmax, choice.per_position))


def test_the_choice_for_the_cpu(monkeypatch):
    assert backend.select(mx.cpu).softcap is host.softcap
    monkeypatch.setenv("MLX_DIFFUSIONGEMMA_HOST_SAMPLER", "0")
    assert backend.select(mx.cpu).softcap is softcap


def test_models_keep_mlx_lm_modules_off_the_cpu(tiny_ckpt):
    model = load_model(tiny_ckpt)  # on this (CPU) backend: its experts compute half precision in float32
    kinds = {type(m) for _, m in model.named_modules()}
    assert backend.Float32SwitchLinear in kinds and SwitchLinear not in kinds
    fresh = backend.prepare_model(Model(model.args), mx.gpu)
    kinds = {type(m) for _, m in fresh.named_modules()}
    assert SwitchLinear in kinds and backend.Float32SwitchLinear not in kinds


def _tokens(model) -> list[int]:
    drafter = resolve_drafter("reference", model.generation_config, model.args.canvas_length,
                              {"max_denoising_steps": 5, "adaptive_stop": True})
    prompt = mx.array([[2, 105, 30, 31, 32, 33, 34, 35, 106, 105, 40]])
    events = generate.denoise(model, prompt, drafter, MLXNoise(7), 2, [1], 0)
    return [t for e in events if e.kind == "commit" for t in e.tokens[0].tolist()]


def test_the_gpu_path_runs_no_numpy_and_no_cpu_branch(tiny_ckpt, monkeypatch):
    on_cpu = _tokens(load_model(tiny_ckpt))

    def refuse(*args, **kwargs):
        raise AssertionError("a CPU-only path ran")

    monkeypatch.setattr(backend, "_on_cpu", lambda device=None: False)  # every choice made as for Metal
    model = load_model(tiny_ckpt)
    for name in ("softcap", "vocab_stats", "argmax", "_logits_view", "_map_blocks"):
        monkeypatch.setattr(host, name, refuse)
    monkeypatch.setattr(parallel, "per_position", refuse)
    monkeypatch.setattr(backend.Float32SwitchLinear, "__call__", refuse)
    for name in ("asarray", "array", "frombuffer"):
        monkeypatch.setattr(np, name, refuse)
    try:
        on_gpu = _tokens(model)
    finally:
        monkeypatch.undo()
    assert on_gpu == on_cpu


def test_large_cpu_experts_take_one_matmul_per_expert(monkeypatch):
    """On the CPU, rows sorted by expert through an expert of at least `DENSE_EXPERT_ELEMENTS` weights take one
    BLAS matmul per expert (MLX's CPU gather_mm was 4-10x slower there) with gather_mm's result, fp32 and bf16;
    smaller experts keep gather_mm."""
    mx.random.seed(3)
    calls = []
    per_expert = backend.Float32SwitchLinear.per_expert
    monkeypatch.setattr(backend.Float32SwitchLinear, "per_expert",
                        lambda self, x, i: calls.append(x.shape) or per_expert(self, x, i))
    for out_dims, in_dims, dense in ((512, 1024, True), (64, 128, False)):
        lin = SwitchLinear(in_dims, out_dims, 4, bias=False)
        lin.__class__ = backend.Float32SwitchLinear
        ids = mx.sort(mx.random.randint(0, 4, (96,)))  # experts 0-3, one of them perhaps never chosen
        x = mx.random.normal((96, 1, in_dims))
        want = mx.gather_mm(x, lin.weight.swapaxes(-1, -2), rhs_indices=ids, sorted_indices=True)
        calls.clear()
        got = lin(x, ids, sorted_indices=True)
        assert bool(calls) == dense and got.shape == want.shape == (96, 1, out_dims)
        assert mx.allclose(got, want, atol=1e-4).item()
        half = lin(x.astype(mx.bfloat16), ids, sorted_indices=True)
        assert half.dtype == mx.bfloat16 and mx.allclose(half.astype(mx.float32), want, atol=0.1, rtol=0.02).item()
        assert mx.allclose(lin(x, ids), mx.gather_mm(x, lin.weight.swapaxes(-1, -2), rhs_indices=ids)).item()
