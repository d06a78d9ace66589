"""`mlx_diffusiongemma.convert`: our converter's output, mlx-vlm's converter output, and the failure paths.

Quality figures are relative RMS errors of the decoder logits against transformers fp32 (the unquantized
model): ||logits - reference|| / ||reference||, over a batch of canvases with and without self-conditioning.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
import torch
from transformers import DynamicCache

from checkpoints import build_checkpoint, decoder_logits_pair, load_reference
from figures import record
from mlx_diffusiongemma.convert import ConversionOptionError, convert
from mlx_diffusiongemma.errors import CheckpointError
from mlx_diffusiongemma.loader import load, load_model
from mlx_diffusiongemma.model import Model

# Every linear input dim a multiple of 64, so each module quantizes at group 32 and 64.
GEOMETRY = dict(hidden_size=64, intermediate_size=64, moe_intermediate_size=64, head_dim=16, global_head_dim=32)
VISION_PREFIXES = ("model.encoder.vision_tower.", "model.encoder.embed_vision.")
BATCH, PROMPT = 16, 20


def _mlx_vlm_convert():
    try:
        from mlx_vlm.convert import convert as vlm_convert
    except ImportError:
        if os.environ.get("MLX_DIFFUSIONGEMMA_SKIP_MLX_VLM"):
            pytest.skip("mlx-vlm is not installed")
        pytest.fail("these tests need mlx-vlm: pip install mlx-vlm==0.7.10 (or set MLX_DIFFUSIONGEMMA_SKIP_MLX_VLM=1)")
    return vlm_convert


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    """Hub layout (which mlx-vlm's converter needs), 3 layers, fp32, the tiny tokenizer (vocab 512)."""
    return build_checkpoint(
        tmp_path_factory.mktemp("src"), layout="hub", seed=5, num_layers=3, canvas_length=32, **GEOMETRY
    )


@pytest.fixture(scope="module")
def inputs(source):
    rng = np.random.default_rng(7)
    V, C = 512, 32
    prompt = rng.integers(0, V, (BATCH, PROMPT))
    canvas = rng.integers(0, V, (BATCH, C))
    sc = (rng.standard_normal((BATCH, C, V)) * 4).astype(np.float32)
    return prompt, canvas, sc


@pytest.fixture(scope="module")
def reference_logits(source, inputs):
    """transformers fp32 decoder logits: (no self-conditioning, with self-conditioning)."""
    ref = load_reference(source)
    prompt, canvas, sc = inputs
    out = []
    for kw in ({}, {"self_conditioning_logits": torch.tensor(sc)}):
        cache = DynamicCache(config=ref.config.text_config)
        with torch.no_grad():
            ref.model.encoder(input_ids=torch.tensor(prompt), cache=cache)
            out.append(ref(cache=cache, decoder_input_ids=torch.tensor(canvas), **kw).logits.float().numpy())
    return out


def _logits(model, inputs):
    prompt, canvas, sc = inputs
    out = []
    for s in (None, mx.array(sc)):
        cache = model.make_cache()
        model.encode(mx.array(prompt), cache)
        out.append(np.array(model.decode(mx.array(canvas), cache, s)))
    return out


def _rel_rms(got, expected) -> float:
    num = sum(float(((g - e) ** 2).sum()) for g, e in zip(got, expected))
    den = sum(float((e**2).sum()) for e in expected)
    return (num / den) ** 0.5


def _tensors(folder: Path) -> dict[str, mx.array]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(mx.load(str(f)))
    return out


def _leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if ".tmp-" in p.name or ".old-" in p.name)


# --- our converter ----------------------------------------------------------------------------------------

def test_bf16_conversion(source, inputs, reference_logits, tmp_path):
    out = convert(source, tmp_path / "bf16", dtype="bfloat16")
    files = sorted(p.name for p in out.iterdir())
    assert "model-00001-of-00001.safetensors" in files and "model.safetensors.index.json" in files
    assert {"tokenizer.json", "tokenizer_config.json", "generation_config.json", "config.json"} <= set(files)
    assert _leftovers(tmp_path) == []
    config = json.loads((out / "config.json").read_text())
    assert config["text_only"] is True and "quantization" not in config and config["dtype"] == "bfloat16"
    tensors = _tensors(out)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(tensors)
    # Exactly the source's text tensors, rounded to bf16 (experts named `.weight`, vision dropped).
    expected = Model.sanitize(_tensors(source))
    assert set(tensors) == set(expected) and not any(k.startswith(VISION_PREFIXES) for k in tensors)
    for key, value in tensors.items():
        assert value.dtype == mx.bfloat16 and mx.array_equal(value, expected[key].astype(mx.bfloat16)).item(), key

    model, tokenizer = load(out)
    assert tokenizer.encode("Hello") and model.generation_config["max_denoising_steps"] == 48
    got = _logits(model, inputs)
    agree = float(np.mean([(g.argmax(-1) == e.argmax(-1)).mean() for g, e in zip(got, reference_logits)]))
    # Figures only: a random tiny model is chaotic in bf16 (transformers' own bf16 eager and sdpa paths agree
    # on only ~85-90% of argmaxes here), so this is the floor the quantized figures sit on.
    record("convert bf16 (quantization geometry): argmax agreement with transformers fp32", round(agree, 4))
    record("convert bf16 (quantization geometry): logits relative RMS error vs fp32", f"{_rel_rms(got, reference_logits):.4f}")


def test_bf16_conversion_argmax_agreement(tmp_path):
    """A converted bf16 folder against transformers bf16 on the 3-layer parity config (top-2 of 4 experts),
    whose bf16 noise floor is under 1% (see test_model_parity.test_bf16_argmax_agreement)."""
    src = build_checkpoint(tmp_path / "src", seed=5, num_layers=3, canvas_length=32, tokenizer=False)
    ours = load_model(convert(src, tmp_path / "bf16", dtype="bfloat16"))
    ref = load_reference(src, "bfloat16")
    rng = np.random.default_rng(4)
    V, C = ours.args.vocab_size, ours.args.canvas_length
    prompt, canvas = rng.integers(0, V, (16, 20)), rng.integers(0, V, (16, C))
    expected, got = decoder_logits_pair(ref, ours, prompt, canvas)
    agree = float((expected.argmax(-1) == got.argmax(-1)).mean())
    record("convert bf16: decoder argmax agreement with transformers bf16 (512 positions)", agree)
    assert agree >= 0.99


QUANT_CASES = {
    "mixed 4-bit": dict(q_bits=4),
    "mixed 6-bit": dict(q_bits=6),
    "mixed 8-bit": dict(q_bits=8),
    "uniform 4-bit": dict(q_bits=4, q_recipe="uniform"),
    "mixed mxfp4": dict(q_bits=4, q_mode="mxfp4", q_group_size=32),
    "uniform mxfp4": dict(q_bits=4, q_mode="mxfp4", q_group_size=32, q_recipe="uniform"),
}


QUANT_BOUNDS = {"mixed 4-bit": 0.65, "mixed 6-bit": 0.5, "mixed 8-bit": 0.5, "uniform 4-bit": 1.2, "mixed mxfp4": 0.7, "uniform mxfp4": 1.3}


@pytest.mark.parametrize("case", list(QUANT_CASES))
def test_quantized_conversion(case, source, inputs, reference_logits, tmp_path):
    kw = QUANT_CASES[case]
    out = convert(source, tmp_path / "q", dtype="bfloat16", quantize=True, **kw)
    config = json.loads((out / "config.json").read_text())
    q = config["quantization"]
    assert config["quantization_config"] == q
    bits, mode = kw["q_bits"], kw.get("q_mode", "affine")
    assert (q["bits"], q["mode"], q["group_size"]) == (bits, mode, kw.get("q_group_size", 64))
    tensors = _tensors(out)
    entries = {k: v for k, v in q.items() if isinstance(v, dict)}
    for module, entry in entries.items():
        assert set(entry) == {"group_size", "bits", "mode"}
        assert f"{module}.scales" in tensors and tensors[f"{module}.weight"].dtype == mx.uint32
    # Every quantized tensor is listed; norms, scales and layer scalars never are.
    assert {k[: -len(".scales")] for k in tensors if k.endswith(".scales") and "router.scale" not in k} == set(entries)
    assert not any("norm" in m or "layer_scalar" in m for m in entries)
    high = entries["model.decoder.layers.0.self_attn.q_proj"]
    low = entries["model.decoder.layers.0.experts.gate_up_proj"]
    assert entries["model.decoder.self_conditioning.up_proj"] == low
    assert low == {"group_size": kw.get("q_group_size", 64), "bits": bits, "mode": mode}
    if kw.get("q_recipe") == "uniform":
        assert high == low and entries["model.decoder.embed_tokens"] == low
    else:
        assert high == entries["model.decoder.embed_tokens"] == {"group_size": 64, "bits": 8, "mode": "affine"}

    model = load_model(out)
    err = _rel_rms(_logits(model, inputs), reference_logits)
    record(f"convert {case} (ours): logits relative RMS error vs fp32", f"{err:.4f}")
    # A random 3-layer model amplifies weight noise (bf16 rounding alone gives ~0.20 here; two unrelated
    # models give ~1.4), so these bounds only catch a broken conversion; the mlx-vlm tests pin exactness.
    assert err < QUANT_BOUNDS[case]


def test_indivisible_dims_stay_unquantized(tiny_ckpt, tmp_path):
    """The per_layer layout with hidden 32 / expert width 8: at group 64 only inputs of 64 (the full layer's
    o_proj) quantize; everything else stays float and is not listed in the config."""
    out = convert(tiny_ckpt, tmp_path / "q", quantize=True)
    config = json.loads((out / "config.json").read_text())
    assert "per_layer_config" in config["text_config"]
    entries = {k for k, v in config["quantization"].items() if isinstance(v, dict)}
    tensors = _tensors(out)
    quantized = {k[: -len(".scales")] for k in tensors if k.endswith(".scales")}
    assert entries == quantized == {"model.decoder.layers.5.self_attn.o_proj"}
    assert tensors["model.decoder.layers.0.experts.down_proj.weight"].dtype == mx.float32
    model = load_model(out)
    assert isinstance(model.model.decoder.layers[5].self_attn.o_proj, nn.QuantizedLinear)
    assert not isinstance(model.model.decoder.layers[0].self_attn.o_proj, nn.QuantizedLinear)
    # group 32: the hidden-32 inputs quantize too, the width-8 expert down projection still cannot.
    out32 = convert(tiny_ckpt, tmp_path / "q32", quantize=True, q_group_size=32, q_recipe="uniform")
    q32 = json.loads((out32 / "config.json").read_text())["quantization"]
    assert "model.decoder.layers.0.experts.gate_up_proj" in q32
    assert "model.decoder.layers.0.experts.down_proj" not in q32
    cache = load_model(out32).make_cache()
    assert cache is not None


@pytest.mark.parametrize("chunk", [1000, 200])
def test_chunked_conversion_is_exact(chunk, source, tmp_path, monkeypatch):
    """Tensors are read, cast and quantized a bounded number of rows at a time and written in place, and
    unchanged ones are copied file to file: tiny chunks (200 bytes is under one 256-byte row), without the
    in-kernel copy or preadv, give exactly the tensors of one chunk per tensor, and the same files."""
    import importlib

    module = importlib.import_module("mlx_diffusiongemma.convert.shards")
    runs = {
        "fp32 copy": dict(),
        "bf16 cast": dict(dtype="bfloat16"),
        "mixed 4-bit": dict(dtype="bfloat16", quantize=True),
        "uniform mxfp4 fp32": dict(quantize=True, q_mode="mxfp4", q_group_size=32, q_recipe="uniform"),
    }
    whole = {name: convert(source, tmp_path / f"whole-{i}", **kw) for i, (name, kw) in enumerate(runs.items())}
    monkeypatch.setattr(module, "CHUNK_BYTES", chunk)
    monkeypatch.delattr(os, "copy_file_range", raising=False)
    if chunk < 256:
        monkeypatch.delattr(os, "preadv", raising=False)
    for i, (name, kw) in enumerate(runs.items()):
        out = convert(source, tmp_path / f"chunked-{i}", **kw)
        expected, got = _tensors(whole[name]), _tensors(out)
        assert set(got) == set(expected), name
        for key, value in got.items():
            assert value.dtype == expected[key].dtype and mx.array_equal(value, expected[key]).item(), (name, key)
        for f in whole[name].glob("*.safetensors"):
            assert (out / f.name).read_bytes() == f.read_bytes(), (name, f.name)


def test_output_is_valid_safetensors(source, tmp_path, monkeypatch):
    """Shards written in place pass the safetensors library's own checks (contiguous offsets, sizes)."""
    from safetensors import safe_open

    monkeypatch.setenv("MLX_DIFFUSIONGEMMA_CONVERT_SHARD_BYTES", "100000")
    out = convert(source, tmp_path / "q", dtype="bfloat16", quantize=True)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    seen = {}
    for shard in sorted(out.glob("*.safetensors")):
        assert (8 + int.from_bytes(shard.read_bytes()[:8], "little")) % 8 == 0  # data 8-byte aligned
        with safe_open(str(shard), "pt") as f:
            assert f.metadata() == {"format": "mlx"}
            seen.update({k: shard.name for k in f.keys()})
    assert seen == index["weight_map"]
    assert index["metadata"]["total_size"] == sum(v.nbytes for v in _tensors(out).values())


def test_sharded_output_and_progress(source, tmp_path, monkeypatch):
    cap = 100_000
    monkeypatch.setenv("MLX_DIFFUSIONGEMMA_CONVERT_SHARD_BYTES", str(cap))
    calls = []
    out = convert(source, tmp_path / "out", progress=lambda d, t: calls.append((d, t)))
    shards = sorted(out.glob("*.safetensors"))
    assert len(shards) > 2 and shards[0].name == f"model-00001-of-{len(shards):05d}.safetensors"
    for shard in shards:  # under the cap, or a single tensor larger than the cap on its own
        tensors = mx.load(str(shard))
        assert sum(v.nbytes for v in tensors.values()) <= cap or len(tensors) == 1, shard.name
    assert calls[-1][0] == calls[-1][1] and [d for d, _ in calls] == list(range(1, calls[-1][1] + 1))
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {s.name for s in shards}
    assert load_model(out) is not None


# --- mlx-vlm's converter output ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def vlm_folders(source, tmp_path_factory):
    vlm_convert = _mlx_vlm_convert()
    root = tmp_path_factory.mktemp("vlm")
    out = {}
    for name, kw in OURS_FOR_VLM.items():  # the same settings on both sides
        vlm_convert(str(source), str(root / name.replace("-", "")), dtype="bfloat16", **kw)
        out[name] = root / name.replace("-", "")
    return out


OURS_FOR_VLM = {
    "bf16": dict(),
    "4-bit": dict(quantize=True),
    "6-bit": dict(quantize=True, q_bits=6),
    "8-bit": dict(quantize=True, q_bits=8),
    "mxfp4": dict(quantize=True, q_mode="mxfp4", q_group_size=32),
}


@pytest.mark.parametrize("name", list(OURS_FOR_VLM))
def test_mlx_vlm_output_loads_and_matches(name, vlm_folders, source, inputs, reference_logits, tmp_path):
    vlm = vlm_folders[name]
    assert any(k.startswith(VISION_PREFIXES) for k in _tensors(vlm))  # the loader must skip these
    vlm_model, tokenizer = load(vlm)  # tokenizer, embedded generation_config and all
    assert tokenizer.encode("Hello") and model_generation_ok(vlm_model)
    ours = convert(source, tmp_path / "ours", dtype="bfloat16", **OURS_FOR_VLM[name])
    err_vlm = _rel_rms(_logits(vlm_model, inputs), reference_logits)
    err_ours = _rel_rms(_logits(load_model(ours), inputs), reference_logits)
    record(f"{name} logits relative RMS error vs fp32: ours / mlx-vlm", f"{err_ours:.4f} / {err_vlm:.4f}")
    assert err_ours <= err_vlm * 1.001 + 1e-6
    if name != "bf16":
        # Same modules quantized, at the same bits/group/mode (a mode-less mlx-vlm entry means affine).
        qv = json.loads((vlm / "config.json").read_text())["quantization"]
        qo = json.loads((ours / "config.json").read_text())["quantization"]
        tv, to = _tensors(vlm), _tensors(ours)
        quantized_v = {k[:-7] for k in tv if k.endswith(".scales") and not k.startswith(VISION_PREFIXES)}
        quantized_o = {k[:-7] for k in to if k.endswith(".scales")}
        assert quantized_v == quantized_o
        for module in quantized_o:
            entry = qv.get(module)
            expected = {**qv, "mode": "affine", **entry} if isinstance(entry, dict) else qv
            assert qo[module] == {k: expected[k] for k in ("group_size", "bits", "mode")}, module
            for suffix in ("weight", "scales", "biases"):
                key = f"{module}.{suffix}"
                assert (key in tv) == (key in to), key
                if key in tv:
                    assert mx.array_equal(tv[key], to[key]).item(), key


def test_mlx_vlm_embedded_generation_config(vlm_folders, tmp_path):
    """Without generation_config.json, the copy mlx-vlm embeds in config.json is used."""
    folder = _copy(vlm_folders["4-bit"], tmp_path / "vlm")
    (folder / "generation_config.json").unlink()
    assert json.loads((folder / "config.json").read_text())["generation_config"]["max_denoising_steps"] == 48
    assert model_generation_ok(load_model(folder, lazy=True))


def test_mlx_vlm_loads_our_output(source, tmp_path):
    """Interoperability: mlx-vlm's loader accepts our text-only 4-bit folder (vision_config is null)."""
    _mlx_vlm_convert()
    from mlx_vlm import load as vlm_load

    out = convert(source, tmp_path / "q4", dtype="bfloat16", quantize=True)
    model, _ = vlm_load(str(out))
    rng = np.random.default_rng(0)
    ids, canvas = mx.array(rng.integers(0, 512, (1, 12))), mx.array(rng.integers(0, 512, (1, 32)))
    logits = model(input_ids=ids, cache=model.make_cache(), canvas_ids=canvas).logits
    assert logits.shape == (1, 32, 512) and mx.all(mx.isfinite(logits)).item()


def model_generation_ok(model) -> bool:
    g = model.generation_config
    return g.get("max_denoising_steps") == 48 and g.get("t_min") == 0.4


def test_same_tensors_as_mlx_vlm_bf16(vlm_folders, source, tmp_path):
    """Documented differences: mlx-vlm keeps the vision tower (we drop it); every text tensor is identical."""
    ours = _tensors(convert(source, tmp_path / "ours", dtype="bfloat16"))
    theirs = _tensors(vlm_folders["bf16"])
    vision = {k for k in theirs if k.startswith(VISION_PREFIXES)}
    assert vision and set(theirs) - vision == set(ours)
    for key, value in ours.items():
        assert value.dtype == theirs[key].dtype and mx.array_equal(value, theirs[key]).item(), key


# --- failures ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def sharded_source(source, tmp_path_factory) -> Path:
    """The same checkpoint split into 4 safetensors shards with an index."""
    folder = tmp_path_factory.mktemp("sharded")
    for f in source.iterdir():
        if f.is_file() and not f.name.startswith("model"):
            (folder / f.name).write_bytes(f.read_bytes())
    tensors = _tensors(source)
    keys = sorted(tensors)
    n = 4
    weight_map = {}
    for i in range(n):
        name = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        part = {k: tensors[k] for k in keys[i::n]}
        mx.save_safetensors(str(folder / name), part, metadata={"format": "pt"})
        weight_map.update({k: name for k in part})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return folder


def _copy(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def test_sharded_source_converts(sharded_source, source, tmp_path):
    a = _tensors(convert(sharded_source, tmp_path / "a", dtype="bfloat16"))
    b = _tensors(convert(source, tmp_path / "b", dtype="bfloat16"))
    assert set(a) == set(b) and all(mx.array_equal(a[k], b[k]).item() for k in a)


def test_missing_shard(sharded_source, tmp_path):
    src = _copy(sharded_source, tmp_path / "src")
    (src / "model-00003-of-00004.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model-00003-of-00004.safetensors"):
        convert(src, tmp_path / "out")
    assert not (tmp_path / "out").exists() and _leftovers(tmp_path) == []


def test_truncated_shard(sharded_source, tmp_path):
    src = _copy(sharded_source, tmp_path / "src")
    shard = src / "model-00004-of-00004.safetensors"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        convert(src, tmp_path / "out")
    assert not (tmp_path / "out").exists() and _leftovers(tmp_path) == []


def test_output_exists(source, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(CheckpointError, match="already exists") as e:
        convert(source, out)
    assert "\n" not in str(e.value) and (out / "keep.txt").exists()
    assert "pass --force to replace it" in str(e.value) and "force=True" not in str(e.value)  # CLI terms
    convert(source, out, force=True)
    assert not (out / "keep.txt").exists() and (out / "config.json").exists()
    assert _leftovers(tmp_path) == []


def test_folder_without_safetensors(source, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text((source / "config.json").read_text())
    with pytest.raises(CheckpointError, match="no \\*.safetensors"):
        convert(src, tmp_path / "out")
    assert not (tmp_path / "out").exists() and _leftovers(tmp_path) == []


def test_invalid_options(source, tmp_path):
    with pytest.raises(ConversionOptionError, match="mxfp4"):
        convert(source, tmp_path / "o", quantize=True, q_mode="mxfp4", q_group_size=64)
    with pytest.raises(ConversionOptionError, match="dtype"):
        convert(source, tmp_path / "o", dtype="float64")
    assert list(tmp_path.iterdir()) == []


def _default_sigint() -> None:
    # A shell's background job starts with SIGINT ignored, and Python then never turns it into Ctrl-C.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _cli(*args, env=None, **kw):
    return subprocess.Popen(
        [sys.executable, "-m", "mlx_diffusiongemma", "convert", *map(str, args)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, preexec_fn=_default_sigint, **kw,
    )


@pytest.mark.parametrize("flags", [["--q-bits", "5"], ["--q-bits", "3"], ["--q-mode", "nvfp4"]])
def test_cli_rejects_bad_quantization_flags(flags, source, tmp_path):
    proc = _cli("--hf-path", source, "--mlx-path", tmp_path / "out", "-q", *flags)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode != 0
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert not (tmp_path / "out").exists()


def test_cli_converts(source, tmp_path):
    proc = _cli("--hf-path", source, "--mlx-path", tmp_path / "out", "-q", "--q-bits", "8", "--dtype", "bfloat16")
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert "conver" not in err  # no progress line when stderr is not a terminal
    assert json.loads((tmp_path / "out" / "config.json").read_text())["quantization"]["bits"] == 8


def test_sigint_leaves_nothing(sharded_source, tmp_path):
    env = dict(os.environ, MLX_DIFFUSIONGEMMA_CONVERT_DELAY="0.05", MLX_DIFFUSIONGEMMA_CONVERT_SHARD_BYTES="100000")
    parent = tmp_path / "outputs"
    parent.mkdir()
    proc = _cli("--hf-path", sharded_source, "--mlx-path", parent / "out", env=env)
    deadline = time.monotonic() + 120
    started = False
    while time.monotonic() < deadline and proc.poll() is None:
        tmp = [p for p in parent.iterdir() if ".tmp-" in p.name]
        if tmp and any(tmp[0].glob("*.safetensors")):  # the first output shard has been written
            started = True
            break
        time.sleep(0.02)
    assert started, "the conversion never got to its first shard"
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "Traceback" not in err, err
    assert list(parent.iterdir()) == []


def test_cli_help_lists_every_flag_fast():
    args = [sys.executable, "-X", "importtime", "-m", "mlx_diffusiongemma", "convert", "--help"]
    tic = time.perf_counter()
    result = subprocess.run(args, capture_output=True, text=True, timeout=60)
    elapsed = time.perf_counter() - tic
    assert result.returncode == 0, result.stderr
    for flag in ("--hf-path", "--mlx-path", "--dtype", "--quantize", "-q", "--q-bits", "--q-group-size",
                 "--q-mode", "--q-recipe", "--force"):
        assert flag in result.stdout, flag
    modules = {line.split("|")[-1].strip() for line in result.stderr.splitlines() if "|" in line}
    assert not {m for m in modules if m.split(".")[0] in ("mlx", "mlx_lm", "transformers", "torch", "numpy")}
    assert elapsed < 3.0
