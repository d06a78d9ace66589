"""Fine-tuning: the block-diffusion loss trains, LoRA adapters round-trip and fuse, and `finetune` runs."""

import json
import os
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import pytest

from checkpoints import build_checkpoint
from mlx_diffusiongemma.loader import load
from mlx_diffusiongemma.lora import apply_lora, fuse_lora, load_adapters, save_adapters
from mlx_diffusiongemma.train import (
    diffusion_loss, encoder_forward, prefix_cache, tokenize, train,
)

ROOT = Path(__file__).resolve().parents[1]
MESSAGES = [
    {"role": "user", "content": "hi there"},
    {"role": "assistant", "content": "hello, how are you today? fine thanks"},
]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return build_checkpoint(tmp_path_factory.mktemp("ft_ckpt"), seed=0, num_layers=3, sliding_window=6)


@pytest.fixture(scope="module")
def example(ckpt):
    _, tokenizer = load(ckpt)
    return tokenize(tokenizer, MESSAGES)


def _cli(*args):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return subprocess.run(
        [sys.executable, "-m", "mlx_diffusiongemma", *map(str, args)], capture_output=True, text=True,
        timeout=300, env=env, cwd=ROOT,
    )


def test_prefix_view_matches_inference_cache(ckpt, example):
    """The training read path (one encoder pass, sliced K/V) gives the decoder exactly what encode() does."""
    model, _ = load(ckpt)
    ids, prompt_len = example
    x = mx.array(ids)[None]
    _, kvs = encoder_forward(model, x)
    canvas = mx.array(ids[prompt_len : prompt_len + 8])[None]
    for prefix in (3, prompt_len):  # shorter and longer than the sliding window
        cache = model.make_cache()
        model.encode(x[:, :prefix], cache)
        expected = model.decode(canvas, cache)
        assert mx.array_equal(model.decode(canvas, prefix_cache(model, kvs, prefix)), expected)


def test_loss_decreases_on_a_repeated_example(ckpt, example):
    model, _ = load(ckpt)
    ids, prompt_len = example
    mx.random.seed(0)
    apply_lora(model, rank=8)

    def held_out():  # fixed noise draws, so the comparison does not depend on the training draws
        return sum(diffusion_loss(model, ids, prompt_len, mx.random.key(100 + i))[0].item() for i in range(4)) / 4

    before = held_out()
    history = train(model, [(ids, prompt_len)], iters=30, learning_rate=1e-3, seed=0, log=lambda _: None)
    after = held_out()
    assert len(history) == 30 and all(map(lambda v: v == v, history))  # no NaN
    assert after < 0.7 * before, (before, after)


def test_self_conditioning_pass_gets_gradients(ckpt, example):
    import mlx.nn as nn
    from mlx.utils import tree_flatten

    model, _ = load(ckpt)
    ids, prompt_len = example
    fn = nn.value_and_grad(model, lambda: diffusion_loss(model, ids, prompt_len, mx.random.key(0),
                                                         self_conditioning_prob=1.0)[0])
    _, grads = fn()
    flat = dict(tree_flatten(grads))
    assert mx.abs(flat["model.decoder.self_conditioning.gate_proj.weight"]).sum().item() > 0
    assert mx.abs(flat["model.encoder.language_model.layers.0.layer_scalar"]).sum().item() > 0


def test_adapters_round_trip_and_fuse(ckpt, example, tmp_path):
    ids, prompt_len = example
    model, _ = load(ckpt)
    mx.random.seed(1)
    config = apply_lora(model, rank=4, scale=2.0)
    for layer in model.layers:  # B starts at zero: make the adapters actually change the output
        for lin in (layer.self_attn.q_proj, layer.self_attn.o_proj, layer.mlp.down_proj):
            lin.lora_b = mx.random.normal(lin.lora_b.shape) * 0.1
    save_adapters(model, tmp_path / "ad", config)
    assert {p.name for p in (tmp_path / "ad").iterdir()} == {"adapters.safetensors", "adapter_config.json"}
    assert json.loads((tmp_path / "ad" / "adapter_config.json").read_text())["rank"] == 4

    def logits(m):
        cache = m.make_cache()
        m.encode(mx.array(ids[:prompt_len])[None], cache)
        return m.decode(mx.array(ids[prompt_len : prompt_len + 8])[None], cache)

    reference = logits(load(ckpt)[0])
    adapted = logits(model)
    assert mx.abs(adapted - reference).max().item() > 1e-3

    fresh, _ = load(ckpt)
    load_adapters(fresh, tmp_path / "ad")
    assert mx.array_equal(logits(fresh), adapted)

    fuse_lora(fresh)  # the same sums in another order: fp32 rounding only (logits reach about 10)
    assert mx.allclose(logits(fresh), adapted, rtol=1e-5, atol=1e-5)


def test_finetune_rejects_malformed_line(ckpt, tmp_path):
    data = tmp_path / "data.jsonl"
    data.write_text(json.dumps({"prompt": "a", "completion": "b"}) + "\n" + '{"prompt": "a", "completion"\n')
    result = _cli("finetune", "--model", ckpt, "--data", data, "--iters", 1, "--adapter-path", tmp_path / "ad")
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "line 2" in lines[0], result.stderr
    wrong = tmp_path / "wrong.jsonl"
    wrong.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    result = _cli("finetune", "--model", ckpt, "--data", wrong, "--iters", 1, "--adapter-path", tmp_path / "ad")
    assert result.returncode != 0 and "line 1" in result.stderr and "assistant" in result.stderr
    assert not (tmp_path / "ad").exists()


def test_finetune_end_to_end(ckpt, tmp_path):
    data = tmp_path / "data.jsonl"
    data.write_text(
        json.dumps({"messages": MESSAGES}) + "\n" + json.dumps({"prompt": "2+2?", "completion": "4"}) + "\n"
    )
    out = tmp_path / "adapters"
    result = _cli("finetune", "--model", ckpt, "--data", data, "--iters", 3, "--steps-per-report", 1,
                  "--learning-rate", 1e-3, "--adapter-path", out, "--seed", 3)
    assert result.returncode == 0, result.stderr
    assert "iter 3: loss" in result.stderr and "tokens/s" in result.stderr
    assert (out / "adapters.safetensors").exists() and (out / "adapter_config.json").exists()
    model, _ = load(ckpt)
    load_adapters(model, out)  # loads strictly into a fresh model
    # generate applies them: the adapted model's text differs from the base's under the same seed.
    args = ("generate", "--model", ckpt, "--prompt", "2+2?", "--max-tokens", 8, "--seed", 1, "--quiet")
    base, adapted = _cli(*args), _cli(*args, "--adapter-path", out)
    assert base.returncode == 0 and adapted.returncode == 0, adapted.stderr
    assert adapted.stdout != base.stdout
    missing = _cli(*args, "--adapter-path", tmp_path / "absent")
    assert missing.returncode == 1 and missing.stderr.count("\n") == 1 and "adapters" in missing.stderr
