"""Fine-tuning: the block-diffusion loss trains, LoRA adapters round-trip and fuse, and `finetune` runs."""

import json
import os
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import pytest

from mlx.utils import tree_flatten, tree_unflatten
from mlx_lm.tuner.lora import LoRASwitchLinear

from checkpoints import build_checkpoint
from mlx_diffusiongemma.convert import convert
from mlx_diffusiongemma.errors import UsageError
from mlx_diffusiongemma.loader import load
from mlx_diffusiongemma.lora import (
    EXPERT_TARGETS, TARGETS, apply_lora, fuse_lora, load_adapters, save_adapters,
)
from mlx_diffusiongemma.train import (
    diffusion_loss, encoder_forward, prefix_cache, run_finetune, tokenize, train, validation_loss,
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
def qckpt(tmp_path_factory):
    """`convert --quantize` (4-bit experts, 8-bit attention/MLP/embedding) of a checkpoint whose linear inputs
    are all multiples of 64, so every linear quantizes."""
    src = build_checkpoint(
        tmp_path_factory.mktemp("q_src"), seed=2, num_layers=3, sliding_window=6, hidden_size=64,
        intermediate_size=64, moe_intermediate_size=64, head_dim=16, global_head_dim=32,
    )
    return convert(src, tmp_path_factory.mktemp("q") / "q4", quantize=True)


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    data = tmp_path_factory.mktemp("data") / "data.jsonl"
    data.write_text(
        json.dumps({"messages": MESSAGES}) + "\n" + json.dumps({"prompt": "2+2?", "completion": "4"}) + "\n"
    )
    return data


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


def test_padded_prompts_share_a_batch_exactly(ckpt, example):
    """A row with pad tokens in front (`prompt_pad`) gets, at its own positions, the encoder logits and decoder
    logits it gets alone, and its loss and gradients stay finite: rows of different prompt lengths batch."""
    import mlx.nn as nn

    model, _ = load(ckpt)
    ids, prompt_len = example
    pad = 5
    alone = mx.array(ids)[None]
    rows = mx.array([[0] * pad + ids, ids + [0] * pad])  # row 1: the same example, unpadded, longer tail
    left = mx.array([pad, 0])
    logits_alone, kvs_alone = encoder_forward(model, alone)
    logits, kvs = encoder_forward(model, rows, left)
    assert mx.allclose(logits[0, pad:], logits_alone[0], atol=1e-5)
    assert mx.allclose(logits[1, : len(ids)], logits_alone[0], atol=1e-5)
    canvas = mx.array(ids[prompt_len : prompt_len + 8])[None]
    for prefix in (3, prompt_len):  # shorter and longer than the sliding window
        expected = model.decode(canvas, prefix_cache(model, kvs_alone, prefix))
        got = model.decode(mx.concatenate([canvas, canvas]), prefix_cache(model, kvs, prefix + pad))
        assert mx.allclose(got[0], expected[0], atol=1e-5)
    padded = mx.array([[0] * pad + ids, [7] * pad + ids])  # row 1: a longer prompt, no pads
    fn = nn.value_and_grad(model, lambda: diffusion_loss(model, padded, prompt_len + pad, mx.random.key(0),
                                                         prompt_pad=[pad, 0])[0])
    loss, grads = fn()
    assert mx.isfinite(loss).item()
    assert all(mx.isfinite(g).all().item() for _, g in tree_flatten(grads))


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
    saved = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert saved["fine_tune_type"] == "lora" and saved["num_layers"] == len(model.layers)  # mlx-lm's schema
    assert saved["lora_parameters"]["rank"] == 4 and saved["lora_parameters"]["keys"] == config["modules"]

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

    # The same sums in another order: fp32 rounding only, relative to the largest logit (about 10); 1e-5 of
    # each logit's own size was too tight for small ones (2.3e-5 off with one draw of the adapters).
    fuse_lora(fresh)
    assert mx.abs(logits(fresh) - adapted).max().item() <= 1e-5 * mx.abs(adapted).max().item()


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


def test_finetune_refuses_an_example_longer_than_the_context(tmp_path):
    """An answer longer than the toy's context (one token per character or so) does not fit, and training on it
    would run the model past the positions it knows. Nothing is written."""
    context = json.loads((ROOT / "mlx_diffusiongemma/toy_model/config.json").read_text())["text_config"][
        "max_position_embeddings"]
    data = tmp_path / "data.jsonl"
    long = {"prompt": "sort: 3 1 2", "completion": "1 2 3 " * (context // 4)}
    data.write_text(json.dumps({"prompt": "sort: 2 1", "completion": "1 2"}) + "\n" + json.dumps(long) + "\n")
    result = _cli("finetune", "--model", "toy", "--data", data, "--iters", 1, "--adapter-path", tmp_path / "ad")
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "line 2" in lines[0] and f"context of {context}" in lines[0], result.stderr
    assert not (tmp_path / "ad").exists()


def test_finetune_end_to_end(ckpt, data_file, tmp_path):
    out = tmp_path / "adapters"
    result = _cli("finetune", "--model", ckpt, "--data", data_file, "--iters", 3, "--steps-per-report", 1,
                  "--learning-rate", 1e-3, "--adapter-path", out, "--seed", 3, "--lora-experts",
                  "--save-every", 2, "--val-data", data_file, "--val-every", 2)
    assert result.returncode == 0, result.stderr
    assert "iter 3: loss" in result.stderr and "tokens/s" in result.stderr
    val = [line for line in result.stderr.splitlines() if "val loss" in line]
    assert [line.split(":")[0] for line in val] == ["iter 0", "iter 2", "iter 3"], result.stderr
    assert (out / "adapters.safetensors").exists() and (out / "adapter_config.json").exists()
    # --save-every 2 left the iteration-2 state beside the final one.
    at_2, final = mx.load(str(out / "0000002_adapters.safetensors")), mx.load(str(out / "adapters.safetensors"))
    assert set(at_2) == set(final) and any(k.startswith("model.decoder.layers.0.experts.") for k in final)
    assert not all(mx.array_equal(at_2[k], final[k]) for k in final)
    model, _ = load(ckpt)
    load_adapters(model, out)  # loads strictly into a fresh model
    # generate applies them: the adapted model's text differs from the base's under the same seed.
    args = ("generate", "--model", ckpt, "--prompt", "2+2?", "--max-tokens", 8, "--seed", 1, "--quiet")
    base, adapted = _cli(*args), _cli(*args, "--adapter-path", out)
    assert base.returncode == 0 and adapted.returncode == 0, adapted.stderr
    assert adapted.stdout != base.stdout
    missing = _cli(*args, "--adapter-path", tmp_path / "absent")
    assert missing.returncode == 1 and missing.stderr.count("\n") == 1 and "adapters" in missing.stderr


# --- validation, resume, full fine-tuning ---------------------------------------------------------------------


def _canvas_logits(model, ids, prompt_len):
    cache = model.make_cache()
    model.encode(mx.array(ids[:prompt_len])[None], cache)
    return model.decode(mx.array(ids[prompt_len : prompt_len + 8])[None], cache)


def test_validation_loss_uses_fixed_noise_and_is_reported(ckpt, example):
    model, _ = load(ckpt)
    before = validation_loss(model, [example] * 2)
    assert validation_loss(model, [example] * 2) == before  # the same noise every time
    mx.random.seed(0)
    apply_lora(model, rank=8)
    lines, saved = [], []
    train(model, [example], iters=5, learning_rate=1e-3, val_examples=[example] * 2, val_every=2,
          save_every=2, save=saved.append, log=lines.append)
    val = [(line.split(":")[0], float(line.rsplit(" ", 1)[1])) for line in lines if "val loss" in line]
    assert [it for it, _ in val] == ["iter 0", "iter 2", "iter 4", "iter 5"]
    assert val[0][1] == pytest.approx(before, abs=1e-4)  # LoRA B starts at zero: the base model's loss
    assert val[-1][1] < val[0][1] and validation_loss(model, [example] * 2) == pytest.approx(val[-1][1], abs=1e-4)
    assert saved == [2, 4]  # the last iteration is the caller's final save


def test_resume_continues_from_saved_adapters(ckpt, data_file, tmp_path):
    out = tmp_path / "ad"
    common = dict(iters=2, adapter_path=str(out), report_every=1, save_every=100)
    run_finetune(str(ckpt), str(data_file), learning_rate=1e-3, **common)
    first = mx.load(str(out / "adapters.safetensors"))
    assert max(mx.abs(v).max().item() for k, v in first.items() if k.endswith("lora_b")) > 1e-4
    # A tiny learning rate: resumed adapters stay next to the saved ones (a fresh start would put B near 0).
    run_finetune(str(ckpt), str(data_file), learning_rate=1e-7, resume=True, **common)
    resumed = mx.load(str(out / "adapters.safetensors"))
    assert set(resumed) == set(first)
    assert max(mx.abs(resumed[k] - first[k]).max().item() for k in first) < 1e-5
    assert not all(mx.array_equal(resumed[k], first[k]) for k in first)
    with pytest.raises(UsageError, match="--lora-rank 4 differs"):
        run_finetune(str(ckpt), str(data_file), resume=True, lora_rank=4, **common)
    with pytest.raises(UsageError, match="--resume needs adapters"):
        run_finetune(str(ckpt), str(data_file), resume=True, **{**common, "adapter_path": str(tmp_path / "none")})


def test_full_finetune_writes_a_loadable_checkpoint(ckpt, data_file, example, tmp_path):
    out = tmp_path / "full"
    run_finetune(str(ckpt), str(data_file), full=True, save_path=str(out), iters=3, learning_rate=1e-3)
    base, _ = load(ckpt)
    tuned, tokenizer = load(out)
    assert tokenizer.encode("hi there") == load(ckpt)[1].encode("hi there")
    for name in ("config.json", "generation_config.json", "tokenizer.json"):
        assert (out / name).read_text() == (ckpt / name).read_text()
    old, new = dict(tree_flatten(base.parameters())), dict(tree_flatten(tuned.parameters()))
    assert set(old) == set(new)
    # Every kind of weight trained, the router's projection too (through the routing weights).
    for key in ("model.decoder.layers.0.router.proj.weight", "model.decoder.layers.0.experts.gate_up_proj.weight",
                "model.decoder.layers.2.self_attn.q_proj.weight", "model.decoder.norm.weight"):
        assert not mx.array_equal(old[key], new[key]), key
    ids, prompt_len = example
    assert not mx.allclose(_canvas_logits(base, ids, prompt_len), _canvas_logits(tuned, ids, prompt_len))
    assert [p.name for p in tmp_path.iterdir()] == ["full"]  # no temporary folder left behind
    with pytest.raises(UsageError, match="already exists"):
        run_finetune(str(ckpt), str(data_file), full=True, save_path=str(out), iters=1)
    with pytest.raises(UsageError, match="--full needs --save-path"):
        run_finetune(str(ckpt), str(data_file), full=True, iters=1)
    with pytest.raises(UsageError, match="takes no --resume"):
        run_finetune(str(ckpt), str(data_file), full=True, resume=True, save_path=str(tmp_path / "x"))


# --- quantized bases, expert LoRA, fuse, bench ---------------------------------------------------------------


def test_qlora_trains_on_a_quantized_base(qckpt, data_file, tmp_path):
    import mlx.nn as nn

    model, tokenizer = load(qckpt)
    ids, prompt_len = example = tokenize(tokenizer, MESSAGES)
    assert isinstance(model.layers[0].self_attn.q_proj, nn.QuantizedLinear)
    frozen = dict(tree_flatten(model.parameters()))
    mx.random.seed(0)
    apply_lora(model, rank=8, modules=TARGETS + EXPERT_TARGETS)
    assert isinstance(model.layers[0].experts.gate_up_proj, LoRASwitchLinear)
    assert all("lora_" in k for k, _ in tree_flatten(model.trainable_parameters()))
    before = validation_loss(model, [example] * 2)
    train(model, [example], iters=15, learning_rate=1e-3, log=lambda _: None)
    after = validation_loss(model, [example] * 2)
    assert after < 0.7 * before, (before, after)
    q = model.layers[0].self_attn.q_proj.linear
    assert mx.array_equal(q.weight, frozen["model.decoder.layers.0.self_attn.q_proj.weight"])  # base untouched
    with pytest.raises(UsageError, match="quantized"):
        run_finetune(str(qckpt), str(data_file), full=True, save_path=str(tmp_path / "f"), iters=1)


def test_expert_lora_in_half_precision_on_cpu():
    """MLX's CPU gather_mm is float32-only: the CPU backend's expert linear computes half-precision inputs in
    float32, and mlx-lm's `LoRASwitchLinear` over it (float32 low-rank factors) runs unchanged."""
    from mlx_lm.models.switch_layers import SwitchLinear

    from mlx_diffusiongemma.backend import Float32SwitchLinear, prepare_model

    mx.random.seed(3)
    base = SwitchLinear(16, 8, 4, bias=False)
    base.set_dtype(mx.bfloat16)
    lora = LoRASwitchLinear.from_base(base, r=2, scale=2.0)
    lora.lora_b = mx.random.normal(lora.lora_b.shape) * 0.3
    prepare_model(lora, mx.cpu)
    assert type(lora.linear) is Float32SwitchLinear
    x = mx.random.normal((6, 1, 1, 16)).astype(mx.bfloat16)
    idx = mx.array([[0], [1], [2], [3], [1], [0]])
    with mx.stream(mx.cpu):
        got = lora(x, idx).astype(mx.float32)
        plain = base(x, idx).astype(mx.float32)
    merged = base.weight.astype(mx.float32) + 2.0 * lora.lora_b @ lora.lora_a  # (E, out, in)
    want = (x.astype(mx.float32) @ merged[idx[:, 0]].swapaxes(-1, -2)[:, None])
    assert mx.allclose(got, want, rtol=2e-2, atol=2e-2)
    assert mx.abs(got - plain).max().item() > 0.1  # the low-rank term is there


def _random_adapters(model, modules, path):
    mx.random.seed(1)
    config = apply_lora(model, rank=4, scale=2.0, modules=modules)
    b = [(k, mx.random.normal(v.shape) * 0.05) for k, v in tree_flatten(model.trainable_parameters())
         if k.endswith("lora_b")]  # B starts at zero: make the adapters change the output
    model.update(tree_unflatten(b))
    save_adapters(model, path, config)


def test_fuse_command_round_trip(ckpt, example, tmp_path):
    ids, prompt_len = example
    model, _ = load(ckpt)
    _random_adapters(model, TARGETS + EXPERT_TARGETS, tmp_path / "ad")
    adapted = _canvas_logits(model, ids, prompt_len)
    fuse_lora(model)
    in_memory = _canvas_logits(model, ids, prompt_len)
    out = tmp_path / "fused"
    result = _cli("fuse", "--model", ckpt, "--adapter-path", tmp_path / "ad", "--save-path", out)
    assert result.returncode == 0, result.stderr
    fused, _ = load(out)
    assert all("lora" not in k for k, _ in tree_flatten(fused.parameters()))
    logits = _canvas_logits(fused, ids, prompt_len)
    assert mx.array_equal(logits, in_memory)  # saving and loading fp32 is exact
    # Against the unfused adapters: fp32 rounding of the reordered sums only (logits reach about 15).
    assert mx.abs(logits - adapted).max().item() <= 1e-5 * mx.abs(adapted).max().item()
    assert mx.abs(_canvas_logits(load(ckpt)[0], ids, prompt_len) - adapted).max().item() > 1.0
    again = _cli("fuse", "--model", ckpt, "--adapter-path", tmp_path / "ad", "--save-path", out)
    assert again.returncode == 1 and again.stderr.count("\n") == 1 and "already exists" in again.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ad", "fused"]


def test_fuse_requantizes_like_the_base(qckpt, tmp_path):
    from mlx_diffusiongemma.fuse import fuse

    model, tokenizer = load(qckpt)
    ids, prompt_len = tokenize(tokenizer, MESSAGES)
    base = _canvas_logits(model, ids, prompt_len)
    _random_adapters(model, TARGETS + EXPERT_TARGETS, tmp_path / "ad")
    adapted = _canvas_logits(model, ids, prompt_len)
    out = fuse(qckpt, tmp_path / "ad", tmp_path / "q", dequantize=False)
    flat = fuse(qckpt, tmp_path / "ad", tmp_path / "flat", dequantize=True)
    config = json.loads((qckpt / "config.json").read_text())
    assert json.loads((out / "config.json").read_text())["quantization"] == config["quantization"]
    assert "quantization" not in json.loads((flat / "config.json").read_text())
    q, dq = mx.load(str(out / "model.safetensors")), mx.load(str(flat / "model.safetensors"))
    src = mx.load(str(qckpt / "model-00001-of-00001.safetensors"))
    assert {k for k in q if k.endswith(".scales")} == {k for k in src if k.endswith(".scales")}
    assert not any(k.endswith(".scales") for k in dq)
    # Each fused module is the dequantized fusion re-quantized with the base module's own bits and group size.
    for module in ("model.decoder.layers.0.self_attn.q_proj", "model.decoder.layers.1.experts.gate_up_proj"):
        setting = config["quantization"][module]
        w, scales, biases = mx.quantize(dq[f"{module}.weight"], setting["group_size"], setting["bits"])
        assert mx.array_equal(q[f"{module}.weight"], w) and mx.array_equal(q[f"{module}.scales"], scales)
        assert not mx.array_equal(q[f"{module}.weight"], src[f"{module}.weight"])
    fused = _canvas_logits(load(out)[0], ids, prompt_len)
    rms = lambda a: mx.sqrt((a * a).mean()).item()  # noqa: E731
    assert rms(fused - adapted) < 0.5 * rms(base - adapted)  # the merge is there, up to 4-bit rounding
    assert mx.allclose(_canvas_logits(load(flat)[0], ids, prompt_len), adapted, rtol=1e-4, atol=1e-4)


def test_bench_with_adapters(ckpt, tmp_path):
    model, _ = load(ckpt)
    _random_adapters(model, TARGETS, tmp_path / "ad")
    args = ("bench", "--model", ckpt, "--steps", 2, "--canvases", 1, "--repeat", 1, "--prompt-tokens", 8, "--json")
    result = _cli(*args, "--adapter-path", tmp_path / "ad")
    assert result.returncode == 0, result.stderr
    assert f"LoRA rank 4 from {tmp_path / 'ad'}" in json.loads(result.stdout)["label"]
    missing = _cli(*args, "--adapter-path", tmp_path / "none")
    assert missing.returncode == 1 and missing.stderr.count("\n") == 1 and "adapters" in missing.stderr
    random = _cli("bench", "--random", "tiny", "--adapter-path", tmp_path / "ad")
    assert random.returncode == 1 and random.stderr.count("\n") == 1 and "--model" in random.stderr
